"""Time the Triton kernels around the scan one call at a time, over their block shapes (CUDA only).

    python scripts/kernel_sweep.py --out results/kernel_sweep.json

At LR 339x510 (L = 172,890 tokens) with random inputs of the released widths (C=60, E=120, N=16,
rank 4), TF32 allowed: LayerNorm + in_proj (separate, and fused over its block shapes), conv1d +
SiLU (over its block shapes) and x_proj after it, conv1d's backward and LayerNorm's forward + backward at the
training step's size (over their block shapes), a convolution's bias and skip added in one pass,
the scan with u contiguous or read from in_proj's x plane, and cuDNN's 3x3 convolution from token
rows of 60 or 64 channels (the fused path pads), alone and, at the training step's size (batch 64,
64x64), with its backward. Each number is the median of 20 calls between two CUDA events after 5
warm-up calls, so it includes the launch: compare the numbers with each other, and use
``benchmark.py profile`` for kernel times inside the network. The two backward sweeps (conv1d's and
LayerNorm's, through autograd) report kernel time per call from the profiler instead: the host
takes longer to issue such a call than its kernels run, so events around it time the host. The
chosen shapes are the module constants of ``dvmsr_arch/ops/fused_triton.py``.

First, at the teacher's widths (192 channels, 384 inner; ``--wide-only`` runs these alone): LayerNorm
+ in_proj at batch 64 of 64x64, separate and fused; LayerNorm's forward without autograd at the
distillation teacher's batch of 128, and its forward + backward at batch 32; conv1d's backward at
batch 32. Each over its block shapes.
"""
import argparse
import itertools
import json
import os
import sys
from os import path as osp

ROOT = osp.abspath(osp.join(__file__, osp.pardir, osp.pardir))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import dvmsr_arch  # noqa: E402,F401
from benchmark import device_ms, profiled, time_calls  # noqa: E402  (scripts/, this file's folder)
from dvmsr_arch.ops import fused_triton, scan_triton  # noqa: E402

LENGTH, C, E, N, R = 339 * 510, 60, 120, 16, 4
WIDE_C = 192  # the teacher's embed_dim


