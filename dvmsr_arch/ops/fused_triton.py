"""Triton LayerNorm and causal Conv1d + SiLU for token-major activations, with autograd, and
LayerNorm followed by a Linear layer as one kernel for inference.

PyTorch's LayerNorm kernel is slow on rows of 60 channels, and its Conv1d wants (batch, E, L)
contiguous input, which costs a transpose and a padded copy per call. These kernels read and write
(batch, L, C) directly. CUDA only (or the CPU under ``TRITON_INTERPRET=1``), like the scan kernels.
"""
from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

from .launch import launch
from .scan_triton import _cdiv, _pow2, _sum_partials

# LayerNorm alone (training, and outside the mixers): rows a program and warps. Rows up to 64 wide
# (the student's) take 8 rows and one warp: in a training step on an H100 the backward took 68 us a
# call against 109 us at 32 rows and 4 warps, the forward 61 against 82 us (docs/performance.md, 18d).
# Wider rows (the teacher's 192): the forward takes 4 rows and 2 warps, 290 against 485 us a call at
# 32 x 4 for the distillation teacher's batch of 128 x 64 x 64 tokens; the backward keeps 32 rows and
# 4 warps, 200 us a call (with the forward) at batch 32, as fast as any other shape (H100,
# `kernel_sweep.py --wide-only`; docs/performance.md, version 23).
LN_BLOCK_ROWS, LN_WARPS = 8, 1
LN_WIDE_BLOCK_ROWS, LN_WIDE_WARPS = 32, 4
LN_WIDE_FWD_BLOCK_ROWS, LN_WIDE_FWD_WARPS = 4, 2
LN_LINEAR_BLOCK_ROWS = 128
# LayerNorm + Linear in one kernel pays for narrow rows only (the student's 60 channels). At the
# teacher's 192 it took 1.9-6.4 ms a call over its block shapes against 0.95-1.0 ms for the two apart
# (batch 64 of 64x64 tokens, H100, `kernel_sweep.py --wide-only`), and at 128 rows a program it asked
# for 352 KiB of shared memory, where an H100 has 227 KiB a block.
LN_LINEAR_MAX_CHANNELS = 64
LN_LINEAR_BLOCK_OUT = 64
LN_LINEAR_WARPS = 8
# conv1d's forward: short blocks of tokens across (up to) all the channels, so that a program reads
# whole rows of in_proj's x plane. Inside the network at LR 339x510 it took 68 us a call at 16 x
# 128 against 85 us at 64 x 32 (H100, docs/performance.md, version 16).
CONV_BLOCK_L = 16
CONV_BLOCK_E = 128
# conv1d's backward kernels: short blocks of tokens across all the channels. In a training step the
# first of them took 218 us a call at 16 x 128 against 310 us at 64 x 32 (docs/performance.md, 13e).
CONV_BWD_BLOCK_L = 16
CONV_BWD_BLOCK_E = 128
CONV_BWD_WARPS = 4
# Past one block of channels (the teacher's 384): 32 tokens and 2 warps a program. At the teacher's
# training step (batch 32 of 64x64 tokens) both kernels and the sums took 539 against 737 us a call
# at 16 x 4 (H100, `kernel_sweep.py --wide-only`; docs/performance.md, version 23).
CONV_WIDE_BWD_BLOCK_L = 32
CONV_WIDE_BWD_WARPS = 2
# add_bias_skip_: 64 token rows a program, fewer where the rows are wide. At 192 channels (256-wide
# blocks) 64 rows took 255 registers and spilled (an offline sm_90a build); 16 rows take 132.
ADD_BLOCK_ROWS = 64
ADD_BLOCK_ELEMENTS = 4096
SHUFFLE_BLOCK_W = 32


_low_memory = False


@contextmanager
def low_memory_inference(enabled: bool = True) -> Iterator[None]:
    """Inside this context, DVMSR's Triton inference path stores less: each ViMM computes in_proj's
    x half, runs conv1d on it and frees it before it computes the z half, so that it never holds x,
    z and conv1d's output at once. The price is in_proj's LayerNorm twice and two kernels instead of
    one. Measured on an H100 at LR 339x510 (docs/usage.md): peak memory 319 MiB instead of 372,
    about 4% more GPU time. Training and other backends are unaffected."""
    global _low_memory
    saved, _low_memory = _low_memory, enabled
    try:
        yield
    finally:
        _low_memory = saved


def low_memory_enabled() -> bool:
    return _low_memory


def _kernels():
    from . import fused_triton_kernels  # imported late: TRITON_INTERPRET must be set before triton loads
    return fused_triton_kernels


def _layer_norm_shape(width: int, forward: bool = False) -> Tuple[int, int]:
    if width <= 64:
        return LN_BLOCK_ROWS, LN_WARPS
    return (LN_WIDE_FWD_BLOCK_ROWS, LN_WIDE_FWD_WARPS) if forward else (LN_WIDE_BLOCK_ROWS, LN_WIDE_WARPS)


