"""NTIRE-2024-style efficiency report for DVMSR, always next to the RLFN baseline.

    python scripts/benchmark.py report --sizes 256x256 339x510 678x1020      # GPU, every ratio to RLFN
    python scripts/benchmark.py report --device cpu --sizes 64x64 96x128     # CPU mode
    python scripts/benchmark.py report --lr-dir ../shared/data/Set5/LR_bicubic/X4
    python scripts/benchmark.py all --set5 ../shared/data/Set5 --out results/bench   # everything below

Subcommands (each writes ``<name>.json`` into ``--out``; ``report`` and ``profile`` also ``<name>.md``):

``report``    per model: runtime per image (CUDA events around the forward only, after warm-up;
              median and mean), parameters, FLOPs (fvcore convention and full count, from
              ``scripts/model_stats.py``), activations, peak memory; the ratio to RLFN.
``scan``      the Triton scan against the float64 ``ref`` scan on fresh random inputs (forward and
              all gradients, odd lengths, poisoned outputs), then its kernel shapes timed.
``fidelity``  true-fp32 max difference to the float64 path, and Set5 PSNR in every precision mode.
``train``     one training step (batch 64, LR 64x64, fwd + bwd + Adam; under fp16/bf16 autocast around
              the forward), the CPU time to issue it, and gradients against float64 (true fp32, and
              under the autocast of --precision); ``--cuda-graph`` times replays of the whole step;
              ``--basicsr-option FILE`` also whole iterations of BasicSR's model for an option file
              (losses, optimizer and EMA update as it sets them, without data loading), and with
              ``--basicsr-cuda-graph`` that iteration recorded as one CUDA graph (``train.cuda_graph``).
``profile``   PyTorch profiler, GPU kernel time per forward, per kernel; ``--memory-at-peak`` also lists
              the buffers live at the peak of one forward, ``--profile-shapes`` the operators by input
              shapes; ``--profile-train`` profiles training steps instead, ``--profile-teacher`` the
              distillation teacher's forward on a training batch.
``floor``     bytes and exp2 the released student must move and compute per size, and the times
              they take at given ceilings (no device needed); also the exp2 of a training step's
              scan kernels and its saved states' bytes (--train-batch, --train-size).
``all``       report, scan, fidelity, train and profile in one process.

Precision modes: ``fp32`` (true fp32: no TF32 anywhere), ``tf32`` (the default fast mode: TF32
for matmuls and convolutions), ``fp16``/``bf16`` (autocast; the scan state stays fp32), ``tf32-conv``
(PyTorch's own defaults, TF32 for convolutions only: a BasicSR run whose option file has no ``tf32``
key).
"""
import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from functools import partial
from os import path as osp
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = osp.abspath(osp.join(__file__, osp.pardir, osp.pardir))
sys.path.insert(0, ROOT)  # so a fresh clone runs without `pip install -e .`
sys.path.insert(0, osp.join(ROOT, 'scripts'))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import dvmsr_arch  # noqa: E402,F401  (registers the networks)
from dvmsr_arch.archs.dvmsr_arch import DVMSR  # noqa: E402
from dvmsr_arch.archs.rlfn_arch import RLFN  # noqa: E402
from dvmsr_arch.ops import available_backends, low_memory_inference, resolve_backend  # noqa: E402
from dvmsr_arch.utils.graphs import capture_graph  # noqa: E402

DEFAULT_WEIGHTS = {
    'dvmsr': osp.join(ROOT, '..', 'shared', 'weights', 'dvmsr_ntire2024_official.pth'),
    'rlfn': osp.join(ROOT, '..', 'shared', 'weights', 'rlfn_ntire2024.pth'),
}
# Pixel range each network takes: DVMSR [0, 1], RLFN [0, 255].
PIXEL_RANGE = {'dvmsr': 1.0, 'rlfn': 255.0}
PRECISIONS = ('fp32', 'tf32', 'fp16', 'bf16', 'tf32-conv')
AUTOCAST_DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16}  # the modes that run under autocast
MIB = 2**20


# ----------------------------------------------------------------------------------------------
# Models, precision, timing


def load_weights(net: torch.nn.Module, path: str) -> None:
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except (OSError, RuntimeError) as error:
        raise SystemExit(f'{path}: cannot load ({error})')
    if isinstance(state, dict) and ('params_ema' in state or 'params' in state):
        state = state.get('params_ema', state.get('params'))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise SystemExit(f'{path}: does not fit {type(net).__name__} ({str(error).splitlines()[0]})')


def build_model(name: str, device: torch.device, scan_backend: str = 'auto', weights: Optional[str] = None,
                channels_last: bool = False) -> torch.nn.Module:
    if name == 'dvmsr':
        net = DVMSR(scan_backend=scan_backend)
    elif name == 'rlfn':
        net = RLFN()
    elif name == 'teacher':
        net = distillation_teacher(device, scan_backend)
    else:
        raise SystemExit(f'unknown model {name!r}: use dvmsr, rlfn or teacher')
    if weights and osp.isfile(weights):
        load_weights(net, weights)
    net = net.eval().to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


@contextmanager
def precision(mode: str, device: torch.device):
    """TF32 switches and autocast for one precision mode, restored afterwards."""
    if mode not in PRECISIONS:
        raise SystemExit(f'--precision {mode!r}: use one of {", ".join(PRECISIONS)}')
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = mode not in ('fp32', 'tf32-conv')
    torch.backends.cudnn.allow_tf32 = mode != 'fp32'
    dtype = AUTOCAST_DTYPES.get(mode)
    try:
        with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> List[float]:
    """Milliseconds of each of ``repeats`` calls after ``warmup`` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == 'cuda':
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            start_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start_s) * 1e3)
    return times


def host_times(fn: Callable[[], object], device: torch.device, repeats: int,
               sleep_s: float = 0.02) -> Optional[List[float]]:
    """Milliseconds the CPU takes to issue each of ``repeats`` calls while the GPU is still busy with
    a long kernel queued before it, so that no launch waits for the GPU. When this comes close to the
    GPU time, a timing is bound by the CPU's launch overhead rather than by the kernels (and varies
    with the host's load); a CUDA graph removes it. None off CUDA."""
    if device.type != 'cuda' or not hasattr(torch.cuda, '_sleep'):
        return None
    # A bound on the SM clock: the sleep lasts at least ``sleep_s`` (20 ms: several times what a forward
    # takes to issue, and a hundred samples (--host-repeats) take seconds, not a minute).
    clock_hz = 2e9
    times = []
    for _ in range(repeats):
        synchronize(device)
        torch.cuda._sleep(int(sleep_s * clock_hz))
        start_s = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start_s) * 1e3)
    synchronize(device)
    return times


def summary(times: Sequence[float]) -> Dict[str, float]:
    return {'median_ms': statistics.median(times), 'mean_ms': statistics.fmean(times), 'min_ms': min(times),
            'runs': len(times)}


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """torch.cuda.max_memory_allocated over one call, weights and input included (NTIRE's number)."""
    if device.type != 'cuda':
        return None
    synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / MIB


