"""A real CPU training process is killed with SIGKILL mid-run, then ``--auto_resume`` continues it.

One killed run (a module fixture) is copied for each test, which then resumes its copy: from the
newest state, and from an older one when the newest state or its network file is torn. Checkpoints are written every iteration so that the kill is likely to land during a write.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import tiny_training as tiny

REPO = tiny.REPO
LR, GAMMA, MILESTONES, EMA_DECAY = 2e-4, 0.5, (8, 16), 0.9
RESUMED_TOTAL = 20


def expected_lr(iteration: int) -> float:
    # BasicSR steps the scheduler from iteration 2 on, so iteration i runs at the rate the scheduler
    # has after i - 1 steps.
    return LR * GAMMA ** sum(m <= iteration - 1 for m in MILESTONES)


def logged(log: str):
    """(iteration, lr, l_pix) for every training line of a BasicSR log."""
    pattern = re.compile(r'iter:\s*(\d+), lr:\(([\d.e+-]+),\)\].*l_pix: ([\d.e+-]+)')
    return [(int(m[1]), float(m[2]), float(m[3])) for m in pattern.finditer(log)]


@pytest.fixture(scope='module')
def killed_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('killed')
    lmdbs = tiny.write_lmdbs(root, count=6, gt_side=48)
    name = tiny.unique_name('killed')
    opt = tiny.training_options(name, lmdbs['gt'], lmdbs['lq'], total_iter=60, save_freq=1, milestones=MILESTONES,
                                ema_decay=EMA_DECAY)
    exp = tiny.experiment_dir(name)
    process = subprocess.Popen([sys.executable, str(REPO / 'dvmsr_arch' / 'train.py'), '-opt',
                                str(tiny.write_options(root / 'opt.yml', opt))],
                               cwd=REPO, env=tiny.cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while not (exp / 'training_states' / '3.state').exists():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, 'no checkpoint within 90 s'
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    states = sorted(int(p.stem) for p in (exp / 'training_states').glob('*.state'))
    assert 3 <= states[-1] < 60, states  # killed mid-run, after at least three checkpoints
    yield {'name': name, 'opt': opt, 'root': root, 'newest': states[-1]}
    tiny.remove_experiment(name)


@pytest.fixture
def copy_of(killed_run, tmp_path):
    """A copy of the killed experiment under a new name, and a resume command for it."""
    name = tiny.unique_name('resumed')
    shutil.copytree(tiny.experiment_dir(killed_run['name']), tiny.experiment_dir(name))
    opt = dict(killed_run['opt'], name=name)
    opt_path = tiny.write_options(tmp_path / 'opt.yml', opt)

    def resume():
        return tiny.run_cli('train.py', opt_path, '--auto_resume', '--force_yml', f'train:total_iter={RESUMED_TOTAL}')

    yield tiny.experiment_dir(name), resume
    tiny.remove_experiment(name)


def load(path):
    return torch.load(path, map_location='cpu')


def test_every_file_left_by_the_kill_loads(killed_run):
    exp = tiny.experiment_dir(killed_run['name'])
    files = list((exp / 'training_states').glob('*.state')) + list((exp / 'models').glob('*.pth'))
    assert len(files) >= 6
    for path in files:
        load(path)  # atomic writes: a kill leaves whole files or none, never a torn one


def test_auto_resume_continues_iteration_lr_optimizer_and_ema(killed_run, copy_of):
    exp, resume = copy_of
    newest = killed_run['newest']
    before = load(exp / 'models' / f'net_g_{newest}.pth')
    old_log = next(exp.glob('train_*.log')).read_text()

    result = resume()
    assert result.returncode == 0, result.stderr[-3000:]
    new_log = max(exp.glob('train_*.log'), key=lambda p: p.stat().st_mtime).read_text()
    assert 'Resuming training from epoch: ' in new_log and f'iter: {newest}.' in new_log

    # Iterations go on from the state, at the rates the schedule gives, before the kill and after.
    resumed = logged(new_log)
    assert [i for i, _, _ in resumed] == list(range(newest + 1, RESUMED_TOTAL + 1))
    for iteration, lr, _ in logged(old_log) + resumed:
        assert lr == pytest.approx(expected_lr(iteration), rel=1e-3), iteration
    assert {lr for _, lr, _ in resumed} >= {expected_lr(RESUMED_TOTAL)}  # crossed a milestone after resuming

    # Adam's step count carried on: a fresh optimizer would count only the resumed iterations.
    final = load(exp / 'training_states' / f'{RESUMED_TOTAL}.state')
    assert final['iter'] == RESUMED_TOTAL
    steps = {float(s['step']) for s in final['optimizers'][0]['state'].values()}
    assert steps == {float(RESUMED_TOTAL)}

    # The EMA carried on from the saved EMA, not from a fresh copy of the weights:
    # ema(n+1) = d * ema(n) + (1 - d) * params(n+1), exactly as BasicSR updates it.
    after = load(exp / 'models' / f'net_g_{newest + 1}.pth')
    moved = 0
    for key, ema in before['params_ema'].items():
        expected = ema.clone().mul_(EMA_DECAY).add_(after['params'][key], alpha=1 - EMA_DECAY)
        torch.testing.assert_close(after['params_ema'][key], expected, rtol=1e-6, atol=1e-7, msg=key)
        moved += not torch.allclose(ema, before['params'][key], atol=1e-6)
    assert moved > 0  # EMA and weights differed at the kill, so the check above tells them apart


def test_torn_files_are_reported_and_skipped(killed_run, copy_of):
    """The newest state is truncated and the network file of the one before it too: resume from the
    third newest, say why, and leave every file whole again afterwards."""
    exp, resume = copy_of
    newest = killed_run['newest']
    state = exp / 'training_states' / f'{newest}.state'
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    net = exp / 'models' / f'net_g_{newest - 1}.pth'
    net.write_bytes(net.read_bytes()[:100])
    leftover = exp / 'training_states' / f'.{newest + 1}.state.abc123.tmp'  # as a kill mid-save leaves it
    leftover.write_bytes(b'partial')

    result = resume()
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'training state {state} is truncated or corrupt' in result.stdout
    assert f'belongs with net_g_{newest - 1}.pth, which is truncated or corrupt' in result.stdout
    new_log = max(exp.glob('train_*.log'), key=lambda p: p.stat().st_mtime).read_text()
    assert f'iter: {newest - 2}.' in new_log.split('Resuming training from epoch: ', 1)[1].splitlines()[0]
    assert logged(new_log)[0][0] == newest - 1
    assert load(state)['iter'] == newest  # rewritten whole by the resumed run
    assert 'params' in load(net)
    assert not leftover.exists()
