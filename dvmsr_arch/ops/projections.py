"""Mamba's in_proj for training, as two outputs whose gradients meet in one matmul."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


class _LinearHalves(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        # Under autocast in its dtype, as F.linear outside a Function would be.
        return tuple(F.linear(x, half) for half in weight.chunk(2))

    @staticmethod
    def backward(ctx, d_first: Optional[Tensor], d_second: Optional[Tensor]):
        x, weight = ctx.saved_tensors
        rows, channels = x.numel() // x.shape[-1], x.shape[-1]
        halves = weight.float().chunk(2)
        grads = [None if g is None else g.reshape(rows, -1).float() for g in (d_first, d_second)]
        dx = dweight = None
        if ctx.needs_input_grad[0]:
            # The second half's share added by the matmul itself: no pass of its own over dx.
            for g, half in zip(grads, halves):
                if g is not None:
                    dx = g @ half if dx is None else dx.addmm_(g, half)
            dx = torch.zeros_like(x) if dx is None else dx.view(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            flat_x = x.reshape(rows, channels).float()
            dweight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
            for g, part in zip(grads, dweight.chunk(2)):
                if g is not None:
                    torch.mm(g.t(), flat_x, out=part)
            dweight = dweight.to(weight.dtype)
        return dx, dweight


def linear_halves(x: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor]:
    """``F.linear(x, w)`` for each half of ``weight``'s rows: Mamba's x and z, each contiguous.

    One matmul and two slices would give each half a zero-filled full-width gradient that autograd
    then adds up; two ``F.linear`` calls would add their input gradients in a pass of its own. Here
    the backward takes the second half's input gradient into the first's with one addmm, and writes
    the weight gradient's halves in place.
    """
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearHalves.apply(x, weight)
    return tuple(F.linear(x, half) for half in weight.chunk(2))
