"""Triton backend: a fused selective scan, parallel over sequence chunks as well as channels.

One forward launch sequence does softplus(delta + bias), exp(delta A), delta B u, the scan with an
fp32 state, the C contraction, + D u and the silu(z) gate; the backward pass (an autograd
Function) gives the gradients of u, delta, A, B, C, D, z and delta_bias. See
:mod:`dvmsr_arch.ops.scan_triton_kernels` for the algorithm.

Triton runs on CUDA tensors; on the CPU only under its interpreter (``TRITON_INTERPRET=1`` set
before triton is first imported), which the tests use. Kernel shapes are fixed (no autotuning) and
the sequence length is a run-time argument, so a new image size compiles nothing new.
"""
import importlib.util
import math
import os
from dataclasses import dataclass, replace
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .launch import launch


@dataclass(frozen=True)
class ScanConfig:
    """Kernel shape: ``tile`` tokens per register block, ``block_e`` channels per program,
    ``tiles_per_chunk`` tiles per sequence chunk (one program each), ``num_warps`` per program.
    ``sequential``: the kernels give each thread one channel and step through a tile token by
    token, its N states in registers, instead of scanning the tile as a (T, E, N) block.
    ``prefetch`` (lane-per-channel kernels only): tokens ahead whose inputs the kernels ask the L2
    for as they go (in the backward's gradient kernel, rounded to whole tiles); 0 asks for none.
    ``summary_registers`` and ``output_registers`` cap the registers per thread of the summary pass
    and of the output pass (in the backward: of the gradients kernel), so more warps fit on an SM;
    0 leaves the count to the compiler. ``whole_waves`` (forward, on a GPU): lengthen the chunks, up
    to twice, so that the programs of a pass fill whole waves of the GPU, or to whole sequences
    where the batch fills it (see ``_whole_wave_tiles``)."""
    tile: int = 16
    block_e: int = 32
    tiles_per_chunk: int = 16
    num_warps: int = 4
    sequential: bool = False
    prefetch: int = 0
    summary_registers: int = 0
    output_registers: int = 0
    whole_waves: bool = False


# The shapes measured and checked against float64 on a GPU (docs/performance.md). Forward: the
# lane-per-channel kernels (one channel per thread, its states in registers, each token's inputs
# read one token ahead). Backward: lane-per-channel too, tiles of 4 tokens (the fastest training
# step of a sweep; the (T, E, N) block kernels took twice as long), and four warps of 32 channels a
# program, which read the same [dt, B, C] rows on one SM: in a training step on an H100 the
# gradients kernel took 1.43 ms a call against 1.54-1.55 ms with one warp a program (version 21).
# Under autograd the forward pass runs with the backward's tile, because the backward restarts from
# the states saved at every tile start, and with its programs of channels. Both prefetch 8 tokens
# ahead: without it the kernels spent most of their stalls waiting on those loads. The forward
# lengthens its chunks to fill whole waves of the GPU: at LR 339x510 on an H100 that took its two
# passes from 220 + 149 to 197 + 133 us per call. Inference takes the backward's programs too, four
# warps of 32 channels, so one program holds all of the student's 120: its output pass took 175
# against 178 us a call with programs of two warps, and no image size from 64x64 to 678x1020 got
# slower; the teacher's 384 channels lost 0.6% (docs/performance.md, version 26).
FORWARD_CONFIG = ScanConfig(tile=4, block_e=128, tiles_per_chunk=32, num_warps=4, sequential=True, prefetch=8,
                            whole_waves=True)
BACKWARD_CONFIG = ScanConfig(tile=4, block_e=128, tiles_per_chunk=64, num_warps=4, sequential=True, prefetch=8)
CARRY_BLOCK_CHUNKS = 256
CARRY_BLOCK_STATES = 16
# The saved states are (batch, n_tiles, N, E) blocks, contiguous: each state's row of channels is E
# long (the kernels' STATE_ROW) and consecutive channels are 1 apart.
STATE_CHANNEL_STRIDE = 1