def _layer_norm_forward(x: Tensor, weight: Tensor, bias: Tensor, eps: float, save_stats: bool,
                        width: Optional[int] = None, sample_scale: Optional[Tensor] = None):
    batch, length, channels = x.shape
    width = width or channels
    rows = batch * length
    y = torch.empty(batch, length, width, device=x.device, dtype=x.dtype)
    stats = [torch.empty(rows, device=x.device, dtype=torch.float32) for _ in range(2)] if save_stats else [y, y]
    block_rows, warps = _layer_norm_shape(width, forward=True)
    launch(_kernels()._layer_norm_fwd, (_cdiv(rows, block_rows),),
        x, sample_scale if sample_scale is not None else weight, weight, bias, y, stats[0], stats[1], rows, length,
        channels, width, *x.stride(), *y.stride(), eps, BLOCK_R=block_rows, BLOCK_C=_pow2(width),
        SAVE_STATS=save_stats, HAS_SCALE=sample_scale is not None, num_warps=warps)
    return y, stats


class _LayerNorm(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, eps, width, sample_scale):
        y, (mean, rstd) = _layer_norm_forward(x, weight, bias, eps, save_stats=True, width=width,
                                              sample_scale=sample_scale)
        ctx.save_for_backward(x, weight, mean, rstd, sample_scale)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd, sample_scale = ctx.saved_tensors
        batch, length, channels = x.shape
        dy = dy[..., :channels]  # padding columns are constant zeros
        rows = batch * length
        block_rows, warps = _layer_norm_shape(channels)
        programs = _cdiv(rows, block_rows)
        dx = torch.empty(batch, length, channels, device=x.device, dtype=torch.float32)
        dw_part, db_part = (torch.empty(programs, channels, device=x.device, dtype=torch.float32) for _ in range(2))
        launch(_kernels()._layer_norm_bwd, (programs,), x, sample_scale if sample_scale is not None else weight,
               weight, dy, mean, rstd, dx, dw_part, db_part, rows, length, channels, *x.stride(), *dy.stride(),
               BLOCK_R=block_rows, BLOCK_C=_pow2(channels), HAS_SCALE=sample_scale is not None, num_warps=warps)
        return (dx.to(x.dtype), _sum_partials(dw_part).to(weight.dtype), _sum_partials(db_part).to(weight.dtype), None,
                None, None)


def layer_norm_tokens(x: Tensor, weight: Tensor, bias: Tensor, eps: float, width: Optional[int] = None,
                      sample_scale: Optional[Tensor] = None) -> Tensor:
    """LayerNorm over the last axis of (batch, L, C), any strides; returns a contiguous tensor.

    ``width`` > C: the rows are ``width`` wide, zero after the C normalised values.
    ``sample_scale`` (batch,): LayerNorm of x times each sample's factor (stochastic depth's), taken
    in the kernel rather than in a pass of its own over x, forward and backward; no gradient for it.
    """
    if width is not None and width < x.shape[-1]:
        raise ValueError(f'layer_norm_tokens: width={width} is less than the {x.shape[-1]} channels')
    if sample_scale is not None:
        sample_scale = sample_scale.detach().float().contiguous()
        if sample_scale.shape != (x.shape[0],):
            raise ValueError(f'layer_norm_tokens: sample_scale {tuple(sample_scale.shape)} for {x.shape[0]} samples')
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return _LayerNorm.apply(x, weight, bias, eps, width, sample_scale)
    return _layer_norm_forward(x, weight, bias, eps, save_stats=False, width=width, sample_scale=sample_scale)[0]


