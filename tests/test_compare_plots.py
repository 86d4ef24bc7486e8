"""scripts/compare.py and scripts/plot_curves.py write the figures they promise, from real inputs."""
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

import dvmsr_arch  # noqa: F401  (first: it fits basicsr to this torchvision and registers the networks)
from basicsr.metrics import calculate_psnr
from basicsr.utils.matlab_functions import imresize
from dvmsr_arch.archs.dvmsr_arch import DVMSR
from dvmsr_arch.utils import imageio
from dvmsr_arch.utils.training_log import parse_training_log, read_training_log

REPO = Path(__file__).resolve().parents[1]


def script(name: str):
    spec = importlib.util.spec_from_file_location(f'{name}_cli', REPO / 'scripts' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8 BGR with structure at several scales, so that PSNR values are ordinary."""
    coarse = rng.random((height // 8, width // 8, 3)).astype(np.float32)
    return np.clip(cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC) * 255, 0, 255).astype(np.uint8)


def test_compare_figure(tmp_path, capsys):
    torch.manual_seed(0)
    for name in ('a', 'b'):
        torch.save(DVMSR(embed_dim=8, depths=(1,), d_state=4).state_dict(), tmp_path / f'{name}.pth')
    (tmp_path / 'tiny.yml').write_text('network_g:\n  type: DVMSR\n  embed_dim: 8\n  depths: [1]\n  d_state: 4\n')
    hr = smooth_image(np.random.default_rng(0), 66, 80)  # 66 is cut to 64, a multiple of the scale
    cv2.imwrite(str(tmp_path / 'hr.png'), hr)
    figure = tmp_path / 'figure.png'
    code = script('compare').main([
        '--hr', str(tmp_path / 'hr.png'), '--crop', '8', '16', '40', '20', '-o', str(figure), '--device', 'cpu',
        '--model', 'first', str(tmp_path / 'a.pth'), str(tmp_path / 'tiny.yml'),
        '--model', 'second', str(tmp_path / 'b.pth'), str(tmp_path / 'tiny.yml')])
    assert code == 0
    # Widths: overview 2.0 * (20 / 40) * 80 / 64 inches, then four 2.0-inch crops (bicubic, 2 models, HR);
    # height 2.0 * 20 / 40 + 0.7 inches; 100 dpi.
    height, width = cv2.imread(str(figure)).shape[:2]
    assert (height, width) == (round(1.7 * 100), round((1.25 + 4 * 2.0) * 100))
    lines = capsys.readouterr().out.splitlines()
    hr_rgb = imageio.read_image(tmp_path / 'hr.png').rgb[:64]
    bicubic = np.clip(imresize(np.clip(imresize(hr_rgb.astype(np.float64), 1 / 4), 0, 1), 4), 0, 1)
    expected = calculate_psnr(imageio.rgb_to_uint8_bgr(bicubic), imageio.rgb_to_uint8_bgr(hr_rgb), 4,
                              test_y_channel=True)
    assert lines[0].startswith(f'Bicubic: {expected:.2f} dB / ')
    assert [line.split(':')[0] for line in lines[1:4]] == ['first', 'second', 'HR']

    assert script('compare').main(['--hr', str(tmp_path / 'hr.png'), '--crop', '60', '0', '40', '20', '-o',
                                   str(figure), '--device', 'cpu', '--model', 'x', str(tmp_path / 'a.pth'),
                                   str(tmp_path / 'tiny.yml')]) == 2
    assert '--crop 60 0 40 20 does not fit the 80x64 output' in capsys.readouterr().err


def run_basicsr_training(root: Path) -> Path:
    """12 iterations of BasicSR's own SRModel with a tiny network: a real train_*.log to read."""
    rng = np.random.default_rng(1)
    for split, count in (('train', 4), ('val', 2)):
        for kind in ('GT', 'LQ'):
            (root / split / kind).mkdir(parents=True)
        for i in range(count):
            gt = smooth_image(rng, 48, 48)
            cv2.imwrite(str(root / split / 'GT' / f'{i}.png'), gt)
            cv2.imwrite(str(root / split / 'LQ' / f'{i}.png'), cv2.resize(gt, (12, 12), interpolation=cv2.INTER_AREA))

    def dataset(split):
        return {'name': f'tiny_{split}', 'type': 'PairedImageDataset', 'dataroot_gt': str(root / split / 'GT'),
                'dataroot_lq': str(root / split / 'LQ'), 'io_backend': {'type': 'disk'}}

    options = {
        'name': 'curves', 'model_type': 'SRModel', 'scale': 4, 'num_gpu': 0, 'manual_seed': 0,
        'datasets': {'train': {**dataset('train'), 'gt_size': 32, 'use_hflip': True, 'use_rot': False,
                               'num_worker_per_gpu': 0, 'batch_size_per_gpu': 2, 'dataset_enlarge_ratio': 1,
                               'prefetch_mode': None},
                     'val': dataset('val')},
        'network_g': {'type': 'SRVGGNetCompact', 'num_feat': 4, 'num_conv': 1, 'upscale': 4},
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {'ema_decay': 0, 'optim_g': {'type': 'Adam', 'lr': 1e-3},
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [100], 'gamma': 0.5},
                  'total_iter': 12, 'warmup_iter': -1,
                  'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'}},
        # val_freq 5 is no multiple of print_freq 2: the validations at 5 and 10 come between log lines.
        'val': {'val_freq': 5, 'save_img': False,
                'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 4, 'test_y_channel': True}}},
        'logger': {'print_freq': 2, 'save_checkpoint_freq': 100, 'use_tb_logger': False,
                   'wandb': {'project': None, 'resume_id': None}},
        'dist_params': {'backend': 'nccl', 'port': 29500},
    }
    option_file = root / 'train.yml'
    option_file.write_text(yaml.safe_dump(options))
    code = textwrap.dedent(f'''
        import sys
        sys.path.insert(0, {str(REPO)!r})
        import dvmsr_arch
        from basicsr.train import train_pipeline
        sys.argv = ['train', '-opt', {str(option_file)!r}]
        train_pipeline({str(root)!r})
    ''')
    subprocess.run([sys.executable, '-c', code], check=True, capture_output=True, timeout=300)
    return root / 'experiments' / 'curves'


