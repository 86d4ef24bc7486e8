"""Mamba's inner computation for training on the Triton path, as one autograd Function: in_proj's x
and z halves, conv1d + SiLU on x, x_proj and the selective scan (out_proj stays a plain Linear), as
mamba_ssm's ``mamba_inner_fn`` does it for its own kernels.

Apart, their gradients would meet in autograd's passes of their own: u feeds both x_proj and the scan,
and in_proj's two halves both come from the same tokens. Inside one Function the backward adds x_proj's
share to u's gradient by the matmul itself, and the scan and conv1d's backward write the gradients of
z and of x side by side, as in_proj's output rows lay them out, so that in_proj's input and weight
gradients are one matmul each over those rows.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .fused_triton import causal_conv_backward, causal_conv_forward
from .scan_triton import (_f32, _input_grads, _launch_on, _scan_backward, _scan_forward, _split_rows, padded_dt_weight,
                          padded_x_proj_weight, row_layout)


def _inner_forward(tokens, in_weight, conv_weight, conv_bias, proj_weight, dt_weight, A, D, delta_bias,
                   save_states: bool):
    """in_proj's [x, z] rows, u, x_proj's rows, y and (with ``save_states``) the scan's saved states."""
    inner = in_weight.shape[0] // 2
    # One matmul for both halves (under autocast in its dtype, as in_proj would be): x and z are
    # views of its rows, which conv1d and the scan read as they are.
    xz = F.linear(tokens, in_weight)
    u = causal_conv_forward(xz[..., :inner], conv_weight, conv_bias)
    rows = F.linear(u, proj_weight)
    dt, B, C = _split_rows(rows, dt_weight.shape[1], A.shape[1])
    y, states = _scan_forward(u.transpose(1, 2), dt, dt_weight, A, B, C, D, xz[..., inner:].transpose(1, 2),
                              delta_bias, True, None, save_states=save_states)
    return xz, u, rows, y, states


class _MambaInner(torch.autograd.Function):

    @staticmethod
    def forward(ctx, tokens, in_weight, conv_weight, conv_bias, proj_weight, dt_weight, A, D, delta_bias):
        xz, u, rows, y, states = _inner_forward(tokens, in_weight, conv_weight, conv_bias, proj_weight, dt_weight, A,
                                                D, delta_bias, save_states=True)
        ctx.save_for_backward(tokens, in_weight, xz, conv_weight, conv_bias, proj_weight, u, rows, dt_weight, A, D,
                              delta_bias, states)
        return y

    @staticmethod
    def backward(ctx, dy):
        (tokens, in_weight, xz, conv_weight, conv_bias, proj_weight, u, rows, dt_weight, A, D, delta_bias,
         states) = ctx.saved_tensors
        batch, length, channels = tokens.shape
        inner, width = u.shape[-1], rows.shape[-1]
        rank, state = dt_weight.shape[1], A.shape[1]
        f32 = dict(device=u.device, dtype=torch.float32)
        dt, B, C = _split_rows(rows, rank, state)
        d_xz = torch.empty(batch, length, 2 * inner, **f32)  # [x, z] rows, as in_proj's output
        d_rows = torch.empty(batch, length, width, **f32)
        du, _, d_dt_weight, dA, _, _, dD, _, d_bias = _scan_backward(
            dy, u.transpose(1, 2), dt, dt_weight, A, B, C, D, xz[..., inner:].transpose(1, 2), delta_bias, True,
            states, d_rows, dz_into=d_xz[..., inner:].transpose(1, 2))
        du = du.transpose(1, 2)  # token rows 2E apart, beside delta's gradient
        flat_rows = d_rows.view(-1, width)
        du.view(-1, inner).addmm_(flat_rows, proj_weight.float())  # x_proj's share, in place through the view
        d_proj = flat_rows.t() @ u.reshape(-1, inner).float()
        _, d_conv_weight, d_conv_bias = causal_conv_backward(xz[..., :inner], conv_weight, conv_bias, du,
                                                             dx_into=d_xz[..., :inner])
        flat = d_xz.view(-1, 2 * inner)
        d_tokens = (flat @ in_weight.float()).view(batch, length, channels)
        d_in_weight = flat.t() @ tokens.reshape(-1, channels).float()
        grads = (d_tokens, d_in_weight, d_conv_weight, d_conv_bias, d_proj, d_dt_weight, dA, dD, d_bias)
        return tuple(_input_grads(ctx, grads, (tokens, in_weight, conv_weight, conv_bias, proj_weight, dt_weight, A,
                                               D, delta_bias)))


def mamba_inner_triton(tokens: Tensor, in_weight: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor],
                       proj_weight: Tensor, dt_weight: Tensor, A: Tensor, D: Optional[Tensor] = None,
                       delta_bias: Optional[Tensor] = None) -> Tensor:
    """The gated scan output y (batch, E, L) of a Mamba block before out_proj, from its (already
    normalised) tokens (batch, L, C), any strides: [x, z] = tokens @ in_weight^T (in_weight (2E, C)),
    u = silu(causal depthwise conv1d of x) (conv_weight (E, 1, K)), [dt, B, C] = u @ proj_weight^T
    (proj_weight (R + 2N, E)), and the selective scan of u with delta = softplus(dt_weight dt +
    delta_bias), A (E, N), B, C, D and the gate z.

    For training: under autograd it is one Function (see the module's docstring); without autograd
    the same kernels run one after another.
    """
    _launch_on(tokens.device)
    A, D, delta_bias = A.float(), _f32(D), _f32(delta_bias)
    # dt's columns padded with zeros to a width the scan reads whole (see ``row_layout``); under
    # autograd the padding is part of the graph, so the weights' gradients come back unpadded.
    rank = dt_weight.shape[1]
    columns, _ = row_layout(rank)
    proj_weight, dt_weight = padded_x_proj_weight(proj_weight, rank, columns), padded_dt_weight(dt_weight, columns)
    conv_weight = conv_weight.contiguous()
    tensors = (tokens, in_weight, conv_weight, conv_bias, proj_weight, dt_weight, A, D, delta_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _MambaInner.apply(*tensors)
    return _inner_forward(*tensors, save_states=False)[3]
