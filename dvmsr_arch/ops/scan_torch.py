"""Selective scan in plain PyTorch: chunked, autograd-capable, bounded memory.

The sequence is cut into chunks of ``T`` tokens that all advance together, one token at a time,
each from a zero state (``T`` vectorised steps over every chunk at once). A short pass over the
chunk ends then gives each chunk the true state it starts from, and a second sweep over the ``T``
positions adds that state's decayed contribution to the output. The (batch, E, L, N) tensor of
all states never exists: each step holds one state per chunk, and long sequences are further cut
into blocks chained by their final state. Under autograd every block is checkpointed, so the
backward pass also holds one block at a time.

Only decay factors exp(delta * A) in (0, 1] are formed (A < 0, delta >= 0 after softplus), never
their inverses, so nothing overflows however long the sequence.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

CHUNK = 16  # short chunks make few, large vectorised steps; the pass over chunk ends is cheap
# Elements of one step's (batch, chunks, E, N) state tensor in a block: bounds the working set,
# and, under autograd, what one checkpointed block keeps for its backward pass.
STEP_ELEMENTS = 2**22
STEP_ELEMENTS_WITH_GRAD = 2**20


def _scan_block(u: Tensor, delta: Tensor, B: Tensor, C: Tensor, A: Tensor, h0: Tensor) -> Tuple[Tensor, Tensor]:
    """Scan one block whose length is a multiple of CHUNK; returns (C.h per token, final state)."""
    batch, inner, length = u.shape
    n_chunks = length // CHUNK

    def steps_first(t: Tensor) -> Tensor:  # (b, X, L) -> (T, b, chunks, X): each step's slice contiguous
        return t.reshape(batch, t.shape[1], n_chunks, CHUNK).permute(3, 0, 2, 1).contiguous()

    delta_s, drive_s = steps_first(delta), steps_first(delta * u)
    B_s, C_s = steps_first(B).unsqueeze(3), steps_first(C).unsqueeze(-1)  # (T,b,chunks,1,N), (T,b,chunks,N,1)
    delta_sum = delta_s.cumsum(0).unsqueeze(-1)  # decay from a chunk's start is exp(A * delta_sum)

    h, y_local = None, []
    for t in range(CHUNK):
        drive = drive_s[t].unsqueeze(-1) * B_s[t]
        h = drive if h is None else torch.addcmul(drive, torch.exp(delta_s[t].unsqueeze(-1) * A), h)
        y_local.append(torch.matmul(h, C_s[t]))

    chunk_decay = torch.exp(delta_sum[-1] * A)  # (b, chunks, E, N)
    carry, starts = h0, []
    for c in range(n_chunks):
        starts.append(carry)
        carry = torch.addcmul(h[:, c], chunk_decay[:, c], carry)
    start = torch.stack(starts, dim=1)

    y = torch.stack([y_local[t] + torch.matmul(torch.exp(delta_sum[t] * A) * start, C_s[t]) for t in range(CHUNK)])
    return y.squeeze(-1).permute(1, 3, 2, 0).reshape(batch, inner, length), carry


def selective_scan_torch(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                         z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                         delta_softplus: bool = False) -> Tensor:
    """Same contract as :func:`dvmsr_arch.ops.scan_ref.selective_scan_ref`."""
    dtype_in = u.dtype
    compute = torch.promote_types(dtype_in, torch.float32)  # the state is never kept in half precision
    u_c, delta, A, B, C = (t.to(compute) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].to(compute)
    if delta_softplus:
        delta = F.softplus(delta)
    batch, inner, length = u_c.shape
    state = A.shape[1]
    with_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (u_c, delta, A, B, C))
    step_budget = STEP_ELEMENTS_WITH_GRAD if with_grad else STEP_ELEMENTS
    block = max(1, step_budget // (batch * inner * state)) * CHUNK

    h = u_c.new_zeros(batch, inner, state)
    outputs = []
    for start in range(0, length, block):
        stop = min(start + block, length)
        # Padding with delta = 0 gives decay 1 and no input: the state passes through unchanged.
        pad = -(stop - start) % CHUNK
        pieces = [F.pad(t[..., start:stop], (0, pad)) for t in (u_c, delta, B, C)]
        if with_grad:
            y, h = checkpoint(_scan_block, *pieces, A, h, use_reentrant=False)
        else:
            y, h = _scan_block(*pieces, A, h)
        outputs.append(y[..., :stop - start])
    y = torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0]
    if D is not None:
        y = y + u_c * D[..., None].to(compute)
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(dtype_in)
