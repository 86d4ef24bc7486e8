"""Multi-process training through torchrun and BasicSR's own launcher, on the CPU with gloo.

The same code path runs with NCCL on GPUs (``docs/multi_gpu.md``); here two CPU processes prove that
the launcher works without CUDA, that the distillation teacher stays an unwrapped module on every
rank while the student (and the feature adapter) are synchronised by DDP, and that rank 0 alone
validates and writes checkpoints.
"""
import subprocess
import sys

import pytest
import torch

import tiny_training as tiny

REPO = tiny.REPO


def test_sampler_gives_each_rank_its_own_share_and_reshuffles_each_epoch():
    import dvmsr_arch  # noqa: F401
    from basicsr.data.data_sampler import EnlargedSampler

    data = list(range(12))
    shares = {}
    for epoch in (0, 1):
        for rank in (0, 1):
            sampler = EnlargedSampler(data, num_replicas=2, rank=rank, ratio=1)
            sampler.set_epoch(epoch)
            shares[epoch, rank] = list(sampler)
        assert sorted(shares[epoch, 0] + shares[epoch, 1]) == data  # disjoint and complete
    assert shares[0, 0] != shares[1, 0]


@pytest.fixture
def distillation_setup(tmp_path):
    """Deterministic data: 4 images exactly gt_size wide, no flips or rotations, so a batch of 4 on
    one process sees the same pixels as two ranks with batches of 2, and DDP's averaged gradient
    must reproduce the single-process run."""
    pairs = tiny.write_pairs(tmp_path / 'images', count=4, gt_side=32)
    lmdbs = {side: tiny.folder_to_lmdb(pairs[side], tmp_path / f'{side}.lmdb') for side in ('gt', 'lq')}
    val = tiny.write_pairs(tmp_path / 'val', count=1, gt_side=32, seed=3)
    # A wider teacher, distilled at the body: the student's features go through a 1x1 adapter that
    # DDP must keep in sync too.
    teacher_net = dict(tiny.TINY_NET, embed_dim=12)
    teacher = tiny.save_tiny_teacher(tmp_path / 'teacher.pth', teacher_net)
    names = []

    def options(prefix: str, batch: int):
        name = tiny.unique_name(prefix)
        names.append(name)
        opt = tiny.training_options(name, lmdbs['gt'], lmdbs['lq'], total_iter=4, save_freq=2, milestones=[3],
                                    batch=batch, val=val, model='DistillSRModel', teacher=teacher,
                                    teacher_net=teacher_net)
        opt['datasets']['train'].update({'use_hflip': False, 'use_rot': False})
        opt['train']['distill_position'] = 'body'
        return name, tiny.write_options(tmp_path / f'{prefix}.yml', opt)

    yield options
    for name in names:
        tiny.remove_experiment(name)


def logged_losses(log: str):
    return [line.split('l_pix: ')[1].split()[0] for line in log.splitlines() if 'l_pix: ' in line]


def test_torchrun_two_cpu_ranks_match_one_process_at_the_same_total_batch(distillation_setup):
    single_name, single_opt = distillation_setup('ddp_single', batch=4)
    result = tiny.run_cli('train.py', single_opt)
    assert result.returncode == 0, result.stderr[-3000:]

    ddp_name, ddp_opt = distillation_setup('ddp_two', batch=2)
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               str(REPO / 'dvmsr_arch' / 'train.py'), '-opt', str(ddp_opt), '--launcher', 'pytorch']
    result = subprocess.run(command, cwd=REPO, env=tiny.cli_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    exp = tiny.experiment_dir(ddp_name)
    logs = list(exp.glob('train_*.log'))
    assert len(logs) == 1  # rank 0 alone writes the log
    log = logs[0].read_text()
    assert 'World size (gpu number): 2' in log and 'Batch size per gpu: 2' in log
    assert 'l_distill: ' in log and 'frozen' in log
    assert log.count('Validation tinyval') == 3  # iterations 2 and 4, and after the last save: rank 0 only
    assert sorted(p.name for p in (exp / 'models').iterdir()) == [
        'net_adapter_2.pth', 'net_adapter_4.pth', 'net_adapter_latest.pth', 'net_g_2.pth', 'net_g_4.pth',
        'net_g_latest.pth']
    assert sorted(p.name for p in (exp / 'training_states').iterdir()) == ['2.state', '4.state']

    # Same total batch, same pixels: DDP's all-reduced gradient gives the single-process weights.
    single_log = next(tiny.experiment_dir(single_name).glob('train_*.log')).read_text()
    assert [float(v) for v in logged_losses(log)] == pytest.approx([float(v) for v in logged_losses(single_log)],
                                                                    rel=1e-4)
    for name in ('net_g_4.pth', 'net_adapter_4.pth'):
        two = torch.load(exp / 'models' / name, map_location='cpu')
        one = torch.load(tiny.experiment_dir(single_name) / 'models' / name, map_location='cpu')
        for param_key in one:
            for key, value in one[param_key].items():
                torch.testing.assert_close(two[param_key][key], value, rtol=1e-4, atol=1e-6,
                                           msg=f'{name} {param_key} {key}')
    # ...and training did move the weights, so the comparison above means something.
    first = torch.load(exp / 'models' / 'net_g_2.pth', map_location='cpu')['params']
    last = torch.load(exp / 'models' / 'net_g_4.pth', map_location='cpu')['params']
    assert any(not torch.equal(first[k], last[k]) for k in first)