def _state_stride(cfg: ScanConfig) -> Tuple[int, ...]:
    """The saved states' channel stride, an argument of the lane kernels only."""
    return (STATE_CHANNEL_STRIDE,) if cfg.sequential else ()


def set_configs(forward: Optional[ScanConfig] = None, backward: Optional[ScanConfig] = None) -> None:
    """Replace the kernel shapes (the benchmark compares several)."""
    global FORWARD_CONFIG, BACKWARD_CONFIG
    FORWARD_CONFIG = forward or FORWARD_CONFIG
    BACKWARD_CONFIG = backward or BACKWARD_CONFIG
    _forward_plans.clear()


def why_unavailable(device: torch.device) -> Optional[str]:
    device = torch.device(device)
    interpreted = os.environ.get('TRITON_INTERPRET') == '1'
    if device.type != 'cuda' and not (device.type == 'cpu' and interpreted):
        return (f'triton kernels run on CUDA tensors (or on the CPU under TRITON_INTERPRET=1), '
                f'these are on {device.type}')
    if importlib.util.find_spec('triton') is None:
        return 'triton is not installed (it comes with the CUDA builds of torch)'
    if device.type == 'cuda' and not torch.cuda.is_available():
        return 'CUDA is not available'
    return None


def _kernels():
    from . import scan_triton_kernels  # imported late: TRITON_INTERPRET must be set before triton loads
    return scan_triton_kernels


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _sum_partials(parts: Tensor, axes: int = 1) -> Tensor:
    """The sum of per-program partial results over their ``axes`` leading axes, as one
    matrix-vector product: these are tall, narrow matrices (thousands of rows of a few hundred
    values), over whose rows PyTorch's own reduction took 2-3x as long on an H100
    (docs/performance.md, 20e)."""
    rows = math.prod(parts.shape[:axes])
    flat = parts.reshape(rows, -1)
    return torch.mv(flat.t(), _ones(rows, flat)).view(parts.shape[axes:])


_ones_vectors = {}


def _ones(rows: int, like: Tensor) -> Tensor:
    """A vector of ``rows`` ones on ``like``'s device and dtype, kept for the process: a training step
    sums 57 sets of partials, and a new vector each time was a fill kernel each. There are a few
    row counts per training geometry. None is kept from inside a CUDA graph's capture, whose fill
    runs only on replay; and none is ever dropped, since a captured graph may read it."""
    key = (rows, like.device, like.dtype)
    ones = _ones_vectors.get(key)
    if ones is None:
        ones = like.new_ones(rows)
        if not (like.is_cuda and torch.cuda.is_current_stream_capturing()):
            _ones_vectors[key] = ones
    return ones


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _carry_block(n_chunks: int) -> int:
    # Chunks per step of the carry kernel: at most CARRY_BLOCK_CHUNKS, but no more than the chunks
    # there are (rounded up), so a short sequence does not scan mostly padding: at batch 64 and
    # 64x64 tokens (32 chunks) the kernel took 91 µs a call on an H100 at 256, about 33 at 32.
    return min(CARRY_BLOCK_CHUNKS, max(32, _pow2(n_chunks)))


# A summary pass's time per tile walked, against the output pass's: 125 against 178 us a call at LR
# 339x510 on an H100, both in two waves of the same programs (docs/performance.md, version 11).
SUMMARY_PASS_SHARE = 0.7
MAX_WHOLE_SEQUENCE_SPLIT = 8  # the fewest-chunk lengths tried: a sequence in 1 to this many chunks