def cuda_graph(net: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One forward captured as a CUDA graph (fixed input size): replays skip the launch overhead."""
    return capture_graph(net, x)[0].replay


def parse_size(text: str) -> Tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise SystemExit(f'size {text!r}: write HEIGHTxWIDTH, e.g. 339x510')
    return height, width


def read_lr_folder(folder: str) -> List[Tuple[str, torch.Tensor]]:
    """RGB images in [0, 1] as (1, 3, H, W)."""
    import cv2
    import numpy as np
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in ('.png', '.jpg', '.jpeg', '.bmp'))
    if not paths:
        raise SystemExit(f'{folder}: no images')
    images = []
    for p in paths:
        image = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if image is None:
            raise SystemExit(f'{p}: not a readable image')
        rgb = np.ascontiguousarray(image[:, :, ::-1]).astype(np.float32) / 255.0
        images.append((p.name, torch.from_numpy(rgb).permute(2, 0, 1)[None]))
    return images


def machine_info(device: torch.device) -> Dict[str, object]:
    info = {'torch': torch.__version__, 'python': platform.python_version(), 'device': str(device),
            'cpu': platform.processor() or platform.machine(), 'threads': torch.get_num_threads()}
    try:
        import triton
        info['triton'] = triton.__version__
    except ImportError:
        info['triton'] = None
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, cuda=torch.version.cuda, sm_count=props.multi_processor_count,
                    gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return info


# ----------------------------------------------------------------------------------------------
# report


def model_stats(name: str, size: Tuple[int, int]) -> Dict[str, object]:
    """Parameters, FLOPs and activations at ``size``, counted on the CPU by scripts/model_stats.py."""
    try:
        import model_stats as stats_module
    except ImportError as error:  # the counting script is optional here
        return {'note': f'scripts/model_stats.py unavailable ({error})'}
    network_opt = {'type': 'DVMSR' if name == 'dvmsr' else 'RLFN'}
    with_fvcore = getattr(stats_module, 'FlopCountAnalysis', None) is not None
    stats = stats_module.network_stats(network_opt, *size, with_fvcore=with_fvcore)
    out = {'parameters': stats['parameters'], 'activations': stats['activations'], 'flops_size': f'{size[0]}x{size[1]}'}
    if 'flops_fvcore' in stats:
        out['flops_fvcore'] = stats['flops_fvcore']
    if name == 'dvmsr':
        out['flops_fvcore_analytic'] = stats['flops_fvcore_analytic']
        out['flops_full'] = stats['flops_full']
    elif 'flops_fvcore' in stats:
        out['flops_full'] = stats['flops_fvcore']  # all of RLFN is convolutions, which fvcore counts
    return out


def run_report(args, device: torch.device) -> Dict[str, object]:
    models = list(dict.fromkeys(args.models + ['rlfn']))
    if args.lr_dir:
        inputs = [(name, image) for name, image in read_lr_folder(args.lr_dir)]
    else:
        inputs = [(f'{h}x{w}', None) for h, w in map(parse_size, args.sizes)]
    results: Dict[str, object] = {'machine': machine_info(device), 'precision': args.precision,
                                  'scan_backend': args.scan_backend, 'channels_last': args.channels_last,
                                  'cudnn_benchmark': args.cudnn_benchmark, 'cuda_graph': args.cuda_graph,
                                  'triton_launch': args.triton_launch,
                                  'scan_config': args.scan_config,
                                  'backward_config': args.backward_config,
                                  'warmup': args.warmup, 'repeats': args.repeats, 'host_repeats': args.host_repeats,
                                  'models': {}}
    torch.manual_seed(0)
    for name in models:
        net = build_model(name, device, args.scan_backend, args.weights.get(name, DEFAULT_WEIGHTS.get(name)),
                          args.channels_last)
        entry: Dict[str, object] = {'parameters': sum(p.numel() for p in net.parameters())}
        if name == 'dvmsr':
            entry['scan_backend'] = resolve_backend(args.scan_backend, device)
        per_input = {}
        for label, image in inputs:
            x = (image if image is not None else torch.rand(1, 3, *parse_size(label))) * PIXEL_RANGE[name]
            x = x.to(device)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), precision(args.precision, device):
                forward = cuda_graph(net, x) if args.cuda_graph and device.type == 'cuda' else (lambda: net(x))
                times = time_calls(forward, device, args.warmup, args.repeats)
                host = host_times(forward, device, args.host_repeats)
                memory = peak_memory_mib(forward, device)
            per_input[label] = dict(summary(times), peak_memory_mib=memory, lr_size=list(x.shape[2:]))
            if host is not None:
                per_input[label].update(host_median_ms=statistics.median(host), host_min_ms=min(host))
            print(f'{name:6s} {label:>12s}  median {per_input[label]["median_ms"]:9.3f} ms'
                  + (f'  peak {memory:8.1f} MiB' if memory is not None else '')
                  + (f'  host {per_input[label]["host_median_ms"]:7.3f} ms (min {per_input[label]["host_min_ms"]:.3f})'
                     if host is not None else ''), flush=True)
        entry['inputs'] = per_input
        entry['median_over_inputs_ms'] = statistics.median(v['median_ms'] for v in per_input.values())
        entry['mean_over_inputs_ms'] = statistics.fmean(v['mean_ms'] for v in per_input.values())
        if not args.no_flops:
            entry['stats'] = model_stats(name, parse_size(args.flops_size))
        results['models'][name] = entry
        del net
    base = results['models']['rlfn']
    for name, entry in results['models'].items():
        entry['ratio_to_rlfn'] = {label: v['median_ms'] / base['inputs'][label]['median_ms']
                                  for label, v in entry['inputs'].items()}
    return results


def report_markdown(results: Dict[str, object]) -> str:
    machine = results['machine']
    where = machine.get('gpu') or f'CPU ({machine["threads"]} threads)'
    labels = list(next(iter(results['models'].values()))['inputs'])
    # FLOPs and activations are counted at one size (--flops-size), which need not be a timed one.
    counted_at = next((entry['stats']['flops_size'] for entry in results['models'].values()
                       if 'flops_size' in entry.get('stats', {})), None)
    at = f', at {counted_at}' if counted_at else ''
    lines = [f'Device: {where}; torch {machine["torch"]}, triton {machine.get("triton")}; precision '
             f'{results["precision"]}; channels_last {results["channels_last"]}; cuDNN benchmark '
             f'{results.get("cudnn_benchmark", False)}; CUDA graph {results["cuda_graph"]}; '
             f'Triton launches {results.get("triton_launch", "jit")}; median of {results["repeats"]} '
             f'runs after {results["warmup"]} warm-up runs, forward only, batch 1.', '',
             '| model | params | ' + ' | '.join(f'{label} ms (x RLFN)' for label in labels)
             + ' | peak MiB (' + labels[min(1, len(labels) - 1)] + f') | FLOPs fvcore / full (G{at}) | activations '
             f'(M{at}) |',
             '|---|---|' + '---|' * len(labels) + '---|---|---|']
    for name, entry in results['models'].items():
        cells = [f'{entry["inputs"][label]["median_ms"]:.2f} ({entry["ratio_to_rlfn"][label]:.2f}x)'
                 for label in labels]
        memory = entry['inputs'][labels[min(1, len(labels) - 1)]]['peak_memory_mib']
        stats = entry.get('stats', {})
        fv = stats.get('flops_fvcore', stats.get('flops_fvcore_analytic'))
        full = stats.get('flops_full')
        flops = ' / '.join('n/a' if v is None else f'{v / 1e9:.2f}' for v in (fv, full))
        activations = stats.get('activations')
        label = name + (f' ({entry["scan_backend"]})' if 'scan_backend' in entry else '')
        lines.append(f'| {label} | {entry["parameters"]:,} | ' + ' | '.join(cells)
                     + f' | {"n/a" if memory is None else f"{memory:.0f}"} | {flops} | '
                     + ('n/a' if activations is None else f'{activations / 1e6:.1f}') + ' |')
    host = [f'{name} ' + ', '.join(f'{entry["inputs"][label]["host_median_ms"]:.2f} ({label})' for label in labels)
            for name, entry in results['models'].items() if 'host_median_ms' in entry['inputs'][labels[0]]]
    if host:
        lines += ['', f'CPU time to issue one forward, ms (median of {results["host_repeats"]}, the GPU kept busy; '
                  'a time close to the one above is bound by launch overhead): ' + '; '.join(host) + '.']
    return '\n'.join(lines) + '\n'


# ----------------------------------------------------------------------------------------------
# scan: correctness against ref and kernel-shape timings


def _scan_inputs(batch: int, inner: int, state: int, length: int, rank: int, device, dtype=torch.float32,
                 token_major: bool = True):
    """Random inputs shaped as the network makes them (token-major views unless told otherwise)."""
    def seq(channels):
        if token_major:
            return torch.randn(batch, length, channels, device=device, dtype=dtype).transpose(1, 2)
        return torch.randn(batch, channels, length, device=device, dtype=dtype)
    u, z = seq(inner), seq(inner)
    dt = seq(rank) * 0.5 if rank else seq(inner) * 0.5
    weight = (torch.randn(inner, rank, device=device) * rank**-0.5) if rank else None
    A = -torch.exp(torch.randn(inner, state, device=device) * 0.5 + 0.5)
    B, C = seq(state), seq(state)
    D = torch.randn(inner, device=device)
    bias = torch.randn(inner, device=device) * 0.5 - 1.0
    return u, dt, weight, A, B, C, D, z, bias


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@contextmanager
def poisoned_empty():
    """torch.empty returns NaN-filled floats: any element a kernel fails to write shows up."""
    original = torch.empty

    def empty(*args, **kwargs):
        out = original(*args, **kwargs)
        return out.fill_(float('nan')) if out.is_floating_point() else out
    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = original


def check_scan(device: torch.device, cases: Sequence[Tuple[int, int, int, int, int]], seed: int) -> List[Dict]:
    """Triton scan vs the float64 ref scan, forward and every gradient, on fresh random inputs."""
    from dvmsr_arch.ops.scan_ref import selective_scan_ref
    from dvmsr_arch.ops.scan_triton import selective_scan_lowrank_triton, selective_scan_triton
    torch.manual_seed(seed)
    rows = []
    for batch, inner, state, length, rank in cases:
        # Token-major views as the network passes them, plain contiguous tensors as other callers do.
        inputs = _scan_inputs(batch, inner, state, length, rank, device, token_major=bool(rank))
        names = ('u', 'dt' if rank else 'delta', 'dt_weight', 'A', 'B', 'C', 'D', 'z', 'delta_bias')
        leaves32 = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
        leaves64 = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
        u6, dt6, w6, A6, B6, C6, D6, z6, b6 = leaves64
        delta6 = torch.einsum('brl,er->bel', dt6, w6) if rank else dt6
        ref = selective_scan_ref(u6, delta6, A6, B6, C6, D6, z6, b6, True)
        with poisoned_empty():
            if rank:
                y = selective_scan_lowrank_triton(*leaves32, delta_softplus=True)
            else:
                y = selective_scan_triton(leaves32[0], leaves32[1], *leaves32[3:], delta_softplus=True)
            grad = torch.randn_like(ref)
            y.backward(grad.float())
        ref.backward(grad)
        with torch.no_grad(), poisoned_empty():
            out = torch.full((batch, length, inner), float('nan'), device=device).transpose(1, 2)
            plain = [t.detach() if t is not None else None for t in leaves32]
            if rank:
                selective_scan_lowrank_triton(*plain, delta_softplus=True, out=out)
            else:
                out.copy_(selective_scan_triton(plain[0], plain[1], *plain[3:], delta_softplus=True))
        row = {'shape': dict(batch=batch, E=inner, N=state, L=length, rank=rank),
               'forward_max_rel': _max_rel(y.detach(), ref.detach()),
               'forward_rel_l2': ((y.detach().double() - ref).norm() / ref.norm()).item(),
               'forward_nan': bool(torch.isnan(y).any().item() or torch.isnan(out).any().item()),
               'out_matches': bool(torch.equal(out, y.detach()))}
        for name, a, r in zip(names, leaves32, leaves64):
            if a is not None:
                row[f'grad_{name}_max_rel'] = _max_rel(a.grad, r.grad)
                row['grad_nan'] = row.get('grad_nan', False) or bool(torch.isnan(a.grad).any().item())
        rows.append(row)
    return rows


# The kernel shapes measured in docs/performance.md; `scan` times these when --scan-configs names none.
MEASURED_SCAN_CONFIGS = (
    'lanes_t8_e32_c32_w1', 'lanes_t4_e32_c64_w1', 'lanes_t8_e32_c16_w1', 'lanes_t8_e128_c32_w4', 'lanes_t16_e32_c16_w1',
    'lanes_t8_e64_c32_w2', 'lanes_t4_e64_c32_w2', 'lanes_t8_e32_c8_w1', 'lanes_t4_e64_c16_w2', 'lanes_t4_e64_c64_w2',
    'lanes_t2_e64_c64_w2', 'lanes_t4_e128_c32_w4', 'lanes_t8_e64_c16_w2', 'lanes_t4_e32_c32_w1', 'lanes_t8_e32_c64_w1',
    'assoc_t8_e32_c32_w4', 'lanes_t4_e64_c32_w2_p8', 'lanes_t4_e128_c32_w4_p8', 'lanes_t4_e32_c64_w1_p8',
    'lanes_t4_e64_c41_w2_p8', 'lanes_t4_e64_c32_w2_p8_waves', 'lanes_t4_e128_c64_w4_p8',
    'lanes_t4_e128_c32_w4_p8_waves')
SCAN_CONFIG_NAME = re.compile(r'(lanes|assoc)_t(\d+)_e(\d+)_c(\d+)_w(\d+)(?:_p(\d+))?(?:_s(\d+))?(?:_o(\d+))?(_waves)?')


def scan_config(name: str):
    """The ScanConfig a name spells: ``lanes`` (lane-per-channel kernels) or ``assoc`` (block
    kernels), then ``_tT`` tile, ``_eE`` channels per program, ``_cC`` tiles per chunk, ``_wW``
    warps, and optionally ``_pP`` prefetch distance, ``_sS`` and ``_oO`` register caps of the
    summary pass and of the output (or gradients) pass, ``_waves`` chunks fitted to whole waves of
    the GPU (ScanConfig.whole_waves). ValueError for anything else."""
    from dvmsr_arch.ops.scan_triton import ScanConfig
    match = SCAN_CONFIG_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f'{name!r} is not a scan kernel shape: write e.g. lanes_t4_e64_c32_w2_p8 '
                         f'(optionally _s80 and _o112 register caps, then _waves) or assoc_t8_e32_c32_w4')
    family, tile, block_e, tiles, warps, prefetch, summary_regs, output_regs, waves = match.groups()
    if family == 'assoc' and (prefetch or summary_regs or output_regs or waves):
        raise ValueError(f'{name!r}: prefetch, register caps and _waves apply to lanes kernels only')
    return ScanConfig(tile=int(tile), block_e=int(block_e), tiles_per_chunk=int(tiles), num_warps=int(warps),
                      sequential=family == 'lanes', prefetch=int(prefetch or 0),
                      summary_registers=int(summary_regs or 0), output_registers=int(output_regs or 0),
                      whole_waves=bool(waves))


def time_scan_configs(device: torch.device, length: int, names: Sequence[str], warmup: int, repeats: int,
                      dtype=torch.float32) -> Dict[str, Dict]:
    """The scan alone as the network calls it (E=120, N=16, rank 4, token-major), per kernel shape."""
    from dvmsr_arch.ops import scan_triton
    u, dt, weight, A, B, C, D, z, bias = _scan_inputs(1, 120, 16, length, 4, device, dtype=dtype)
    out = torch.empty(1, length, 120, device=device, dtype=dtype).transpose(1, 2)
    saved = scan_triton.FORWARD_CONFIG
    results = {}
    # The least any scan must move: u, z, dt, B, C read once, y written once.
    floor_bytes = (3 * 120 + 4 + 2 * 16) * length * u.element_size()
    try:
        for name in names:
            scan_triton.set_configs(forward=scan_config(name))
            with torch.no_grad():
                times = time_calls(lambda: scan_triton.selective_scan_lowrank_triton(
                    u, dt, weight, A, B, C, D, z, bias, True, out=out), device, warmup, repeats)
            results[name] = dict(summary(times), bytes_floor=floor_bytes)
            print(f'scan {name:24s} L={length}: {results[name]["median_ms"]:.3f} ms', flush=True)
    finally:
        scan_triton.set_configs(forward=saved)
    return results


def copy_bandwidth(device: torch.device) -> Optional[float]:
    """Device-to-device copy, GB/s counting bytes read plus written: the memory ceiling."""
    if device.type != 'cuda':
        return None
    src = torch.randn(256 * MIB // 4, device=device)
    dst = torch.empty_like(src)
    times = time_calls(lambda: dst.copy_(src), device, 3, 20)
    return 2 * src.numel() * 4 / (statistics.median(times) * 1e-3) / 1e9


def run_scan(args, device: torch.device) -> Dict[str, object]:
    cases = [(2, 24, 16, 1000, 4), (1, 120, 16, 4099, 4), (3, 7, 5, 77, 0), (2, 40, 16, 2500, 0)]
    if device.type == 'cpu':  # the interpreter: tiny sizes only
        cases = [(2, 6, 3, 29, 2), (1, 5, 4, 19, 0)]
    from dvmsr_arch.ops import scan_triton
    results: Dict[str, object] = {'machine': machine_info(device), 'checks': []}
    saved = scan_triton.FORWARD_CONFIG, scan_triton.BACKWARD_CONFIG
    # Every kernel family is checked, whichever is the default: the configured pair first, then
    # each candidate as both the forward and the backward shape.
    pairs = {'configured': saved} if args.check_configs != ['none'] else {}
    pairs.update({name: (scan_config(name),) * 2 for name in args.check_configs
                  if name not in ('none', 'configured')})
    try:
        for label, (forward, backward) in pairs.items():
            scan_triton.set_configs(forward=forward, backward=backward)
            for row in check_scan(device, cases, args.seed):
                row['configs'] = label
                results['checks'].append(row)
                print('check', json.dumps(row), flush=True)
    finally:
        scan_triton.set_configs(*saved)
    if device.type == 'cuda':
        results['copy_GBps'] = copy_bandwidth(device)
        names = args.scan_configs or list(MEASURED_SCAN_CONFIGS)
        results['timings'] = {}
        for length in args.scan_lengths:
            results['timings'][str(length)] = time_scan_configs(device, length, names, args.warmup, args.repeats)
        results['timings_fp16'] = time_scan_configs(device, args.scan_lengths[-1], names[:3], args.warmup,
                                                    args.repeats, dtype=torch.float16)
    return results


# ----------------------------------------------------------------------------------------------
# fidelity: true fp32 against float64, and Set5 PSNR per precision mode


def read_set5(folder: str):
    import cv2
    hr_dir, lr_dir = Path(folder) / 'HR', Path(folder) / 'LR_bicubic' / 'X4'
    pairs = []
    for hr_path in sorted(hr_dir.glob('*.png')):
        lr_path = lr_dir / hr_path.name
        if not lr_path.is_file():
            raise SystemExit(f'{lr_path}: missing LR image for {hr_path.name}')
        lr = read_lr_folder_one(lr_path)
        pairs.append((hr_path.stem, lr, cv2.imread(str(hr_path), cv2.IMREAD_COLOR)))
    if not pairs:
        raise SystemExit(f'{hr_dir}: no PNG images')
    return pairs


def read_lr_folder_one(path: Path) -> torch.Tensor:
    import cv2
    import numpy as np
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise SystemExit(f'{path}: not a readable image')
    return torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1]).astype(np.float32) / 255.0).permute(2, 0, 1)[None]


def psnr_y(sr: torch.Tensor, hr_bgr) -> float:
    import numpy as np
    from basicsr.metrics import calculate_psnr
    image = (sr[0].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()[:, :, ::-1] * 255.0).round()
    return calculate_psnr(image.astype(np.uint8), hr_bgr, crop_border=4, test_y_channel=True)


def run_fidelity(args, device: torch.device) -> Dict[str, object]:
    weights = args.weights.get('dvmsr', DEFAULT_WEIGHTS['dvmsr'])
    if not osp.isfile(weights):
        raise SystemExit(f'{weights}: released DVMSR weights needed for fidelity checks')
    pairs = read_set5(args.set5)
    reference = build_model('dvmsr', device, 'torch' if args.reference_backend == 'torch' else 'ref', weights).double()
    fast = build_model('dvmsr', device, args.scan_backend, weights, args.channels_last)
    results: Dict[str, object] = {'machine': machine_info(device), 'reference': f'{args.reference_backend} scan, float64',
                                  'fast_backend': resolve_backend(args.scan_backend, device), 'psnr': {}, 'max_abs': {}}
    with torch.inference_mode():
        refs = {name: reference(lr.to(device).double()) for name, lr, _ in pairs}
        results['psnr']['float64_reference'] = statistics.fmean(psnr_y(refs[n], hr) for n, _, hr in pairs)
        for mode in args.modes:
            with precision(mode, device):
                outs = {name: fast(lr.to(device)) for name, lr, _ in pairs}
            results['psnr'][mode] = statistics.fmean(psnr_y(outs[n], hr) for n, _, hr in pairs)
            results['max_abs'][mode] = max((outs[n].double() - refs[n]).abs().max().item() for n in outs)
            print(f'fidelity {mode}: Set5 PSNR-Y {results["psnr"][mode]:.4f} dB, max |out - float64| '
                  f'{results["max_abs"][mode]:.2e}', flush=True)
        # A long sequence: the first Set5 image resized to the NTIRE validation LR size.
        height, width = parse_size(args.long_size)
        big = F.interpolate(pairs[0][1], size=(height, width), mode='bicubic', align_corners=False).clamp(0, 1)
        big = big.to(device)
        ref_big = reference(big.double())
        with precision('fp32', device):
            out_big = fast(big)
        results['max_abs_long_fp32'] = {'size': args.long_size,
                                        'max_abs': (out_big.double() - ref_big).abs().max().item()}
        print(f'fidelity fp32 at {args.long_size}: max |out - float64| {results["max_abs_long_fp32"]["max_abs"]:.2e}',
              flush=True)
    for mode in args.modes:
        results.setdefault('psnr_delta_to_reference', {})[mode] = (results['psnr'][mode]
                                                                   - results['psnr']['float64_reference'])
    return results


# ----------------------------------------------------------------------------------------------
# train: one step's time, and gradients against float64


def train_step(name: str, device: torch.device, backend: str, batch: int, size: Tuple[int, int],
               channels_last: bool, mode: str = 'tf32', graphed: bool = False,
               adam: str = 'foreach') -> Callable[[], None]:
    """One optimisation step of ``name`` (L1 loss, Adam) on fixed random LR/HR tensors.

    Under ``fp16``/``bf16`` the forward and the loss run under autocast, entered afresh each step as a
    training loop would: one autocast region over several steps would keep reusing the weights'
    half-precision copies it cached at the first step. The TF32 switches are the caller's
    (``precision``). ``graphed`` captures the step as one CUDA graph on its first call (PyTorch's
    whole-network capture, Adam with ``capturable=True``); later calls replay it, without the host.
    ``adam``: PyTorch's multi-tensor Adam (``foreach``, its default on a GPU and BasicSR's) or its
    one-kernel ``fused`` one.
    """
    torch.manual_seed(0)
    net = build_model(name, device, backend, None, channels_last).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-4, capturable=graphed, **{adam: True})
    height, width = size
    scale = PIXEL_RANGE[name]
    lr = torch.rand(batch, 3, height, width, device=device) * scale
    hr = torch.rand(batch, 3, height * 4, width * 4, device=device) * scale
    if channels_last:
        lr = lr.contiguous(memory_format=torch.channels_last)
    half = AUTOCAST_DTYPES.get(mode)

    def forward_backward():
        # A graph must not replay casts autocast cached while it was being recorded.
        with torch.autocast(device.type, dtype=half, cache_enabled=not graphed) if half else nullcontext():
            loss = F.l1_loss(net(lr), hr)
        loss.backward()

    def step():
        optimizer.zero_grad(set_to_none=True)
        forward_backward()
        optimizer.step()
    if not graphed:
        return step
    replay: List[Callable[[], None]] = []

    def graphed_step():
        if not replay:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(3):  # Triton compiles, cuBLAS and cuDNN pick kernels, Adam builds its state
                    step()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            optimizer.zero_grad(set_to_none=True)  # the gradients come from the graph's pool
            with torch.cuda.graph(graph):
                forward_backward()
                optimizer.step()
            replay.append(graph.replay)
        replay[0]()
    return graphed_step


DISTILL_OPTION = osp.join(ROOT, 'options', 'train', 'student_x4.yml')


def distillation_teacher(device: torch.device, scan_backend: str = 'auto') -> torch.nn.Module:
    """The teacher of the paper's distillation (``network_t`` of options/train/student_x4.yml: 192
    channels, 8 RSSBs, pixelshuffle upsampler) with random weights, none trained being at hand; its
    time does not depend on them. In eval mode, as DistillSRModel runs it."""
    import yaml
    from basicsr.archs import build_network
    with open(DISTILL_OPTION) as f:
        spec = yaml.safe_load(f)['network_t']
    torch.manual_seed(0)
    return build_network(dict(spec, scan_backend=scan_backend)).eval().to(device)


def basicsr_iteration(option_file: str, device: torch.device, batch: int, size: Tuple[int, int],
                      ema_update: str = 'dvmsr', cuda_graph: bool = False,
                      settings: Sequence[str] = ()) -> Tuple[Callable[[], None], object]:
    """One iteration of BasicSR's own model, built from ``option_file`` (its ``model_type``,
    ``network_g`` and ``train`` section: losses, optimizer, EMA), on fixed random patches:
    ``feed_data`` and ``optimize_parameters``, which waits for the GPU to log the losses and then
    updates the EMA copy. That is what a training run spends on an iteration apart from loading
    data. A distillation (``network_t``) gets a teacher with random weights. The precision switches
    are the caller's; the networks keep BasicSR's NCHW layout.
    ``ema_update='basicsr'`` puts back basicsr's own per-parameter EMA update (see
    ``dvmsr_arch.compat``) to measure what the project's saves. ``cuda_graph`` sets
    ``train.cuda_graph`` (an SRModel file gets DVMSRModel, which is SRModel with that option), so that
    after its warm-up iterations the model replays its step as one CUDA graph. ``settings``: option
    values to set first, each ``key:key=value`` as BasicSR's ``--force_yml`` writes them (the value
    read as YAML). Returns the step and the model."""
    import logging
    import tempfile

    import yaml
    from basicsr.archs import build_network
    from basicsr.models import build_model as build_basicsr_model

    from dvmsr_arch import compat
    with open(option_file) as f:
        opt = yaml.safe_load(f)
    opt.update(is_train=True, dist=False, rank=0, world_size=1, num_gpu=int(device.type == 'cuda'))
    opt['path'] = {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None}
    for setting in settings:
        keys, equals, value = setting.partition('=')
        if not equals:
            raise ValueError(f'--basicsr-set {setting}: write key:key=value, as train:teacher_precision=fp16')
        node = opt
        *parents, last = keys.split(':')
        for key in parents:
            if not isinstance(node.get(key), dict):
                raise ValueError(f'--basicsr-set {setting}: {option_file} has no section {key}')
            node = node[key]
        node[last] = yaml.safe_load(value)
    if cuda_graph:
        opt['train']['cuda_graph'] = True
        if opt['model_type'] == 'SRModel':
            opt['model_type'] = 'DVMSRModel'
    logging.getLogger('basicsr').setLevel(logging.WARNING)  # its network summary would fill the output
    with tempfile.TemporaryDirectory() as folder:
        if 'network_t' in opt:
            # A distillation's teacher with random weights: none trained is at hand, and its forward
            # takes the same time whatever its weights.
            torch.manual_seed(1)
            teacher = osp.join(folder, 'teacher.pth')
            torch.save(build_network(opt['network_t']).state_dict(), teacher)
            opt['path'].update(pretrain_network_t=teacher, param_key_t=None)
        torch.manual_seed(0)
        model = build_basicsr_model(opt)
    if ema_update == 'basicsr':
        model.model_ema = compat._model_ema.__get__(model)
    height, width = size
    data = {'lq': torch.rand(batch, 3, height, width, device=device),
            'gt': torch.rand(batch, 3, height * opt['scale'], width * opt['scale'], device=device)}
    iteration = [0]

    def step():
        iteration[0] += 1
        model.feed_data(data)
        model.optimize_parameters(iteration[0])
    return step, model


def time_basicsr_iterations(args, device: torch.device, size: Tuple[int, int]) -> Dict[str, Dict[str, float]]:
    """BasicSR's iteration for ``--basicsr-option``, with the project's EMA update and with basicsr's
    own, timed in turns (one iteration of each, repeatedly), so that both see the same state of the
    machine; then each EMA update alone, from an idle GPU, which is how an iteration meets it (the
    loss logging before it waits for the GPU). With ``--basicsr-cuda-graph`` also the iteration
    recorded as a CUDA graph (``train.cuda_graph``), in the same turns."""
    from dvmsr_arch.models.dvmsr_model import WARMUP_ITERATIONS
    name = osp.splitext(osp.basename(args.basicsr_option))[0]
    variants = {'ema_dvmsr': ('dvmsr', False), 'ema_basicsr': ('basicsr', False)}
    if args.basicsr_cuda_graph and device.type == 'cuda':
        variants['cuda_graph'] = ('dvmsr', True)
    models = {variant: basicsr_iteration(args.basicsr_option, device, args.train_batch, size, update, graph,
                                         args.basicsr_set)
              for variant, (update, graph) in variants.items()}
    times: Dict[str, List[float]] = {variant: [] for variant in models}
    with precision(_tf32_switches(args.precision), device):
        # The graph's own warm-up iterations and its recording come before the timed ones.
        for _ in range(args.warmup + WARMUP_ITERATIONS + 1):
            for step, _model in models.values():
                step()
        for _ in range(args.repeats):
            for variant, (step, _model) in models.items():
                times[variant] += time_calls(step, device, 0, 1)
    results = {}
    for variant, (step, model) in models.items():
        decay = model.ema_decay
        ema_times = time_calls(lambda model=model, decay=decay: model.model_ema(decay), device, args.warmup,
                               args.repeats) if decay > 0 and variant != 'cuda_graph' else None
        key = f'basicsr_{name}_{variant}'
        results[key] = summary(times[variant])
        if ema_times:
            results[key]['ema_update_median_ms'] = statistics.median(ema_times)
        print(f'train step {key}: median {results[key]["median_ms"]:.2f} ms'
              + (f', EMA update {statistics.median(ema_times):.3f} ms' if ema_times else ''), flush=True)
    return results


def _tf32_switches(mode: str) -> str:
    """The precision mode whose TF32 switches ``mode`` uses, without its autocast (see ``train_step``)."""
    return mode if mode in ('fp32', 'tf32-conv') else 'tf32'


FP16_TRAINING = ('--precision fp16: fp16 training needs loss scaling, which the training step does not time; '
                 'use bf16, tf32 or fp32')


def run_train(args, device: torch.device) -> Dict[str, object]:
    if args.precision == 'fp16':
        # Without loss scaling fp16 gradients underflow to zero (an L1 loss over a batch of 64 starts
        # them at 1/N, about 8e-8, below fp16's smallest normal number); bf16 has fp32's range.
        raise ValueError(FP16_TRAINING)
    results: Dict[str, object] = {'machine': machine_info(device), 'cudnn_benchmark': args.cudnn_benchmark,
                                  'batch': args.train_batch,
                                  'lr_size': args.train_size, 'precision': args.precision,
                                  'channels_last': args.channels_last, 'adam': args.adam, 'steps': {}}
    size = parse_size(args.train_size)
    runs = [('dvmsr', backend) for backend in args.train_backends
            if backend == 'auto' or backend in available_backends(device)] + [('rlfn', 'auto')]
    graphed = args.cuda_graph and device.type == 'cuda'
    results['cuda_graph'] = graphed
    for name, backend in runs:
        step = train_step(name, device, backend, args.train_batch, size, args.channels_last, args.precision, graphed,
                          args.adam)
        with precision(_tf32_switches(args.precision), device):
            times = time_calls(step, device, args.warmup, args.repeats)
            memory = peak_memory_mib(step, device)
            # The host's share: what issuing one step costs the CPU while the GPU is busy elsewhere.
            host = None if graphed else host_times(step, device, args.host_repeats, sleep_s=0.2)
        key = f'dvmsr_{resolve_backend(backend, device)}' if name == 'dvmsr' else 'rlfn'
        results['steps'][key] = dict(summary(times), peak_memory_mib=memory)
        if host:
            results['steps'][key]['host_median_ms'] = statistics.median(host)
        print(f'train step {key}: median {results["steps"][key]["median_ms"]:.2f} ms'
              + (f', host {statistics.median(host):.2f} ms to issue' if host else ''), flush=True)
        del step
    if args.basicsr_option:
        results['steps'].update(time_basicsr_iterations(args, device, size))
    if 'rlfn' in results['steps']:
        for key, entry in results['steps'].items():
            entry['ratio_to_rlfn'] = entry['median_ms'] / results['steps']['rlfn']['median_ms']
    # Gradients of every parameter against the float64 path (small batch), true fp32.
    torch.manual_seed(1)
    ref = DVMSR(scan_backend='torch', drop_path_rate=0.0).to(device).double().train()
    fast = DVMSR(scan_backend=args.scan_backend, drop_path_rate=0.0).to(device).train()
    fast.load_state_dict(ref.state_dict())
    lr = torch.rand(2, 3, 32, 40, device=device)
    target = torch.rand(2, 3, 128, 160, device=device)
    with precision('fp32', device):
        F.l1_loss(fast(lr), target).backward()
    F.l1_loss(ref(lr.double()), target.double()).backward()
    checks = {'fp32': _grads_against(fast, ref)}
    half = AUTOCAST_DTYPES.get(args.precision)
    if half is not None:
        # The same gradients under the step's autocast: how far half-precision activations move them.
        fast.zero_grad(set_to_none=True)
        with precision(_tf32_switches(args.precision), device):
            with torch.autocast(device.type, dtype=half):
                loss = F.l1_loss(fast(lr), target)
            loss.backward()
        checks[args.precision] = _grads_against(fast, ref)
    for mode, worst in checks.items():
        entry = {'backend': resolve_backend(args.scan_backend, device), 'max_rel_worst': max(worst.values()),
                 'worst_parameter': max(worst, key=worst.get), 'per_parameter': worst}
        results['grad_check' if mode == 'fp32' else f'grad_check_{mode}'] = entry
        print(f'train grads vs float64 ({mode}): worst max-rel {entry["max_rel_worst"]:.2e} '
              f'({entry["worst_parameter"]})', flush=True)
    return results


def _grads_against(fast: torch.nn.Module, ref: torch.nn.Module) -> Dict[str, float]:
    """Each parameter's gradient, max |fast - ref| over max |ref|."""
    return {name: _max_rel(p.grad, q.grad) for (name, p), q in zip(fast.named_parameters(), ref.parameters())}