def median_us(fn, warmup: int = 5, repeats: int = 20) -> float:
    """The middle (upper middle for an even count) of ``repeats`` single-call times, in µs."""
    times = time_calls(fn, torch.device('cuda'), warmup, repeats)
    return round(sorted(times)[len(times) // 2] * 1000, 1)


def kernel_us(fn, warmup: int = 5, runs: int = 20) -> float:
    """GPU kernel time per call in µs, from the profiler's device events as ``benchmark.py profile``
    counts them. For calls through autograd, whose host time exceeds their kernels': events around
    such a call time the host."""
    prof = profiled(fn, torch.device('cuda'), warmup, runs)
    return round(device_ms(prof.events(), runs) * 1000, 1)


def sweep(setting: dict, shapes, fn, timer=median_us) -> dict:
    """Time ``fn`` by ``timer`` with the module constants of fused_triton set to each shape, then
    restore them."""
    saved = {name: getattr(fused_triton, name) for name in setting}
    out = {}
    try:
        for values in shapes:
            for name, value in zip(setting, values):
                setattr(fused_triton, name, value)
            label = ' '.join(f'{setting[name]}{value}' for name, value in zip(setting, values))
            try:
                out[label] = timer(fn)
            except Exception as error:  # a shape that does not fit (shared memory) is a result too
                out[label] = f'{type(error).__name__}'
    finally:
        for name, value in saved.items():
            setattr(fused_triton, name, value)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', help='JSON file for the results')
    parser.add_argument('--wide-only', action='store_true', help="only the kernels at the teacher's widths")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit('kernel_sweep.py needs a CUDA GPU')
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    dev = torch.device('cuda')
    results = {'device': torch.cuda.get_device_name(), 'torch': torch.__version__, 'length': LENGTH}

    # The teacher's width (192 -> 768), which the distillation step's teacher forward and validation
    # run without autograd, at the training step's 64 x 64 x 64 tokens: the two kernels apart (what
    # the network runs past LN_LINEAR_MAX_CHANNELS), and the fused one made to run anyway.
    wide = torch.randn(64, 64 * 64, WIDE_C, device=dev)
    wide_w, wide_b = torch.randn(WIDE_C, device=dev), torch.randn(WIDE_C, device=dev)
    wide_in = torch.randn(8 * WIDE_C, WIDE_C, device=dev) * 0.05
    results[f'layer_norm + in_proj at {WIDE_C} channels, separate'] = median_us(
        lambda: F.linear(fused_triton.layer_norm_tokens(wide, wide_w, wide_b, 1e-5), wide_in))
    results[f'layer_norm_linear at {WIDE_C} channels'] = sweep(
        {'LN_LINEAR_MAX_CHANNELS': 'fused up to ', 'LN_LINEAR_BLOCK_ROWS': 'rows ', 'LN_LINEAR_BLOCK_OUT': 'out ',
         'LN_LINEAR_WARPS': 'warps '},
        itertools.product((WIDE_C,), (16, 32, 64), (32, 64), (4, 8)),
        lambda: fused_triton.layer_norm_linear_tokens(wide, wide_w, wide_b, 1e-5, wide_in))
    del wide
    # LayerNorm alone at that width: its forward without autograd at the distillation teacher's
    # batch (128 of 64x64), then forward + backward under autograd at a teacher-training batch (32).
    wide = torch.randn(128, 64 * 64, WIDE_C, device=dev)
    results[f'layer_norm forward at {WIDE_C} channels, batch 128 of 64x64'] = sweep(
        {'LN_WIDE_FWD_BLOCK_ROWS': 'rows ', 'LN_WIDE_FWD_WARPS': 'warps '},
        itertools.product((4, 8, 16, 32, 64), (1, 2, 4, 8)),
        lambda: fused_triton.layer_norm_tokens(wide, wide_w, wide_b, 1e-5))
    del wide
    wide = torch.randn(32, 64 * 64, WIDE_C, device=dev, requires_grad=True)
    wide_w.requires_grad_()
    wide_b.requires_grad_()
    wide_dy = torch.randn(32, 64 * 64, WIDE_C, device=dev)
    results[f'layer_norm forward + backward at {WIDE_C} channels, batch 32 of 64x64'] = sweep(
        {'LN_WIDE_BLOCK_ROWS': 'backward rows ', 'LN_WIDE_WARPS': 'warps '},
        itertools.product((4, 8, 16, 32, 64), (2, 4, 8)),
        lambda: torch.autograd.grad(fused_triton.layer_norm_tokens(wide, wide_w, wide_b, 1e-5), (wide, wide_w, wide_b),
                                    wide_dy), kernel_us)
    del wide, wide_dy
    # conv1d's backward at the teacher's inner width (384), x a view of in_proj's [x, z] rows as in
    # training, batch 32 of 64x64.
    xz = torch.randn(32, 64 * 64, 4 * WIDE_C, device=dev)
    x_wide = xz[..., :2 * WIDE_C].detach().requires_grad_()
    w_wide = (torch.randn(2 * WIDE_C, 1, 4, device=dev) * 0.3).requires_grad_()
    b_wide = torch.randn(2 * WIDE_C, device=dev).requires_grad_()
    y_wide = fused_triton.causal_conv1d_silu_tokens(x_wide, w_wide, b_wide)
    dy_wide = torch.randn_like(y_wide)
    results[f'conv1d backward at {2 * WIDE_C} channels, batch 32 of 64x64'] = sweep(
        {'CONV_WIDE_BWD_BLOCK_L': 'tokens ', 'CONV_WIDE_BWD_WARPS': 'warps '},
        itertools.product((8, 16, 32, 64), (2, 4, 8)),
        lambda: torch.autograd.grad(y_wide, (x_wide, w_wide, b_wide), dy_wide, retain_graph=True), kernel_us)
    del xz, x_wide, y_wide, dy_wide
    if args.wide_only:
        return _write(results, args.out)

    tokens = torch.randn(1, LENGTH, C, device=dev)
    norm_w, norm_b = torch.randn(C, device=dev), torch.randn(C, device=dev)
    w_in = torch.randn(2 * E, C, device=dev) * 0.1
    results['layer_norm + in_proj, separate'] = median_us(
        lambda: F.linear(fused_triton.layer_norm_tokens(tokens, norm_w, norm_b, 1e-5), w_in))
    results['layer_norm_linear'] = sweep(
        {'LN_LINEAR_BLOCK_ROWS': 'rows ', 'LN_LINEAR_BLOCK_OUT': 'out ', 'LN_LINEAR_WARPS': 'warps '},
        itertools.product((32, 64, 128), (64, 128, 256), (4, 8)),
        lambda: fused_triton.layer_norm_linear_tokens(tokens, norm_w, norm_b, 1e-5, w_in, planes=2))

    # in_proj's output as inference lays it out: the x plane, then the z plane.
    x_plane, z_plane = torch.randn(2, 1, LENGTH, E, device=dev)
    conv_w, conv_b = torch.randn(E, 1, 4, device=dev) * 0.3, torch.randn(E, device=dev)
    w_x = torch.randn(R + 2 * N, E, device=dev) * 0.1
    results['conv1d + x_proj, separate'] = median_us(
        lambda: F.linear(fused_triton.causal_conv1d_silu_tokens(x_plane, conv_w, conv_b), w_x))
    results['conv1d alone'] = median_us(lambda: fused_triton.causal_conv1d_silu_tokens(x_plane, conv_w, conv_b))
    results['conv1d'] = sweep(
        {'CONV_BLOCK_L': 'tokens ', 'CONV_BLOCK_E': 'channels '},
        itertools.product((16, 32, 64, 128, 256), (32, 64, 128)),
        lambda: fused_triton.causal_conv1d_silu_tokens(x_plane, conv_w, conv_b))
    # Its backward (both kernels, and the sums of dw's and db's partials) at the training step's
    # size: batch 64 of 64x64 tokens.
    x_train = torch.randn(64, 64 * 64, E, device=dev, requires_grad=True)
    w_train, b_train = conv_w.clone().requires_grad_(), conv_b.clone().requires_grad_()
    y_train = fused_triton.causal_conv1d_silu_tokens(x_train, w_train, b_train)
    dy_train = torch.randn_like(y_train)
    results['conv1d backward, batch 64 of 64x64'] = sweep(
        {'CONV_BWD_BLOCK_L': 'tokens ', 'CONV_BWD_BLOCK_E': 'channels ', 'CONV_BWD_WARPS': 'warps '},
        itertools.product((8, 16, 32, 64), (32, 64, 128), (2, 4, 8)),
        lambda: torch.autograd.grad(y_train, (x_train, w_train, b_train), dy_train, retain_graph=True), kernel_us)
    del x_train, y_train, dy_train
    # LayerNorm alone, forward and backward with the sums of dw's and db's partials, at the training
    # step's size, as in_proj's LayerNorm runs under autograd.
    ln_x = torch.randn(64, 64 * 64, C, device=dev, requires_grad=True)
    ln_w, ln_b = norm_w.clone().requires_grad_(), norm_b.clone().requires_grad_()
    ln_dy = torch.randn(64, 64 * 64, C, device=dev)
    results['layer_norm forward + backward, batch 64 of 64x64'] = sweep(
        {'LN_BLOCK_ROWS': 'rows ', 'LN_WARPS': 'warps '},
        itertools.product((8, 16, 32, 64, 128), (1, 2, 4, 8)),
        lambda: torch.autograd.grad(fused_triton.layer_norm_tokens(ln_x, ln_w, ln_b, 1e-5), (ln_x, ln_w, ln_b), ln_dy),
        kernel_us)
    del ln_x, ln_dy

    conv_out, skip, conv_bias = (torch.randn(1, LENGTH, C, device=dev), torch.randn(1, LENGTH, C, device=dev),
                                 torch.randn(C, device=dev))
    results['conv bias + skip'] = sweep({'ADD_BLOCK_ROWS': 'rows '}, ((16,), (32,), (64,), (128,), (256,)),
                                        lambda: fused_triton.add_bias_skip_(conv_out, conv_bias, skip))

    rows = torch.randn(1, LENGTH, R + 2 * N, device=dev) * 0.5
    dt, B, C_rows = (t.transpose(1, 2) for t in rows.split([R, N, N], -1))
    w_dt = torch.randn(E, R, device=dev) * 0.5
    A = -torch.exp(torch.randn(E, N, device=dev) * 0.5 + 0.5)
    D, bias = torch.randn(E, device=dev), torch.randn(E, device=dev) * 0.5 - 1
    x = fused_triton.causal_conv1d_silu_tokens(x_plane, conv_w, conv_b)
    z = z_plane.transpose(1, 2)
    out = torch.empty(1, LENGTH, E, device=dev).transpose(1, 2)
    scan = scan_triton.selective_scan_lowrank_triton
    with torch.no_grad():
        results['scan, u contiguous'] = median_us(lambda: scan(x.transpose(1, 2), dt, w_dt, A, B, C_rows, D, z, bias,
                                                               True, out=out))
        results['scan, u read from the x plane'] = median_us(
            lambda: scan(x_plane.transpose(1, 2), dt, w_dt, A, B, C_rows, D, z, bias, True, out=out))
    # The image the network hands cuDNN: token rows seen as channels-last (B, C, H, W).
    for channels in (60, 64):
        image = torch.randn(1, LENGTH, channels, device=dev).transpose(1, 2).reshape(1, channels, 339, 510)
        weight = (torch.randn(C, channels, 3, 3, device=dev) * 0.05).contiguous(memory_format=torch.channels_last)
        results[f'conv 3x3, {channels} -> {C} channels'] = median_us(lambda: F.conv2d(image, weight, None, 1, 1))
    for in_channels, out_channels in ((60, 60), (64, 60), (64, 64)):
        batch = torch.randn(64, 64 * 64, in_channels, device=dev).transpose(1, 2).reshape(64, in_channels, 64, 64)
        batch.requires_grad_()
        weight = (torch.randn(out_channels, in_channels, 3, 3, device=dev) * 0.05).contiguous(
            memory_format=torch.channels_last).requires_grad_()
        grad = torch.randn(64, 64 * 64, out_channels, device=dev).transpose(1, 2).reshape(64, out_channels, 64, 64)
        label = f'conv 3x3 forward + backward, batch 64 of 64x64, {in_channels} -> {out_channels} channels'
        results[label] = median_us(lambda: F.conv2d(batch, weight, None, 1, 1).backward(grad))
    return _write(results, args.out)


def _write(results: dict, out) -> int:
    print(json.dumps(results, indent=1))
    if out:
        os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
        with open(out, 'w') as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