def _whole_wave_tiles(n_tiles: int, tiles: int, programs_per_chunk: int, resident: int) -> int:
    """Tiles per chunk for which the forward's two passes end soonest when the GPU holds
    ``resident`` programs at once: from ``tiles`` to twice that, or so long that each sequence
    is one to ``MAX_WHOLE_SEQUENCE_SPLIT`` chunks.

    Every program of a pass has the same work, so they finish in waves, and a last wave that is
    partly empty costs as long as a full one: the time goes as the number of waves times the tiles
    a program walks. At LR 339x510 the default shape gives 1,351 programs, 2.56 waves of 528 on an
    H100, so the last of three runs half empty; chunks of 41 tiles instead of 32 make it 1,055
    programs, two full waves. The summary pass runs on every chunk but the last of a sequence, so
    where the batch and the channel blocks alone come close to filling the GPU, whole sequences as
    single chunks leave it nothing to do: a distillation teacher's 128 images of 64x64 tokens at 384
    channels are 384 programs, of which an H100 holds 396 at once. Chunks only grow: fewer, longer
    ones also leave less to the carry.
    """
    def cost(t: int) -> float:
        chunks = _cdiv(n_tiles, t)
        output_waves = _cdiv(chunks * programs_per_chunk, resident)
        summary_waves = _cdiv((chunks - 1) * programs_per_chunk, resident)
        return (output_waves + SUMMARY_PASS_SHARE * summary_waves) * t
    # The configured range first: where a longer chunk only ties, the shorter one stays.
    whole = [_cdiv(n_tiles, split) for split in range(1, MAX_WHOLE_SEQUENCE_SPLIT + 1)]
    return min([*range(tiles, 2 * tiles + 1), *(t for t in whole if t > 2 * tiles)], key=cost)


_resident = {}


