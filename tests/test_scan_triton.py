"""The Triton kernels (scan, LayerNorm, causal conv1d) against float64 references, without a GPU.

Triton's interpreter runs the kernels on the CPU when ``TRITON_INTERPRET=1`` is set before triton is
first imported, so the checks run in one fresh subprocess (this file run as a script) and the tests
read its JSON. The interpreter executes every program one after another in numpy: sizes are tiny,
and the kernel shapes are shrunk so that they still cover several chunks, a partial last chunk and
tile, and channel and state blocks with masked lanes. Outputs are poisoned with NaN before each
run, so an element a kernel fails to write shows up.
"""
import importlib.util
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec('triton') is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason='triton is not installed')
TOL = 2e-5  # fp32 kernels against float64: max |diff| / max |ref|


sys.path.insert(0, str(REPO / 'scripts'))
# The NaN poisoning of the GPU checks, here under the interpreter; the GPU tests' precision switches.
from benchmark import poisoned_empty, precision  # noqa: E402

# ----------------------------------------------------------------------------------------------
# The subprocess side


def max_rel(a, b) -> float:
    """max |a - b| / max |b|; NaN anywhere in ``a`` gives inf."""
    if torch.isnan(a).any():
        return float('inf')
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def scan_case(batch, inner, state, length, rank, token_major, with_extras, dtype=torch.float32, packed=False):
    """``packed``: dt, B and C are slices of one token-major (batch, L, R + 2N) buffer, as the
    network's x_proj makes them; with R and N multiples of 4 the kernels then use 128-bit row loads."""
    from dvmsr_arch.ops.scan_ref import selective_scan_ref
    from dvmsr_arch.ops.scan_triton import _rows_aligned, selective_scan_lowrank_triton, selective_scan_triton

    def seq(channels):
        if token_major:
            return torch.randn(batch, length, channels).transpose(1, 2)
        return torch.randn(batch, channels, length)
    u, z, B, C = seq(inner), seq(inner), seq(state), seq(state)
    if with_extras:
        delta = seq(rank or inner) * 0.5
    else:  # no softplus: delta itself must be positive
        delta = seq(rank or inner).abs() * 0.3
    if packed:
        rows = torch.cat([delta, B, C], 1).transpose(1, 2).contiguous().transpose(1, 2)
        delta, B, C = rows.split([rank, state, state], 1)
    weight = torch.randn(inner, rank).abs() * 0.5 if rank else None
    A = -torch.exp(torch.randn(inner, state) * 0.5)
    D, bias = (torch.randn(inner), torch.randn(inner) * 0.5) if with_extras else (None, None)
    z = z if with_extras else None
    names = ('u', 'delta', 'dt_weight', 'A', 'B', 'C', 'D', 'z', 'delta_bias')
    inputs = [None if t is None else t.to(dtype) for t in (u, delta, weight, A, B, C, D, z, bias)]
    inputs[3] = A  # A, D and delta_bias are parameters: fp32 whatever the activations are
    if with_extras:
        inputs[6], inputs[8] = D, bias
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    leaves64 = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    u6, d6, w6, A6, B6, C6, D6, z6, b6 = leaves64
    delta6 = torch.einsum('brl,er->bel', d6, w6) if rank else d6
    ref = selective_scan_ref(u6, delta6, A6, B6, C6, D6, z6, b6, with_extras)
    grad = torch.randn_like(ref)
    ref.backward(grad)

    with poisoned_empty():
        if rank:
            y = selective_scan_lowrank_triton(*leaves, delta_softplus=with_extras)
        else:
            y = selective_scan_triton(leaves[0], leaves[1], *leaves[3:], delta_softplus=with_extras)
        y.backward(grad.to(dtype))
    result = {'forward': max_rel(y.detach(), ref.detach())}
    for name, leaf, leaf64 in zip(names, leaves, leaves64):
        if leaf is not None and leaf.grad is not None:
            result[f'grad_{name}'] = max_rel(leaf.grad, leaf64.grad)
    with torch.no_grad(), poisoned_empty():
        plain = [None if t is None else t.detach() for t in inputs]
        if rank:
            out = torch.full((batch, length, inner), float('nan'), dtype=dtype).transpose(1, 2)
            selective_scan_lowrank_triton(*plain, delta_softplus=with_extras, out=out)
        else:
            out = selective_scan_triton(plain[0], plain[1], *plain[3:], delta_softplus=with_extras)
    result['no_grad_path'] = max_rel(out, ref.detach())
    if rank:  # y written over u, as the network's inference path does
        with torch.no_grad(), poisoned_empty():
            u_then_y = plain[0].clone()
            selective_scan_lowrank_triton(u_then_y, *plain[1:], delta_softplus=with_extras, out=u_then_y)
        result['over_u'] = max_rel(u_then_y, ref.detach())
    result['rows_aligned'] = _rows_aligned(inputs[1] if rank else None, inputs[4], inputs[5], rank, state)
    return result