# ----------------------------------------------------------------------------------------------
# profile


def device_ms(events, runs: int) -> float:
    """Milliseconds of device work per run from profiler events: kernels, memsets and copies only.
    The operator rows carry their kernels' time as well and would count it twice. A user annotation
    (a ``record_function`` range, such as the optimizer's ``Optimizer.step#Adam.step``) also has a
    device-side event, which spans the kernels inside it and the gaps between them."""
    from torch.autograd import DeviceType
    return sum(e.time_range.elapsed_us() for e in events
               if e.device_type == DeviceType.CUDA and not getattr(e, 'is_user_annotation', False)) / runs / 1e3


def profiled(work: Callable[[], object], device: torch.device, warmup: int, runs: int, record_shapes: bool = False):
    """The PyTorch profiler's record of ``runs`` calls of ``work`` after ``warmup`` calls outside it
    (with the GPU's activity on CUDA; with ``record_shapes``, each operator's input shapes)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    for _ in range(warmup):
        work()
    synchronize(device)
    with profile(activities=activities, record_shapes=record_shapes) as prof:
        for _ in range(runs):
            work()
        synchronize(device)
    return prof


def run_profile(args, device: torch.device) -> Dict[str, object]:
    height, width = parse_size(args.profile_size)
    what = ('train step' if args.profile_train else 'teacher forward' if args.profile_teacher else 'forward')
    if args.profile_train or args.profile_teacher:
        what += f', batch {args.train_batch} at {args.train_size}'
    results: Dict[str, object] = {'machine': machine_info(device), 'size': args.profile_size, 'what': what,
                                  'cudnn_benchmark': args.cudnn_benchmark, 'tables': {}}
    for backend in args.profile_backends:
        if backend not in ('auto',) + tuple(available_backends(device)):
            continue
        for name in ('teacher',) if args.profile_teacher else ('dvmsr', 'rlfn'):
            if name == 'rlfn' and backend != args.profile_backends[0]:
                continue
            if name == 'teacher':
                # As a distillation iteration runs it: no autograd, BasicSR's NCHW batch.
                net = build_model(name, device, backend, None, args.channels_last)
                x = torch.rand(args.train_batch, 3, *parse_size(args.train_size), device=device)
                if args.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                work, mode, switches = partial(net, x), torch.inference_mode(), args.precision
            elif args.profile_train:
                work = train_step(name, device, backend, args.train_batch, parse_size(args.train_size),
                                  args.channels_last, args.precision, adam=args.adam)
                mode, switches = nullcontext(), _tf32_switches(args.precision)
            else:
                net = build_model(name, device, backend, None, args.channels_last)
                x = torch.rand(1, 3, height, width, device=device) * PIXEL_RANGE[name]
                work, mode, switches = partial(net, x), torch.inference_mode(), args.precision
            with mode, precision(switches, device):
                prof = profiled(work, device, 3, args.profile_runs, record_shapes=args.profile_shapes)
            key = f'{name}_{resolve_backend(backend, device) if name != "rlfn" else "cudnn"}'
            sort = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
            table = prof.key_averages().table(sort_by=sort, row_limit=40 if args.profile_train else 25,
                                              max_name_column_width=70)
            results['tables'][key] = table
            print(table, flush=True)
            if args.profile_shapes:
                # The operators again, one row per operator and input shapes: which of, say, the
                # step's 75 sums is the slow one.
                table = prof.key_averages(group_by_input_shape=True).table(
                    sort_by='device_time_total' if device.type == 'cuda' else 'cpu_time_total', row_limit=80,
                    max_name_column_width=40, max_shapes_column_width=80)
                results.setdefault('tables_by_shape', {})[key] = table
                print(table, flush=True)
            total = device_ms(prof.events(), args.profile_runs)
            results.setdefault('gpu_ms_per_train_step' if args.profile_train else 'gpu_ms_per_forward', {})[key] = total
            print(f'profile {key}: GPU kernel time {total:.3f} ms per {what}', flush=True)
            if name != 'rlfn':
                # Registers bound how many programs of a Triton kernel an SM holds, and spills cost loads.
                from dvmsr_arch.ops.launch import compiled_kernels
                kernels = compiled_kernels()
                results.setdefault('triton_kernels', {})[key] = [
                    dict(name=k, registers=r, spilled_words=sp, warps=w) for k, r, sp, w in kernels]
                for kernel, registers, spilled, warps in kernels:
                    print(f'profile {key}: {kernel} {registers} registers, {spilled} spilled words, {warps} warps',
                          flush=True)
            if args.memory_at_peak and device.type == 'cuda':
                with mode, precision(switches, device):
                    peak, held, rows = live_at_peak(work, device)
                results.setdefault('memory_at_peak', {})[key] = {'peak_mib': peak, 'held_before_mib': held,
                                                                 'live': rows}
                print(f'profile {key}: {peak:.1f} MiB at the peak of one {what}, {held:.1f} MiB of it held '
                      "before the call (weights, input, and what else the process holds, such as cuBLAS's "
                      'workspace); live then:', flush=True)
                for mib, where in rows:
                    print(f'  {mib:8.2f} MiB  {where}', flush=True)
            del work
    return results


def live_at_peak(work: Callable[[], object], device: torch.device) -> Tuple[float, float, List[Tuple[float, str]]]:
    """The CUDA allocations live at the peak of one ``work()`` call: the peak and what was allocated
    before the call (MiB), and each buffer of 1 MiB or more allocated in the call and live at the
    peak, with the code that allocated it. From the caching allocator's own record of the call."""
    synchronize(device)
    held = torch.cuda.memory_allocated(device)
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks='python')
    try:
        work()
        synchronize(device)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    index = device.index if device.index is not None else torch.cuda.current_device()
    peak, at_peak = peak_of_trace(snapshot['device_traces'][index], held)
    rows = [(event['size'] / 2**20, _allocated_by(event)) for event in at_peak if event['size'] >= 2**20]
    return peak / 2**20, held / 2**20, rows


