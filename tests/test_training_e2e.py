"""Distillation end to end through the command lines a user types.

``scripts/make_lmdb.py`` packs generated images, ``dvmsr_arch/train.py`` distils a tiny student from
a tiny teacher (body features, widths 8 -> 12, so the adapter is exercised too), resumes with
``--auto_resume`` to more iterations, and ``dvmsr_arch/test.py`` evaluates the result, whose PSNR is
checked against one computed here from the saved weights. Every command runs outside the
repository folder, as a user's would.
"""
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

import tiny_training as tiny

REPO = Path(__file__).resolve().parents[1]
SCALE = 4
STUDENT = {'type': 'DVMSR', 'upscale': SCALE, 'embed_dim': 8, 'depths': [1], 'd_state': 4, 'drop_path_rate': 0.0}
TEACHER = {'type': 'DVMSR', 'upscale': SCALE, 'embed_dim': 12, 'depths': [1], 'd_state': 4, 'drop_path_rate': 0.0,
           'upsampler': 'pixelshuffle', 'num_feat': 8}
METRICS = {'psnr': {'type': 'calculate_psnr', 'crop_border': SCALE, 'test_y_channel': True},
           'ssim': {'type': 'calculate_ssim', 'crop_border': SCALE, 'test_y_channel': True}}


def run(args, cwd, timeout=240):
    # One thread a process: the tensors are tiny, and a second thread stalls when the cores are busy.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    result = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f'{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
    return result.stdout + result.stderr