def mamba_inner_case(batch, channels, inner, state, length, rank):
    """in_proj, conv1d + SiLU, x_proj and the scan as one autograd Function (the network's training
    path) against float64: u feeds both the scan and x_proj, and the tokens both of in_proj's halves,
    so their gradients are sums of two shares each."""
    import torch.nn.functional as F

    from dvmsr_arch.ops.mamba_inner import mamba_inner_triton
    from dvmsr_arch.ops.scan_ref import selective_scan_ref
    tokens = torch.randn(batch, channels, length).transpose(1, 2)  # strided, as tests elsewhere
    in_weight = torch.randn(2 * inner, channels) * channels**-0.5
    conv_weight, conv_bias = torch.randn(inner, 1, 4) * 0.5, torch.randn(inner) * 0.5
    proj_weight = torch.randn(rank + 2 * state, inner) * inner**-0.5
    dt_weight = torch.randn(inner, rank).abs() * 0.5
    A = -torch.exp(torch.randn(inner, state) * 0.5)
    D, bias = torch.randn(inner), torch.randn(inner) * 0.5
    names = ('tokens', 'in_weight', 'conv_weight', 'conv_bias', 'proj_weight', 'dt_weight', 'A', 'D', 'delta_bias')
    leaves = [t.clone().requires_grad_() for t in
              (tokens, in_weight, conv_weight, conv_bias, proj_weight, dt_weight, A, D, bias)]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    t6, i6, cw6, cb6, p6, w6, A6, D6, b6 = leaves64
    x6, z6 = (t6 @ i6.t()).transpose(1, 2).split(inner, 1)
    u6 = F.silu(F.conv1d(F.pad(x6, (3, 0)), cw6, cb6, groups=inner))
    dt6, B6, C6 = (p6 @ u6).split([rank, state, state], 1)
    ref = selective_scan_ref(u6, torch.einsum('brl,er->bel', dt6, w6), A6, B6, C6, D6, z6, b6, True)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    with poisoned_empty():
        y = mamba_inner_triton(*leaves)
        y.backward(grad.float())
    result = {'forward': max_rel(y.detach(), ref.detach())}
    result.update({f'grad_{name}': max_rel(leaf.grad, leaf64.grad)
                   for name, leaf, leaf64 in zip(names, leaves, leaves64)})
    with torch.no_grad(), poisoned_empty():
        result['no_grad_path'] = max_rel(mamba_inner_triton(*[t.detach() for t in leaves]), ref.detach())
    return result


def fused_case():
    import torch.nn.functional as F

    from dvmsr_arch.ops.fused_triton import (add_bias_skip_, add_bias_skip_image, causal_conv1d_silu_tokens,
                                             layer_norm_linear_tokens, layer_norm_tokens, pixel_shuffle_image)
    result = {}
    # LayerNorm over 6 channels (BLOCK_C 8), rows not a multiple of the row block, strided input.
    x = torch.randn(2, 6, 37).transpose(1, 2).requires_grad_()
    weight, bias = torch.randn(6).requires_grad_(), torch.randn(6).requires_grad_()
    x6, w6, b6 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    ref = F.layer_norm(x6, (6,), w6, b6, 1e-5)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    with poisoned_empty():
        y = layer_norm_tokens(x, weight, bias, 1e-5)
        y.backward(grad.float())
    result.update(ln_forward=max_rel(y.detach(), ref.detach()), ln_grad_x=max_rel(x.grad, x6.grad),
                  ln_grad_weight=max_rel(weight.grad, w6.grad), ln_grad_bias=max_rel(bias.grad, b6.grad))

    # Causal depthwise conv1d + SiLU on the x half of a token-major (B, L, 2E) tensor; L=70 leaves a
    # partial last block of tokens, and 130 channels (kernel 3) span two of the backward's channel blocks.
    for name, channels, kernel in (('conv', 5, 4), ('conv_130_k3', 130, 3)):
        xz = torch.randn(2, 70, 2 * channels)
        x = xz[..., :channels].requires_grad_()
        weight, bias = torch.randn(channels, 1, kernel).requires_grad_(), torch.randn(channels).requires_grad_()
        x6, w6, b6 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
        ref = F.silu(F.conv1d(F.pad(x6.transpose(1, 2), (kernel - 1, 0)), w6, b6, groups=channels)).transpose(1, 2)
        grad = torch.randn_like(ref)
        ref.backward(grad)
        with poisoned_empty():
            y = causal_conv1d_silu_tokens(x, weight, bias)
            y.backward(grad.float())
        result.update({f'{name}_forward': max_rel(y.detach(), ref.detach()), f'{name}_grad_x': max_rel(x.grad, x6.grad),
                       f'{name}_grad_weight': max_rel(weight.grad, w6.grad),
                       f'{name}_grad_bias': max_rel(bias.grad, b6.grad)})

    # LayerNorm then in_proj in one kernel (inference), true fp32: the released width (60 -> 240,
    # and -> 120 for one half as the low-memory path runs it) over 300 rows (a partial last row
    # block), a narrow one (6 -> 24) from strided input, and the teacher's width (192 -> 768), past
    # LN_LINEAR_MAX_CHANNELS: LayerNorm and the matmul apart.
    for name, channels, out_features, x in (('ln_linear_60', 60, 240, torch.randn(2, 150, 60)),
                                            ('ln_linear_60_half', 60, 120, torch.randn(2, 150, 60)),
                                            ('ln_linear_6', 6, 24, torch.randn(1, 6, 37).transpose(1, 2)),
                                            ('ln_linear_192', 192, 768, torch.randn(1, 70, 192))):
        norm_w, norm_b = torch.randn(channels), torch.randn(channels)
        weight = torch.randn(out_features, channels) * channels**-0.5
        ref = F.linear(F.layer_norm(x.double(), (channels,), norm_w.double(), norm_b.double(), 1e-5), weight.double())
        with poisoned_empty():
            result[name] = max_rel(layer_norm_linear_tokens(x, norm_w, norm_b, 1e-5, weight), ref)
    # The same as x and z planes, as inference runs it: 149 rows of 120 outputs leave the first plane
    # short of a whole 128-byte block, so the second one starts after padding, each plane contiguous;
    # past LN_LINEAR_MAX_CHANNELS, and without a LayerNorm, views of one cuBLAS matmul's rows.
    for name, channels, x, norm in (('ln_linear_60_planes', 60, torch.randn(1, 149, 60), True),
                                    ('ln_linear_192_planes', 192, torch.randn(1, 70, 192), True),
                                    ('linear_60_planes', 60, torch.randn(1, 149, 60), False)):
        norm_w, norm_b = (torch.randn(channels), torch.randn(channels)) if norm else (None, None)
        weight = torch.randn(4 * channels, channels) * channels**-0.5
        x64 = F.layer_norm(x.double(), (channels,), norm_w.double(), norm_b.double(), 1e-5) if norm else x.double()
        ref = F.linear(x64, weight.double()).unflatten(-1, (2, -1)).movedim(-2, 0)
        with poisoned_empty():
            planes = layer_norm_linear_tokens(x, norm_w, norm_b, 1e-5, weight, planes=2)
        apart = planes[1].data_ptr() - planes[0].data_ptr()
        fused = name == 'ln_linear_60_planes'
        laid_out = not fused or (planes[0].is_contiguous() and planes[1].is_contiguous() and apart % 128 == 0)
        result[name] = max_rel(planes, ref) if laid_out else float('inf')

    # A convolution's output as tokens (channels-last, 70 pixels: a partial row block) += bias + a
    # skip of other strides, in place.
    y = torch.randn(2, 60, 7, 10).contiguous(memory_format=torch.channels_last).flatten(2).transpose(1, 2)
    bias, skip = torch.randn(60), torch.randn(2, 70, 120)[..., ::2]
    ref = y.double() + bias.double() + skip.double()
    with poisoned_empty():
        out = add_bias_skip_(y, bias, skip)
    result['add_bias_skip'] = max_rel(y, ref) if out is y else float('inf')
    # The same under autograd, as training runs it: into a convolution's output image, whose gradient,
    # the skip's and the bias's (a sum over the pixels) come from the output's.
    x = torch.randn(2, 8, 7, 10).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight, bias = torch.randn(12, 8, 3, 3).requires_grad_(), torch.randn(12).requires_grad_()
    skip = torch.randn(2, 70, 24)[..., ::2].requires_grad_()
    leaves64 = [t.detach().double().requires_grad_() for t in (x, weight, bias, skip)]
    ref = F.conv2d(*leaves64[:3], padding=1).flatten(2).transpose(1, 2) + leaves64[3]
    grad = torch.randn_like(ref)
    ref.backward(grad)
    with poisoned_empty():
        out = add_bias_skip_image(F.conv2d(x, weight, padding=1), bias, skip)
        out.backward(grad.float())
    result['add_bias_skip_image'] = max_rel(out.detach(), ref.detach())
    result.update({f'add_bias_skip_image_grad_{name}': max_rel(leaf.grad, leaf64.grad)
                   for name, leaf, leaf64 in zip(('x', 'weight', 'bias', 'skip'), (x, weight, bias, skip), leaves64)})

    # The upsampler's tail: bias, PixelShuffle and the mean in one pass, for each scale; channels-last
    # input whose width (37) leaves a partial block.
    for factor in (2, 3, 4):
        y = torch.randn(2, 3 * factor**2, 5, 37).contiguous(memory_format=torch.channels_last)
        bias, mean = torch.randn(3 * factor**2), torch.randn(1, 3, 1, 1)
        ref = mean.double() + 0.5 * F.pixel_shuffle(y.double() + bias.double()[:, None, None], factor)
        with poisoned_empty():
            out = pixel_shuffle_image(y, bias, mean, 0.5, factor)
        result[f'pixel_shuffle_image_x{factor}'] = max_rel(out, ref) if out.is_contiguous() else float('inf')
    return result