def peak_of_trace(events: Sequence[dict], held: int) -> Tuple[int, List[dict]]:
    """Walk the caching allocator's trace of a call (``alloc`` and ``free_requested`` events, with
    ``held`` bytes allocated before it): the peak in bytes and the allocations live there, largest
    first."""
    live: Dict[int, dict] = {}
    current = peak = held
    at_peak: List[dict] = []
    for event in events:
        if event['action'] == 'alloc':
            live[event['addr']] = event
            current += event['size']
            if current > peak:
                peak, at_peak = current, list(live.values())
        elif event['action'] == 'free_requested':  # a buffer of the call's, or one held before it
            live.pop(event['addr'], None)
            current -= event['size']
    return peak, sorted(at_peak, key=lambda e: -e['size'])


def _allocated_by(event: dict) -> str:
    """The innermost two frames of this package that made an allocation (else the innermost one)."""
    frames = event.get('frames', [])
    ours = [f for f in frames if f'{os.sep}dvmsr_arch{os.sep}' in f['filename']] or frames[:1]
    return ' < '.join(f"{osp.basename(f['filename'])}:{f['line']} {f['name']}" for f in ours[:2])


# ----------------------------------------------------------------------------------------------
# floor: what the released student must move and compute, layer by layer as the CUDA path runs


