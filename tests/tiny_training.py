"""A tiny but real training setup for the CLI tests: image folders, BasicSR LMDBs, option files.

The network is a one-block, 8-channel DVMSR, so a training iteration takes well under a second on
one CPU core and every test that launches ``dvmsr_arch/train.py`` stays within seconds.
"""
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Dict, Optional, Sequence

import cv2
import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SCALE = 4
TINY_NET = {'type': 'DVMSR', 'upscale': SCALE, 'embed_dim': 8, 'depths': [1], 'd_state': 4, 'drop_path_rate': 0.0}


def smooth_image(rng: np.random.Generator, size: int, channels: int = 3) -> np.ndarray:
    """A uint8 image of blurred noise: enough structure for the loss to move."""
    noise = rng.random((size // 4, size // 4, channels)).astype(np.float32)
    image = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(image * 255, 0, 255).astype(np.uint8).reshape(size, size, channels)


def write_pairs(folder: Path, count: int = 6, gt_side: int = 48, seed: int = 0) -> Dict[str, Path]:
    """GT PNGs and their bicubic x4 LQ PNGs under ``folder/{GT,LQ}``, same names in both."""
    rng = np.random.default_rng(seed)
    gt_dir, lq_dir = folder / 'GT', folder / 'LQ'
    gt_dir.mkdir(parents=True, exist_ok=True)
    lq_dir.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        gt = smooth_image(rng, gt_side)
        lq = cv2.resize(gt, (gt_side // SCALE, gt_side // SCALE), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(gt_dir / f'img_{i:03d}.png'), gt)
        cv2.imwrite(str(lq_dir / f'img_{i:03d}.png'), lq)
    return {'gt': gt_dir, 'lq': lq_dir}


def folder_to_lmdb(folder: Path, lmdb_path: Path) -> Path:
    """BasicSR's own LMDB writer, so the layout is exactly what its datasets read."""
    import dvmsr_arch  # noqa: F401  (basicsr needs the compatibility shim first)
    from basicsr.utils.lmdb_util import make_lmdb_from_imgs

    names = sorted(p.name for p in folder.glob('*.png'))
    make_lmdb_from_imgs(str(folder), str(lmdb_path), names, [Path(n).stem for n in names], n_thread=1,
                        map_size=1 << 26)  # BasicSR sizes the map from the first image: too small for tiny sets
    return lmdb_path


def write_lmdbs(folder: Path, count: int = 6, gt_side: int = 48) -> Dict[str, Path]:
    pairs = write_pairs(folder / 'images', count=count, gt_side=gt_side)
    return {'gt': folder_to_lmdb(pairs['gt'], folder / 'train_GT.lmdb'),
            'lq': folder_to_lmdb(pairs['lq'], folder / 'train_LQ.lmdb')}


def unique_name(prefix: str) -> str:
    # Experiments land in the repository's experiments/ (BasicSR puts them under the code's root);
    # a unique name keeps parallel test runs apart, and the fixture below removes them.
    return f'{prefix}_{uuid.uuid4().hex[:8]}'


def training_options(name: str, gt: Path, lq: Path, *, total_iter: int = 8, save_freq: int = 4,
                     milestones: Sequence[int] = (6,), batch: int = 2, gt_size: int = 32,
                     val: Optional[Dict[str, Path]] = None, ema_decay: float = 0.9, io_backend: str = 'lmdb',
                     model: str = 'SRModel', teacher: Optional[Path] = None, teacher_net: Optional[dict] = None,
                     print_freq: int = 1) -> dict:
    opt = {
        'name': name,
        'model_type': model,
        'scale': SCALE,
        'num_gpu': 0,
        'manual_seed': 10,
        'datasets': {
            'train': {
                'name': 'tiny', 'type': 'PairedImageDataset', 'dataroot_gt': str(gt), 'dataroot_lq': str(lq),
                'io_backend': {'type': io_backend}, 'gt_size': gt_size, 'use_hflip': True, 'use_rot': True,
                'num_worker_per_gpu': 0, 'batch_size_per_gpu': batch, 'dataset_enlarge_ratio': 1,
                'prefetch_mode': None,
            },
        },
        'network_g': dict(TINY_NET),
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {
            'ema_decay': ema_decay,
            'optim_g': {'type': 'Adam', 'lr': 2e-4, 'weight_decay': 0, 'betas': [0.9, 0.99]},
            'scheduler': {'type': 'MultiStepLR', 'milestones': list(milestones), 'gamma': 0.5},
            'total_iter': total_iter,
            'warmup_iter': -1,
            'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'},
        },
        'logger': {'print_freq': print_freq, 'save_checkpoint_freq': save_freq, 'use_tb_logger': False,
                   'wandb': {'project': None, 'resume_id': None}},
        'dist_params': {'backend': 'nccl', 'port': 29500},
    }
    if val is not None:
        opt['datasets']['val'] = {'name': 'tinyval', 'type': 'PairedImageDataset', 'dataroot_gt': str(val['gt']),
                                  'dataroot_lq': str(val['lq']), 'io_backend': {'type': 'disk'}}
        opt['val'] = {'val_freq': save_freq, 'save_img': False,
                      'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': SCALE, 'test_y_channel': True}}}
    if teacher is not None:
        opt['network_t'] = dict(teacher_net or TINY_NET)
        opt['path'].update({'pretrain_network_t': str(teacher), 'param_key_t': 'params', 'strict_load_t': True})
        opt['train']['distill_opt'] = {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'}
    return opt


def write_options(path: Path, opt: dict) -> Path:
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    return path


def save_tiny_teacher(path: Path, net_opt: Optional[dict] = None, seed: int = 1) -> Path:
    """Random weights of the tiny network in BasicSR's checkpoint layout ({'params': state_dict})."""
    from dvmsr_arch.archs.dvmsr_arch import DVMSR

    torch.manual_seed(seed)
    net_opt = dict(net_opt or TINY_NET)
    net_opt.pop('type')
    torch.save({'params': DVMSR(**net_opt).state_dict()}, path)
    return path


def cli_env(threads: int = 1) -> Dict[str, str]:
    env = dict(os.environ)
    # One thread a process: the tests run beside other work on two cores, and two DDP ranks must
    # not fight over them.
    env.update({'OMP_NUM_THREADS': str(threads), 'MKL_NUM_THREADS': str(threads), 'PYTHONUNBUFFERED': '1',
                'CUDA_VISIBLE_DEVICES': ''})
    return env


def run_cli(script: str, opt_path: Path, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python dvmsr_arch/<script> -opt <opt_path> <extra>`` from the repository root."""
    command = [sys.executable, str(REPO / 'dvmsr_arch' / script), '-opt', str(opt_path), *extra]
    return subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def experiment_dir(name: str) -> Path:
    return REPO / 'experiments' / name


def remove_experiment(name: str) -> None:
    for folder in (REPO / 'experiments').glob(f'{name}*'):
        shutil.rmtree(folder, ignore_errors=True)
    for folder in (REPO / 'results').glob(f'{name}*'):
        shutil.rmtree(folder, ignore_errors=True)