def network_against_float64(kw, x):
    """A DVMSR(**kw) on the ``ref`` backend in float64 and one on the Triton path with its weights,
    both in training mode, each run forward on ``x`` and backward from the same random gradient.
    Returns both networks, the float64 output, the forward's error and each parameter gradient's."""
    from dvmsr_arch.archs.dvmsr_arch import DVMSR
    reference = DVMSR(**kw, scan_backend='ref').double()
    fused = DVMSR(**kw, scan_backend='triton')
    fused.load_state_dict(reference.state_dict())
    ref = reference(x.double())
    grad = torch.randn_like(ref)
    (ref * grad).sum().backward()
    with poisoned_empty():
        y = fused(x)
        (y * grad.float()).sum().backward()
    grads = {name: max_rel(p.grad, q.grad) for (name, p), q in zip(fused.named_parameters(), reference.parameters())}
    return reference, fused, ref, max_rel(y.detach(), ref.detach()), grads


def model_case():
    from dvmsr_arch.archs.dvmsr_arch import DVMSR
    from dvmsr_arch.ops import resolve_backend, scan_triton
    result = {'auto_on_cpu': resolve_backend('auto', 'cpu'),
              'triton_unavailable_reason': scan_triton.why_unavailable(torch.device('cpu'))}
    # Two ViMMs in the RSSB: inference frees the second one's input (see ``release_storage``). E = 18
    # leaves room for x_proj's rows in in_proj's x plane under fp16 autocast too (16 columns there).
    kw = dict(upscale=2, embed_dim=6, depths=(2,), d_state=4, expand=3, drop_path_rate=0.0, dt_init='mamba')
    x = torch.rand(1, 3, 3, 4)  # 12 tokens: two forward and two backward chunks
    reference, fused, ref, result['forward'], result['grads'] = network_against_float64(kw, x)
    # The inference path: the scan writes into the in_proj buffer, and each convolution reads token
    # rows padded to 8 channels (recorded here).
    import dvmsr_arch.archs.dvmsr_arch as arch
    conv_on_padded, conv_inputs = arch.conv_on_padded, []

    def recording(conv, image, *rest):
        conv_inputs.append(image.shape[1])
        return conv_on_padded(conv, image, *rest)
    arch.conv_on_padded = recording
    with torch.no_grad():
        result['no_grad_forward'] = max_rel(fused(x), ref.detach())
    arch.conv_on_padded = conv_on_padded
    result['no_grad_conv_input_channels'] = conv_inputs
    from dvmsr_arch.ops import low_memory_inference
    with torch.no_grad(), low_memory_inference(), poisoned_empty():  # in_proj's halves one after the other
        result['low_memory_forward'] = max_rel(fused(x), ref.detach())
    with torch.no_grad(), low_memory_inference(), torch.autocast('cpu', dtype=torch.float16), poisoned_empty():
        result['low_memory_fp16_autocast_forward'] = max_rel(fused(x), ref.detach())
    # fp16 autocast inference: the fused kernels with fp16 activations, x_proj's rows padded.
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.float16), poisoned_empty():
        result['fp16_autocast_forward'] = max_rel(fused(x), ref.detach())
    result.update(released_input_case(fused, reference))
    result.update(drop_path_case())
    # Past LN_LINEAR_MAX_CHANNELS (72 channels, as the teacher's 192): in_proj's x and z are views of
    # one cuBLAS matmul's rows, conv1d reads the strided x and x_proj's rows get a buffer of their own.
    wide = dict(kw, embed_dim=72, depths=(1,), expand=2)
    wide_reference = DVMSR(**wide, scan_backend='ref').double()
    wide_fused = DVMSR(**wide, scan_backend='triton')
    wide_fused.load_state_dict(wide_reference.state_dict())
    with torch.no_grad(), poisoned_empty():
        result['wide_no_grad_forward'] = max_rel(wide_fused(x), wide_reference(x.double()))
    # The teachers' upsampler (conv + LeakyReLU, two conv/PixelShuffle stages, a last conv), whose
    # images stay channels-last between the convolutions; the SR image leaves contiguous.
    shuffled = dict(kw, upsampler='pixelshuffle', num_feat=8, upscale=4)
    shuffled_reference = DVMSR(**shuffled, scan_backend='ref').double().eval()
    shuffled_fused = DVMSR(**shuffled, scan_backend='triton').eval()
    shuffled_fused.load_state_dict(shuffled_reference.state_dict())
    with torch.no_grad(), poisoned_empty():
        out = shuffled_fused(x)
        result['pixelshuffle_no_grad_forward'] = max_rel(out, shuffled_reference(x.double()))
        result['pixelshuffle_output_contiguous'] = out.is_contiguous()
    return result


