"""DVMSR: Distillated Vision Mamba for efficient Super-Resolution (Lei et al., CVPRW 2024).

Parameter names and shapes follow the released code (and mamba_ssm's ``Mamba``), so the released
checkpoints load strictly. Defaults are the released x4 student: 4 RSSBs x 2 ViMMs at 60 channels,
424,428 parameters.
"""
import math
from typing import Callable, Dict, Hashable, List, Literal, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from basicsr.utils.registry import ARCH_REGISTRY
from torch import Tensor, nn
from torch.utils.weak import WeakTensorKeyDictionary

from dvmsr_arch.ops import causal_conv1d_silu, check_backend_name, resolve_backend, selective_scan
from dvmsr_arch.ops.fused_triton import (add_bias_skip_, add_bias_skip_image, causal_conv1d_silu_tokens,
                                        layer_norm_linear_tokens, layer_norm_tokens, low_memory_enabled,
                                        pixel_shuffle_image)
from dvmsr_arch.ops.mamba_inner import mamba_inner_triton
from dvmsr_arch.ops.scan_triton import (padded_dt_weight, padded_x_proj_weight, row_layout,
                                        selective_scan_lowrank_triton)

RGB_MEAN = (0.4488, 0.4371, 0.4040)


def images_to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H*W, C), row-major raster order: the scan order of the released model."""
    return x.flatten(2).transpose(1, 2)


def tokens_to_images(tokens: Tensor, size: Tuple[int, int]) -> Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *size)


# cuDNN's NHWC convolutions read an input of a multiple of 8 channels in place; an input of 60 is
# first copied into a padded layout, for a slower kernel (H100, LR 339x510, 60 -> 60 channels: 143 us
# against 70 us from 64 channels, docs/performance.md). So the fused path hands each convolution
# token rows padded with zero columns to this multiple, and pads the weights to match.
CONV_CHANNEL_MULTIPLE = 8

_derived_tensors = WeakTensorKeyDictionary()


def conv_input_width(channels: int, fused: bool) -> Optional[int]:
    """How wide the fused path makes the token rows a convolution reads (None: as they are)."""
    if not fused:
        return None
    return -(-channels // CONV_CHANNEL_MULTIPLE) * CONV_CHANNEL_MULTIPLE


def derived_tensor(source: Tensor, kind: Hashable, build: Callable[[], Tensor]) -> Tensor:
    """``build()``, a tensor the inference kernels take in place of the parameter ``source``, kept
    until ``source`` changes (a parameter's version counter moves with every in-place update), so
    inference does not rebuild it in each call. Built without autograd."""
    key = (source.data_ptr(), source._version, source.dtype)
    cache = _derived_tensors.get(source)
    if cache is None:
        cache = _derived_tensors[source] = {}
    if kind not in cache or cache[kind][0] != key:
        with torch.no_grad():
            cache[kind] = (key, build())
    return cache[kind][1]


def zero_padded(weight: Tensor, shape: Sequence[int]) -> Tensor:
    """``weight`` with zeros appended along each axis up to ``shape`` (``weight`` itself when it has
    that shape), channels-last for a convolution's. While autograd records ``weight`` the padding is
    part of the graph; otherwise it is kept as a ``derived_tensor``."""
    shape = tuple(shape)
    if tuple(weight.shape) == shape:
        return weight

    def build() -> Tensor:
        padding = [p for have, want in zip(reversed(weight.shape), reversed(shape)) for p in (0, want - have)]
        layout = torch.channels_last if weight.dim() == 4 else torch.contiguous_format
        return F.pad(weight, padding).contiguous(memory_format=layout)
    if torch.is_grad_enabled() and weight.requires_grad:
        return build()
    return derived_tensor(weight, ('zero_padded', shape), build)


def conv_on_padded(conv: nn.Conv2d, x: Tensor, bias: Optional[Tensor], out_channels: Optional[int] = None) -> Tensor:
    """``conv`` (with ``bias``) of an image whose channels after ``conv.in_channels``, if any, are zero;
    ``out_channels`` > conv.out_channels appends zero output channels."""
    out_channels = out_channels or conv.out_channels
    return conv._conv_forward(x, zero_padded(conv.weight, (out_channels, x.shape[1], *conv.kernel_size)), bias)


def conv_any_width(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)`` with its bias, for an image that may carry zero channels after ``conv.in_channels``.
    Through the module when it carries none, so that forward hooks (activation counts) see the call."""
    if x.shape[1] == conv.in_channels:
        return conv(x)
    return conv_on_padded(conv, x, conv.bias)


def records(conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether autograd records ``conv`` applied to ``x``: then the fused inference passes stay off."""
    return torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)


def conv_plus_skip(conv: nn.Conv2d, tokens: Tensor, size: Tuple[int, int], skip: Tensor, fused: bool,
                   out_width: Optional[int] = None) -> Tensor:
    """``conv`` applied to the tokens as an image, plus ``skip`` (tokens), as tokens.

    ``fused``: ``tokens`` may carry zero columns after the conv's input channels (see
    ``CONV_CHANNEL_MULTIPLE``). For inference the convolution then runs without its bias, and one
    Triton pass adds bias and skip (in fp32, stored in the convolution's dtype), where PyTorch would
    add a cuDNN convolution's bias in a pass of its own; ``out_width`` asks for the result padded
    with zero columns too. Under autograd the result is C wide, and the same pass adds bias and
    skip where their dtypes agree.
    """
    x = tokens_to_images(tokens, size)
    if not fused or conv.bias is None:
        return images_to_tokens(conv_any_width(conv, x)) + skip
    if records(conv, x):
        y = conv_on_padded(conv, x, None)
        if y.dtype != skip.dtype:  # autocast: as the convolution would add its bias, in y's dtype
            return images_to_tokens(y + conv.bias.to(y.dtype).view(-1, 1, 1)) + skip
        return add_bias_skip_image(y, conv.bias, skip)
    y = images_to_tokens(conv_on_padded(conv, x, None, out_width))
    if y.dtype != skip.dtype:
        return y[..., :conv.out_channels] + conv.bias + skip
    add_bias_skip_(y[..., :conv.out_channels], conv.bias, skip)
    return y


def release_storage(tensor: Tensor) -> None:
    """Free the memory of ``tensor``, a dead activation that callers up the stack still reference
    (Python keeps a call's arguments alive until it returns), when it owns all of it. The tensor is
    then empty: reading it raises. Without it, inference peaked inside the second ViMM of an RSSB
    while the first ViMM's output, already read by in_proj, still took 60 values per token
    (docs/performance.md, version 15)."""
    storage = tensor.untyped_storage()
    if tensor.storage_offset() == 0 and storage.nbytes() == tensor.numel() * tensor.element_size():
        storage.resize_(0)


def scaled_per_sample(x: Tensor, sample_scale: Tensor) -> Tensor:
    """``x`` (B, ...) times each sample's factor (B,)."""
    return x * sample_scale.view((-1,) + (1,) * (x.ndim - 1))


def _may_be_kept(producer: nn.Module, consumer: nn.Module) -> bool:
    """Whether a hook may hold on to a tensor that ``producer`` hands ``consumer``: a forward hook
    of ``producer`` or its children, a forward pre-hook of ``consumer`` or its children, or a global
    one."""
    module = nn.modules.module
    return (bool(module._global_forward_hooks or module._global_forward_pre_hooks)
            or any(m._forward_hooks for m in producer.modules())
            or any(m._forward_pre_hooks for m in consumer.modules()))


def layer_norm(norm: nn.LayerNorm, tokens: Tensor, fused: bool, width: Optional[int] = None) -> Tensor:
    """``norm(tokens)``; ``fused`` runs it as a Triton kernel (PyTorch's is slow on 60-wide rows),
    whose output rows ``width`` pads with zero columns."""
    if fused:
        return layer_norm_tokens(tokens, norm.weight, norm.bias, norm.eps, width)
    return norm(tokens)


class DropPath(nn.Module):
    """Stochastic depth: zero a whole sample with probability ``p`` while training, rescale the rest."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def sample_scale(self, x: Tensor) -> Optional[Tensor]:
        """A new draw of each sample's factor (batch,): 0 or 1 / (1 - p); None when inactive."""
        if self.p == 0.0 or not self.training:
            return None
        return x.new_empty(x.shape[0]).bernoulli_(1.0 - self.p).div_(1.0 - self.p)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.sample_scale(x)
        return x if scale is None else scaled_per_sample(x, scale)


def _ssm_parameters(inner: int, d_state: int, d_conv: int, dt_rank: int):
    """One scan direction's own parameters: conv1d, x_proj, dt_proj, A_log (E, N) and D (E)."""
    # The causal padding is applied in ``causal_conv1d_silu``, not by the module.
    conv1d = nn.Conv1d(inner, inner, d_conv, groups=inner)
    x_proj = nn.Linear(inner, dt_rank + 2 * d_state, bias=False)
    dt_proj = nn.Linear(dt_rank, inner)
    A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(inner, 1))
    D = nn.Parameter(torch.ones(inner))
    return conv1d, x_proj, dt_proj, A_log, D


class MambaMixer(nn.Module):
    """mamba_ssm's ``Mamba`` block (same parameter names), with the scan behind ``dvmsr_arch.ops``.

    Args:
        dim: Token width C.
        d_state: SSM state size N.
        d_conv: Kernel size of the causal depthwise Conv1d.
        expand: Inner width E = expand * dim.
        dt_rank: Rank R of the delta projection.
        bidirectional: Add a second scan over the reversed sequence with its own conv1d, x/dt
            projections, A and D (suffix ``_b``), sharing ``in_proj`` and ``out_proj``; the two gated
            outputs are averaged before ``out_proj``, as in Vision Mamba.
        scan_backend: Selective-scan backend, see :mod:`dvmsr_arch.ops.selective_scan`.
    """

    def __init__(self, *, dim: int, d_state: int, d_conv: int, expand: int, dt_rank: int, bidirectional: bool,
                 scan_backend: str) -> None:
        super().__init__()
        inner = expand * dim
        self.d_state, self.dt_rank, self.scan_backend = d_state, dt_rank, scan_backend
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D = _ssm_parameters(inner, d_state, d_conv, dt_rank)
        if bidirectional:
            self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b = _ssm_parameters(
                inner, d_state, d_conv, dt_rank)
        self.bidirectional = bidirectional
        self.out_proj = nn.Linear(inner, dim, bias=False)

    def _scan(self, x: Tensor, z: Tensor, conv1d: nn.Conv1d, x_proj: nn.Linear, dt_proj: nn.Linear, A_log: Tensor,
              D: Tensor, backend: str) -> Tensor:
        x = causal_conv1d_silu(x, conv1d.weight, conv1d.bias, backend)
        dt, B, C = x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, dt_proj.weight).transpose(1, 2)  # the bias goes in as the scan's delta_bias
        return selective_scan(x, delta, -torch.exp(A_log.float()), B.transpose(1, 2), C.transpose(1, 2),
                              D.float(), z, dt_proj.bias.float(), delta_softplus=True, backend=backend)

    def uses_triton(self, device: torch.device) -> bool:
        return resolve_backend(self.scan_backend, device) == 'triton'

    def _forward_triton(self, tokens: Tensor, norm: Optional[nn.LayerNorm], out_width: Optional[int],
                        release_input: bool, sample_scale: Optional[Tensor]) -> Tensor:
        """The same computation, token-major throughout: no transposes, no delta tensor.

        Triton kernels for LayerNorm (inside in_proj's kernel for inference), conv1d + SiLU and the
        scan (which expands dt_proj itself); the projections are single matmuls over (B*L, C) rows.
        Under autograd, everything between LayerNorm and out_proj is one Function.
        """
        if sample_scale is not None and (not torch.is_grad_enabled() or norm is None):
            tokens = scaled_per_sample(tokens, sample_scale)
            sample_scale = None
        if torch.is_grad_enabled():
            if norm is not None:
                tokens = layer_norm_tokens(tokens, norm.weight, norm.bias, norm.eps, sample_scale=sample_scale)
            # in_proj, conv1d, x_proj and the scan as one autograd Function (see ``mamba_inner_triton``).
            y = mamba_inner_triton(tokens, self.in_proj.weight, self.conv1d.weight, self.conv1d.bias,
                                   self.x_proj.weight, self.dt_proj.weight, -torch.exp(self.A_log.float()), self.D,
                                   self.dt_proj.bias)
            return self._out_proj(y.transpose(1, 2), out_width)
        # Under autocast, inference keeps the fused kernels and stores their activations in the
        # autocast dtype (the scan state stays fp32).
        half_dtype = _autocast_dtype(tokens.device.type)
        rows_into = None
        if low_memory_enabled():
            # in_proj's halves one after the other, conv1d between them: x is gone before z exists,
            # so the ViMM never holds x, z and u at once (see ``low_memory_inference``).
            x_raw = self._in_proj_inference(tokens, norm, 0, out_dtype=half_dtype)
            x = causal_conv1d_silu_tokens(x_raw, self.conv1d.weight, self.conv1d.bias)
            del x_raw
            z = self._in_proj_inference(tokens, norm, 1, out_dtype=half_dtype)
            if release_input:
                release_storage(tokens)
        else:
            # x and z as two planes of one allocation (see ``_in_proj_inference``).
            x_plane, z = self._in_proj_inference(tokens, norm, out_dtype=half_dtype, planes=2)
            if release_input:  # before conv1d allocates its output
                release_storage(tokens)
            x = causal_conv1d_silu_tokens(x_plane, self.conv1d.weight, self.conv1d.bias)
            # conv1d has read the x plane, which z's view keeps allocated until the scan is done:
            # x_proj's rows go there, if it is contiguous, instead of into a buffer of their own.
            rows_into = x_plane
            del x_plane
        dt_weight, A = self._scan_weights()
        u = x.transpose(1, 2)
        dt, B, C = self._x_proj_rows(x, rows_into)
        del rows_into
        # The scan writes y over u (each lane reads u_t before it stores y_t): no (B, L, E) buffer more.
        y = selective_scan_lowrank_triton(u, dt, dt_weight, A, B, C, self.D, z.transpose(1, 2), self.dt_proj.bias,
                                          delta_softplus=True, out=u)
        del dt, B, C, z  # before out_proj allocates its output
        return self._out_proj(y.transpose(1, 2), out_width)

    def _scan_weights(self) -> Tuple[Tensor, Tensor]:
        """dt_proj's weight (E, R') with zero columns past R (see ``_x_proj_rows``) and A (E, N) for the
        Triton scan without autograd. The kernels read both transposed, and they are kept so (see
        ``derived_tensor``), which spares each call four small kernels (A's exp and sign, two
        transposing copies)."""
        columns, _ = row_layout(self.dt_rank)  # zero columns past the rank, as ``_x_proj_rows`` gives dt
        weight = derived_tensor(self.dt_proj.weight, ('scan_t', columns),
                                lambda: padded_dt_weight(self.dt_proj.weight, columns).t().contiguous())
        A = derived_tensor(self.A_log, 'scan_t', lambda: (-torch.exp(self.A_log.float())).t().contiguous())
        return weight.t(), A.t()

    def _out_proj(self, y: Tensor, out_width: Optional[int]) -> Tensor:
        """out_proj(y), its rows padded with zero columns to ``out_width`` if given."""
        weight = self.out_proj.weight
        if out_width is None or out_width == weight.shape[0]:
            return self.out_proj(y)
        return F.linear(y, zero_padded(weight, (out_width, weight.shape[1])))

    def _x_proj_rows(self, x: Tensor, into: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """x_proj(x) split into (dt, B, C) as the inference scan takes them: (B, R', L) and (B, N, L)
        views of token-major rows (training runs x_proj inside the scan's autograd Function).

        The rows are laid out by ``row_layout``, so that the scan reads them with vector loads: dt
        has R' columns, R itself where it is a power of two of at least 4 (the student's 4), else
        zero columns follow (12 -> 16 for 180 or 192 channels); for 2-byte activations (autocast) B
        starts on a multiple of 8 columns. ``into``: a spent contiguous tensor of x's dtype whose
        memory takes the rows, one after another, in place of a new buffer, if it is large enough.
        """
        rank, state = self.dt_rank, self.d_state
        columns, b_start = row_layout(rank, x.element_size())
        width = b_start + 2 * state
        tokens = x.numel() // x.shape[-1]
        if into is not None and not (into.is_contiguous() and into.dtype == x.dtype and into.numel() >= tokens * width):
            into = None
        if into is None and b_start == rank:
            return self.x_proj(x).transpose(1, 2).split([rank, state, state], dim=1)
        weight = self._padded_x_proj_weight(b_start, x.dtype) if b_start != rank else self.x_proj.weight
        if into is None:
            rows = F.linear(x, weight)
        else:
            rows = into.view(-1)[:tokens * width].view(*x.shape[:-1], width)
            # autocast passes out= calls through, and x and the weight already share the
            # activations' dtype.
            torch.mm(x.reshape(tokens, x.shape[-1]), weight.t(), out=rows.view(tokens, width))
        rows = rows.transpose(1, 2)
        return rows[:, :columns], rows[:, b_start:b_start + state], rows[:, b_start + state:]

    def _padded_x_proj_weight(self, b_start: int, dtype: torch.dtype) -> Tensor:
        """x_proj's weight with zero rows after dt's up to row ``b_start``, in ``dtype``, kept as a
        ``derived_tensor`` so that inference does not pay a concatenation and a cast in every ViMM call."""
        weight = self.x_proj.weight
        return derived_tensor(weight, ('x_proj_padded', b_start, dtype),
                              lambda: padded_x_proj_weight(weight, self.dt_rank, b_start).to(dtype))

    def _in_proj_inference(self, tokens: Tensor, norm: Optional[nn.LayerNorm], half: Optional[int] = None,
                           out_dtype: Optional[torch.dtype] = None, planes: int = 1) -> Tensor:
        """in_proj(norm(tokens)) without autograd, (B, L, 2E); with ``planes=2`` as (2, B, L, E), the x
        plane then the z plane (each contiguous from the fused kernel, see ``layer_norm_linear_tokens``);
        with ``half`` 0 or 1 only its x or z half (B, L, E).
        LayerNorm runs inside in_proj's kernel, which stores its output in ``out_dtype`` (default:
        the dtype of ``tokens``; under autocast, the autocast dtype, as ``self.in_proj`` alone would
        give).

        Planes rather than rows of [x, z]: x_proj's rows then go into the spent x plane as contiguous
        rows. Written into the x half of [x, z] rows, 960 bytes apart, they cost the GEMMs and the
        scan's output pass 0.7-1.6% of the forward's GPU time (docs/performance.md, version 16)."""
        weight = self.in_proj.weight if half is None else self.in_proj.weight.chunk(2)[half]
        norm_args = (None, None, 0.0) if norm is None else (norm.weight, norm.bias, norm.eps)
        return layer_norm_linear_tokens(tokens, *norm_args, weight, out_dtype=out_dtype, planes=planes)

    def forward(self, tokens: Tensor, norm: Optional[nn.LayerNorm] = None, out_width: Optional[int] = None,
                release_input: bool = False, sample_scale: Optional[Tensor] = None) -> Tensor:
        """Mix ``tokens`` (B, L, C), normalised by ``norm`` first if given (so that the Triton path
        can fuse the normalisation into in_proj). ``out_width``: the Triton path returns rows of that
        many columns, zero after the C (a convolution reads them, see ``CONV_CHANNEL_MULTIPLE``);
        other paths ignore it. ``release_input``: the caller's word that nothing reads ``tokens``
        after this call; Triton inference then frees their memory once in_proj has read them (see
        ``release_storage``). ``sample_scale`` (B,): mix ``tokens`` times each sample's factor
        (stochastic depth's); Triton training takes it inside its LayerNorm kernel, which spares a
        pass over the tokens forward and one backward."""
        backend = resolve_backend(self.scan_backend, tokens.device)
        if backend == 'triton' and not self.bidirectional:
            return self._forward_triton(tokens, norm, out_width, release_input, sample_scale)
        if sample_scale is not None:
            tokens = scaled_per_sample(tokens, sample_scale)
        if norm is not None:
            tokens = norm(tokens)
        x, z = self.in_proj(tokens).transpose(1, 2).chunk(2, dim=1)  # (B, E, L) each
        y = self._scan(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, backend)
        if self.bidirectional:
            y_b = self._scan(x.flip(-1), z.flip(-1), self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log,
                             self.D_b, backend)
            y = (y + y_b.flip(-1)) / 2
        return self.out_proj(y.transpose(1, 2))


class ViMM(nn.Module):
    """Vision Mamba Module: LayerNorm then the Mamba mixer, over a token sequence."""

    def __init__(self, *, dim: int, mixer: MambaMixer, drop_path: float, residual: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mixer = mixer
        self.drop_path = DropPath(drop_path)
        self.residual = residual

    def forward(self, x: Tensor, out_width: Optional[int] = None, release_input: bool = False) -> Tensor:
        """``out_width``, ``release_input``: see ``MambaMixer.forward``; with the skip of Eq. 4 the
        rows stay C wide and the input is kept for the skip."""
        if self.residual:  # paper Eq. 4
            return x + self.drop_path(self.mixer(x, norm=self.norm))
        # The released model: no skip, stochastic depth on the block input.
        return self.mixer(x, norm=self.norm, out_width=out_width, release_input=release_input,
                          sample_scale=self.drop_path.sample_scale(x))


class ViMMGroup(nn.Module):
    """ViMMs applied one after another (its own module so checkpoint keys read ``residual_group.blocks``)."""

    def __init__(self, blocks: Sequence[ViMM]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, out_width: Optional[int] = None) -> Tensor:
        """``out_width`` applies to the last block's output (see ``ViMM.forward``). Each block after
        the first may free its input, the previous block's output, which only this loop holds (the
        first block's input is the RSSB's skip), unless a forward hook may have kept it."""
        for index, block in enumerate(self.blocks):
            # Under autograd nothing is freed: the hook walk is skipped on the training path.
            release = index > 0 and not torch.is_grad_enabled() and not _may_be_kept(self.blocks[index - 1], block)
            x = block(x, out_width if index == len(self.blocks) - 1 else None, release_input=release)
        return x


class RSSB(nn.Module):
    """Residual State Space Block: ViMMs, a 3x3 conv in image space, and a skip connection."""

    def __init__(self, *, dim: int, blocks: Sequence[ViMM]) -> None:
        super().__init__()
        self.residual_group = ViMMGroup(blocks)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, tokens: Tensor, size: Tuple[int, int], fused: bool = False) -> Tensor:
        mixed = self.residual_group(tokens, conv_input_width(self.conv.in_channels, fused))
        return conv_plus_skip(self.conv, mixed, size, tokens, fused)


class PatchEmbed(nn.Module):
    """Image features to a normalised token sequence (patch size 1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, fused: bool = False) -> Tensor:
        return layer_norm(self.norm, images_to_tokens(x), fused)


class PixelShuffle(nn.PixelShuffle):
    """``nn.PixelShuffle`` that keeps a channels-last image channels-last, by one copy.

    PyTorch's pixel shuffle returns an NCHW image whatever its input's layout, and cuDNN then runs
    the next convolution on NHWC data by converting its input and output back and forth (2.3 ms of
    the teacher's forward at batch 128 on an H100; docs/performance.md, version 23).
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x)
        r = self.upscale_factor
        batch, channels, height, width = x.shape
        # Channel c * r^2 + i * r + j of pixel (h, w) goes to pixel (h * r + i, w * r + j).
        rows = x.permute(0, 2, 3, 1).view(batch, height, width, channels // r**2, r, r)
        out = rows.permute(0, 1, 4, 2, 5, 3).contiguous()
        return out.view(batch, height * r, width * r, channels // r**2).permute(0, 3, 1, 2)


class Upsample(nn.Sequential):
    """Classical SR upsampler: log2(scale) x (conv, PixelShuffle(2)), or one conv + PixelShuffle(3)."""

    def __init__(self, scale: int, num_feat: int) -> None:
        layers: List[nn.Module] = []
        if scale & (scale - 1) == 0:
            for _ in range(int(math.log2(scale))):
                layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), PixelShuffle(2)]
        elif scale == 3:
            layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), PixelShuffle(3)]
        else:
            raise ValueError(f'upscale={scale} is not supported; use 2, 3 or 4')
        super().__init__(*layers)


