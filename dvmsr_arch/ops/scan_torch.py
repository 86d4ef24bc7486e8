"""Selective scan in plain PyTorch: chunked, autograd-capable, bounded memory.

The sequence is cut into chunks of ``T`` tokens that all advance together, one token at a time,
each from a zero state (``T`` vectorised steps over every chunk at once). A short pass over the
chunk ends then gives each chunk the true state it starts from, and a second sweep over the ``T``
positions adds that state's decayed contribution to the output. The (batch, E, L, N) tensor of
all states never exists: each step holds one state per chunk, and long sequences are further cut
into blocks chained by their final state. Under autograd every block is checkpointed, so the
backward pass also holds one block at a time.

Only decay factors exp(delta * A) in (0, 1] are formed (A < 0, delta >= 0 after softplus), never
their inverses, so nothing overflows however long the sequence; those below 2**-64 are taken as
2**-64 (``DECAY_FLOOR``).
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# Decays below 2**-64 are taken as 2**-64: that moves a state by less than 2**-64 of the state before
# it, below float64's rounding (2**-53) at the states' scale. Smaller factors make the CPU slow: PyTorch's
# exp is many times slower per element for arguments below about -87 (where fp32 underflows), and so
# is a multiply with an operand below fp32's normal range (2**-126). The released student's A reaches
# -456, so many of its decays lie there (docs/benchmarks.md, CPU).
DECAY_FLOOR = -64 * math.log(2)  # natural log of the smallest decay factor
# Tokens a chunk: chunks advance together, one token a step, and the pass over chunk ends steps once a
# chunk. Longer chunks mean fewer of those small steps; under autograd a checkpointed block keeps every
# step's tensors for its backward, so there chunks stay short. Without autograd 32 runs the released
# student faster than 16 on the CPU, for a little more memory (docs/benchmarks.md, CPU).
CHUNK = 32
CHUNK_WITH_GRAD = 16
# Elements of one step's (batch, chunks, E, N) state tensor in a block: bounds the working set,
# and, under autograd, what one checkpointed block keeps for its backward pass.
STEP_ELEMENTS = 2**20
STEP_ELEMENTS_WITH_GRAD = 2**20


def _decay(exponent: Tensor) -> Tensor:
    """exp(exponent) for exponent <= 0, no smaller than exp(DECAY_FLOOR). Where autograd does not
    record it, it works in place, on the temporary every caller hands it: two allocations of a whole
    step fewer per call."""
    if exponent.requires_grad:
        return torch.exp(exponent.clamp_min(DECAY_FLOOR))
    return exponent.clamp_min_(DECAY_FLOOR).exp_()


def _scan_chunks(u: Tensor, delta: Tensor, B: Tensor, C: Tensor, A: Tensor, h0: Tensor,
                 chunk: int) -> Tuple[Tensor, Tensor]:
    """The recurrence over a length that is a multiple of ``chunk``; returns (C.h per token, final state)."""
    batch, inner, length = u.shape
    n_chunks = length // chunk

    def steps_first(t: Tensor) -> Tensor:  # (b, X, L) -> (T, b, chunks, X): each step's slice contiguous
        return t.reshape(batch, t.shape[1], n_chunks, chunk).permute(3, 0, 2, 1).contiguous()

    delta_s, drive_s = steps_first(delta), steps_first(delta * u)
    B_s, C_s = steps_first(B).unsqueeze(3), steps_first(C).unsqueeze(-1)  # (T,b,chunks,1,N), (T,b,chunks,N,1)
    delta_sum = delta_s.cumsum(0).unsqueeze(-1)  # decay from a chunk's start is exp(A * delta_sum)

    h, y_local = None, []
    for t in range(chunk):
        drive = drive_s[t].unsqueeze(-1) * B_s[t]
        h = drive if h is None else torch.addcmul(drive, _decay(delta_s[t].unsqueeze(-1) * A), h)
        y_local.append(torch.matmul(h, C_s[t]))

    chunk_decay = _decay(delta_sum[-1] * A)  # (b, chunks, E, N)
    carry, starts = h0, []
    for c in range(n_chunks):
        starts.append(carry)
        carry = torch.addcmul(h[:, c], chunk_decay[:, c], carry)
    start = torch.stack(starts, dim=1)

    y = torch.stack([y_local[t] + torch.matmul(_decay(delta_sum[t] * A) * start, C_s[t]) for t in range(chunk)])
    return y.squeeze(-1).permute(1, 3, 2, 0).reshape(batch, inner, length), carry


def _scan_block(u: Tensor, delta: Tensor, B: Tensor, C: Tensor, z: Optional[Tensor], A: Tensor, h0: Tensor,
                D: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                chunk: int) -> Tuple[Tensor, Tensor]:
    """Everything per token for one block, so that no full-length temporary is ever made."""
    compute = h0.dtype
    length = u.shape[-1]
    u, delta, B, C = (t.to(compute) for t in (u, delta, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].to(compute)
    if delta_softplus:
        delta = F.softplus(delta)
    # Padding with delta = 0 gives decay 1 and no input: the state passes through unchanged.
    pad = -length % chunk
    y, h = _scan_chunks(*(F.pad(t, (0, pad)) for t in (u, delta, B, C)), A, h0, chunk)
    y = y[..., :length]
    if D is not None:
        y = torch.addcmul(y, u, D[..., None].to(compute))
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y, h


def selective_scan_torch(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                         z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                         delta_softplus: bool = False) -> Tensor:
    """Same contract as :func:`dvmsr_arch.ops.scan_ref.selective_scan_ref`."""
    compute = torch.promote_types(u.dtype, torch.float32)  # the state is never kept in half precision
    A = A.to(compute)
    batch, inner, length = u.shape
    state = A.shape[1]
    with_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias))
    step_budget, chunk = (STEP_ELEMENTS_WITH_GRAD, CHUNK_WITH_GRAD) if with_grad else (STEP_ELEMENTS, CHUNK)
    block = max(1, step_budget // (batch * inner * state)) * chunk

    h = u.new_zeros(batch, inner, state, dtype=compute)
    pieces = []
    out = None if with_grad else u.new_empty(batch, inner, length)
    for start in range(0, length, block):
        span = slice(start, min(start + block, length))
        args = (u[..., span], delta[..., span], B[..., span], C[..., span], None if z is None else z[..., span],
                A, h, D, delta_bias, delta_softplus, chunk)
        if with_grad:
            y, h = checkpoint(_scan_block, *args, use_reentrant=False)
            pieces.append(y.to(u.dtype))
        else:
            y, h = _scan_block(*args)
            out[..., span] = y
    return out if out is not None else torch.cat(pieces, dim=-1)