@contextmanager
def fixed_sample_scales():
    """Stochastic depth that keeps the even samples (times 1 / (1 - p)) and drops the odd ones, so a
    float64 network and the network under test draw the same."""
    from dvmsr_arch.archs.dvmsr_arch import DropPath
    draw = DropPath.sample_scale

    def sample_scale(self, x):
        if self.p == 0.0 or not self.training:
            return None
        return (torch.arange(x.shape[0], device=x.device) % 2 == 0).to(x.dtype) / (1.0 - self.p)
    DropPath.sample_scale = sample_scale
    try:
        yield
    finally:
        DropPath.sample_scale = draw


def drop_path_case():
    """Training with stochastic depth: the Triton path takes each sample's factor inside its
    LayerNorm kernel, forward and backward."""
    kw = dict(upscale=2, embed_dim=6, depths=(2,), d_state=4, expand=3, drop_path_rate=0.5, dt_init='mamba')
    with fixed_sample_scales():
        *_, forward, grads = network_against_float64(kw, torch.rand(2, 3, 3, 4))
    return {'drop_path_forward': forward, 'drop_path_grads': grads}


def released_input_case(fused, reference):
    """Inference frees the first ViMM's output once the second ViMM's in_proj has read it, but
    leaves the group's input (the RSSB's skip) alone, and a tensor a hook holds."""
    group, ref_group = fused.layers[0].residual_group, reference.layers[0].residual_group
    first = group.blocks[0]
    tokens = torch.randn(2, 12, 6)
    tokens_before = tokens.clone()
    with torch.no_grad():
        ref_first = ref_group.blocks[0](tokens.double())
        ref_out = ref_group(tokens.double())
    outputs = []
    first.forward = lambda *args, **kwargs: outputs.append(type(first).forward(first, *args, **kwargs)) or outputs[-1]
    with torch.no_grad():
        out = group(tokens)
    del first.forward
    result = {'released_output': max_rel(out, ref_out),
              'released_bytes': outputs[0].untyped_storage().nbytes(),
              'group_input_intact': tokens.untyped_storage().nbytes() > 0 and torch.equal(tokens, tokens_before)}
    handle = first.register_forward_hook(lambda module, args, output: outputs.append(output))
    with torch.no_grad():
        out = group(tokens)
    handle.remove()
    result['hooked_output'] = max_rel(out, ref_out)
    result['hook_kept_output'] = max_rel(outputs[1], ref_first)
    return result