@ARCH_REGISTRY.register()
class DVMSR(nn.Module):
    """DVMSR super-resolution network.

    Args:
        upscale: Scale factor, 2, 3 or 4.
        embed_dim: Feature width C.
        depths: ViMMs in each RSSB; its length is the number of RSSBs.
        d_state: SSM state size N.
        d_conv: Kernel size of the causal Conv1d in each ViMM.
        expand: Inner width of the mixer, E = expand * embed_dim.
        dt_rank: Rank of the delta projection; None means ceil(embed_dim / 16) as in Mamba.
        upsampler: ``'pixelshuffledirect'`` (one conv + PixelShuffle, the lightweight student) or
            ``'pixelshuffle'`` (conv + LeakyReLU, then conv/PixelShuffle stages and a last conv; the
            paper's teachers and ablations).
        num_feat: Width of the ``'pixelshuffle'`` upsampler.
        img_range: Inputs and outputs are in [0, img_range]; the RGB mean is removed before the body.
        drop_path_rate: Stochastic depth, rising linearly to this value over all ViMMs.
        vimm_residual: Add the skip connection of the paper's Eq. 4 around each ViMM. The released
            weights were trained without it, so it is off by default.
        bidirectional: Scan each sequence forwards and backwards (paper Table 6).
        dt_init: ``'released'`` keeps what the released code ends up with (delta projection weights
            drawn like every Linear, delta bias zero); ``'mamba'`` uses Mamba's own delta init
            (bias = inverse softplus of a log-uniform step in [0.001, 0.1]).
        scan_backend: ``'auto'``, ``'ref'``, ``'torch'``, ``'mamba_ssm'`` or ``'triton'``; see
            :mod:`dvmsr_arch.ops.selective_scan`.
    """

    def __init__(self, *, upscale: int = 4, embed_dim: int = 60, depths: Sequence[int] = (2, 2, 2, 2),
                 d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: Optional[int] = None,
                 upsampler: Literal['pixelshuffledirect', 'pixelshuffle'] = 'pixelshuffledirect', num_feat: int = 64,
                 img_range: float = 1.0, drop_path_rate: float = 0.1, vimm_residual: bool = False,
                 bidirectional: bool = False, dt_init: Literal['released', 'mamba'] = 'released',
                 scan_backend: str = 'auto') -> None:
        super().__init__()
        if upscale not in (2, 3, 4):
            raise ValueError(f'upscale={upscale} is not supported; use 2, 3 or 4')
        if upsampler not in ('pixelshuffledirect', 'pixelshuffle'):
            raise ValueError(f"upsampler={upsampler!r}: use 'pixelshuffledirect' or 'pixelshuffle'")
        if dt_init not in ('released', 'mamba'):
            raise ValueError(f"dt_init={dt_init!r}: use 'released' or 'mamba'")
        check_backend_name(scan_backend)
        self.upscale, self.upsampler, self.img_range = upscale, upsampler, img_range
        self.scan_backend = scan_backend
        self.register_buffer('mean', torch.tensor(RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        dt_rank = dt_rank or math.ceil(embed_dim / 16)
        drop_rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()

        def vimm(index: int) -> ViMM:
            mixer = MambaMixer(dim=embed_dim, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank,
                               bidirectional=bidirectional, scan_backend=scan_backend)
            return ViMM(dim=embed_dim, mixer=mixer, drop_path=drop_rates[index], residual=vimm_residual)

        self.conv_first = nn.Conv2d(3, embed_dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(embed_dim)
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.layers = nn.ModuleList(
            RSSB(dim=embed_dim, blocks=[vimm(start + j) for j in range(depth)]) for start, depth in zip(starts, depths))
        self.norm_f = nn.LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1)
        if upsampler == 'pixelshuffle':
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True))
            self.upsample = Upsample(upscale, num_feat)
            self.conv_last = nn.Conv2d(num_feat, 3, 3, 1, 1)
        else:
            self.upsample = nn.Sequential(nn.Conv2d(embed_dim, 3 * upscale**2, 3, 1, 1), nn.PixelShuffle(upscale))
        self.apply(self._init_weights)
        if dt_init == 'mamba':
            for name, module in self.named_modules():
                if name.endswith(('.dt_proj', '.dt_proj_b')):
                    _mamba_dt_init(module, dt_rank)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward_with_features(self, x: Tensor) -> Tuple[Tensor, Dict[str, object]]:
        """The SR image plus the features distillation can match.

        ``rssb``: the output of each RSSB as images (B, C, H, W); ``body``: deep features at the end of
        the body (after ``conv_after_body`` and the long skip), the input of the upsampler.
        """
        return self._run(x, keep_features=True)

    def _run(self, x: Tensor, keep_features: bool) -> Tuple[Tensor, Dict[str, object]]:
        size = (x.shape[2], x.shape[3])
        fused = resolve_backend(self.scan_backend, x.device) == 'triton'
        x = x - self.mean
        if self.img_range != 1.0:
            x = x * self.img_range
        shallow = self.conv_first(x)
        tokens = self.patch_embed(shallow, fused)
        rssb = []
        for layer in self.layers:
            tokens = layer(tokens, size, fused)
            if keep_features:  # holding them costs an activation-sized buffer per RSSB
                rssb.append(tokens)
        # On the fused path the body's convolution reads padded rows; for inference the body leaves
        # padded too, for the upsampler.
        width = conv_input_width(self.conv_after_body.in_channels, fused)
        body = tokens_to_images(conv_plus_skip(self.conv_after_body, layer_norm(self.norm_f, tokens, fused, width),
                                               size, images_to_tokens(shallow), fused, width), size)
        if _autocast_enabled(x.device.type):
            # The last convolutions set the output pixels directly: under autocast they stay in fp32.
            with torch.autocast(x.device.type, enabled=False):
                out = self._reconstruct(body.float(), fused)
        else:
            out = self._reconstruct(body, fused)
        return out, {'rssb': [tokens_to_images(t, size) for t in rssb],
                     'body': body[:, :self.conv_after_body.out_channels]}

    def _reconstruct(self, body: Tensor, fused: bool) -> Tensor:
        """The upsampler and the mean: the SR image. ``body`` may carry zero channels after the C
        (see ``_run``); ``fused`` inference adds the last convolution's bias and the mean inside
        the pixel shuffle's pass (one pass over the SR image instead of three)."""
        head = self.conv_before_upsample if self.upsampler == 'pixelshuffle' else self.upsample
        conv = head[0]
        if fused and not records(conv, body) and self.upsampler == 'pixelshuffledirect' and conv.bias is not None:
            return pixel_shuffle_image(conv_on_padded(conv, body, None), conv.bias, self.mean, 1.0 / self.img_range,
                                       self.upscale)
        x = head[1:](conv_any_width(conv, body))
        if self.upsampler == 'pixelshuffle':
            x = self.conv_last(self.upsample(x))
        # One pass over the SR image; the SR image leaves NCHW, as the input came, whatever layout
        # the convolutions kept (a second pass, over 3 channels only, where they kept channels-last).
        return torch.add(self.mean, x, alpha=1.0 / self.img_range).contiguous()

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, keep_features=False)[0]


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype where autocast is on for ``device_type``, else None."""
    if not _autocast_enabled(device_type):
        return None
    try:
        return torch.get_autocast_dtype(device_type)
    except AttributeError:  # torch < 2.4
        return torch.get_autocast_gpu_dtype() if device_type == 'cuda' else torch.get_autocast_cpu_dtype()


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled() if device_type == 'cuda' else torch.is_autocast_cpu_enabled()


def _mamba_dt_init(dt_proj: nn.Linear, dt_rank: int, dt_min: float = 1e-3, dt_max: float = 0.1,
                   dt_floor: float = 1e-4) -> None:
    """Mamba's delta-projection init: softplus(bias) is log-uniform in [dt_min, dt_max]."""
    with torch.no_grad():
        bound = dt_rank**-0.5
        dt_proj.weight.uniform_(-bound, bound)
        dt = torch.exp(torch.rand(dt_proj.out_features) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