def test_curves_from_a_real_basicsr_run(tmp_path, capsys):
    experiment = run_basicsr_training(tmp_path)
    log_path, log = read_training_log(experiment)
    text = log_path.read_text()
    assert [it for it, _ in log.losses['l_pix']] == [2, 4, 6, 8, 10, 12]
    assert [it for it, _ in log.learning_rates] == [2, 4, 6, 8, 10, 12]
    psnr = log.validation[('tiny_val', 'psnr')]
    # Validations after iterations 5 and 10, and once more at the end (12).
    assert [it for it, _ in psnr] == [5, 10, 12]
    assert [f'# psnr: {value:.4f}' in text for _, value in psnr] == [True] * 3
    assert all(f'l_pix: {value:.4e}' in text for _, value in log.losses['l_pix'])

    output = tmp_path / 'curves.png'
    assert script('plot_curves').main([str(experiment), '-o', str(output), '--dpi', '50']) == 0
    assert cv2.imread(str(output)).shape[:2] == (round(3.6 * 50), round(2 * 5 * 50))  # losses + one metric
    assert 'l_pix x6; 1 validation curves' in capsys.readouterr().out


def test_log_parser_thousands_resume_and_sparse_printing():
    """BasicSR prints iterations with thousands separators; a resumed run starts past 0; validations
    can fall between training messages."""
    text = textwrap.dedent('''\
        2024-01-01 00:00:00,000 INFO:
          train:[
            total_iter: 3000
          ]
          val:[
            val_freq: 500.0
          ]
        2024-01-01 00:00:01,000 INFO: Start training from epoch: 3, iter: 1000
        2024-01-01 00:00:02,000 INFO: Validation Set5
        \t # psnr: 30.0000\tBest: 30.0000 @ 1500 iter
        \t # ssim: 0.8000\tBest: 0.8000 @ 1500 iter

        2024-01-01 00:00:03,000 INFO: [DVMSR..][epoch:  3, iter:   2,000, lr:(1.000e-04,)] [eta: 0:10:00, time (data): 0.100 (0.001)] l_pix: 1.5000e-02 l_distill: 3.0000e-03 
        2024-01-01 00:00:04,000 INFO: Validation Set5
        \t # psnr: 30.5000\tBest: 30.5000 @ 2000 iter
        \t # ssim: 0.8100\tBest: 0.8100 @ 2000 iter

        2024-01-01 00:00:05,000 INFO: Validation Set5
        \t # psnr: 30.6000\tBest: 30.6000 @ 2500 iter
        \t # ssim: 0.8200\tBest: 0.8200 @ 2500 iter

        2024-01-01 00:00:06,000 INFO: End of training. Time consumed: 0:20:00
        2024-01-01 00:00:07,000 INFO: Validation Set5
        \t # psnr: 30.7000\tBest: 30.7000 @ 3001 iter
        ''')
    log = parse_training_log(text)
    assert log.losses == {'l_pix': [(2000, 0.015)], 'l_distill': [(2000, 0.003)]}
    assert log.learning_rates == [(2000, 1e-4)]
    assert log.validation[('Set5', 'psnr')] == [(1500, 30.0), (2000, 30.5), (2500, 30.6), (3000, 30.7)]
    assert log.validation[('Set5', 'ssim')] == [(1500, 0.8), (2000, 0.81), (2500, 0.82)]