def run_all_cases():
    from dvmsr_arch.ops import scan_triton
    from dvmsr_arch.ops.scan_triton import ScanConfig
    torch.manual_seed(0)
    results = {}
    # Chunks of 8 tokens (2 tiles of 4) forward, 6 tokens (3 tiles of 2) backward (12 tokens, 3 tiles
    # of 4, for the lane-per-channel backward, which steps in runs of 4): L=21 spans
    # several chunks with a partial last one; E=6 and N=3 leave masked lanes in their blocks.
    # Both kernel families: (T, E, N) register blocks with associative scans, and lane-per-channel.
    associative = ScanConfig(tile=4, block_e=4, tiles_per_chunk=2, num_warps=1)
    lanes = ScanConfig(tile=4, block_e=4, tiles_per_chunk=2, num_warps=1, sequential=True)
    backward = ScanConfig(tile=2, block_e=4, tiles_per_chunk=3, num_warps=1)
    backward_lanes = ScanConfig(tile=4, block_e=4, tiles_per_chunk=3, num_warps=1, sequential=True)
    scan_triton.set_configs(associative, backward)
    results['full_delta_channel_major'] = scan_case(2, 6, 3, 21, 0, token_major=False, with_extras=True)
    results['plain_no_D_z_bias_softplus'] = scan_case(1, 5, 4, 19, 0, token_major=False, with_extras=False)
    results['lowrank_token_major_associative'] = scan_case(1, 6, 3, 21, 2, token_major=True, with_extras=True)
    scan_triton.set_configs(lanes, backward_lanes)
    results['lowrank_token_major_sequential'] = scan_case(1, 6, 3, 21, 2, token_major=True, with_extras=True)
    # As the network calls it: R=4, N=4 packed rows (aligned loads), 3 full chunks and a partial one
    # forward; backward tiles of 8, so that the second run of 4 re-steps from the tile start. With
    # the L2 prefetch, as the defaults run: the interpreter skips the prefetch itself, but not the
    # code around it.
    scan_triton.set_configs(ScanConfig(tile=4, block_e=4, tiles_per_chunk=2, num_warps=1, sequential=True, prefetch=3),
                            ScanConfig(tile=8, block_e=4, tiles_per_chunk=2, num_warps=1, sequential=True, prefetch=8))
    results['lowrank_packed_rows_sequential'] = scan_case(2, 6, 4, 29, 4, token_major=True, with_extras=True,
                                                          packed=True)
    # The released widths' backward layout: 32 channels per warp and 16 states, so dB and dC are
    # summed over the lanes by the reduce-scatter (emulated here); E=40 leaves a half-empty block.
    scan_triton.set_configs(backward=ScanConfig(tile=4, block_e=32, tiles_per_chunk=2, num_warps=1, sequential=True,
                                                prefetch=8))
    results['lowrank_packed_rows_warp_sums'] = scan_case(1, 40, 16, 37, 4, token_major=True, with_extras=True,
                                                         packed=True)
    results['mamba_inner_warp_sums'] = mamba_inner_case(1, 20, 40, 16, 37, 4)
    # Four warps a program, as the default backward runs: each warp sums over its own 32 lanes, and
    # E=150 leaves the second program's last three warps without a channel.
    scan_triton.set_configs(backward=ScanConfig(tile=4, block_e=128, tiles_per_chunk=2, num_warps=4, sequential=True,
                                                prefetch=8))
    results['lowrank_packed_rows_warp_sums_4_warps'] = scan_case(1, 150, 16, 37, 4, token_major=True,
                                                                 with_extras=True, packed=True)
    scan_triton.set_configs(lanes, backward_lanes)
    results['mamba_inner'] = mamba_inner_case(2, 3, 6, 3, 21, 2)
    # fp16 rows as the network lays them out under autocast: [dt, B, C] starting on 16 bytes (R = N = 8),
    # read with vector loads.
    results['half_packed_rows'] = scan_case(1, 6, 8, 29, 8, token_major=True, with_extras=True, dtype=torch.float16,
                                            packed=True)
    results['half_inputs'] = scan_case(1, 4, 4, 13, 2, token_major=True, with_extras=True, dtype=torch.float16)
    results['fused'] = fused_case()
    results['model'] = model_case()
    return results


# ----------------------------------------------------------------------------------------------
# The pytest side


@pytest.fixture(scope='module')
def interpreted():
    env = dict(os.environ, TRITON_INTERPRET='1', PYTHONPATH=str(REPO))
    env.pop('DVMSR_SCAN_BACKEND', None)
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600,
                          cwd=str(REPO))
    assert proc.returncode == 0, f'interpreter run failed:\n{proc.stderr[-4000:]}'
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_triton
@pytest.mark.parametrize('case', ['full_delta_channel_major', 'plain_no_D_z_bias_softplus',
                                  'lowrank_token_major_associative', 'lowrank_token_major_sequential',
                                  'lowrank_packed_rows_sequential', 'lowrank_packed_rows_warp_sums',
                                  'lowrank_packed_rows_warp_sums_4_warps'])
def test_scan_matches_float64_ref(interpreted, case):
    result = interpreted[case]
    # The packed cases must take the 128-bit row-load path, the others the general one.
    assert result['rows_aligned'] == ('packed' in case)
    assert result['forward'] < TOL
    assert result['no_grad_path'] < TOL
    if case.startswith('lowrank'):
        assert result['over_u'] < TOL
    grads = {k: v for k, v in result.items() if k.startswith('grad_')}
    expected = {'grad_u', 'grad_delta', 'grad_A', 'grad_B', 'grad_C'}
    if case != 'plain_no_D_z_bias_softplus':
        expected |= {'grad_D', 'grad_z', 'grad_delta_bias'}
    if case.startswith('lowrank'):
        expected |= {'grad_dt_weight'}
    assert set(grads) == expected
    assert max(grads.values()) < TOL, grads


