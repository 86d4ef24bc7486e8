"""RLFN, the NTIRE 2024 Efficient SR baseline, and the benchmark report that is always relative to it."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import dvmsr_arch  # noqa: F401  (before basicsr: registers the networks, patches basicsr's imports)
from basicsr.archs import build_network
from basicsr.metrics import calculate_psnr
from dvmsr_arch.archs.rlfn_arch import RLFN

REPO = Path(__file__).resolve().parents[1]
RLFN_PARAMETERS = 317_218
# The released baseline on Set5 x4, Y channel, crop 4 (weights/SOURCES.md: 32.099 dB).
RLFN_SET5_PSNR = 32.099


def load_benchmark():
    """scripts/benchmark.py as a fresh module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location('benchmark_cli', REPO / 'scripts' / 'benchmark.py')
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    return benchmark


def test_default_network_is_the_pruned_baseline():
    net = build_network({'type': 'RLFN'})
    assert isinstance(net, RLFN)
    assert sum(p.numel() for p in net.parameters()) == RLFN_PARAMETERS
    x = torch.rand(1, 3, 16, 21) * 255
    assert net(x).shape == (1, 3, 64, 84)


def test_scale_and_width_are_arguments():
    net = RLFN(feature_channels=8, mid_channels=12, esa_channels=4, num_blocks=2, upscale=2)
    names = {name.split('.')[0] for name, _ in net.named_parameters()}
    assert names == {'conv_1', 'block_1', 'block_2', 'conv_2', 'upsampler'}
    assert net(torch.rand(2, 3, 17, 19)).shape == (2, 3, 34, 38)


def test_released_checkpoint_loads_strictly(weights_dir):
    state = torch.load(weights_dir / 'rlfn_ntire2024.pth', map_location='cpu', weights_only=True)
    net = RLFN()
    net.load_state_dict(state, strict=True)
    assert sum(v.numel() for v in state.values()) == RLFN_PARAMETERS


def test_released_checkpoint_set5_psnr(weights_dir, set5_dir):
    net = RLFN()
    net.load_state_dict(torch.load(weights_dir / 'rlfn_ntire2024.pth', map_location='cpu', weights_only=True))
    net.eval()
    psnrs = []
    for hr_path in sorted((set5_dir / 'HR').glob('*.png')):
        lr = cv2.imread(str(set5_dir / 'LR_bicubic' / 'X4' / hr_path.name), cv2.IMREAD_COLOR)
        x = torch.from_numpy(np.ascontiguousarray(lr[:, :, ::-1])).permute(2, 0, 1)[None].float()  # [0, 255]
        with torch.no_grad():
            sr = net(x)[0].clamp(0, 255).round().permute(1, 2, 0).numpy()[:, :, ::-1].astype(np.uint8)
        psnrs.append(calculate_psnr(sr, cv2.imread(str(hr_path)), crop_border=4, test_y_channel=True))
    assert len(psnrs) == 5
    assert np.mean(psnrs) == pytest.approx(RLFN_SET5_PSNR, abs=0.01)


def test_benchmark_report_carries_the_rlfn_ratio(tmp_path):
    out = tmp_path / 'bench'
    proc = subprocess.run([sys.executable, str(REPO / 'scripts' / 'benchmark.py'), 'report', '--device', 'cpu',
                           '--models', 'dvmsr', '--sizes', '16x16', '16x24', '--warmup', '0', '--repeats', '2',
                           '--no-flops', '--cudnn-benchmark', '--out', str(out)], capture_output=True, text=True,
                          timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / 'report.json').read_text())
    assert set(results['models']) == {'dvmsr', 'rlfn'}
    dvmsr, rlfn = results['models']['dvmsr'], results['models']['rlfn']
    assert rlfn['parameters'] == RLFN_PARAMETERS and dvmsr['parameters'] == 424_428
    assert dvmsr['scan_backend'] == 'torch'
    for label in ('16x16', '16x24'):
        assert rlfn['ratio_to_rlfn'][label] == 1.0
        timing = dvmsr['inputs'][label]
        assert timing['runs'] == 2 and timing['min_ms'] <= timing['median_ms']
        assert dvmsr['ratio_to_rlfn'][label] == pytest.approx(timing['median_ms'] / rlfn['inputs'][label]['median_ms'])
    table = (out / 'report.md').read_text()
    assert '| rlfn | 317,218 |' in table and 'dvmsr (torch)' in table
    assert results['cudnn_benchmark'] is True and 'cuDNN benchmark True' in table


def test_benchmark_cudnn_flag_sets_and_clears_torch_setting(monkeypatch):
    benchmark = load_benchmark()
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', False)
    assert benchmark.main(['floor', '--device', 'cpu', '--sizes', '16x16', '--cudnn-benchmark']) == 0
    assert torch.backends.cudnn.benchmark is True
    assert benchmark.main(['floor', '--device', 'cpu', '--sizes', '16x16']) == 0
    assert torch.backends.cudnn.benchmark is False