def layer_norm_linear_tokens(x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], eps: float,
                             weight: Tensor, out_dtype: Optional[torch.dtype] = None, planes: int = 1) -> Tensor:
    """``F.linear(F.layer_norm(x), weight)`` without bias, for inference: one kernel reads x once and
    writes only the projection, instead of writing the normalised tokens and reading them again.

    x (batch, L, C) any strides; weight (OUT, C). The matmul uses TF32 when
    ``torch.backends.cuda.matmul.allow_tf32`` allows it, as ``F.linear`` would. Returns a contiguous
    (batch, L, OUT) tensor of x's dtype (or ``out_dtype``); with ``planes`` = P > 1, a (P, batch, L,
    OUT / P) tensor whose p-th plane holds outputs p * OUT / P onwards (Mamba's x and z halves apart).
    From the fused kernel each plane is contiguous. Rows wider than ``LN_LINEAR_MAX_CHANNELS``, or no
    ``norm_weight`` (no LayerNorm), take :func:`layer_norm_tokens` and one cuBLAS matmul instead, whose
    planes are then views of its rows: one matmul per plane made the teacher's forward slower.
    """
    batch, length, channels = x.shape
    rows = batch * length
    width = weight.shape[0] // planes
    dtype = out_dtype or x.dtype
    if norm_weight is None or channels > LN_LINEAR_MAX_CHANNELS:
        normalised = x if norm_weight is None else layer_norm_tokens(x, norm_weight, norm_bias, eps)
        y = torch.mm(normalised.reshape(rows, channels).to(dtype), weight.to(dtype).t())
        return y.view(batch, length, planes, width).permute(2, 0, 1, 3) if planes > 1 else y.view(batch, length, -1)
    # Each plane starts on 128 bytes, so that the kernel may store whole vectors to every plane.
    plane_stride = _cdiv(rows * width, 32) * 32 if planes > 1 else rows * width
    storage = torch.empty(planes * plane_stride, device=x.device, dtype=dtype)
    y = storage.as_strided((planes, batch, length, width), (plane_stride, length * width, width, 1))
    # WIDTH is a constexpr: the compiler then knows where y's rows start and stores whole vectors for
    # any width (as a run-time argument only for multiples of 16, and Mamba's halves are 120 wide).
    launch(_kernels()._layer_norm_linear_fwd, (_cdiv(rows, LN_LINEAR_BLOCK_ROWS),),
        x, norm_weight, norm_bias, weight.contiguous(), y, rows, length, channels, *x.stride(), eps, plane_stride,
        WIDTH=width, PLANES=planes, BLOCK_R=LN_LINEAR_BLOCK_ROWS, BLOCK_C=max(16, _pow2(channels)),
        BLOCK_O=LN_LINEAR_BLOCK_OUT, TF32=bool(torch.backends.cuda.matmul.allow_tf32), num_warps=LN_LINEAR_WARPS)
    return y[0] if planes == 1 else y


def _conv_grid(batch: int, length: int, inner: int, block_l: int, block_e: int):
    return (_cdiv(length, block_l), _cdiv(inner, block_e), batch)


def causal_conv_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """:func:`causal_conv1d_silu_tokens` without autograd; ``weight`` contiguous."""
    batch, length, inner = x.shape
    y = torch.empty(batch, length, inner, device=x.device, dtype=x.dtype)
    launch(_kernels()._causal_conv_silu_fwd, _conv_grid(batch, length, inner, CONV_BLOCK_L, CONV_BLOCK_E),
        x, weight, bias if bias is not None else weight, y, length, inner, *x.stride(), *y.stride(),
        K=weight.shape[-1], BLOCK_L=CONV_BLOCK_L, BLOCK_E=CONV_BLOCK_E, HAS_BIAS=bias is not None)
    return y