def floor_per_token(embed: int = 60, inner: int = 120, state: int = 16, rank: int = 4, vimms: int = 8,
                    rssbs: int = 4, out_channels: int = 48, element_bytes: int = 4) -> Dict[str, float]:
    """Bytes and operations per LR pixel, each kernel reading its inputs and writing its outputs once.

    The structure is the one ``MambaMixer._forward_triton`` runs: LayerNorm, in_proj, conv1d+SiLU,
    x_proj, the two scan passes (summary, output), out_proj; plus the RSSB convolutions and skips.
    """
    per_vimm = (2 * embed  # LayerNorm
                + embed + 2 * inner  # in_proj
                + 2 * inner  # conv1d + SiLU
                + inner + rank + 2 * state  # x_proj
                + inner + rank + state  # scan summary pass: u, dt, B
                + 2 * inner + rank + 2 * state + inner)  # scan output pass: u, z, dt, B, C -> y
    per_rssb = 2 * embed + 3 * embed  # 3x3 conv, then the skip addition
    rest = (2 * embed  # patch-embed LayerNorm
            + 3 + embed  # conv_first
            + 2 * embed + 2 * embed + embed  # norm_f, conv_after_body, long skip
            + embed + out_channels + 2 * out_channels + 2 * 3)  # upsampler conv, PixelShuffle, mean
    elements = vimms * per_vimm + rssbs * per_rssb + rest
    scan_elements = vimms * (inner + rank + state + 2 * inner + rank + 2 * state + inner)
    matmul_flops = 2 * vimms * (embed * 2 * inner + inner * (rank + 2 * state) + inner * embed)
    conv_flops = 2 * 9 * ((rssbs + 1) * embed * embed + 3 * embed + embed * out_channels)
    return {'bytes': elements * element_bytes, 'scan_bytes': scan_elements * element_bytes,
            'exp2': vimms * 2 * inner * state,  # two scan passes, one exp2 per state
            'tensor_flops': matmul_flops + conv_flops}