@needs_triton
@pytest.mark.parametrize('case', ['mamba_inner', 'mamba_inner_warp_sums'])
def test_mamba_inner_function_matches_float64_ref(interpreted, case):
    result = interpreted[case]
    assert set(result) == {'forward', 'no_grad_path', 'grad_tokens', 'grad_in_weight', 'grad_conv_weight',
                           'grad_conv_bias', 'grad_proj_weight', 'grad_dt_weight', 'grad_A', 'grad_D',
                           'grad_delta_bias'}, result
    assert max(result.values()) < TOL, result


@needs_triton
def test_conv_backward_refuses_a_gradient_buffer_it_cannot_fill():
    from dvmsr_arch.ops.fused_triton import causal_conv_backward
    x, weight, bias, dy = torch.randn(2, 9, 6), torch.randn(6, 1, 4), torch.randn(6), torch.randn(2, 9, 6)
    for bad in (torch.empty(2, 9, 12)[..., ::2],  # channels not adjacent
                torch.empty(2, 9, 6, dtype=torch.float64), torch.empty(2, 8, 6)):
        with pytest.raises(ValueError, match='dx_into'):
            causal_conv_backward(x, weight, bias, dy, dx_into=bad)


def test_sum_partials_sums_over_the_leading_axes():
    from dvmsr_arch.ops.scan_triton import _sum_partials
    torch.manual_seed(0)
    parts = torch.randn(37, 5, 6, 4, dtype=torch.float64)
    assert _sum_partials(parts).shape == (5, 6, 4)
    assert torch.allclose(_sum_partials(parts), parts.sum(0))
    assert torch.allclose(_sum_partials(parts, 2), parts.sum((0, 1)))


@pytest.mark.parametrize('rank, element_size, layout', [
    (4, 4, (4, 4)), (16, 4, (16, 16)),  # already whole: as they are
    (12, 4, (16, 16)), (10, 4, (16, 16)), (14, 4, (16, 16)), (1, 4, (4, 4)), (5, 4, (8, 8)),
    (4, 2, (4, 8)), (12, 2, (16, 16)), (1, 2, (4, 8))])  # 2-byte rows: B on 16 bytes too
def test_row_layout(rank, element_size, layout):
    from dvmsr_arch.ops.scan_triton import row_layout
    assert row_layout(rank, element_size) == layout