def _resident_programs(kernel, args: Callable[[], list], options: dict, device: torch.device) -> Optional[int]:
    """How many programs of ``kernel``, compiled for these arguments, the GPU holds at once: the
    limit that its registers, shared memory and warps set per SM, times the SMs. None where Triton
    does not tell the register count. Kept per kernel, constexprs and device (the compiled kernel's
    other specialisations, pointer alignment, hardly change it); ``args()`` gives the arguments to
    compile it for, asked only the first time."""
    key = (kernel.fn.__qualname__, device, tuple(sorted(options.items())))
    if key not in _resident:
        try:
            compiled = kernel.warmup(*args(), grid=(1,), **options)
            compiled._init_handles()
            registers, shared, warps = compiled.n_regs, compiled.metadata.shared, compiled.metadata.num_warps
        except (AttributeError, TypeError):  # a Triton without these internals: keep the configured chunks
            _resident[key] = None
            return None
        props = torch.cuda.get_device_properties(device)
        registers_per_warp = -(-registers * 32 // 256) * 256  # allocated in units of 256 per warp
        per_sm = min(props.max_threads_per_multi_processor // (32 * warps),
                     props.regs_per_multiprocessor // max(1, registers_per_warp * warps))
        if shared:
            per_sm = min(per_sm, props.shared_memory_per_multiprocessor // shared)
        _resident[key] = props.multi_processor_count * per_sm or None
    return _resident[key]


def _register_cap(registers: int) -> dict:
    # Triton's launch option; left out when 0, so the compiler's own count stands.
    return dict(maxnreg=registers) if registers else {}


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.float().contiguous()


def _rows_aligned(dt: Optional[Tensor], B: Tensor, C: Tensor, rank: int, state: int) -> bool:
    """Whether every token's row of dt, B and C is contiguous, starts on 16 bytes and fills its
    power-of-two block: then the lane-per-channel kernels read each row with vector loads (128-bit
    for fp32). This holds for the network's token-major x_proj output (rank 4, state 16; for 2-byte
    activations with dt padded to 8 columns) and for few other callers."""
    rows = [B, C] + ([dt] if rank else [])
    if state != _pow2(state) or state % 4 or (rank and (rank != _pow2(rank) or rank % 4)):
        return False
    return all(t.dtype in (torch.float32, torch.float16, torch.bfloat16) and t.stride(1) == 1
               and t.stride(0) % 4 == 0 and t.stride(2) % 4 == 0 and t.data_ptr() % 16 == 0 for t in rows)


def row_layout(rank: int, element_size: int = 4) -> Tuple[int, int]:
    """Where x_proj's token rows put dt and B for the lane kernels to read them with vector loads:
    (dt's columns, B's first column); C follows B.

    dt takes ``rank`` columns where that is a power of two of at least 4 (DVMSR's student: 4), else
    the next such, its extra columns zero (zero rows of x_proj's weight). The scan then reads them
    with dt_proj's weight padded with as many zero columns (``padded_dt_weight``), which leaves
    delta's sum as it was: the kernels already summed a block of that width with zeros past the rank.
    The paper's 180- and 192-channel networks have rank 12. For 2-byte rows B starts on a multiple of 8
    columns (16 bytes).
    """
    columns = max(4, _pow2(rank))
    return columns, columns + (-columns % 8 if element_size == 2 else 0)


def padded_dt_weight(dt_weight: Tensor, columns: int) -> Tensor:
    """dt_proj's weight (E, R) with zero columns up to ``columns`` (``dt_weight`` itself if it has them)."""
    rank = dt_weight.shape[1]
    return dt_weight if rank == columns else F.pad(dt_weight, (0, columns - rank))


def padded_x_proj_weight(weight: Tensor, rank: int, b_start: int) -> Tensor:
    """x_proj's weight (R + 2N, E) with zero rows after dt's so that B's row starts at ``b_start``."""
    if b_start == rank:
        return weight
    return torch.cat([weight[:rank], weight.new_zeros(b_start - rank, weight.shape[1]), weight[rank:]])


@dataclass(frozen=True)
class _ForwardPlan:
    """How a forward scan launches for one input geometry: the two passes' kernels, grid, chunks and
    the kernels' constexprs. Worked out once per geometry (``_forward_plan``), since an eager forward
    calls the scan eight times with the same one and the host's time per call counts at small sizes."""
    summary: Callable
    output: Callable
    grid: Tuple[int, int, int]
    n_chunks: int
    n_tiles: int
    tiles: int
    summary_options: dict
    output_options: dict


_forward_plans = {}
MAX_PLANS = 256  # geometries in use at once; forgotten all at once past this


def _forward_plan(u: Tensor, rank: int, state: int, aligned: bool, flags: tuple, save_states: bool,
                  output_args: Callable[[int, int, int], list]) -> _ForwardPlan:
    """``flags``: whether there are a delta bias, softplus, D and z. ``output_args(n_chunks,
    n_tiles, tiles)`` gives the output kernel's arguments, asked only where the plan is new and the GPU's
    capacity decides the chunk length (``_whole_wave_tiles``)."""
    key = (u.shape, u.get_device(), rank, state, aligned, flags, save_states)
    plan = _forward_plans.get(key)
    if plan is not None:
        return plan
    has_bias, softplus, has_D, has_z = flags
    k = _kernels()
    cfg = FORWARD_CONFIG
    if save_states:
        # The backward's tile, whose start states it saves, and its programs of channels: at the
        # training size the output pass took 426 us a call with four warps of 32 channels against
        # 452 us with inference's two (H100, docs/performance.md, version 21).
        chunk = cfg.tile * cfg.tiles_per_chunk
        cfg = replace(cfg, tile=BACKWARD_CONFIG.tile, tiles_per_chunk=max(1, chunk // BACKWARD_CONFIG.tile),
                      block_e=BACKWARD_CONFIG.block_e, num_warps=BACKWARD_CONFIG.num_warps)
    batch, inner, length = u.shape
    n_tiles, tiles = _cdiv(length, cfg.tile), cfg.tiles_per_chunk
    n_chunks = _cdiv(n_tiles, tiles)
    shapes = dict(T=cfg.tile, BLOCK_E=cfg.block_e, BLOCK_N=_pow2(state), DT_RANK=rank, HAS_BIAS=has_bias,
                  SOFTPLUS=softplus, num_warps=cfg.num_warps)
    if cfg.sequential:
        shapes.update(RANK_PAD=_pow2(max(rank, 1)), ALIGNED=aligned, PREFETCH=cfg.prefetch)
    output_options = dict(HAS_D=has_D, HAS_Z=has_z, SAVE_STATES=save_states, **shapes,
                          **_register_cap(cfg.output_registers))
    if cfg.sequential:
        output_options['STATE_ROW'] = inner
    e_blocks = _cdiv(inner, cfg.block_e)
    summary = k._fwd_chunk_summary_lanes if cfg.sequential else k._fwd_chunk_summary
    output = k._fwd_chunk_output_lanes if cfg.sequential else k._fwd_chunk_output
    if cfg.whole_waves and u.is_cuda and n_chunks > 1:
        resident = _resident_programs(output, lambda: output_args(n_chunks, n_tiles, tiles),
                                      dict(output_options, HAS_CARRY=True), u.device)
        if resident:
            tiles = _whole_wave_tiles(n_tiles, tiles, e_blocks * batch, resident)
            n_chunks = _cdiv(n_tiles, tiles)
    output_options['HAS_CARRY'] = n_chunks > 1
    plan = _ForwardPlan(summary=summary, output=output, grid=(n_chunks, e_blocks, batch), n_chunks=n_chunks,
                        n_tiles=n_tiles, tiles=tiles,
                        summary_options=dict(shapes, **_register_cap(cfg.summary_registers)),
                        output_options=output_options)
    if len(_forward_plans) >= MAX_PLANS:
        _forward_plans.clear()
    _forward_plans[key] = plan
    return plan


def _scan_forward(u: Tensor, delta: Tensor, dt_weight: Optional[Tensor], A: Tensor, B: Tensor, C: Tensor,
                  D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor], softplus: bool,
                  out: Optional[Tensor], save_states: bool) -> Tuple[Tensor, Optional[Tensor]]:
    k = _kernels()
    batch, inner, length = u.shape
    state = A.shape[1]
    rank = 0 if dt_weight is None else dt_weight.shape[1]
    if out is None:
        # Token-major output when the input is token-major: the out projection reads it as is.
        out = (torch.empty(batch, length, inner, device=u.device, dtype=u.dtype).transpose(1, 2)
               if u.stride(1) == 1 else torch.empty_like(u, memory_format=torch.contiguous_format))
    # The kernels keep every (E, N) array as (N, E) in memory and dt_proj's weight as (R, E): a
    # lane-per-channel kernel then reads consecutive channels.
    A = A.t().contiguous()
    any_t = A  # stands in for absent optional tensors; never read
    w = dt_weight.t().contiguous() if dt_weight is not None else any_t
    bias = delta_bias if delta_bias is not None else any_t
    states = None
    z_or_u = z if z is not None else u
    strides = (*u.stride(), *delta.stride(), *B.stride())  # the summary pass's
    state_stride = _state_stride(FORWARD_CONFIG)

    def output_args(n_chunks: int, n_tiles: int, tiles: int, carry_in: Tensor = any_t) -> list:
        return [u, delta, w, bias, A, B, C, D if D is not None else any_t, z_or_u, out, carry_in,
                states if states is not None else any_t, length, inner, state, n_chunks, n_tiles, tiles,
                *state_stride, *strides, *C.stride(), *z_or_u.stride(), *out.stride()]

    aligned = FORWARD_CONFIG.sequential and _rows_aligned(delta if rank else None, B, C, rank, state)
    plan = _forward_plan(u, rank, state, aligned, (delta_bias is not None, softplus, D is not None, z is not None),
                         save_states, output_args)
    f32 = dict(device=u.device, dtype=torch.float32)
    if save_states:
        states = torch.empty(batch, plan.n_tiles, inner, state, **f32)
    carry_in = any_t
    if plan.n_chunks > 1:
        # The carry entering chunk c+1 goes over chunk c's end state, which the carry kernel has just
        # read, by a program that reads and writes only its own states: one buffer less. The extra
        # slot in front takes the zeros entering chunk 0; for batch b > 0 that slot is batch b-1's
        # last end state, which no carry depends on.
        chunk_states = inner * state
        decay = torch.empty(batch, plan.n_chunks, inner, state, **f32)
        handed = torch.empty(batch * plan.n_chunks * chunk_states + chunk_states, **f32)
        end_state = handed[chunk_states:].view(batch, plan.n_chunks, inner, state)
        carry_in = handed[:-chunk_states].view(batch, plan.n_chunks, inner, state)
        # The last chunk's end state goes nowhere: the summary pass leaves that chunk out.
        launch(plan.summary, (plan.n_chunks - 1, *plan.grid[1:]), u, delta, w, bias, A, B, decay, end_state, length,
               inner, state, plan.n_chunks, plan.tiles, *strides, **plan.summary_options)
        launch(k._chunk_carry, (_cdiv(chunk_states, CARRY_BLOCK_STATES), batch),
               decay, end_state, carry_in, plan.n_chunks, chunk_states, REVERSE=False,
               BLOCK_C=_carry_block(plan.n_chunks), BLOCK_S=CARRY_BLOCK_STATES)
    launch(plan.output, plan.grid, *output_args(plan.n_chunks, plan.n_tiles, plan.tiles, carry_in),
           **plan.output_options)
    return out, states


def _scan_backward(dy: Tensor, u: Tensor, delta: Tensor, dt_weight: Optional[Tensor], A: Tensor, B: Tensor,
                   C: Tensor, D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor], softplus: bool,
                   states: Tensor, d_rows: Optional[Tensor] = None, dz_into: Optional[Tensor] = None):
    """Gradients (fp32) of u, delta (the raw pre-bias delta, or dt and dt_weight), A, B, C, D, z, bias.

    With dt_weight, the gradients of dt, B and C are views of one token-major (batch, L, R + 2N)
    buffer, [dt, B, C] per token as x_proj makes them: ``d_rows`` if given, else a new one.
    ``dz_into``: a (batch, E, L) fp32 view of token rows 2E apart (the second half of [x, z] rows,
    say) that receives z's gradient; u's and delta's then come as the two halves of such rows."""
    k = _kernels()
    cfg = BACKWARD_CONFIG
    if cfg.sequential and cfg.tile % 4:
        raise ValueError(f'the lane-per-channel backward steps in runs of 4 tokens: tile {cfg.tile} is not a multiple')
    batch, inner, length = u.shape
    state = A.shape[1]
    chunk = cfg.tile * cfg.tiles_per_chunk
    n_chunks, n_tiles, n_eblk = _cdiv(length, chunk), _cdiv(length, cfg.tile), _cdiv(inner, cfg.block_e)
    grid = (n_chunks, n_eblk, batch)
    rank = 0 if dt_weight is None else dt_weight.shape[1]
    shapes = dict(T=cfg.tile, BLOCK_E=cfg.block_e, BLOCK_N=_pow2(state), DT_RANK=rank, HAS_BIAS=delta_bias is not None,
                  SOFTPLUS=softplus, num_warps=cfg.num_warps)
    if cfg.sequential:
        shapes['RANK_PAD'] = _pow2(max(rank, 1))
    f32 = dict(device=u.device, dtype=torch.float32)
    A = A.t().contiguous()
    any_t = A
    w = dt_weight.t().contiguous() if dt_weight is not None else any_t
    bias = delta_bias if delta_bias is not None else any_t
    z_or_u = z if z is not None else u

    # Token-major (batch, L, E) buffers seen as (batch, E, L). The kernel writes the three at the
    # same offsets, so with dz_into du and ddelta share its rows' spacing.
    if dz_into is None:
        du, ddelta, dz = (torch.empty(batch, length, inner, **f32).transpose(1, 2) for _ in range(3))
    else:
        pair = torch.empty(batch, length, 2 * inner, **f32)
        du, ddelta, dz = pair[..., :inner].transpose(1, 2), pair[..., inner:].transpose(1, 2), dz_into
        if dz.dtype != torch.float32 or dz.shape != du.shape or dz.stride() != du.stride():
            raise ValueError(f'_scan_backward: dz_into {tuple(dz.shape)} {dz.dtype} with strides {dz.stride()}: '
                             f'expected fp32 {tuple(du.shape)} with strides {du.stride()}')
    # The lane-per-channel kernels read dt/B/C rows with vector loads where they allow it, and prefetch.
    lane_extra = dict(ALIGNED=_rows_aligned(delta if rank else None, B, C, rank, state),
                      PREFETCH=cfg.prefetch) if cfg.sequential else {}
    carry = any_t
    if n_chunks > 1:
        decay, handed = (torch.empty(batch, n_chunks, inner, state, **f32) for _ in range(2))
        summary = k._bwd_chunk_summary_lanes if cfg.sequential else k._bwd_chunk_summary
        # The first chunk's adjoint summary goes nowhere: the pass runs on the sequences from the
        # second chunk on, and its summaries go one chunk further into the buffers.
        later = (slice(None), slice(None), slice(chunk, None))
        launch(summary, (n_chunks - 1, *grid[1:]), delta[later], w, bias, A, C[later], z_or_u[later], dy[later],
               decay[:, 1:], handed[:, 1:], length - chunk, inner, state, n_chunks, cfg.tiles_per_chunk,
               *delta.stride(), *C.stride(), *z_or_u.stride(), *dy.stride(), HAS_Z=z is not None, **shapes,
               **lane_extra, **_register_cap(cfg.summary_registers))
        carry = torch.empty(batch, n_chunks, inner, state, **f32)
        launch(k._chunk_carry, (_cdiv(inner * state, CARRY_BLOCK_STATES), batch),
            decay, handed, carry, n_chunks, inner * state, REVERSE=True, BLOCK_C=_carry_block(n_chunks),
            BLOCK_S=CARRY_BLOCK_STATES)

    # One channel per lane and 16 states: each warp sums dB and dC over its own channels with
    # warp shuffles and writes its own partial slice. A slice holds [dB, dC] rows, so that one
    # reduction sums them into x_proj's row layout.
    warp_sums = cfg.sequential and _pow2(state) == 16 and cfg.block_e == 32 * cfg.num_warps
    grads_extra = dict(lane_extra, WARP_SUMS=warp_sums, STATE_ROW=inner) if cfg.sequential else {}
    slices = n_eblk * (cfg.num_warps if warp_sums else 1)
    dBC_part = torch.empty(slices, batch * length, 2 * state, **f32)
    dA_part = torch.empty(batch, n_chunks, state, inner, **f32)
    dD_part, dbias_part = (torch.empty(batch, n_chunks, inner, **f32) for _ in range(2))
    grads = k._bwd_chunk_grads_lanes if cfg.sequential else k._bwd_chunk_grads
    launch(grads, grid, u, delta, w, bias, A, B, C, D if D is not None else any_t, z_or_u, dy, states, carry, du,
           ddelta, dz, dBC_part, dBC_part[..., state:], dA_part, dD_part, dbias_part, length, inner, state, 2 * state,
           batch, n_chunks, n_tiles, cfg.tiles_per_chunk, *_state_stride(cfg), *u.stride(), *delta.stride(),
           *B.stride(), *C.stride(), *z_or_u.stride(), *dy.stride(), *du.stride(), HAS_D=D is not None,
           HAS_Z=z is not None, HAS_CARRY=n_chunks > 1, **shapes, **grads_extra, **_register_cap(cfg.output_registers))
    dA = dA_part.sum((0, 1)).t()
    dD = _sum_partials(dD_part, 2) if D is not None else None
    dbias = _sum_partials(dbias_part, 2) if delta_bias is not None else None
    dz = dz if z is not None else None
    if dt_weight is None:
        dB, dC = dBC_part.sum(0).view(batch, length, 2 * state).transpose(1, 2).split(state, 1)
        return du, ddelta, None, dA, dB, dC, dD, dz, dbias
    width = rank + 2 * state
    if d_rows is None:
        d_rows = torch.empty(batch, length, width, **f32)
    flat_rows = d_rows.view(batch * length, width)
    torch.sum(dBC_part, 0, out=flat_rows[:, rank:])
    # delta_raw = dt^T W^T per token: d_dt = ddelta W goes into the rows, dW = ddelta^T dt.
    dd_tokens = ddelta.transpose(1, 2).reshape(batch * length, inner)
    torch.mm(dd_tokens, dt_weight.float(), out=flat_rows[:, :rank])
    d_weight = dd_tokens.t() @ delta.transpose(1, 2).float().reshape(batch * length, rank)
    d_dt, dB, dC = _split_rows(d_rows, rank, state)
    return du, d_dt, d_weight, dA, dB, dC, dD, dz, dbias


def _split_rows(rows: Tensor, rank: int, state: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Token-major (batch, L, R + 2N) rows [dt, B, C], as x_proj makes them, seen as the scan's
    (batch, R, L), (batch, N, L) and (batch, N, L)."""
    return rows.transpose(1, 2).split([rank, state, state], 1)


def _input_grads(ctx, grads, inputs) -> list:
    """Each fp32 gradient in its input's dtype, None where autograd asked for none."""
    return [None if g is None or not need else g.to(t.dtype) for g, t, need in zip(grads, inputs, ctx.needs_input_grad)]


class _SelectiveScan(torch.autograd.Function):

    @staticmethod
    def forward(ctx, u, delta, dt_weight, A, B, C, D, z, delta_bias, softplus):
        y, states = _scan_forward(u, delta, dt_weight, A, B, C, D, z, delta_bias, softplus, None, save_states=True)
        ctx.softplus = softplus
        ctx.save_for_backward(u, delta, dt_weight, A, B, C, D, z, delta_bias, states)
        return y

    @staticmethod
    def backward(ctx, dy):
        u, delta, dt_weight, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        grads = _scan_backward(dy, u, delta, dt_weight, A, B, C, D, z, delta_bias, ctx.softplus, states)
        return (*_input_grads(ctx, grads, (u, delta, dt_weight, A, B, C, D, z, delta_bias)), None)


def _launch_on(device: torch.device) -> None:
    # Triton launches on the current device.
    if device.type == 'cuda' and device.index != torch.cuda.current_device():
        torch.cuda.set_device(device)


def _run(u, delta, dt_weight, A, B, C, D, z, delta_bias, softplus, out):
    _launch_on(u.device)
    # A may come transposed, as the network keeps it: the kernels' own layout is its transpose.
    A, D, delta_bias = A.float(), _f32(D), _f32(delta_bias)
    tensors = (u, delta, dt_weight, A, B, C, D, z, delta_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        if out is not None:
            raise ValueError('out= is for inference: it cannot be used while autograd records the scan')
        return _SelectiveScan.apply(u, delta, dt_weight, A, B, C, D, z, delta_bias, softplus)
    return _scan_forward(u, delta, dt_weight, A, B, C, D, z, delta_bias, softplus, out, save_states=False)[0]


def selective_scan_triton(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                          z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                          delta_softplus: bool = False) -> Tensor:
    """Same contract as :func:`dvmsr_arch.ops.scan_ref.selective_scan_ref`; any strides."""
    return _run(u, delta, None, A, B, C, D, z, delta_bias, delta_softplus, None)


def selective_scan_lowrank_triton(u: Tensor, dt: Tensor, dt_weight: Tensor, A: Tensor, B: Tensor, C: Tensor,
                                  D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                                  delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                                  out: Optional[Tensor] = None) -> Tensor:
    """The scan with delta = dt_weight @ dt given by its factors, as Mamba's dt_proj makes it.

    dt: (batch, R, L); dt_weight: (E, R). The (batch, E, L) delta is formed inside the kernels only.
    Without autograd, ``out`` (batch, E, L), any strides, receives y, and may be ``z`` or ``u``
    itself (each z_t and u_t is read before y_t is written over it).
    """
    return _run(u, dt, dt_weight, A, B, C, D, z, delta_bias, delta_softplus, out)
