"""The selective scan as its definition: one step of the recurrence per token.

Slow on purpose. It is the yardstick every other backend is tested against
(run it in float64), never something the network should use for real work.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                       z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                       delta_softplus: bool = False) -> Tensor:
    """h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t;  y_t = C_t . h_t + D u_t;  y_t *= silu(z_t).

    Shapes as in mamba_ssm: u, delta, z (batch, E, L); A (E, N); B, C (batch, N, L); D, delta_bias (E,).
    """
    dtype_in = u.dtype
    u, delta, A, B, C = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].to(delta.dtype)
    if delta_softplus:
        delta = F.softplus(delta)
    batch, inner, length = u.shape
    h = u.new_zeros(batch, inner, A.shape[1])
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append(torch.einsum('ben,bn->be', h, C[:, :, t]))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D[..., None].to(u.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype_in)