@pytest.mark.parametrize('embed_dim', [192, 180, 60])  # dt rank 12, 12, 4
def test_inference_rows_are_aligned_and_give_the_same_delta(embed_dim):
    """The Triton inference path's x_proj rows for the paper's wide networks: dt padded with zero
    columns to 16, so that the scan reads dt, B and C with vector loads (``_rows_aligned``), and
    delta = dt_proj(dt), B and C as x_proj gives them."""
    from dvmsr_arch.archs.dvmsr_arch import MambaMixer
    from dvmsr_arch.ops.scan_triton import _rows_aligned
    torch.manual_seed(0)
    rank = -(-embed_dim // 16)
    mixer = MambaMixer(dim=embed_dim, d_state=16, d_conv=4, expand=2, dt_rank=rank, bidirectional=False,
                       scan_backend='triton')
    x = torch.randn(2, 37, 2 * embed_dim)
    with torch.no_grad():
        dt, B, C = mixer._x_proj_rows(x)
        dt_weight, _ = mixer._scan_weights()
        expected_dt, expected_B, expected_C = mixer.x_proj(x).split([rank, 16, 16], dim=-1)
    columns = dt.shape[1]
    assert columns == max(4, 1 << (rank - 1).bit_length()) and dt_weight.shape == (2 * embed_dim, columns)
    assert _rows_aligned(dt, B, C, columns, 16)
    assert torch.equal(dt[:, rank:], torch.zeros_like(dt[:, rank:]))
    for got, expected in ((dt[:, :rank], expected_dt), (B, expected_B), (C, expected_C)):
        torch.testing.assert_close(got, expected.transpose(1, 2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.einsum('brl,er->bel', dt, dt_weight),
                               mixer.dt_proj.weight @ expected_dt.transpose(1, 2), rtol=1e-6, atol=1e-6)


@needs_triton
def test_network_fp16_autocast_inference_on_triton_path(interpreted):
    # fp16 activations around an fp32 scan state: within fp16's resolution of the float64 network.
    assert interpreted['model']['fp16_autocast_forward'] < 5e-3
    assert interpreted['model']['low_memory_fp16_autocast_forward'] < 5e-3


@needs_triton
def test_scan_half_precision_inputs_keep_fp32_state(interpreted):
    # fp16 activations: the output is rounded to fp16 (relative step 2**-11), the state is not.
    for case, aligned in (('half_inputs', False), ('half_packed_rows', True)):
        result = interpreted[case]
        assert result['rows_aligned'] == aligned
        assert result['forward'] < 2e-3 and result['no_grad_path'] < 2e-3 and result['over_u'] < 2e-3
        assert max(v for k, v in result.items() if k.startswith('grad_')) < 5e-3


@needs_triton
def test_layer_norm_and_causal_conv_kernels(interpreted):
    result = interpreted['fused']
    assert ({'add_bias_skip', 'add_bias_skip_image_grad_bias', 'ln_linear_60_half', 'ln_linear_192',
             'ln_linear_60_planes', 'linear_60_planes', 'conv_grad_weight', 'conv_130_k3_grad_x'}
            | {f'pixel_shuffle_image_x{factor}' for factor in (2, 3, 4)} <= set(result))
    assert max(result.values()) < TOL, result


@needs_triton
def test_network_on_triton_path_matches_ref_network(interpreted):
    result = interpreted['model']
    # Under the interpreter the CPU may run the triton backend, but only when asked for it.
    assert result['triton_unavailable_reason'] is None
    assert result['auto_on_cpu'] == 'torch'
    assert result['forward'] < TOL and result['no_grad_forward'] < TOL and result['low_memory_forward'] < TOL
    assert result['wide_no_grad_forward'] < TOL
    assert result['pixelshuffle_no_grad_forward'] < TOL and result['pixelshuffle_output_contiguous']
    # The RSSB's convolution, conv_after_body and the upsampler's, all from 6 channels padded to 8.
    assert result['no_grad_conv_input_channels'] == [8, 8, 8]
    assert max(result['grads'].values()) < 1e-4, result['grads']
    # With stochastic depth, whose factors the Triton path takes inside its LayerNorm kernel.
    assert result['drop_path_forward'] < TOL
    assert max(result['drop_path_grads'].values()) < 1e-4, result['drop_path_grads']


@needs_triton
def test_inference_frees_the_second_vimms_input(interpreted):
    result = interpreted['model']
    assert result['released_output'] < TOL and result['hooked_output'] < TOL
    assert result['released_bytes'] == 0  # the first ViMM's output, once read
    assert result['group_input_intact']
    assert result['hook_kept_output'] < TOL  # a forward hook kept it: left alone


def test_triton_backend_is_cuda_only_without_interpreter(monkeypatch):
    from dvmsr_arch.ops import resolve_backend, scan_triton
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    monkeypatch.delenv('DVMSR_SCAN_BACKEND', raising=False)
    reason = scan_triton.why_unavailable(torch.device('cpu'))
    assert reason is not None and 'CUDA' in reason
    assert resolve_backend('auto', 'cpu') == 'torch'
    with pytest.raises(RuntimeError, match='triton'):
        resolve_backend('triton', 'cpu')


@pytest.mark.parametrize('n_tiles', [100, 1024, 4099, 43223, 691560, 1 << 20])
@pytest.mark.parametrize('programs_per_chunk', [1, 2, 128, 768])
@pytest.mark.parametrize('resident', [264, 792, 1056])
def test_whole_wave_chunks(n_tiles, programs_per_chunk, resident):
    from dvmsr_arch.ops.scan_triton import MAX_WHOLE_SEQUENCE_SPLIT, SUMMARY_PASS_SHARE, _cdiv, _whole_wave_tiles

    def passes_time(t):  # how long the two passes take, in tiles walked one after another
        chunks = _cdiv(n_tiles, t)
        return (_cdiv(chunks * programs_per_chunk, resident)
                + SUMMARY_PASS_SHARE * _cdiv((chunks - 1) * programs_per_chunk, resident)) * t
    configured = 32
    tiles = _whole_wave_tiles(n_tiles, configured, programs_per_chunk, resident)
    whole_sequence_splits = {_cdiv(n_tiles, split) for split in range(1, MAX_WHOLE_SEQUENCE_SPLIT + 1)}
    assert configured <= tiles <= 2 * configured or tiles in whole_sequence_splits
    assert passes_time(tiles) <= passes_time(configured)
    assert all(passes_time(tiles) <= passes_time(t) for t in range(configured, 2 * configured + 1))
    if _cdiv(n_tiles, configured) * programs_per_chunk <= resident:  # less than a wave: nothing to gain
        assert tiles == configured


def test_whole_wave_chunks_at_lr_339x510_on_an_h100():
    # 172,890 tokens in tiles of 4, one program per chunk (120 channels in programs of 128), 132 SMs
    # holding 4 programs of four warps each: 41 tiles a chunk, 1,055 programs in two waves of 528.
    # Programs of two warps and 64 channels, 8 an SM, give the same chunks.
    from dvmsr_arch.ops.scan_triton import _whole_wave_tiles
    assert _whole_wave_tiles(43223, 32, 1, 132 * 4) == 41
    assert _whole_wave_tiles(43223, 32, 2, 132 * 8) == 41


def test_whole_sequence_chunks_for_the_distillation_teacher_on_an_h100():
    # The teacher's forward at the paper's batch: 128 sequences of 64x64 tokens (1,024 tiles of 4),
    # 384 channels in 3 programs of 128: 384 programs a chunk, which 132 SMs hold at once at 3 each
    # (its output pass takes 168 registers a thread). One chunk a sequence then leaves the summary
    # pass nothing to do; so it does with 6 programs of 64 channels a sequence, 8 an SM. At 384
    # programs a chunk where the GPU holds 1,056, chunks of 47 tiles (8 waves a pass) still end
    # sooner than one chunk walking all 1,024 tiles; the student's training forward (one program of
    # 128 channels a sequence, 4 a SM) keeps 32.
    from dvmsr_arch.ops.scan_triton import _whole_wave_tiles
    assert _whole_wave_tiles(1024, 32, 3 * 128, 132 * 3) == 1024
    assert _whole_wave_tiles(1024, 32, 6 * 128, 132 * 8) == 1024
    assert _whole_wave_tiles(1024, 32, 6 * 64, 132 * 8) == 47
    assert _whole_wave_tiles(1024, 32, 64, 132 * 4) == 32


def test_scan_config_names():
    from benchmark import MEASURED_SCAN_CONFIGS, scan_config
    from dvmsr_arch.ops.scan_triton import FORWARD_CONFIG, ScanConfig
    assert scan_config('lanes_t4_e128_c32_w4_p8_waves') == FORWARD_CONFIG
    assert scan_config('lanes_t4_e64_c41_w2_p8_s80_o112') == ScanConfig(
        tile=4, block_e=64, tiles_per_chunk=41, num_warps=2, sequential=True, prefetch=8, summary_registers=80,
        output_registers=112)
    assert not scan_config('assoc_t8_e32_c32_w4').sequential
    assert all(isinstance(scan_config(name), ScanConfig) for name in MEASURED_SCAN_CONFIGS)
    for bad in ('lanes_t4_e64', 'assoc_t8_e32_c32_w4_p8', 'lanes_t4_e64_c32_w2_waves_p8'):
        with pytest.raises(ValueError, match='scan kernel shape|lanes kernels only'):
            scan_config(bad)


@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason='needs a CUDA GPU')
def test_scan_on_gpu_matches_float64_ref():
    from benchmark import check_scan
    assert_scan_rows_match_float64(check_scan(torch.device('cuda'), [(2, 24, 16, 1000, 4), (3, 7, 5, 777, 0)],
                                              seed=1))


def assert_scan_rows_match_float64(rows):
    """``check_scan``'s rows: every element written, forward and every gradient within 1e-4 of float64."""
    for row in rows:
        assert not row['forward_nan'] and not row['grad_nan'] and row['out_matches'], row
        assert row['forward_max_rel'] < 1e-4
        assert max(v for k, v in row.items() if k.startswith('grad_') and k.endswith('_max_rel')) < 1e-4, row


@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason='needs a CUDA GPU')
def test_scan_on_gpu_in_whole_sequence_chunks_matches_float64_ref(monkeypatch):
    """The forward's one-chunk-a-sequence plan (``_whole_wave_tiles``), chosen here at small sizes by a
    GPU said to hold two programs at once: no summary pass, no carry, every tile in one program."""
    from benchmark import check_scan
    from dvmsr_arch.ops import scan_triton
    monkeypatch.setattr(scan_triton, '_resident_programs', lambda *args: 2)
    scan_triton._forward_plans.clear()
    try:
        rows = check_scan(torch.device('cuda'), [(2, 24, 16, 1000, 4), (3, 7, 5, 777, 0)], seed=2)
        plans = list(scan_triton._forward_plans.values())
    finally:
        scan_triton._forward_plans.clear()
    assert plans and all(plan.n_chunks == 1 and plan.tiles >= plan.n_tiles > 64 for plan in plans)
    assert_scan_rows_match_float64(rows)