def train_scan_floor(batch: int, height: int, width: int, inner: int = 120, state: int = 16,
                     vimms: int = 8) -> Dict[str, float]:
    """The exp2 that a training step's scan kernels take per state, and the bytes of the states the
    forward saves for the backward, with the configured shapes (``FORWARD_CONFIG``'s chunks, which a
    GPU may lengthen to fill whole waves, and ``BACKWARD_CONFIG``).

    Per channel, state and token: one decay in the forward's summary and output passes and in the
    backward's summary pass (each summary pass leaves out one chunk a sequence), and in the
    gradients kernel one per token plus one for each token it re-steps: a tile of T tokens goes
    back in runs of 4, and the run starting at offset k first steps from the tile start through
    k + 3 tokens. Softplus, the gate and the other per-channel work come on top."""
    from dvmsr_arch.ops.scan_triton import BACKWARD_CONFIG, FORWARD_CONFIG
    length, tile = height * width, BACKWARD_CONFIG.tile

    def summarised(cfg) -> float:
        chunks = -(-length // (cfg.tile * cfg.tiles_per_chunk))
        return (chunks - 1) / chunks

    restepped = sum(k + 3 for k in range(0, tile, 4)) / tile
    per_state = summarised(FORWARD_CONFIG) + 1 + summarised(BACKWARD_CONFIG) + 1 + restepped
    elements = batch * length * inner * state * vimms
    saved_bytes = 2 * batch * -(-length // tile) * inner * state * 4 * vimms  # written, then read back
    return {'exp2': per_state * elements, 'exp2_per_state_and_token': per_state, 'saved_state_bytes': saved_bytes}


def run_floor(args, device: torch.device) -> Dict[str, object]:
    """Lower bounds per forward from the counts above and the device's ceilings, then what a
    training step's scan kernels must compute and move (``train_scan_floor``)."""
    per_token = floor_per_token(element_bytes=2 if args.precision in ('fp16', 'bf16') else 4)
    bandwidth = args.bandwidth_gbps * 1e9
    results = {'per_token': per_token, 'bandwidth_GBps': args.bandwidth_gbps, 'exp2_per_s': args.exp2_rate,
               'tensor_flops_per_s': args.tensor_tflops * 1e12, 'precision': args.precision, 'sizes': {}}
    for label in args.sizes:
        height, width = parse_size(label)
        tokens = height * width
        memory_ms = per_token['bytes'] * tokens / bandwidth * 1e3
        scan_memory_ms = per_token['scan_bytes'] * tokens / bandwidth * 1e3
        exp_ms = per_token['exp2'] * tokens / args.exp2_rate * 1e3
        tensor_ms = per_token['tensor_flops'] * tokens / (args.tensor_tflops * 1e12) * 1e3
        # Kernels run one after another: the scan kernels are bound by exp2 or memory, the rest by memory.
        structure_ms = memory_ms - scan_memory_ms + max(scan_memory_ms, exp_ms)
        results['sizes'][label] = dict(tokens=tokens, gbytes=per_token['bytes'] * tokens / 1e9, memory_ms=memory_ms,
                                       scan_exp2_ms=exp_ms, tensor_ms=tensor_ms, floor_ms=structure_ms)
        print(f'floor {label:>10s}: {per_token["bytes"] * tokens / 1e9:6.2f} GB -> {memory_ms:7.3f} ms; '
              f'scan exp2 {exp_ms:7.3f} ms; tensor {tensor_ms:6.3f} ms; structure floor {structure_ms:7.3f} ms')
    height, width = parse_size(args.train_size)
    train = train_scan_floor(args.train_batch, height, width)
    train.update(batch=args.train_batch, size=args.train_size, exp2_ms=train['exp2'] / args.exp2_rate * 1e3,
                 saved_state_ms=train['saved_state_bytes'] / bandwidth * 1e3)
    results['train_scan'] = train
    print(f'floor train step, batch {args.train_batch} at {args.train_size}: the scan kernels\' '
          f'{train["exp2"] / 1e9:.2f}e9 exp2 ({train["exp2_per_state_and_token"]:.2f} per state and token) '
          f'-> {train["exp2_ms"]:.3f} ms; saved states {train["saved_state_bytes"] / 1e9:.2f} GB '
          f'-> {train["saved_state_ms"]:.3f} ms')
    return results


# ----------------------------------------------------------------------------------------------


def write(out_dir: Optional[str], name: str, results: Dict[str, object], markdown: Optional[str] = None) -> None:
    if not out_dir:
        return
    os.makedirs(out_dir, exist_ok=True)
    with open(osp.join(out_dir, f'{name}.json'), 'w', encoding='utf-8') as f:
        json.dump(results, f, indent=1, default=str)
    if markdown is not None:
        with open(osp.join(out_dir, f'{name}.md'), 'w', encoding='utf-8') as f:
            f.write(markdown)


def parse_weights(items: Sequence[str]) -> Dict[str, str]:
    weights = {}
    for item in items:
        name, sep, path = item.partition('=')
        if not sep or name not in PIXEL_RANGE:
            raise SystemExit(f'--weights {item!r}: write MODEL=PATH with MODEL one of {", ".join(PIXEL_RANGE)}')
        if not osp.isfile(path):
            raise SystemExit(f'--weights {item!r}: {path} is not a file')
        weights[name] = path
    return weights


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('command', choices=('report', 'scan', 'fidelity', 'train', 'profile', 'floor', 'all'))
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--models', nargs='+', default=['dvmsr'], help='dvmsr and/or rlfn (rlfn is always added)')
    parser.add_argument('--weights', nargs='*', default=[], help='MODEL=PATH (default: ../shared/weights/...)')
    parser.add_argument('--sizes', nargs='+', default=['256x256', '339x510', '678x1020'], help='LR sizes HxW')
    parser.add_argument('--lr-dir', help='time over the images of this folder instead of --sizes')
    parser.add_argument('--precision', default='tf32', choices=PRECISIONS)
    parser.add_argument('--scan-backend', default='auto', help='selective-scan backend of DVMSR')
    parser.add_argument('--channels-last', action='store_true', help='NHWC convolutions')
    parser.add_argument('--cudnn-benchmark', action='store_true',
                        help='let cuDNN time its algorithms for each new input shape and keep the fastest '
                             '(torch.backends.cudnn.benchmark, which BasicSR\'s train and test scripts set); '
                             'the warm-up runs take that search')
    parser.add_argument('--low-memory', action='store_true',
                        help='DVMSR inference computes in_proj in halves, never holding x, z and u at once '
                             '(dvmsr_arch.ops.low_memory_inference)')
    parser.add_argument('--cuda-graph', action='store_true',
                        help='report: time CUDA-graph replays of each forward; train: of the whole step')
    parser.add_argument('--triton-launch', default='direct', choices=('direct', 'jit'),
                        help="how DVMSR's Triton kernels are launched: straight to the compiled kernel once "
                        "compiled (direct, the default) or through Triton's JIT each time (see dvmsr_arch.ops.launch)")
    parser.add_argument('--scan-config', help='Triton scan kernel shape by name, e.g. lanes_t4_e64_c32_w2_p8 (see scan_config)')
    parser.add_argument('--backward-config', help='Triton backward kernel shape by name (same names)')
    parser.add_argument('--warmup', type=int, default=5)
    parser.add_argument('--repeats', type=int, default=20)
    parser.add_argument('--host-repeats', type=int, default=10,
                        help='report: samples of the CPU time to issue a forward (its minimum resolves small '
                             'changes on a busy host better with more)')
    parser.add_argument('--no-flops', action='store_true', help='skip the FLOP/activation count (CPU work)')
    parser.add_argument('--flops-size', default='256x256', help='LR size for FLOPs and activations')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--scan-lengths', type=int, nargs='+', default=[339 * 510])
    parser.add_argument('--scan-configs', nargs='*', help='kernel shapes to time (default: MEASURED_SCAN_CONFIGS)')
    parser.add_argument('--check-configs', nargs='*', default=['lanes_t8_e32_c32_w1', 'assoc_t8_e32_c32_w4'],
                        help='kernel shapes checked against float64 as forward and backward, besides the configured pair '
                             '("none": no check at all, timings only)')
    parser.add_argument('--set5', default=osp.join(ROOT, '..', 'shared', 'data', 'Set5'))
    parser.add_argument('--modes', nargs='+', default=['fp32', 'tf32', 'fp16', 'bf16'], choices=PRECISIONS)
    parser.add_argument('--reference-backend', default='torch', choices=('torch', 'ref'),
                        help='float64 reference path for fidelity (torch: the same math, chunked)')
    parser.add_argument('--long-size', default='339x510')
    parser.add_argument('--train-batch', type=int, default=64)
    parser.add_argument('--train-size', default='64x64')
    parser.add_argument('--train-backends', nargs='+', default=['triton'])
    parser.add_argument('--adam', default='foreach', choices=('foreach', 'fused'),
                        help="train, profile --profile-train: PyTorch's Adam implementation for the timed steps")
    parser.add_argument('--basicsr-option', help='train: also time whole iterations of BasicSR\'s model for this '
                        'option file (e.g. options/train/student_x4.yml, whose teacher gets random weights)')
    parser.add_argument('--basicsr-set', nargs='+', default=[], metavar='KEY=VALUE',
                        help='train: with --basicsr-option, option values to set first, as --force_yml writes them '
                             '(e.g. train:teacher_precision=fp16)')
    parser.add_argument('--basicsr-cuda-graph', action='store_true',
                        help='train: with --basicsr-option, also time that iteration recorded as one CUDA graph '
                             '(train.cuda_graph: true)')
    parser.add_argument('--profile-size', default='339x510')
    parser.add_argument('--profile-runs', type=int, default=5)
    parser.add_argument('--profile-backends', nargs='+', default=['triton'])
    parser.add_argument('--profile-train', action='store_true',
                        help='profile: training steps (--train-batch, --train-size) instead of forwards')
    parser.add_argument('--profile-teacher', action='store_true',
                        help="profile: the distillation teacher's forward without autograd (network_t of "
                        'options/train/student_x4.yml, random weights) on --train-batch patches of --train-size')
    parser.add_argument('--profile-shapes', action='store_true',
                        help="profile: also a table with one row per operator and input shapes")
    parser.add_argument('--memory-at-peak', action='store_true',
                        help='profile (CUDA): also list the buffers live at the peak of one more forward or step')
    parser.add_argument('--bandwidth-gbps', type=float, default=3890.0,
                        help='floor: memory bandwidth (default: a device-to-device copy measured on an H200)')
    parser.add_argument('--exp2-rate', type=float, default=16 * 132 * 1.98e9,
                        help='floor: exp2 per second (default: H100/H200, 16 per SM per clock, 132 SMs, 1.98 GHz)')
    parser.add_argument('--tensor-tflops', type=float, default=495.0, help='floor: dense TF32 rate')
    parser.add_argument('--out', help='folder for the JSON and markdown files')
    args = parser.parse_args(argv)
    for flag in ('--repeats', '--host-repeats', '--profile-runs'):
        if getattr(args, flag[2:].replace('-', '_')) < 1:
            parser.error(f'{flag} must be at least 1')
    if args.profile_train and args.profile_teacher:
        parser.error('--profile-train and --profile-teacher: profile one of them at a time')
    if args.precision == 'fp16' and (args.command == 'train' or args.command == 'profile' and args.profile_train):
        parser.error(FP16_TRAINING)
    args.weights = parse_weights(args.weights)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda: no CUDA device here; use --device cpu')
    for flag, key in (('--scan-config', 'forward'), ('--backward-config', 'backward')):
        name = getattr(args, flag[2:].replace('-', '_'))
        if name:
            try:
                config = scan_config(name)
            except ValueError as error:
                raise SystemExit(f'{flag}: {error}')
            from dvmsr_arch.ops import scan_triton
            scan_triton.set_configs(**{key: config})
    for name in (args.scan_configs or []) + [n for n in args.check_configs if n not in ('none', 'configured')]:
        try:
            scan_config(name)  # a misspelt shape fails here, before any timing
        except ValueError as error:
            raise SystemExit(f'--scan-configs/--check-configs: {error}')

    from dvmsr_arch.ops.launch import set_direct_launches
    set_direct_launches(args.triton_launch == 'direct')
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    commands = ('report', 'scan', 'fidelity', 'train', 'profile') if args.command == 'all' else (args.command,)
    failures = 0
    with low_memory_inference(args.low_memory):
        for command in commands:
            failures += run_command(command, args, device)
    return 1 if failures else 0


def run_command(command: str, args, device: torch.device) -> int:
    """Run one subcommand and return 1 if it failed; in `all`, a failure writes its error and lets
    the other subcommands keep their numbers."""
    try:
        if command == 'report':
            results = run_report(args, device)
            markdown = report_markdown(results)
            print(markdown)
            write(args.out, 'report', results, markdown)
        elif command == 'scan':
            write(args.out, 'scan', run_scan(args, device))
        elif command == 'fidelity':
            write(args.out, 'fidelity', run_fidelity(args, device))
        elif command == 'train':
            write(args.out, 'train', run_train(args, device))
        elif command == 'floor':
            write(args.out, 'floor', run_floor(args, device))
        elif command == 'profile':
            results = run_profile(args, device)
            write(args.out, 'profile', results, '\n\n'.join(f'## {k}\n```\n{v}\n```' for k, v in
                                                           results['tables'].items()))
    except SystemExit:
        raise
    except Exception as error:
        if args.command != 'all':
            raise
        import traceback
        traceback.print_exc()
        write(args.out, f'{command}_error', {'error': repr(error)})
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