def causal_conv_backward(x: Tensor, weight: Tensor, bias: Optional[Tensor], dy: Tensor,
                         dx_into: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Gradients (fp32) of :func:`causal_conv1d_silu_tokens`'s x, weight and bias from its output's
    ``dy`` (any strides). ``dx_into``: a (batch, L, E) fp32 view with unit channel stride and rows
    evenly spaced (a slice of wider rows, say) that receives x's gradient."""
    batch, length, inner = x.shape
    kernel = weight.shape[-1]
    wide = inner > CONV_BWD_BLOCK_E
    block_l, warps = (CONV_WIDE_BWD_BLOCK_L, CONV_WIDE_BWD_WARPS) if wide else (CONV_BWD_BLOCK_L, CONV_BWD_WARPS)
    grid = _conv_grid(batch, length, inner, block_l, CONV_BWD_BLOCK_E)
    shape = dict(K=kernel, BLOCK_L=block_l, BLOCK_E=CONV_BWD_BLOCK_E, num_warps=warps)
    f32 = dict(device=x.device, dtype=torch.float32)
    dx = torch.empty(batch, length, inner, **f32) if dx_into is None else dx_into
    row = dx.stride(1)
    if dx.dtype != torch.float32 or dx.shape != x.shape or dx.stride() != (length * row, row, 1):
        raise ValueError(f'causal_conv_backward: dx_into {tuple(dx.shape)} {dx.dtype} with strides {dx.stride()} '
                         f'for x {tuple(x.shape)}: fp32 rows evenly spaced, channels adjacent')
    gpre = torch.empty(batch, length, inner, **f32)
    dw_part = torch.empty(batch * grid[0], inner, kernel, **f32)
    db_part = torch.empty(batch * grid[0], inner, **f32)
    k = _kernels()
    launch(k._causal_conv_silu_bwd_pre, grid, x, weight, bias if bias is not None else weight, dy, gpre, dw_part,
           db_part, length, inner, grid[0], *x.stride(), *dy.stride(), HAS_BIAS=bias is not None, **shape)
    launch(k._causal_conv_bwd_dx, grid, gpre, weight, dx, length, inner, row, **shape)
    dweight = _sum_partials(dw_part).view_as(weight)
    dbias = _sum_partials(db_part) if bias is not None else None
    return dx, dweight, dbias


class _CausalConvSilu(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return causal_conv_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        dx, dweight, dbias = causal_conv_backward(x, weight, bias, dy)
        return dx.to(x.dtype), dweight.to(weight.dtype), dbias.to(bias.dtype) if bias is not None else None


def causal_conv1d_silu_tokens(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """silu(depthwise causal Conv1d) of token-major x (batch, L, E), any strides; weight (E, 1, K).

    Returns a contiguous (batch, L, E) tensor.
    """
    weight = weight.contiguous()
    tensors = (x, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _CausalConvSilu.apply(x, weight, bias)
    return causal_conv_forward(x, weight, bias)


def add_bias_skip_(y: Tensor, bias: Tensor, skip: Tensor) -> Tensor:
    """``y += bias + skip`` in one pass, for inference: y and skip (batch, L, C) token rows of any
    strides (y typically a convolution's output seen as tokens), bias (C).

    A convolution with its bias followed by a skip addition costs two passes over y (PyTorch adds a
    cuDNN convolution's bias separately); this is one. Returns y.
    """
    batch, length, channels = y.shape
    if skip.shape != y.shape or bias.shape != (channels,):
        raise ValueError(f'add_bias_skip_: y {tuple(y.shape)}, bias {tuple(bias.shape)}, skip {tuple(skip.shape)}')
    rows, block_c = batch * length, _pow2(channels)
    block_r = max(1, min(ADD_BLOCK_ROWS, ADD_BLOCK_ELEMENTS // block_c))
    launch(_kernels()._add_bias_skip, (_cdiv(rows, block_r),), y, bias, skip, rows, length, channels,
           *y.stride(), *skip.stride(), BLOCK_R=block_r, BLOCK_C=block_c)
    return y


class _AddBiasSkip(torch.autograd.Function):
    """``add_bias_skip_`` under autograd, for a convolution's output image ``y`` (batch, C, H, W),
    which the convolution's backward does not read, so it may change in place."""

    @staticmethod
    def forward(ctx, y, bias, skip):
        ctx.mark_dirty(y)
        add_bias_skip_(y.flatten(2).transpose(1, 2), bias, skip)
        return y

    @staticmethod
    def backward(ctx, grad):
        d_bias = None
        if ctx.needs_input_grad[1]:
            # Over the pixels as rows of C values: a view for channels-last gradients.
            d_bias = _sum_partials(grad.permute(0, 2, 3, 1), axes=3)
        return grad, d_bias, grad.flatten(2).transpose(1, 2)


def add_bias_skip_image(y: Tensor, bias: Tensor, skip: Tensor) -> Tensor:
    """``y + bias + skip`` as tokens (batch, H*W, C), written into ``y``, a convolution's output image
    (batch, C, H, W) without its bias; skip (batch, H*W, C) tokens; with autograd. In a training step
    this one pass replaces cuDNN's bias pass and the skip addition's, and the bias's gradient is a
    matrix-vector product instead of cuDNN's reduction (docs/performance.md, version 21)."""
    return _AddBiasSkip.apply(y, bias, skip).flatten(2).transpose(1, 2)


def pixel_shuffle_image(y: Tensor, bias: Tensor, mean: Tensor, scale: float, factor: int) -> Tensor:
    """``mean + scale * pixel_shuffle(y + bias, factor)`` in one pass, for inference: y (batch, K, H, W)
    of any strides (a convolution's output, channels-last typically) before its bias (K), mean
    (K / factor², one value per output channel). Returns a new contiguous (batch, K / factor²,
    H·factor, W·factor) image in y's dtype.

    The upsampler's tail was three passes over the SR image: the convolution's bias, PixelShuffle's
    copy and the mean; this is one.
    """
    batch, channels, height, width = y.shape
    out_channels = channels // factor**2
    if out_channels * factor**2 != channels or bias.shape != (channels,) or mean.numel() != out_channels:
        raise ValueError(f'pixel_shuffle_image: y {tuple(y.shape)}, bias {tuple(bias.shape)}, mean '
                         f'{tuple(mean.shape)}, factor {factor}')
    out = torch.empty(batch, out_channels, height * factor, width * factor, device=y.device, dtype=y.dtype)
    grid = (batch * height, _cdiv(width, SHUFFLE_BLOCK_W))
    launch(_kernels()._pixel_shuffle_image, grid, y, bias, mean.reshape(-1), out, height, width, channels,
           y.stride(0), y.stride(1), y.stride(2), y.stride(3), scale, R=factor, BLOCK_W=SHUFFLE_BLOCK_W,
           BLOCK_K=_pow2(channels))
    return out