def write_images(folder: Path, count: int, side: int, seed: int) -> None:
    """Smooth random colour images (HR) and their bicubic x4 (LR), same names."""
    rng = np.random.default_rng(seed)
    (folder / 'HR').mkdir(parents=True)
    (folder / 'LR').mkdir()
    for i in range(count):
        coarse = rng.random((side // 8, side // 8, 3)).astype(np.float32)
        hr = np.clip(cv2.resize(coarse, (side, side), interpolation=cv2.INTER_CUBIC) * 255, 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / 'HR' / f'im{i}.png'), hr)
        cv2.imwrite(str(folder / 'LR' / f'im{i}.png'), cv2.resize(hr, (side // SCALE, side // SCALE),
                                                                  interpolation=cv2.INTER_AREA))


def log_text(experiment: Path) -> str:
    return '\n'.join(p.read_text() for p in sorted(experiment.glob('train_*.log')))


@pytest.fixture
def experiment_name():
    name = f'e2e_distill_{uuid.uuid4().hex[:8]}'
    yield name
    # BasicSR writes under the code's root whatever the working folder: leave nothing behind.
    for folder in ('experiments', 'results', 'tb_logger'):
        for path in (REPO / folder).glob(f'{name}*'):
            shutil.rmtree(path, ignore_errors=True)


def test_distill_train_resume_and_test(tmp_path, experiment_name):
    write_images(tmp_path / 'train', count=6, side=64, seed=0)
    write_images(tmp_path / 'val', count=2, side=48, seed=1)
    for part in ('HR', 'LR'):
        out = run([REPO / 'scripts' / 'make_lmdb.py', '--input', tmp_path / 'train' / part,
                   '--output', tmp_path / f'train_{part}.lmdb', '--workers', '2'], cwd=tmp_path)
        assert '6 images' in out

    torch.manual_seed(3)
    from dvmsr_arch.archs.dvmsr_arch import DVMSR
    teacher = DVMSR(**{k: v for k, v in TEACHER.items() if k != 'type'})
    teacher_path = tmp_path / 'teacher.pth'
    torch.save({'params_ema': teacher.state_dict()}, teacher_path)

    opt = {
        'name': experiment_name, 'model_type': 'DistillSRModel', 'scale': SCALE, 'num_gpu': 0, 'manual_seed': 0,
        'datasets': {
            'train': {'name': 'gen', 'type': 'PairedImageDataset', 'dataroot_gt': str(tmp_path / 'train_HR.lmdb'),
                      'dataroot_lq': str(tmp_path / 'train_LR.lmdb'), 'io_backend': {'type': 'lmdb'},
                      'gt_size': 32, 'use_hflip': True, 'use_rot': True, 'use_shuffle': True,
                      'num_worker_per_gpu': 0, 'batch_size_per_gpu': 2, 'dataset_enlarge_ratio': 1,
                      'prefetch_mode': None},
            'val': {'name': 'genval', 'type': 'PairedImageDataset', 'dataroot_gt': str(tmp_path / 'val' / 'HR'),
                    'dataroot_lq': str(tmp_path / 'val' / 'LR'), 'io_backend': {'type': 'disk'}},
        },
        'network_g': STUDENT, 'network_t': TEACHER,
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None,
                 'pretrain_network_t': str(teacher_path), 'param_key_t': 'params_ema', 'strict_load_t': True},
        'train': {'ema_decay': 0.9,
                  'optim_g': {'type': 'Adam', 'lr': 2e-4, 'weight_decay': 0, 'betas': [0.9, 0.99]},
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [3, 6], 'gamma': 0.5},
                  'total_iter': 4, 'warmup_iter': -1,
                  'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'},
                  'distill_opt': {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'},
                  'distill_position': 'body'},
        'val': {'val_freq': 4, 'save_img': False, 'metrics': METRICS},
        'logger': {'print_freq': 1, 'save_checkpoint_freq': 2, 'use_tb_logger': False,
                   'wandb': {'project': None, 'resume_id': None}},
        'dist_params': {'backend': 'nccl', 'port': 29500},
    }
    train_yml = tmp_path / 'train.yml'
    train_yml.write_text(yaml.safe_dump(opt, sort_keys=False))
    train_py = REPO / 'dvmsr_arch' / 'train.py'

    run([train_py, '-opt', train_yml], cwd=tmp_path)
    experiment = REPO / 'experiments' / experiment_name
    models = experiment / 'models'
    for it in (2, 4, 'latest'):
        assert (models / f'net_g_{it}.pth').is_file() and (models / f'net_adapter_{it}.pth').is_file()
    assert not list(models.glob('net_t*')), 'the frozen teacher must never be saved'
    assert sorted(p.name for p in (experiment / 'training_states').iterdir()) == ['2.state', '4.state']
    student = torch.load(models / 'net_g_latest.pth', map_location='cpu')
    assert set(student) == {'params', 'params_ema'}
    assert set(student['params']) == set(DVMSR(**{k: v for k, v in STUDENT.items() if k != 'type'}).state_dict())
    adapter = torch.load(models / 'net_adapter_latest.pth', map_location='cpu')['params']
    assert adapter['weight'].shape == (12, 8, 1, 1)

    log = log_text(experiment)
    for it in range(1, 5):
        line = re.search(rf'iter:\s+{it},.*', log).group(0)
        assert re.search(r'l_pix: [0-9.e+-]+', line) and re.search(r'l_distill: [0-9.e+-]+', line), line
    assert re.search(r'iter:\s+3,.*lr:\(2\.000e-04', log) and re.search(r'iter:\s+4,.*lr:\(1\.000e-04', log)
    assert '# psnr:' in log and '# ssim:' in log

    # Resume to 8 iterations: the count, the LR schedule (halved again at 6) and the teacher carry on.
    out = run([train_py, '-opt', train_yml, '--auto_resume', '--force_yml', 'train:total_iter=8'], cwd=tmp_path)
    log = log_text(experiment)
    assert 'Resuming training from epoch' in log and re.search(r'iter: 4\.', log)
    # The teacher came from the option file's path in both runs, not from the experiment's models/.
    assert log.count(f'Teacher DVMSR loaded from {teacher_path} (params_ema)') == 2, out[-2000:]
    assert not re.search(r'iter:\s+[1-4],.*', log[log.index('Resuming'):]), 'a resumed run must not repeat iterations'
    assert re.search(r'iter:\s+6,.*lr:\(1\.000e-04', log) and re.search(r'iter:\s+7,.*lr:\(5\.000e-05', log)
    assert (experiment / 'training_states' / '8.state').is_file() and (models / 'net_adapter_8.pth').is_file()

    # Evaluate the resumed student's EMA weights with test.py, and check its PSNR independently.
    test_name = f'{experiment_name}_test'
    test_opt = {'name': test_name, 'model_type': 'SRModel', 'scale': SCALE, 'num_gpu': 0, 'manual_seed': 0,
                'datasets': {'test_1': opt['datasets']['val']}, 'network_g': STUDENT,
                'path': {'pretrain_network_g': str(models / 'net_g_latest.pth'), 'param_key_g': 'params_ema',
                         'strict_load_g': True},
                'val': {'save_img': False, 'suffix': None, 'metrics': METRICS}}
    test_yml = tmp_path / 'test.yml'
    test_yml.write_text(yaml.safe_dump(test_opt, sort_keys=False))
    out = run([REPO / 'dvmsr_arch' / 'test.py', '-opt', test_yml], cwd=tmp_path)
    psnr = float(re.search(r'# psnr: ([0-9.]+)', out).group(1))
    ssim = float(re.search(r'# ssim: ([0-9.]+)', out).group(1))

    from basicsr.metrics import calculate_psnr
    net = DVMSR(**{k: v for k, v in STUDENT.items() if k != 'type'})
    net.load_state_dict(torch.load(models / 'net_g_latest.pth', map_location='cpu')['params_ema'])
    net.eval()
    expected = []
    for name in ('im0.png', 'im1.png'):
        hr = cv2.imread(str(tmp_path / 'val' / 'HR' / name))
        lr = cv2.imread(str(tmp_path / 'val' / 'LR' / name))
        x = torch.from_numpy(lr[:, :, ::-1].astype(np.float32) / 255).permute(2, 0, 1)[None]
        with torch.no_grad():
            sr = net(x)[0].clamp(0, 1).permute(1, 2, 0).numpy()[:, :, ::-1]
        expected.append(calculate_psnr((sr * 255).round(), hr, crop_border=SCALE, test_y_channel=True))
    assert psnr == pytest.approx(float(np.mean(expected)), abs=1e-3)
    assert 0 < ssim <= 1


def test_training_reaches_total_iter_when_batches_do_not_divide(tmp_path, experiment_name):
    """4 pairs at batch 3: one whole batch an epoch. BasicSR counted two (its DataLoader drops the
    partial batch it counts), so it ran epochs 0 to 2 and stopped after 3 of 4 iterations without a
    word."""
    lmdbs = tiny.write_lmdbs(tmp_path / 'lmdb', count=4, gt_side=48)
    opt = tiny.training_options(experiment_name, lmdbs['gt'], lmdbs['lq'], total_iter=4, save_freq=4, batch=3)
    result = tiny.run_cli('train.py', tiny.write_options(tmp_path / 'opt.yml', opt))
    assert result.returncode == 0, result.stderr[-3000:]
    experiment = REPO / 'experiments' / experiment_name
    log = log_text(experiment)
    assert [int(i) for i in re.findall(r'iter:\s*(\d+), lr:', log)] == [1, 2, 3, 4]
    assert 'Total epochs: 4, not 2: 1 whole batch an epoch' in log
    assert (experiment / 'training_states' / '4.state').is_file()
