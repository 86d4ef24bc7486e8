"""Selective scan in plain PyTorch: chunked, autograd-capable, bounded memory.

The sequence is cut into blocks that fit a fixed element budget, and each block into chunks of
``T`` tokens. Inside a block all chunks advance together, one token at a time (``T`` vectorised
steps, each over every chunk at once), each chunk starting from a zero state. A short pass over
the chunk ends then carries the true state into every chunk, and one fused fix-up adds its decayed
contribution. Blocks are chained by their final state.

Only decay factors ``exp(delta * A)`` in (0, 1] and their running products are ever formed, so
nothing overflows however long the sequence. No tensor of shape (batch, E, L, N) over the whole
sequence exists: under autograd each block is checkpointed, so the backward pass holds one block
at a time too.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# Elements of one (batch, E, block, N) tensor: 2**23 floats is 32 MiB in fp32.
BLOCK_ELEMENTS = 2**23
MAX_CHUNK = 64


def _scan_block(u: Tensor, delta: Tensor, B: Tensor, C: Tensor, A: Tensor, h0: Tensor,
                chunk: int) -> Tuple[Tensor, Tensor]:
    """Scan one block whose length is a multiple of ``chunk``; returns (y without D/gate, last state)."""
    batch, inner, length = u.shape
    n_chunks = length // chunk
    # Token-major layouts (T, batch, E, chunks[, N]) make every step's slice contiguous.
    delta_t = delta.reshape(batch, inner, n_chunks, chunk).permute(3, 0, 1, 2)
    u_t = u.reshape(batch, inner, n_chunks, chunk).permute(3, 0, 1, 2)
    B_t = B.reshape(batch, -1, n_chunks, chunk).permute(3, 0, 2, 1).unsqueeze(2)  # (T, b, 1, chunks, N)
    C_t = C.reshape(batch, -1, n_chunks, chunk).permute(3, 0, 2, 1).unsqueeze(2)
    log_decay = delta_t.unsqueeze(-1) * A[:, None, :]  # (T, b, E, chunks, N), all <= 0
    decay = torch.exp(log_decay)
    drive = (delta_t * u_t).unsqueeze(-1) * B_t

    states = [drive[0]]
    for t in range(1, chunk):
        states.append(torch.addcmul(drive[t], decay[t], states[-1]))
    local = torch.stack(states)  # each chunk's states from a zero start

    # Running decay from each chunk's start: exp of a cumulative sum of non-positive numbers.
    decay_from_start = torch.exp(torch.cumsum(log_decay, dim=0))
    carry, carries = h0, []
    for c in range(n_chunks):
        carries.append(carry)
        carry = torch.addcmul(local[-1, :, :, c], decay_from_start[-1, :, :, c], carry)
    carry_in = torch.stack(carries, dim=2)  # (b, E, chunks, N)

    states = torch.addcmul(local, decay_from_start, carry_in)
    y = (states * C_t).sum(-1)  # (T, b, E, chunks)
    return y.permute(1, 2, 3, 0).reshape(batch, inner, length), carry


def _chunk_sizes(batch: int, inner: int, state: int, length: int) -> Tuple[int, int]:
    chunk = min(MAX_CHUNK, max(1, math.isqrt(length)))
    per_token = batch * inner * state
    block = max(chunk, (BLOCK_ELEMENTS // per_token) // chunk * chunk)
    block = min(block, -(-length // chunk) * chunk)
    return chunk, block


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
    chunk, block = _chunk_sizes(batch, inner, A.shape[1], length)
    use_checkpoint = torch.is_grad_enabled() and any(t.requires_grad for t in (u_c, delta, A, B, C))

    h = u_c.new_zeros(batch, inner, A.shape[1])
    outputs = []
    for start in range(0, length, block):
        stop = min(start + block, length)
        pad = -(stop - start) % chunk
        # Padding with delta = 0 gives decay 1 and no input: the state passes through unchanged.
        pieces = [F.pad(t[..., start:stop], (0, pad)) for t in (u_c, delta, B, C)]
        if use_checkpoint:
            y, h = checkpoint(_scan_block, *pieces, A, h, chunk, use_reentrant=False)
        else:
            y, h = _scan_block(*pieces, A, h, chunk)
        outputs.append(y[..., :stop - start])
    y = torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0]
    if D is not None:
        y = y + u_c * D[..., None].to(compute)
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(dtype_in)