def option_file_networks():
    """Each distinct DVMSR of the option files (their network_g and network_t), named after the first
    file and key that give it."""
    import yaml
    seen = {}
    for path in sorted((REPO / 'options').rglob('*.yml')):
        opt = yaml.safe_load(path.read_text())
        for key in ('network_g', 'network_t'):
            if opt.get(key, {}).get('type') == 'DVMSR':
                spec = {k: v for k, v in opt[key].items() if k != 'type'}
                seen.setdefault(json.dumps(spec, sort_keys=True), f'{path.relative_to(REPO / "options")}:{key}')
    return [pytest.param(json.loads(spec), id=name) for spec, name in seen.items()]


def without_kinks(net: torch.nn.Module) -> torch.nn.Module:
    """``net`` with its LeakyReLUs made the identity. A pre-activation within rounding of zero can fall
    on the other side of the kink in fp32 than in float64, and its gradient element then differs by
    99%: on an H100 one such element of ``vimm_1111``'s upsampler put the torch backend's fp32 x_proj
    gradients 1.5e-2 from float64, while the Triton path's were 1.3e-6."""
    for module in net.modules():
        if isinstance(module, torch.nn.LeakyReLU):
            module.negative_slope = 1.0
    return net


@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason='needs a CUDA GPU')
@pytest.mark.parametrize('spec', option_file_networks())
def test_every_option_file_network_runs_the_triton_path_on_gpu(spec):
    """Inference (default, low-memory, fp16 autocast) and a training step's gradients (with the
    files' stochastic depth) of each network the option files train, distil from or test, against
    the ``ref`` backend in float64, the Triton path in true fp32. The 192-channel teacher's
    inference, which every distillation step and validation run, once asked more shared memory of
    the fused LayerNorm + in_proj kernel than a GPU has. The loss is MSE rather than L1, whose kink
    at each target pixel would be a second place where rounding can flip a gradient element (see
    ``without_kinks``)."""
    from dvmsr_arch.archs.dvmsr_arch import DVMSR
    from dvmsr_arch.ops import low_memory_inference
    torch.manual_seed(0)
    fast = without_kinks(DVMSR(**dict(spec, scan_backend='triton')).cuda())
    reference = without_kinks(DVMSR(**dict(spec, scan_backend='ref')).cuda().double())
    reference.load_state_dict(fast.state_dict())
    x = torch.rand(2, 3, 24, 40, device='cuda', dtype=torch.float64)
    target = torch.rand(2, 3, 24 * spec['upscale'], 40 * spec['upscale'], device='cuda', dtype=torch.float64)
    x32 = x.float()
    with precision('fp32', x.device):
        with torch.no_grad():
            ref = reference.eval()(x)
            out = fast.eval()(x32)
            with low_memory_inference():
                low_memory = fast(x32)
            with torch.autocast('cuda', dtype=torch.float16):
                half = fast(x32)
        with fixed_sample_scales():  # the files' stochastic depth, the same samples dropped in both
            torch.nn.functional.mse_loss(fast.train()(x32), target.float()).backward()
            torch.nn.functional.mse_loss(reference.train()(x), target).backward()
    assert max_rel(out, ref) < 1e-4 and max_rel(low_memory, ref) < 1e-4
    assert max_rel(half.float(), ref) < 5e-3
    worst = max((max_rel(p.grad, q.grad), name)
                for (name, p), q in zip(fast.named_parameters(), reference.parameters()))
    assert worst[0] < 1e-4, worst


if __name__ == '__main__':
    sys.path.insert(0, str(REPO))
    print(json.dumps(run_all_cases()))