def test_floor_counts_the_training_scans_decays_as_the_kernels_walk_the_tokens(tmp_path):
    benchmark = load_benchmark()
    from dvmsr_arch.ops.scan_triton import BACKWARD_CONFIG, FORWARD_CONFIG
    assert benchmark.main(['floor', '--device', 'cpu', '--sizes', '16x16', '--train-batch', '3',
                           '--train-size', '32x32', '--out', str(tmp_path)]) == 0
    train = json.loads((tmp_path / 'floor.json').read_text())['train_scan']
    # Walk one sequence as the kernels do: the gradients kernel goes through each tile in runs of 4
    # from the last, re-stepping from the tile start to each run's start, then through 3 more
    # tokens to hold the run's states; each summary pass leaves out the one chunk it need not summarise.
    tile, length = BACKWARD_CONFIG.tile, 32 * 32
    gradient_steps = sum(start + 3 + 4 for _ in range(length // tile) for start in range(tile - 4, -1, -4))
    summaries = sum(length - cfg.tile * cfg.tiles_per_chunk for cfg in (FORWARD_CONFIG, BACKWARD_CONFIG))
    decays = summaries + length + gradient_steps
    assert train['exp2'] == pytest.approx(3 * decays * 120 * 16 * 8)
    assert train['saved_state_bytes'] == 2 * 3 * (length // tile) * 120 * 16 * 4 * 8


def test_benchmark_basicsr_iteration_with_either_ema_update():
    """The benchmark's BasicSR iteration trains the option file's network, and swapping in basicsr's own
    EMA update (to time what the project's saves) gives the same EMA weights."""
    benchmark = load_benchmark()
    option = str(REPO / 'options' / 'train' / 'student_x4_nodistill.yml')
    ema = {}
    for update in ('dvmsr', 'basicsr'):
        step, model = benchmark.basicsr_iteration(option, torch.device('cpu'), 1, (8, 8), update)
        before = [p.detach().clone() for p in model.net_g_ema.parameters()]
        step()
        step()
        ema[update] = list(model.net_g_ema.parameters())
        assert model.log_dict['l_pix'] > 0
        assert sum(not torch.equal(a, b) for a, b in zip(before, ema[update])) > 50
    assert all(torch.equal(a, b) for a, b in zip(ema['dvmsr'], ema['basicsr']))


def test_benchmark_basicsr_iteration_asks_for_the_cuda_graph():
    """With cuda_graph an SRModel file runs as DVMSRModel with train.cuda_graph (eager on a CPU)."""
    benchmark = load_benchmark()
    option = str(REPO / 'options' / 'train' / 'student_x4_nodistill.yml')
    step, model = benchmark.basicsr_iteration(option, torch.device('cpu'), 1, (8, 8), cuda_graph=True)
    assert type(model).__name__ == 'DVMSRModel' and model.opt['train']['cuda_graph'] is True
    assert model.training_graph is None
    step()
    assert model.log_dict['l_pix'] > 0


def test_benchmark_basicsr_iteration_of_a_distillation():
    """A distillation's option file runs with a teacher of random weights, which the model loads."""
    benchmark = load_benchmark()
    step, model = benchmark.basicsr_iteration(str(REPO / 'options' / 'train' / 'student_x4.yml'),
                                              torch.device('cpu'), 1, (4, 4))
    assert type(model).__name__ == 'DistillSRModel'
    assert sum(p.numel() for p in model.net_t.parameters()) == 7_432_131
    step()
    assert model.log_dict['l_distill'] > 0 and model.log_dict['l_pix'] > 0


def test_benchmark_basicsr_iteration_takes_option_settings():
    benchmark = load_benchmark()
    step, model = benchmark.basicsr_iteration(str(REPO / 'options' / 'train' / 'student_x4.yml'),
                                              torch.device('cpu'), 1, (4, 4),
                                              settings=['train:teacher_precision=bf16', 'train:ema_decay=0'])
    assert model.teacher_dtype == torch.bfloat16 and model.ema_decay == 0
    step()
    assert model.log_dict['l_distill'] > 0
    for setting, message in (('train:ema_decay', 'write key:key=value'), ('trian:ema_decay=0', 'no section trian')):
        with pytest.raises(ValueError, match=message):
            benchmark.basicsr_iteration(str(REPO / 'options' / 'train' / 'student_x4.yml'), torch.device('cpu'), 1,
                                        (4, 4), settings=[setting])


def test_benchmark_distillation_teacher_is_the_option_files():
    benchmark = load_benchmark()
    teacher = benchmark.distillation_teacher(torch.device('cpu'), 'torch')
    assert not teacher.training and sum(p.numel() for p in teacher.parameters()) == 7_432_131
    assert teacher.upsampler == 'pixelshuffle' and teacher.scan_backend == 'torch'


def test_benchmark_profiles_the_teacher_forward(tmp_path):
    benchmark = load_benchmark()
    out = tmp_path / 'bench'
    assert benchmark.main(['profile', '--device', 'cpu', '--profile-teacher', '--profile-backends', 'torch',
                           '--train-batch', '1', '--train-size', '8x12', '--profile-runs', '1', '--out', str(out)]) == 0
    results = json.loads((out / 'profile.json').read_text())
    assert list(results['tables']) == ['teacher_torch']
    assert results['what'] == 'teacher forward, batch 1 at 8x12'
    with pytest.raises(SystemExit):
        benchmark.main(['profile', '--device', 'cpu', '--profile-teacher', '--profile-train'])


def test_benchmark_peak_of_allocator_trace():
    benchmark = load_benchmark()

    def event(action, addr, size):
        return {'action': action, 'addr': addr, 'size': size}
    # 100 bytes held before the call. a (30) and b (50) live together: 180. b is freed (a free
    # counts when requested, not when the allocator completes it) before c (40) comes: 170. a's
    # address is freed and reused by d (20): 160. A buffer held before the call (10) is freed,
    # then e (25) comes: 175.
    trace = [event('alloc', 1, 30), event('alloc', 2, 50), event('free_requested', 2, 50),
             event('free_completed', 2, 50), event('alloc', 3, 40), event('free_requested', 1, 30),
             event('alloc', 1, 20), event('free_requested', 9, 10), event('alloc', 4, 25)]
    peak, live = benchmark.peak_of_trace(trace, held=100)
    assert peak == 180
    assert [(e['addr'], e['size']) for e in live] == [(2, 50), (1, 30)]
    assert benchmark.peak_of_trace([], held=7) == (7, [])


def test_benchmark_device_time_counts_kernels_not_operators_or_annotations():
    from types import SimpleNamespace

    from torch.autograd import DeviceType
    benchmark = load_benchmark()

    def event(device, us, annotation=False):
        return SimpleNamespace(device_type=device, is_user_annotation=annotation,
                               time_range=SimpleNamespace(elapsed_us=lambda: us))
    # Two runs: kernels of 300 and 500 us, an operator row carrying them (CPU side), and the
    # optimizer's annotation, whose device-side span (900 us) covers kernels and gaps.
    events = [event(DeviceType.CUDA, 300.0), event(DeviceType.CUDA, 500.0), event(DeviceType.CPU, 800.0),
              event(DeviceType.CUDA, 900.0, annotation=True)]
    assert benchmark.device_ms(events, runs=2) == pytest.approx(0.4)


def test_benchmark_rejects_bad_sizes():
    proc = subprocess.run([sys.executable, str(REPO / 'scripts' / 'benchmark.py'), 'report', '--device', 'cpu',
                           '--sizes', '16by16'], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "size '16by16'" in proc.stderr


def test_benchmark_train_checks_gradients_in_fp32_and_under_bf16_autocast(tmp_path):
    out = tmp_path / 'bench'
    proc = subprocess.run([sys.executable, str(REPO / 'scripts' / 'benchmark.py'), 'train', '--device', 'cpu',
                           '--precision', 'bf16', '--train-backends', 'torch', '--train-batch', '1',
                           '--train-size', '16x16', '--warmup', '0', '--repeats', '1', '--out', str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / 'train.json').read_text())
    assert set(results['steps']) == {'dvmsr_torch', 'rlfn'} and results['precision'] == 'bf16'
    assert results['grad_check']['max_rel_worst'] < 1e-4
    bf16 = results['grad_check_bf16']['per_parameter']
    assert len(bf16) == len(results['grad_check']['per_parameter'])
    # bf16 activations move the gradients, but they stay gradients: none vanishes (a relative error
    # of 1) and the typical parameter's is a few percent.
    assert max(bf16.values()) < 0.9 and sorted(bf16.values())[len(bf16) // 2] < 0.05


def test_benchmark_refuses_fp16_training():
    proc = subprocess.run([sys.executable, str(REPO / 'scripts' / 'benchmark.py'), 'train', '--device', 'cpu',
                           '--precision', 'fp16'], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert '--precision fp16: fp16 training needs loss scaling' in proc.stderr


@pytest.mark.parametrize('flag', ['--repeats', '--host-repeats', '--profile-runs'])
def test_benchmark_rejects_counts_below_one(flag):
    proc = subprocess.run([sys.executable, str(REPO / 'scripts' / 'benchmark.py'), 'report', '--device', 'cpu',
                           flag, '0'], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f'{flag} must be at least 1' in proc.stderr
