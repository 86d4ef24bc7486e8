"""Triton kernels of the selective scan: a chunked scan, parallel over tokens as well as channels.

Imported only when the ``triton`` backend runs, so that ``TRITON_INTERPRET`` can still be set
before triton is first imported.

The recurrence h_t = a_t h_{t-1} + b_t (a_t = exp(delta_t A), b_t = delta_t u_t B_t) is linear,
so a stretch of tokens acts on the state as one affine map. The sequence is cut into chunks of
``tiles`` tiles of ``T`` tokens; each program owns one (batch, channel block, chunk):

forward   1. ``_fwd_chunk_summary``: each chunk's map from a zero start (decay product P, end state H).
          2. ``_chunk_carry``: a scan over the chunk maps gives the state entering each chunk.
          3. ``_fwd_chunk_output``: each chunk again from its true start; y = C.h + D u, gated by
             silu(z). Under autograd it also stores the state entering every tile.
backward  1. ``_bwd_chunk_summary``: each chunk's adjoint contribution from a zero end.
          2. ``_chunk_carry`` in reverse: the adjoint entering each chunk from the right.
          3. ``_bwd_chunk_grads``: per tile, recompute the states, scan the adjoint backwards, and
             form every gradient (per-program partial sums where several programs meet).

Two kernel families implement these steps. In the first, every quantity of a tile is a (T, E, N)
register block and the scans are ``tl.associative_scan`` over the token axis. In the second (the
``*_lanes`` kernels, the default both ways), each thread owns one channel and its N states and
steps through the tokens one by one. The state is fp32 whatever the input dtype, and only
decay factors in (0, 1] are formed, so nothing overflows on long sequences.

``delta`` is either a full (batch, E, L) tensor or, with ``DT_RANK > 0``, the low-rank factor
dt (batch, R, L) of Mamba's delta projection, expanded inside the kernels as dt @ W^T: the
(batch, E, L) delta then never exists in memory.
"""
import os

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Triton's interpreter runs no inline PTX; under it the kernels take tl.* equivalents instead.
INTERPRETED = tl.constexpr(os.environ.get('TRITON_INTERPRET') == '1')


@triton.jit
def _affine_combine(a_left, b_left, a_right, b_right):
    # Two affine maps x -> a x + b applied one after the other (left first).
    return a_left * a_right, b_left * a_right + b_right


@triton.jit
def _log2_approx(x):
    # lg2.approx: one special-function instruction, where tl.log2 is libdevice's accurate log2, about
    # 15 instructions of polynomial. Its absolute error (about 2**-22 for softplus's 1 + e**x) stays
    # far below the fp32 target (docs/performance.md, 8d). The interpreter has no PTX: accurate there.
    if INTERPRETED:
        return tl.log2(x)
    else:
        return tl.inline_asm_elementwise('lg2.approx.f32 $0, $1;', '=r,r', [x], dtype=tl.float32, is_pure=True,
                                         pack=1)


@triton.jit
def _softplus(x):
    # torch.nn.functional.softplus with its threshold of 20.
    return tl.where(x > 20.0, x, _log2_approx(1.0 + tl.exp2(tl.minimum(x, 20.0) * LOG2E)) * LN2)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _load_delta(delta_ptr, s_db, s_de, s_dl, w_ptr, bias_ptr, base_b, t, t_mask, e, e_mask, E, T: tl.constexpr,
                BLOCK_E: tl.constexpr, DT_RANK: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(raw, delta) for tokens ``t`` x channels ``e``, fp32; delta is 0 outside the masks."""
    mask = t_mask[:, None] & e_mask[None, :]
    if DT_RANK == 0:
        raw = tl.load(delta_ptr + base_b * s_db + e[None, :] * s_de + t[:, None] * s_dl, mask=mask,
                      other=0.0).to(tl.float32)
    else:
        # s_de is the stride over the rank dimension of dt here.
        raw = tl.zeros([T, BLOCK_E], dtype=tl.float32)
        for r in tl.static_range(DT_RANK):
            dt_r = tl.load(delta_ptr + base_b * s_db + r * s_de + t * s_dl, mask=t_mask, other=0.0).to(tl.float32)
            w_r = tl.load(w_ptr + r * E + e, mask=e_mask, other=0.0).to(tl.float32)
            raw += dt_r[:, None] * w_r[None, :]
    if HAS_BIAS:
        raw += tl.load(bias_ptr + e, mask=e_mask, other=0.0).to(tl.float32)[None, :]
    if SOFTPLUS:
        delta = _softplus(raw)
    else:
        delta = raw
    return raw, tl.where(mask, delta, 0.0)


@triton.jit(do_not_specialize=['L', 'n_chunks', 'tiles', 's_ub', 's_db', 's_Bb'])
def _fwd_chunk_summary(u_ptr, delta_ptr, w_ptr, bias_ptr, A_ptr, B_ptr, P_ptr, H_ptr, L, E, N, n_chunks, tiles,
                       s_ub, s_ue, s_ul, s_db, s_de, s_dl, s_Bb, s_Bn, s_Bl, T: tl.constexpr, BLOCK_E: tl.constexpr,
                       BLOCK_N: tl.constexpr, DT_RANK: tl.constexpr, HAS_BIAS: tl.constexpr,
                       SOFTPLUS: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_e = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    n = tl.arange(0, BLOCK_N)
    e_mask = e < E
    n_mask = n < N
    en_mask = e_mask[:, None] & n_mask[None, :]
    A2 = tl.load(A_ptr + n[None, :] * E + e[:, None], mask=en_mask, other=0.0).to(tl.float32) * LOG2E

    h = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    total = tl.zeros([BLOCK_E], dtype=tl.float32)
    for k in range(tiles):
        t = (pid_c * tiles + k) * T + tl.arange(0, T)
        t_mask = t < L
        _, delta = _load_delta(delta_ptr, s_db, s_de, s_dl, w_ptr, bias_ptr, pid_b, t, t_mask, e, e_mask, E, T, BLOCK_E,
                               DT_RANK, HAS_BIAS, SOFTPLUS)
        u = tl.load(u_ptr + pid_b * s_ub + e[None, :] * s_ue + t[:, None] * s_ul,
                    mask=t_mask[:, None] & e_mask[None, :], other=0.0).to(tl.float32)
        Bt = tl.load(B_ptr + pid_b * s_Bb + n[None, :] * s_Bn + t[:, None] * s_Bl,
                     mask=t_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
        # The tile's end state from a zero start, as one sum: token t's input decays by
        # exp(A * (delta_{t+1} + ... + delta_{T-1})) before the end.
        rest = tl.sum(delta, 0)[None, :] - tl.cumsum(delta, 0)
        decay_to_end = tl.exp2(rest[:, :, None] * A2[None, :, :])
        drive = (delta * u)[:, :, None] * Bt[:, None, :]
        tile_total = tl.sum(delta, 0)
        h = tl.exp2(tile_total[:, None] * A2) * h + tl.sum(decay_to_end * drive, 0)
        total += tile_total

    offs = (pid_b * n_chunks + pid_c) * E * N + n[None, :] * E + e[:, None]
    tl.store(P_ptr + offs, tl.exp2(total[:, None] * A2), mask=en_mask)
    tl.store(H_ptr + offs, h, mask=en_mask)


@triton.jit(do_not_specialize=['n_chunks'])
def _chunk_carry(P_ptr, G_ptr, out_ptr, n_chunks, S, REVERSE: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_S: tl.constexpr):
    """out[c] = the carry entering chunk c: x_next = P[c] * x + G[c], from x = 0 at the first chunk.

    Forward: chunks in order. REVERSE: from the last chunk down, for the adjoint.
    Layout (batch, n_chunks, S) for all three; S = E * N. The last chunk in processing order hands
    nothing on: its P and G are not read (the summary passes leave them out).
    """
    pid_s = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    s_mask = s < S
    base = pid_b * n_chunks * S
    if REVERSE:
        first = n_chunks - 1
    else:
        first = 0
    tl.store(out_ptr + base + first * S + s, tl.zeros([BLOCK_S], dtype=tl.float32), mask=s_mask)
    step = tl.arange(0, BLOCK_C)
    carry = tl.zeros([BLOCK_S], dtype=tl.float32)
    for j0 in range(0, n_chunks, BLOCK_C):
        j = j0 + step  # position in processing order
        if REVERSE:
            c = n_chunks - 1 - j
            c_next = c - 1
        else:
            c = j
            c_next = c + 1
        mask = ((j + 1) < n_chunks)[:, None] & s_mask[None, :]
        offs = base + c[:, None].to(tl.int64) * S + s[None, :]
        p = tl.load(P_ptr + offs, mask=mask, other=1.0)
        g = tl.load(G_ptr + offs, mask=mask, other=0.0)
        g = tl.where((step == 0)[:, None], g + p * carry[None, :], g)
        _, x = tl.associative_scan((p, g), 0, _affine_combine)
        # x[j] is what chunk j hands to the next one in processing order.
        tl.store(out_ptr + base + c_next[:, None].to(tl.int64) * S + s[None, :], x, mask=mask)
        carry = tl.sum(tl.where((step == BLOCK_C - 1)[:, None], x, 0.0), 0)


@triton.jit(do_not_specialize=['L', 'n_chunks', 'n_tiles', 'tiles', 's_ub', 's_db', 's_Bb', 's_Cb', 's_zb', 's_yb'])
def _fwd_chunk_output(u_ptr, delta_ptr, w_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, y_ptr, Hin_ptr,
                      states_ptr, L, E, N, n_chunks, n_tiles, tiles, s_ub, s_ue, s_ul, s_db, s_de, s_dl, s_Bb, s_Bn,
                      s_Bl, s_Cb, s_Cn, s_Cl, s_zb, s_ze, s_zl, s_yb, s_ye, s_yl, T: tl.constexpr,
                      BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, DT_RANK: tl.constexpr, HAS_BIAS: tl.constexpr,
                      SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_CARRY: tl.constexpr,
                      SAVE_STATES: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_e = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    n = tl.arange(0, BLOCK_N)
    e_mask = e < E
    n_mask = n < N
    en_mask = e_mask[:, None] & n_mask[None, :]
    en_offs = n[None, :] * E + e[:, None]
    A2 = tl.load(A_ptr + en_offs, mask=en_mask, other=0.0).to(tl.float32) * LOG2E
    if HAS_D:
        D = tl.load(D_ptr + e, mask=e_mask, other=0.0).to(tl.float32)
    if HAS_CARRY:
        h = tl.load(Hin_ptr + (pid_b * n_chunks + pid_c) * E * N + en_offs, mask=en_mask, other=0.0)
    else:
        h = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    row = tl.arange(0, T)
    for k in range(tiles):
        tile = pid_c * tiles + k
        if SAVE_STATES:
            tl.store(states_ptr + (pid_b * n_tiles + tile) * E * N + en_offs, h, mask=en_mask & (tile < n_tiles))
        t = tile * T + row
        t_mask = t < L
        te_mask = t_mask[:, None] & e_mask[None, :]
        _, delta = _load_delta(delta_ptr, s_db, s_de, s_dl, w_ptr, bias_ptr, pid_b, t, t_mask, e, e_mask, E, T, BLOCK_E,
                               DT_RANK, HAS_BIAS, SOFTPLUS)
        u = tl.load(u_ptr + pid_b * s_ub + e[None, :] * s_ue + t[:, None] * s_ul, mask=te_mask,
                    other=0.0).to(tl.float32)
        Bt = tl.load(B_ptr + pid_b * s_Bb + n[None, :] * s_Bn + t[:, None] * s_Bl,
                     mask=t_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + pid_b * s_Cb + n[None, :] * s_Cn + t[:, None] * s_Cl,
                     mask=t_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
        decay = tl.exp2(delta[:, :, None] * A2[None, :, :])
        drive = (delta * u)[:, :, None] * Bt[:, None, :]
        drive = tl.where((row == 0)[:, None, None], drive + decay * h[None, :, :], drive)
        _, states = tl.associative_scan((decay, drive), 0, _affine_combine)
        y = tl.sum(states * Ct[:, None, :], 2)
        if HAS_D:
            y += u * D[None, :]
        if HAS_Z:
            z = tl.load(z_ptr + pid_b * s_zb + e[None, :] * s_ze + t[:, None] * s_zl, mask=te_mask,
                        other=0.0).to(tl.float32)
            y *= z * _sigmoid(z)
        tl.store(y_ptr + pid_b * s_yb + e[None, :] * s_ye + t[:, None] * s_yl, y.to(y_ptr.dtype.element_ty),
                 mask=te_mask)
        h = tl.sum(tl.where((row == T - 1)[:, None, None], states, 0.0), 0)


@triton.jit(do_not_specialize=['L', 'n_chunks', 'tiles', 's_db', 's_Cb', 's_zb', 's_gb'])
def _bwd_chunk_summary(delta_ptr, w_ptr, bias_ptr, A_ptr, C_ptr, z_ptr, dy_ptr, P_ptr, G_ptr, L, E, N, n_chunks, tiles,
                       s_db, s_de, s_dl, s_Cb, s_Cn, s_Cl, s_zb, s_ze, s_zl, s_gb, s_ge, s_gl, T: tl.constexpr,
                       BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, DT_RANK: tl.constexpr, HAS_BIAS: tl.constexpr,
                       SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr):
    """G[c] = what chunk c hands to the chunk before it, a_first * lambda_first, from a zero end;
    P[c] = the chunk's decay product.

    lambda_t = q_t + a_{t+1} lambda_{t+1} with q_t = (dy_t silu(z_t)) C_t, so
    a_first lambda_first = sum_t exp(A (delta_first + ... + delta_t)) q_t.
    """
    pid_c = tl.program_id(0)
    pid_e = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    n = tl.arange(0, BLOCK_N)
    e_mask = e < E
    n_mask = n < N
    en_mask = e_mask[:, None] & n_mask[None, :]
    A2 = tl.load(A_ptr + n[None, :] * E + e[:, None], mask=en_mask, other=0.0).to(tl.float32) * LOG2E
    g = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    before = tl.zeros([BLOCK_E], dtype=tl.float32)
    for k in range(tiles):
        t = (pid_c * tiles + k) * T + tl.arange(0, T)
        t_mask = t < L
        te_mask = t_mask[:, None] & e_mask[None, :]
        _, delta = _load_delta(delta_ptr, s_db, s_de, s_dl, w_ptr, bias_ptr, pid_b, t, t_mask, e, e_mask, E, T, BLOCK_E,
                               DT_RANK, HAS_BIAS, SOFTPLUS)
        gy = tl.load(dy_ptr + pid_b * s_gb + e[None, :] * s_ge + t[:, None] * s_gl, mask=te_mask,
                     other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + pid_b * s_zb + e[None, :] * s_ze + t[:, None] * s_zl, mask=te_mask,
                        other=0.0).to(tl.float32)
            gy *= z * _sigmoid(z)
        Ct = tl.load(C_ptr + pid_b * s_Cb + n[None, :] * s_Cn + t[:, None] * s_Cl,
                     mask=t_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
        decay_from_start = tl.exp2((before[None, :] + tl.cumsum(delta, 0))[:, :, None] * A2[None, :, :])
        g += tl.sum(decay_from_start * gy[:, :, None] * Ct[:, None, :], 0)
        before += tl.sum(delta, 0)
    offs = (pid_b * n_chunks + pid_c) * E * N + n[None, :] * E + e[:, None]
    tl.store(P_ptr + offs, tl.exp2(before[:, None] * A2), mask=en_mask)
    tl.store(G_ptr + offs, g, mask=en_mask)


@triton.jit(do_not_specialize=['L', 'n_chunks', 'n_tiles', 'tiles', 's_ub', 's_db', 's_Bb', 's_Cb', 's_zb', 's_gb',
                               's_xb'])
def _bwd_chunk_grads(u_ptr, delta_ptr, w_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dy_ptr, states_ptr,
                     MU_ptr, du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, L, E, N, s_part,
                     batch, n_chunks, n_tiles, tiles, s_ub, s_ue, s_ul, s_db, s_de, s_dl, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn,
                     s_Cl, s_zb, s_ze, s_zl, s_gb, s_ge, s_gl, s_xb, s_xe, s_xl, T: tl.constexpr, BLOCK_E: tl.constexpr,
                     BLOCK_N: tl.constexpr, DT_RANK: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_CARRY: tl.constexpr):
    """All gradients of one chunk, tiles last to first.

    du, ddelta (of the raw delta, before bias and softplus) and dz share the layout strides s_x*.
    dB, dC: one (batch, L) slice of token rows ``s_part`` apart per channel block, summed afterwards.
    dA, dD, dbias: one partial sum per program, laid out (batch, n_chunks, E[, N]).
    """
    pid_c = tl.program_id(0)
    pid_e = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    n = tl.arange(0, BLOCK_N)
    e_mask = e < E
    n_mask = n < N
    en_mask = e_mask[:, None] & n_mask[None, :]
    en_offs = n[None, :] * E + e[:, None]
    A = tl.load(A_ptr + en_offs, mask=en_mask, other=0.0).to(tl.float32)
    A2 = A * LOG2E
    if HAS_D:
        D = tl.load(D_ptr + e, mask=e_mask, other=0.0).to(tl.float32)
    if HAS_CARRY:
        mu = tl.load(MU_ptr + (pid_b * n_chunks + pid_c) * E * N + en_offs, mask=en_mask, other=0.0)
    else:
        mu = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    dA_acc = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    row = tl.arange(0, T)
    partial_base = (pid_e * batch + pid_b) * L
    for kk in range(tiles):
        tile = pid_c * tiles + (tiles - 1 - kk)
        t = tile * T + row
        t_mask = t < L
        te_mask = t_mask[:, None] & e_mask[None, :]
        tn_mask = t_mask[:, None] & n_mask[None, :]
        h0 = tl.load(states_ptr + (pid_b * n_tiles + tile) * E * N + en_offs, mask=en_mask & (tile < n_tiles),
                     other=0.0)
        raw, delta = _load_delta(delta_ptr, s_db, s_de, s_dl, w_ptr, bias_ptr, pid_b, t, t_mask, e, e_mask, E, T,
                                 BLOCK_E, DT_RANK, HAS_BIAS, SOFTPLUS)
        u = tl.load(u_ptr + pid_b * s_ub + e[None, :] * s_ue + t[:, None] * s_ul, mask=te_mask,
                    other=0.0).to(tl.float32)
        Bt = tl.load(B_ptr + pid_b * s_Bb + n[None, :] * s_Bn + t[:, None] * s_Bl, mask=tn_mask,
                     other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + pid_b * s_Cb + n[None, :] * s_Cn + t[:, None] * s_Cl, mask=tn_mask,
                     other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + pid_b * s_gb + e[None, :] * s_ge + t[:, None] * s_gl, mask=te_mask,
                     other=0.0).to(tl.float32)

        # The forward states of this tile again, from the state saved at its start.
        decay = tl.exp2(delta[:, :, None] * A2[None, :, :])
        drive = (delta * u)[:, :, None] * Bt[:, None, :]
        _, states = tl.associative_scan(
            (decay, tl.where((row == 0)[:, None, None], drive + decay * h0[None, :, :], drive)), 0, _affine_combine)
        if HAS_Z:
            z = tl.load(z_ptr + pid_b * s_zb + e[None, :] * s_ze + t[:, None] * s_zl, mask=te_mask,
                        other=0.0).to(tl.float32)
            sig = _sigmoid(z)
            y = tl.sum(states * Ct[:, None, :], 2)
            if HAS_D:
                y += u * D[None, :]
            dz = dy * y * sig * (1.0 + z * (1.0 - sig))
            tl.store(dz_ptr + pid_b * s_xb + e[None, :] * s_xe + t[:, None] * s_xl, dz, mask=te_mask)
            gy = dy * z * sig
        else:
            gy = dy

        # The adjoint lambda_t = q_t + a_{t+1} lambda_{t+1}, scanned from the tile's end, where the
        # next tile's a_first lambda_first (mu) comes in. a_{t+1} is recomputed from delta_{t+1}.
        t_next = t + 1
        _, delta_next = _load_delta(delta_ptr, s_db, s_de, s_dl, w_ptr, bias_ptr, pid_b, t_next,
                                    (t_next < L) & (row < T - 1), e, e_mask, E, T, BLOCK_E, DT_RANK, HAS_BIAS, SOFTPLUS)
        decay_next = tl.exp2(delta_next[:, :, None] * A2[None, :, :])
        q = gy[:, :, None] * Ct[:, None, :]
        q = tl.where((row == T - 1)[:, None, None], q + mu[None, :, :], q)
        _, lam = tl.associative_scan((decay_next, q), 0, _affine_combine, reverse=True)

        lam_B = tl.sum(lam * Bt[:, None, :], 2)
        # a_t h_{t-1} = h_t - b_t: the state before the step, already decayed.
        lam_prev = lam * (states - drive)
        ddelta = u * lam_B + tl.sum(lam_prev * A[None, :, :], 2)
        du = delta * lam_B
        if HAS_D:
            du += gy * D[None, :]
            dD_acc += tl.sum(gy * u, 0)
        if SOFTPLUS:
            ddelta = ddelta * _sigmoid(raw)
        ddelta = tl.where(te_mask, ddelta, 0.0)
        dbias_acc += tl.sum(ddelta, 0)
        dA_acc += tl.sum(lam_prev * delta[:, :, None], 0)
        x_offs = pid_b * s_xb + e[None, :] * s_xe + t[:, None] * s_xl
        tl.store(du_ptr + x_offs, du, mask=te_mask)
        tl.store(ddelta_ptr + x_offs, ddelta, mask=te_mask)
        tn_offs = (partial_base + t[:, None]) * s_part + n[None, :]
        tl.store(dB_ptr + tn_offs, tl.sum(lam * (delta * u)[:, :, None], 1), mask=tn_mask)
        tl.store(dC_ptr + tn_offs, tl.sum(states * gy[:, :, None], 1), mask=tn_mask)
        mu = tl.sum(tl.where((row == 0)[:, None, None], decay * lam, 0.0), 0)

    prog = pid_b * n_chunks + pid_c
    tl.store(dA_ptr + prog * E * N + en_offs, dA_acc, mask=en_mask)
    tl.store(dD_ptr + prog * E + e, dD_acc, mask=e_mask)
    tl.store(dbias_ptr + prog * E + e, dbias_acc, mask=e_mask)



# ----------------------------------------------------------------------------------------------
# Lane-per-channel forward kernels: each thread owns one channel and its N states, and steps
# through the tokens one by one (unrolled by T). Reductions over N stay inside the thread and no
# data crosses lanes, so a token costs N exp2 and a few FMAs per channel, no shuffles. Strides
# and E are not specialised on purpose: a provably aligned stride would let triton vectorise the
# per-token channel loads, whose layout would then no longer match the state's.

@triton.jit
def _lane_setup(w_ptr, bias_ptr, A_ptr, E, N, e, e_mask, n, n_mask, DT_RANK: tl.constexpr, RANK_PAD: tl.constexpr,
                HAS_BIAS: tl.constexpr):
    A2 = tl.load(A_ptr + n[None, :] * E + e[:, None], mask=e_mask[:, None] & n_mask[None, :],
                 other=0.0).to(tl.float32) * LOG2E
    if DT_RANK > 0:
        r = tl.arange(0, RANK_PAD)
        W = tl.load(w_ptr + r[:, None] * E + e[None, :], mask=(r < DT_RANK)[:, None] & e_mask[None, :],
                    other=0.0).to(tl.float32)
    else:
        W = A2  # unused
    if HAS_BIAS:
        bias = tl.load(bias_ptr + e, mask=e_mask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([e.shape[0]], dtype=tl.float32)
    return A2, W, bias


@triton.jit
def _row(ptr, base, t, s_k, s_l, k, k_mask, valid, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """Token ``t``'s row of dt, B or C as a 1-D vector that every thread holds whole, fp32.

    ALIGNED: the row is contiguous (s_k == 1), starts on 16 bytes and fills its block (no k_mask),
    so it loads as a few 128-bit broadcast loads from one address. MASKED: ``t`` may lie past the
    sequence end (the last chunk only).
    """
    if ALIGNED:
        offs = tl.multiple_of(base + t * s_l, 4) + k
    else:
        offs = base + t * s_l + k * s_k
    if MASKED:
        row = tl.load(ptr + offs, mask=k_mask & valid, other=0.0)
    elif ALIGNED:
        row = tl.load(ptr + offs)
    else:
        row = tl.load(ptr + offs, mask=k_mask, other=0.0)
    return row.to(tl.float32)


@triton.jit
def _lane_dt(delta_ptr, s_db, s_de, s_dl, pid_b, t, valid, ev_mask, e, DT_RANK: tl.constexpr,
             RANK_PAD: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """Token ``t``'s row of dt (rank > 0), or this lane's delta (rank 0), fp32."""
    if DT_RANK == 0:
        return tl.load(delta_ptr + pid_b * s_db + e * s_de + t * s_dl, mask=ev_mask, other=0.0).to(tl.float32)
    else:
        r = tl.arange(0, RANK_PAD)
        return _row(delta_ptr, pid_b * s_db, t, s_de, s_dl, r, r < DT_RANK, valid, ALIGNED, MASKED)


@triton.jit
def _lane_dt_at(delta_ptr, s_db, s_de, s_dl, pid_b, t, L, e, e_mask, DT_RANK: tl.constexpr, RANK_PAD: tl.constexpr,
                ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """``_lane_dt`` of token ``t``, masked past the sequence end where MASKED."""
    valid = t < L
    ev_mask = (e_mask & valid) if MASKED else e_mask
    return _lane_dt(delta_ptr, s_db, s_de, s_dl, pid_b, t, valid, ev_mask, e, DT_RANK, RANK_PAD, ALIGNED, MASKED)


@triton.jit
def _lane_u_B(u_ptr, B_ptr, s_ub, s_ue, s_ul, s_Bb, s_Bn, s_Bl, pid_b, t, L, e, e_mask, n, n_mask,
              ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """This lane's u and the row of B of token ``t`` (fp32)."""
    valid = t < L
    ev_mask = (e_mask & valid) if MASKED else e_mask
    u = tl.load(u_ptr + pid_b * s_ub + e * s_ue + t * s_ul, mask=ev_mask, other=0.0).to(tl.float32)
    Bt = _row(B_ptr, pid_b * s_Bb, t, s_Bn, s_Bl, n, n_mask, valid, ALIGNED, MASKED)
    return u, Bt


@triton.jit
def _lane_load(u_ptr, delta_ptr, B_ptr, s_ub, s_ue, s_ul, s_db, s_de, s_dl, s_Bb, s_Bn, s_Bl, pid_b, t, L, e, e_mask, n,
               n_mask, DT_RANK: tl.constexpr, RANK_PAD: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """What a lane-per-channel kernel reads for token ``t``: dt's row (or this lane's delta), u, B (fp32)."""
    dt = _lane_dt_at(delta_ptr, s_db, s_de, s_dl, pid_b, t, L, e, e_mask, DT_RANK, RANK_PAD, ALIGNED, MASKED)
    u, Bt = _lane_u_B(u_ptr, B_ptr, s_ub, s_ue, s_ul, s_Bb, s_Bn, s_Bl, pid_b, t, L, e, e_mask, n, n_mask, ALIGNED,
                      MASKED)
    return dt, u, Bt


@triton.jit
def _lane_delta(dt, W, bias, mask, DT_RANK: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """delta of one token for this lane's channel from what ``_lane_load`` read; 0 where masked."""
    if DT_RANK == 0:
        raw = dt
    else:
        raw = tl.sum(W * dt[:, None], 0)
    if HAS_BIAS:
        raw += bias
    if SOFTPLUS:
        delta = _softplus(raw)
    else:
        delta = raw
    return tl.where(mask, delta, 0.0)


@triton.jit
def _prefetch(ptrs):
    # prefetch.global.L2: the lines of a later token start on their way without a register to land
    # in, so the distance ahead costs no occupancy (a deeper read-ahead into registers would).
    if not INTERPRETED:
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _prefetch_indices(e, E, N, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, DT_RANK: tl.constexpr,
                      RANK_PAD: tl.constexpr):
    """Per lane, which value of a token to prefetch: its channel (u, z), one of dt's row (or its
    channel's delta at rank 0) and one of B's or C's row, spread so one instruction covers a row."""
    lane = tl.arange(0, BLOCK_E)
    pf_e = tl.minimum(e, E - 1)
    if DT_RANK > 0:
        pf_d = tl.minimum(lane % RANK_PAD, DT_RANK - 1)
    else:
        pf_d = pf_e
    return pf_e, pf_d, tl.minimum(lane % BLOCK_N, N - 1)


@triton.jit
def _next_token(t, L, MASKED: tl.constexpr):
    # The token whose inputs are read ahead. In a full chunk the read after its last token is
    # thrown away; clamping keeps that read inside the tensors.
    if MASKED:
        return t + 1
    else:
        return tl.minimum(t + 1, L - 1)


# The tile loops below read every token's inputs one token ahead (the output pass reads dt's row
# two ahead), while the previous token is computed: the scan itself is a chain through h, and
# without the read-ahead each token waited for its own loads.
@triton.jit
def _summary_lanes_tiles(u_ptr, delta_ptr, B_ptr, s_ub, s_ue, s_ul, s_db, s_de, s_dl, s_Bb, s_Bn, s_Bl, pid_b, pid_c,
                         L, tiles, e, e_mask, n, n_mask, A2, W, bias, h, total, pf_e, pf_d, pf_n, T: tl.constexpr,
                         DT_RANK: tl.constexpr, RANK_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
                         SOFTPLUS: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr, PREFETCH: tl.constexpr):
    dt_next, u_next, B_next = _lane_load(u_ptr, delta_ptr, B_ptr, s_ub, s_ue, s_ul, s_db, s_de, s_dl, s_Bb, s_Bn, s_Bl,
                                         pid_b, pid_c * tiles * T, L, e, e_mask, n, n_mask, DT_RANK, RANK_PAD,
                                         ALIGNED, MASKED)
    for k in range(tiles):
        for i in tl.static_range(T):
            t = (pid_c * tiles + k) * T + i
            dt, u, Bt = dt_next, u_next, B_next
            dt_next, u_next, B_next = _lane_load(u_ptr, delta_ptr, B_ptr, s_ub, s_ue, s_ul, s_db, s_de, s_dl, s_Bb,
                                                 s_Bn, s_Bl, pid_b, _next_token(t, L, MASKED), L, e, e_mask, n,
                                                 n_mask, DT_RANK, RANK_PAD, ALIGNED, MASKED)
            if PREFETCH > 0 and not MASKED:
                tp = tl.minimum(t + PREFETCH, L - 1)
                _prefetch(u_ptr + pid_b * s_ub + tp * s_ul + pf_e * s_ue)
                _prefetch(delta_ptr + pid_b * s_db + tp * s_dl + pf_d * s_de)
                _prefetch(B_ptr + pid_b * s_Bb + tp * s_Bl + pf_n * s_Bn)
            delta = _lane_delta(dt, W, bias, (e_mask & (t < L)) if MASKED else e_mask, DT_RANK, HAS_BIAS, SOFTPLUS)
            h = tl.exp2(delta[:, None] * A2) * h + (delta * u)[:, None] * Bt[None, :]
            total += delta
    return h, total


@triton.jit(do_not_specialize=['L', 'E', 'n_chunks', 'tiles', 's_ub', 's_ue', 's_ul', 's_db', 's_de', 's_dl', 's_Bb',
                               's_Bn', 's_Bl'])
def _fwd_chunk_summary_lanes(u_ptr, delta_ptr, w_ptr, bias_ptr, A_ptr, B_ptr, P_ptr, H_ptr, L, E, N, n_chunks,
                             tiles, s_ub, s_ue, s_ul, s_db, s_de, s_dl, s_Bb, s_Bn, s_Bl, T: tl.constexpr,
                             BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, DT_RANK: tl.constexpr,
                             HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, RANK_PAD: tl.constexpr,
                             ALIGNED: tl.constexpr, PREFETCH: tl.constexpr):
    """Same contract as ``_fwd_chunk_summary``. Every chunk but the last runs without token masks.
    PREFETCH > 0: each token also asks the L2 for the inputs of the token that many ahead."""
    pid_c = tl.program_id(0)
    pid_e = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    n = tl.arange(0, BLOCK_N)
    e_mask = e < E
    n_mask = n < N
    A2, W, bias = _lane_setup(w_ptr, bias_ptr, A_ptr, E, N, e, e_mask, n, n_mask, DT_RANK, RANK_PAD, HAS_BIAS)
    h = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    total = tl.zeros([BLOCK_E], dtype=tl.float32)
    pf_e, pf_d, pf_n = _prefetch_indices(e, E, N, BLOCK_E, BLOCK_N, DT_RANK, RANK_PAD)
    if (pid_c + 1) * tiles * T <= L:
        h, total = _summary_lanes_tiles(u_ptr, delta_ptr, B_ptr, s_ub, s_ue, s_ul, s_db, s_de, s_dl, s_Bb, s_Bn, s_Bl,
                                        pid_b, pid_c, L, tiles, e, e_mask, n, n_mask, A2, W, bias, h, total, pf_e,
                                        pf_d, pf_n, T, DT_RANK, RANK_PAD, HAS_BIAS, SOFTPLUS, ALIGNED, False, PREFETCH)
    else:
        h, total = _summary_lanes_tiles(u_ptr, delta_ptr, B_ptr, s_ub, s_ue, s_ul, s_db, s_de, s_dl, s_Bb, s_Bn, s_Bl,
                                        pid_b, pid_c, L, tiles, e, e_mask, n, n_mask, A2, W, bias, h, total, pf_e,
                                        pf_d, pf_n, T, DT_RANK, RANK_PAD, HAS_BIAS, SOFTPLUS, ALIGNED, True, PREFETCH)
    offs = (pid_b * n_chunks + pid_c) * E * N + n[None, :] * E + e[:, None]
    en_mask = e_mask[:, None] & n_mask[None, :]
    tl.store(P_ptr + offs, tl.exp2(total[:, None] * A2), mask=en_mask)
    tl.store(H_ptr + offs, h, mask=en_mask)


@triton.jit
def _saved_state_ptrs(states_ptr, tile_offset, e, n, s_se, STATE_ROW: tl.constexpr):
    """The addresses of a lane's states in one tile's saved (N, E) block, which starts
    ``tile_offset`` elements into ``states_ptr``: ``n * STATE_ROW + e * s_se`` from there.

    Each lane's pointer is formed first and the state rows added to it, with STATE_ROW (E) a
    constexpr, so a thread's BLOCK_N addresses are one base and immediate offsets; formed from E at
    run time they were BLOCK_N addresses kept in registers across the tile loop (on an H100: 168
    instead of 128 registers a thread in the training forward, more spills in the gradients kernel;
    docs/performance.md, 19a). The channel stride ``s_se`` (1) stays a run-time value: a known unit
    stride lets Triton vectorise these accesses across channels and lay the whole kernel out four
    channels a thread."""
    return (states_ptr + tile_offset + e * s_se)[:, None] + n[None, :] * STATE_ROW


@triton.jit
def _output_lanes_tiles(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, y_ptr, states_ptr, s_ub, s_ue, s_ul, s_db, s_de, s_dl,
                        s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl, s_zb, s_ze, s_zl, s_yb, s_ye, s_yl, pid_b, pid_c, L, E, N,
                        n_tiles, tiles, s_se, e, e_mask, n, n_mask, en_mask, A2, W, bias, D, h, pf_e, pf_d, pf_n,
                        T: tl.constexpr, DT_RANK: tl.constexpr, RANK_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
                        SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SAVE_STATES: tl.constexpr,
                        ALIGNED: tl.constexpr, MASKED: tl.constexpr, PREFETCH: tl.constexpr, STATE_ROW: tl.constexpr):
    # Without a gate, z_ptr is u's: the read-ahead of z stays valid and its value unused. y may be
    # written over z or over u (the inference path does): z_t and u_t are read, one token ahead,
    # before y_t is stored. dt's row is read two tokens ahead: it starts each token's chain (the dt
    # projection, softplus, the exp2 of every state), and one token ahead that chain still waited on
    # its load, most of all at each tile's first token, whose loads the compiler leaves at the end of
    # the previous tile (docs/performance.md, 11a).
    t = pid_c * tiles * T
    dt_next, u_next, B_next = _lane_load(u_ptr, delta_ptr, B_ptr, s_ub, s_ue, s_ul, s_db, s_de, s_dl, s_Bb, s_Bn, s_Bl,
                                         pid_b, t, L, e, e_mask, n, n_mask, DT_RANK, RANK_PAD, ALIGNED, MASKED)
    dt_after = _lane_dt_at(delta_ptr, s_db, s_de, s_dl, pid_b, _next_token(t, L, MASKED), L, e, e_mask, DT_RANK,
                           RANK_PAD, ALIGNED, MASKED)
    C_next = _row(C_ptr, pid_b * s_Cb, t, s_Cn, s_Cl, n, n_mask, t < L, ALIGNED, MASKED)
    z_next = tl.load(z_ptr + pid_b * s_zb + e * s_ze + t * s_zl, mask=(e_mask & (t < L)) if MASKED else e_mask,
                     other=0.0).to(tl.float32)
    for k in range(tiles):
        tile = pid_c * tiles + k
        if SAVE_STATES:
            tl.store(_saved_state_ptrs(states_ptr, (pid_b * n_tiles + tile) * E * N, e, n, s_se, STATE_ROW), h,
                     mask=en_mask & (tile < n_tiles))
        for i in tl.static_range(T):
            t = tile * T + i
            ev_mask = (e_mask & (t < L)) if MASKED else e_mask
            dt, u, Bt, Ct, z = dt_next, u_next, B_next, C_next, z_next
            t_next = _next_token(t, L, MASKED)
            dt_next = dt_after
            dt_after = _lane_dt_at(delta_ptr, s_db, s_de, s_dl, pid_b, _next_token(t_next, L, MASKED), L, e, e_mask,
                                   DT_RANK, RANK_PAD, ALIGNED, MASKED)
            u_next, B_next = _lane_u_B(u_ptr, B_ptr, s_ub, s_ue, s_ul, s_Bb, s_Bn, s_Bl, pid_b, t_next, L, e, e_mask,
                                       n, n_mask, ALIGNED, MASKED)
            C_next = _row(C_ptr, pid_b * s_Cb, t_next, s_Cn, s_Cl, n, n_mask, t_next < L, ALIGNED, MASKED)
            z_next = tl.load(z_ptr + pid_b * s_zb + e * s_ze + t_next * s_zl,
                             mask=(e_mask & (t_next < L)) if MASKED else e_mask, other=0.0).to(tl.float32)
            if PREFETCH > 0 and not MASKED:
                tp = tl.minimum(t + PREFETCH, L - 1)
                _prefetch(u_ptr + pid_b * s_ub + tp * s_ul + pf_e * s_ue)
                _prefetch(z_ptr + pid_b * s_zb + tp * s_zl + pf_e * s_ze)
                _prefetch(delta_ptr + pid_b * s_db + tp * s_dl + pf_d * s_de)
                _prefetch(B_ptr + pid_b * s_Bb + tp * s_Bl + pf_n * s_Bn)
                _prefetch(C_ptr + pid_b * s_Cb + tp * s_Cl + pf_n * s_Cn)
            delta = _lane_delta(dt, W, bias, ev_mask, DT_RANK, HAS_BIAS, SOFTPLUS)
            h = tl.exp2(delta[:, None] * A2) * h + (delta * u)[:, None] * Bt[None, :]
            y = tl.sum(h * Ct[None, :], 1)
            if HAS_D:
                y += u * D
            if HAS_Z:
                y *= z * tl.sigmoid(z)
            tl.store(y_ptr + pid_b * s_yb + e * s_ye + t * s_yl, y.to(y_ptr.dtype.element_ty), mask=ev_mask)
    return h


@triton.jit(do_not_specialize=['L', 'E', 'n_chunks', 'n_tiles', 'tiles', 's_se', 's_ub', 's_ue', 's_ul', 's_db', 's_de',
                               's_dl', 's_Bb', 's_Bn', 's_Bl', 's_Cb', 's_Cn', 's_Cl', 's_zb', 's_ze', 's_zl', 's_yb',
                               's_ye', 's_yl'])
def _fwd_chunk_output_lanes(u_ptr, delta_ptr, w_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, y_ptr, Hin_ptr,
                            states_ptr, L, E, N, n_chunks, n_tiles, tiles, s_se, s_ub, s_ue, s_ul, s_db, s_de,
                            s_dl, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl, s_zb, s_ze, s_zl, s_yb, s_ye, s_yl,
                            T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, DT_RANK: tl.constexpr,
                            HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                            HAS_CARRY: tl.constexpr, SAVE_STATES: tl.constexpr, RANK_PAD: tl.constexpr,
                            ALIGNED: tl.constexpr, PREFETCH: tl.constexpr, STATE_ROW: tl.constexpr):
    """Same contract as ``_fwd_chunk_output``, with the saved states addressed as in
    ``_saved_state_ptrs`` (``s_se``, ``STATE_ROW``). Every chunk but the last runs without token
    masks. PREFETCH > 0: as in ``_fwd_chunk_summary_lanes``."""
    pid_c = tl.program_id(0)
    pid_e = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    n = tl.arange(0, BLOCK_N)
    e_mask = e < E
    n_mask = n < N
    en_mask = e_mask[:, None] & n_mask[None, :]
    ne_offs = n[None, :] * E + e[:, None]
    A2, W, bias = _lane_setup(w_ptr, bias_ptr, A_ptr, E, N, e, e_mask, n, n_mask, DT_RANK, RANK_PAD, HAS_BIAS)
    if HAS_D:
        D = tl.load(D_ptr + e, mask=e_mask, other=0.0).to(tl.float32)
    else:
        D = bias  # unused
    if HAS_CARRY:
        h = tl.load(Hin_ptr + (pid_b * n_chunks + pid_c) * E * N + ne_offs, mask=en_mask, other=0.0)
    else:
        h = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    pf_e, pf_d, pf_n = _prefetch_indices(e, E, N, BLOCK_E, BLOCK_N, DT_RANK, RANK_PAD)
    if (pid_c + 1) * tiles * T <= L:
        h = _output_lanes_tiles(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, y_ptr, states_ptr, s_ub, s_ue, s_ul, s_db, s_de,
                                s_dl, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl, s_zb, s_ze, s_zl, s_yb, s_ye, s_yl, pid_b,
                                pid_c, L, E, N, n_tiles, tiles, s_se, e, e_mask, n, n_mask, en_mask, A2, W, bias, D,
                                h, pf_e, pf_d, pf_n, T, DT_RANK, RANK_PAD, HAS_BIAS, SOFTPLUS, HAS_D, HAS_Z,
                                SAVE_STATES, ALIGNED, False, PREFETCH, STATE_ROW)
    else:
        h = _output_lanes_tiles(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, y_ptr, states_ptr, s_ub, s_ue, s_ul, s_db, s_de,
                                s_dl, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl, s_zb, s_ze, s_zl, s_yb, s_ye, s_yl, pid_b,
                                pid_c, L, E, N, n_tiles, tiles, s_se, e, e_mask, n, n_mask, en_mask, A2, W, bias, D,
                                h, pf_e, pf_d, pf_n, T, DT_RANK, RANK_PAD, HAS_BIAS, SOFTPLUS, HAS_D, HAS_Z,
                                SAVE_STATES, ALIGNED, True, PREFETCH, STATE_ROW)


@triton.jit
def _bwd_summary_load(delta_ptr, C_ptr, z_ptr, dy_ptr, s_db, s_de, s_dl, s_Cb, s_Cn, s_Cl, s_zb, s_ze, s_zl, s_gb, s_ge,
                      s_gl, pid_b, t, L, e, e_mask, n, n_mask, DT_RANK: tl.constexpr, RANK_PAD: tl.constexpr,
                      HAS_Z: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """What the backward summary reads for token ``t``: dt's row (or this lane's delta), C, dy, z."""
    valid = t < L
    ev_mask = (e_mask & valid) if MASKED else e_mask
    dt = _lane_dt(delta_ptr, s_db, s_de, s_dl, pid_b, t, valid, ev_mask, e, DT_RANK, RANK_PAD, ALIGNED, MASKED)
    Ct = _row(C_ptr, pid_b * s_Cb, t, s_Cn, s_Cl, n, n_mask, valid, ALIGNED, MASKED)
    dy = tl.load(dy_ptr + pid_b * s_gb + e * s_ge + t * s_gl, mask=ev_mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * s_zb + e * s_ze + t * s_zl, mask=ev_mask, other=0.0).to(tl.float32)
    else:
        z = dy  # unused
    return dt, Ct, dy, z


@triton.jit
def _bwd_summary_lanes_tiles(delta_ptr, C_ptr, z_ptr, dy_ptr, s_db, s_de, s_dl, s_Cb, s_Cn, s_Cl, s_zb, s_ze, s_zl,
                             s_gb, s_ge, s_gl, pid_b, pid_c, L, tiles, e, e_mask, n, n_mask, A2, W, bias, g, total,
                             pf_e, pf_d, pf_n, T: tl.constexpr, DT_RANK: tl.constexpr, RANK_PAD: tl.constexpr,
                             HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr,
                             ALIGNED: tl.constexpr, MASKED: tl.constexpr, PREFETCH: tl.constexpr):
    # Each token's inputs are read one token ahead, as in the forward passes.
    dt_next, C_next, dy_next, z_next = _bwd_summary_load(
        delta_ptr, C_ptr, z_ptr, dy_ptr, s_db, s_de, s_dl, s_Cb, s_Cn, s_Cl, s_zb, s_ze, s_zl, s_gb, s_ge, s_gl, pid_b,
        pid_c * tiles * T, L, e, e_mask, n, n_mask, DT_RANK, RANK_PAD, HAS_Z, ALIGNED, MASKED)
    for k in range(tiles):
        for i in tl.static_range(T):
            t = (pid_c * tiles + k) * T + i
            dt, Ct, gy, z = dt_next, C_next, dy_next, z_next
            dt_next, C_next, dy_next, z_next = _bwd_summary_load(
                delta_ptr, C_ptr, z_ptr, dy_ptr, s_db, s_de, s_dl, s_Cb, s_Cn, s_Cl, s_zb, s_ze, s_zl, s_gb, s_ge, s_gl,
                pid_b, _next_token(t, L, MASKED), L, e, e_mask, n, n_mask, DT_RANK, RANK_PAD, HAS_Z, ALIGNED, MASKED)
            if PREFETCH > 0 and not MASKED:
                tp = tl.minimum(t + PREFETCH, L - 1)
                _prefetch(delta_ptr + pid_b * s_db + tp * s_dl + pf_d * s_de)
                _prefetch(C_ptr + pid_b * s_Cb + tp * s_Cl + pf_n * s_Cn)
                _prefetch(dy_ptr + pid_b * s_gb + tp * s_gl + pf_e * s_ge)
                if HAS_Z:
                    _prefetch(z_ptr + pid_b * s_zb + tp * s_zl + pf_e * s_ze)
            delta = _lane_delta(dt, W, bias, (e_mask & (t < L)) if MASKED else e_mask, DT_RANK, HAS_BIAS, SOFTPLUS)
            if HAS_Z:
                gy *= z * _sigmoid(z)
            # The decay from the chunk start through token t, exp(A * delta's sum so far), formed from
            # the running sum rather than as a running product of each token's decay: 16 multiplies a
            # token fewer, 104 registers a thread instead of 128 (docs/performance.md, 20c).
            total += delta
            g += tl.exp2(total[:, None] * A2) * gy[:, None] * Ct[None, :]
    return g, total


@triton.jit(do_not_specialize=['L', 'E', 'n_chunks', 'tiles', 's_db', 's_de', 's_dl', 's_Cb', 's_Cn', 's_Cl', 's_zb',
                               's_ze', 's_zl', 's_gb', 's_ge', 's_gl'])
def _bwd_chunk_summary_lanes(delta_ptr, w_ptr, bias_ptr, A_ptr, C_ptr, z_ptr, dy_ptr, P_ptr, G_ptr, L, E, N,
                             n_chunks, tiles, s_db, s_de, s_dl, s_Cb, s_Cn, s_Cl, s_zb, s_ze, s_zl, s_gb, s_ge, s_gl,
                             T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, DT_RANK: tl.constexpr,
                             HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr,
                             RANK_PAD: tl.constexpr, ALIGNED: tl.constexpr, PREFETCH: tl.constexpr):
    """Same contract as ``_bwd_chunk_summary``; the decay from the chunk start comes from the running
    sum of delta. Every chunk but the last runs without token masks."""
    pid_c = tl.program_id(0)
    pid_e = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    n = tl.arange(0, BLOCK_N)
    e_mask = e < E
    n_mask = n < N
    A2, W, bias = _lane_setup(w_ptr, bias_ptr, A_ptr, E, N, e, e_mask, n, n_mask, DT_RANK, RANK_PAD, HAS_BIAS)
    g = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    total = tl.zeros([BLOCK_E], dtype=tl.float32)
    pf_e, pf_d, pf_n = _prefetch_indices(e, E, N, BLOCK_E, BLOCK_N, DT_RANK, RANK_PAD)
    if (pid_c + 1) * tiles * T <= L:
        g, total = _bwd_summary_lanes_tiles(delta_ptr, C_ptr, z_ptr, dy_ptr, s_db, s_de, s_dl, s_Cb, s_Cn, s_Cl, s_zb,
                                            s_ze, s_zl, s_gb, s_ge, s_gl, pid_b, pid_c, L, tiles, e, e_mask, n, n_mask,
                                            A2, W, bias, g, total, pf_e, pf_d, pf_n, T, DT_RANK, RANK_PAD, HAS_BIAS,
                                            SOFTPLUS, HAS_Z, ALIGNED, False, PREFETCH)
    else:
        g, total = _bwd_summary_lanes_tiles(delta_ptr, C_ptr, z_ptr, dy_ptr, s_db, s_de, s_dl, s_Cb, s_Cn, s_Cl, s_zb,
                                            s_ze, s_zl, s_gb, s_ge, s_gl, pid_b, pid_c, L, tiles, e, e_mask, n, n_mask,
                                            A2, W, bias, g, total, pf_e, pf_d, pf_n, T, DT_RANK, RANK_PAD, HAS_BIAS,
                                            SOFTPLUS, HAS_Z, ALIGNED, True, PREFETCH)
    offs = (pid_b * n_chunks + pid_c) * E * N + n[None, :] * E + e[:, None]
    en_mask = e_mask[:, None] & n_mask[None, :]
    tl.store(P_ptr + offs, tl.exp2(total[:, None] * A2), mask=en_mask)
    tl.store(G_ptr + offs, g, mask=en_mask)


@triton.jit
def _lane_inputs(u_ptr, delta_ptr, B_ptr, s_ub, s_ue, s_ul, s_db, s_de, s_dl, s_Bb, s_Bn, s_Bl, pid_b, t, L, e,
                 e_mask, n, n_mask, W, bias, DT_RANK: tl.constexpr, RANK_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SOFTPLUS: tl.constexpr, ALIGNED: tl.constexpr):
    """delta, u and B of token ``t`` (0 past the sequence end), for the lane-per-channel backward."""
    dt, u, Bt = _lane_load(u_ptr, delta_ptr, B_ptr, s_ub, s_ue, s_ul, s_db, s_de, s_dl, s_Bb, s_Bn, s_Bl, pid_b, t, L, e,
                           e_mask, n, n_mask, DT_RANK, RANK_PAD, ALIGNED, True)
    return _lane_delta(dt, W, bias, e_mask & (t < L), DT_RANK, HAS_BIAS, SOFTPLUS), u, Bt


@triton.jit
def _bwd_lane_state(h, t, u_ptr, delta_ptr, B_ptr, s_ub, s_ue, s_ul, s_db, s_de, s_dl, s_Bb, s_Bn, s_Bl, pid_b, L, e,
                    e_mask, n, n_mask, A2, W, bias, DT_RANK: tl.constexpr, RANK_PAD: tl.constexpr,
                    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, ALIGNED: tl.constexpr):
    """The forward state after token ``t`` from the state before it (unchanged past the end)."""
    delta, u, Bt = _lane_inputs(u_ptr, delta_ptr, B_ptr, s_ub, s_ue, s_ul, s_db, s_de, s_dl, s_Bb, s_Bn, s_Bl, pid_b, t,
                                L, e, e_mask, n, n_mask, W, bias, DT_RANK, RANK_PAD, HAS_BIAS, SOFTPLUS, ALIGNED)
    return tl.exp2(delta[:, None] * A2) * h + (delta * u)[:, None] * Bt[None, :]


@triton.jit
def _butterfly(x, lane, MASK: tl.constexpr):
    """Each lane's ``x`` as lane ^ MASK holds it: one warp shuffle per register. Under the
    interpreter, the same with a gather along the channel axis: row r takes row r ^ MASK, which is
    lane ^ MASK of r's own warp (MASK < 32), in programs of several warps too."""
    if INTERPRETED:
        row = tl.arange(0, x.shape[0])
        return tl.gather(x, tl.broadcast_to((row ^ MASK)[:, None], x.shape), 0)
    else:
        if MASK == 16:
            asm: tl.constexpr = "shfl.sync.bfly.b32 $0, $1, 16, 0x1f, -1;"
        elif MASK == 8:
            asm: tl.constexpr = "shfl.sync.bfly.b32 $0, $1, 8, 0x1f, -1;"
        elif MASK == 4:
            asm: tl.constexpr = "shfl.sync.bfly.b32 $0, $1, 4, 0x1f, -1;"
        elif MASK == 2:
            asm: tl.constexpr = "shfl.sync.bfly.b32 $0, $1, 2, 0x1f, -1;"
        else:
            asm: tl.constexpr = "shfl.sync.bfly.b32 $0, $1, 1, 0x1f, -1;"
        return tl.inline_asm_elementwise(asm, "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _fold(a, b, ia, ib, lane, MASK: tl.constexpr):
    """One step of a reduce-scatter over the lanes: of the value pairs (a, b), a lane keeps one half
    and sends the other to lane ^ MASK, which keeps the opposite half; ``ia``/``ib`` track which
    output each kept value is part of."""
    upper = ((lane & MASK) != 0)[:, None]
    keep = tl.where(upper, b, a)
    return keep + _butterfly(tl.where(upper, a, b), lane, MASK), tl.where(upper, ib, ia)


@triton.jit
def _halves(x, BLOCK_E: tl.constexpr, WIDTH: tl.constexpr):
    """(BLOCK_E, WIDTH) -> two (BLOCK_E, WIDTH // 2): the even and the odd columns, in registers."""
    return tl.split(tl.reshape(x, [BLOCK_E, WIDTH // 2, 2]))


@triton.jit
def _fold_halves(v, idx, lane, BLOCK_E: tl.constexpr, WIDTH: tl.constexpr):
    """The next reduce-scatter step after a ``_fold`` across lane ^ WIDTH: the WIDTH values each
    lane kept split into halves, folded across lane ^ (WIDTH // 2)."""
    va, vb = _halves(v, BLOCK_E, WIDTH)
    ia, ib = _halves(idx, BLOCK_E, WIDTH)
    return _fold(va, vb, ia, ib, lane, WIDTH // 2)


@triton.jit
def _lane_sums(a, b, lane, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    """The sums over the 32 channels of a warp of a (BLOCK_E, 16) and b (BLOCK_E, 16), as a
    reduce-scatter: 31 shuffles instead of the 160 of two butterfly reductions. Each lane ends with
    one of the 32 sums; returns it and its index (n for a's sums, BLOCK_N + n for b's)."""
    n = tl.arange(0, BLOCK_N)
    ia = tl.broadcast_to(n[None, :], [BLOCK_E, BLOCK_N])
    v, idx = _fold(a, b, ia, ia + BLOCK_N, lane, 16)
    v, idx = _fold_halves(v, idx, lane, BLOCK_E, 16)
    v, idx = _fold_halves(v, idx, lane, BLOCK_E, 8)
    v, idx = _fold_halves(v, idx, lane, BLOCK_E, 4)
    v, idx = _fold_halves(v, idx, lane, BLOCK_E, 2)
    return tl.reshape(v, [BLOCK_E]), tl.reshape(idx, [BLOCK_E])


@triton.jit
def _bwd_lane_token(h_prev, mu, dA_acc, dD_acc, dbias_acc, t, u_ptr, delta_ptr, B_ptr, C_ptr, D, z_ptr, dy_ptr,
                    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, s_ub, s_ue, s_ul, s_db, s_de, s_dl, s_Bb, s_Bn, s_Bl,
                    s_Cb, s_Cn, s_Cl, s_zb, s_ze, s_zl, s_gb, s_ge, s_gl, s_xb, s_xe, s_xl, pid_b, partial_base, L, N,
                    s_part, e, e_mask, n, n_mask, lane, A2, W, bias, DT_RANK: tl.constexpr, RANK_PAD: tl.constexpr,
                    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                    ALIGNED: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SUMS: tl.constexpr):
    """Every gradient of token ``t`` from the state before it (``h_prev``) and the adjoint handed
    back by token t + 1 (``mu`` = a_{t+1} lambda_{t+1}); returns the adjoint for token t - 1.

    dB and dC of the token are sums over channels, so over lanes. WARP_SUMS: each warp sums its 32
    channels by a reduce-scatter and writes its own partial slice (``partial_base`` per lane);
    otherwise ``tl.sum`` over the block."""
    valid = t < L
    ev_mask = e_mask & valid
    delta, u, Bt = _lane_inputs(u_ptr, delta_ptr, B_ptr, s_ub, s_ue, s_ul, s_db, s_de, s_dl, s_Bb, s_Bn, s_Bl, pid_b, t,
                                L, e, e_mask, n, n_mask, W, bias, DT_RANK, RANK_PAD, HAS_BIAS, SOFTPLUS, ALIGNED)
    Ct = _row(C_ptr, pid_b * s_Cb, t, s_Cn, s_Cl, n, n_mask, valid, ALIGNED, True)
    dy = tl.load(dy_ptr + pid_b * s_gb + e * s_ge + t * s_gl, mask=ev_mask, other=0.0).to(tl.float32)
    decay = tl.exp2(delta[:, None] * A2)
    decayed = decay * h_prev
    h = decayed + (delta * u)[:, None] * Bt[None, :]
    x_offs = pid_b * s_xb + e * s_xe + t * s_xl
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * s_zb + e * s_ze + t * s_zl, mask=ev_mask, other=0.0).to(tl.float32)
        sig = _sigmoid(z)
        y = tl.sum(h * Ct[None, :], 1)
        if HAS_D:
            y += u * D
        tl.store(dz_ptr + x_offs, dy * y * sig * (1.0 + z * (1.0 - sig)), mask=ev_mask)
        gy = dy * z * sig
    else:
        gy = dy
    lam = gy[:, None] * Ct[None, :] + mu
    lam_B = tl.sum(lam * Bt[None, :], 1)
    du = delta * lam_B
    if HAS_D:
        du += gy * D
        dD_acc += gy * u
    lam_decayed = lam * decayed
    ddelta = u * lam_B + tl.sum(lam_decayed * A2, 1) * (1.0 / LOG2E)
    if SOFTPLUS:
        # softplus'(raw) = sigmoid(raw) = 1 - exp(-delta)
        ddelta = ddelta * (1.0 - tl.exp2(-delta * LOG2E))
    ddelta = tl.where(ev_mask, ddelta, 0.0)
    tl.store(du_ptr + x_offs, du, mask=ev_mask)
    tl.store(ddelta_ptr + x_offs, ddelta, mask=ev_mask)
    dbias_acc += ddelta
    dA_acc += lam_decayed * delta[:, None]
    if WARP_SUMS:
        sums, which = _lane_sums(lam * (delta * u)[:, None], h * gy[:, None], lane, BLOCK_E, BLOCK_N)
        of_C = which >= BLOCK_N
        which_n = tl.where(of_C, which - BLOCK_N, which)
        offs = (partial_base + t) * s_part + which_n
        tl.store(tl.where(of_C, dC_ptr + offs, dB_ptr + offs), sums, mask=(which_n < N) & valid)
    else:
        tn_offs = (partial_base + t) * s_part + n
        tl.store(dB_ptr + tn_offs, tl.sum(lam * (delta * u)[:, None], 0), mask=n_mask & valid)
        tl.store(dC_ptr + tn_offs, tl.sum(h * gy[:, None], 0), mask=n_mask & valid)
    return decay * lam, dA_acc, dD_acc, dbias_acc


@triton.jit(do_not_specialize=['L', 'E', 'batch', 'n_chunks', 'n_tiles', 'tiles', 's_se', 's_ub', 's_ue', 's_ul',
                               's_db', 's_de', 's_dl', 's_Bb', 's_Bn', 's_Bl', 's_Cb', 's_Cn', 's_Cl', 's_zb', 's_ze',
                               's_zl', 's_gb', 's_ge', 's_gl', 's_xb', 's_xe', 's_xl'])
def _bwd_chunk_grads_lanes(u_ptr, delta_ptr, w_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dy_ptr, states_ptr,
                           MU_ptr, du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, L, E, N,
                           s_part, batch, n_chunks, n_tiles, tiles, s_se, s_ub, s_ue, s_ul, s_db, s_de, s_dl, s_Bb,
                           s_Bn, s_Bl, s_Cb, s_Cn, s_Cl, s_zb, s_ze, s_zl, s_gb, s_ge, s_gl, s_xb, s_xe, s_xl,
                           T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, DT_RANK: tl.constexpr,
                           HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                           HAS_CARRY: tl.constexpr, RANK_PAD: tl.constexpr, ALIGNED: tl.constexpr,
                           WARP_SUMS: tl.constexpr, PREFETCH: tl.constexpr, STATE_ROW: tl.constexpr):
    """Same contract as ``_bwd_chunk_grads``, lane per channel, with the saved states addressed as in
    ``_saved_state_ptrs`` (``s_se``, ``STATE_ROW``); with WARP_SUMS (one channel per
    lane, BLOCK_N = 16), dB and dC have one partial slice per warp instead of per program. Tokens go
    last to first, in runs of four (T is a multiple of 4): the states before the four tokens of a
    run are recomputed from the tile's saved start state and held in four register sets, so each
    token's backward step has the state it needs without a scratch buffer; a run deeper in the tile
    first re-steps from the tile start to its own start. PREFETCH > 0: at each tile, the L2 is asked
    for the inputs and saved state of the tile PREFETCH tokens earlier, which comes next."""
    pid_c = tl.program_id(0)
    pid_e = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    n = tl.arange(0, BLOCK_N)
    e_mask = e < E
    n_mask = n < N
    en_mask = e_mask[:, None] & n_mask[None, :]
    ne_offs = n[None, :] * E + e[:, None]
    A2, W, bias = _lane_setup(w_ptr, bias_ptr, A_ptr, E, N, e, e_mask, n, n_mask, DT_RANK, RANK_PAD, HAS_BIAS)
    if HAS_D:
        D = tl.load(D_ptr + e, mask=e_mask, other=0.0).to(tl.float32)
    else:
        D = bias  # unused
    if HAS_CARRY:
        mu = tl.load(MU_ptr + (pid_b * n_chunks + pid_c) * E * N + ne_offs, mask=en_mask, other=0.0)
    else:
        mu = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    dA_acc = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    lane = tl.arange(0, BLOCK_E) % 32
    if WARP_SUMS:
        partial_base = ((pid_e * (BLOCK_E // 32) + tl.arange(0, BLOCK_E) // 32) * batch + pid_b) * L
    else:
        partial_base = (pid_e * batch + pid_b) * L
    pf_e, pf_d, pf_n = _prefetch_indices(e, E, N, BLOCK_E, BLOCK_N, DT_RANK, RANK_PAD)
    for kk in range(tiles):
        tile = pid_c * tiles + (tiles - 1 - kk)
        if PREFETCH > 0:
            tile_pf = tl.minimum(tl.maximum(tile - PREFETCH // T, 0), n_tiles - 1)
            _prefetch(states_ptr + (pid_b * n_tiles + tile_pf) * E * N + pf_n * STATE_ROW + pf_e * s_se)
            for j in tl.static_range(T):
                tp = tl.minimum(tile_pf * T + j, L - 1)
                _prefetch(u_ptr + pid_b * s_ub + tp * s_ul + pf_e * s_ue)
                _prefetch(delta_ptr + pid_b * s_db + tp * s_dl + pf_d * s_de)
                _prefetch(B_ptr + pid_b * s_Bb + tp * s_Bl + pf_n * s_Bn)
                _prefetch(C_ptr + pid_b * s_Cb + tp * s_Cl + pf_n * s_Cn)
                _prefetch(dy_ptr + pid_b * s_gb + tp * s_gl + pf_e * s_ge)
                if HAS_Z:
                    _prefetch(z_ptr + pid_b * s_zb + tp * s_zl + pf_e * s_ze)
        h_start = tl.load(_saved_state_ptrs(states_ptr, (pid_b * n_tiles + tile) * E * N, e, n, s_se, STATE_ROW),
                          mask=en_mask & (tile < n_tiles), other=0.0)
        for run in tl.static_range(T // 4):
            t0 = tile * T + (T // 4 - 1 - run) * 4
            h_s = h_start
            for j in tl.static_range((T // 4 - 1 - run) * 4):
                h_s = _bwd_lane_state(h_s, tile * T + j, u_ptr, delta_ptr, B_ptr, s_ub, s_ue, s_ul, s_db, s_de, s_dl,
                                      s_Bb, s_Bn, s_Bl, pid_b, L, e, e_mask, n, n_mask, A2, W, bias, DT_RANK, RANK_PAD,
                                      HAS_BIAS, SOFTPLUS, ALIGNED)
            h_0 = _bwd_lane_state(h_s, t0, u_ptr, delta_ptr, B_ptr, s_ub, s_ue, s_ul, s_db, s_de, s_dl, s_Bb, s_Bn,
                                  s_Bl, pid_b, L, e, e_mask, n, n_mask, A2, W, bias, DT_RANK, RANK_PAD, HAS_BIAS,
                                  SOFTPLUS, ALIGNED)
            h_1 = _bwd_lane_state(h_0, t0 + 1, u_ptr, delta_ptr, B_ptr, s_ub, s_ue, s_ul, s_db, s_de, s_dl, s_Bb, s_Bn,
                                  s_Bl, pid_b, L, e, e_mask, n, n_mask, A2, W, bias, DT_RANK, RANK_PAD, HAS_BIAS,
                                  SOFTPLUS, ALIGNED)
            h_2 = _bwd_lane_state(h_1, t0 + 2, u_ptr, delta_ptr, B_ptr, s_ub, s_ue, s_ul, s_db, s_de, s_dl, s_Bb, s_Bn,
                                  s_Bl, pid_b, L, e, e_mask, n, n_mask, A2, W, bias, DT_RANK, RANK_PAD, HAS_BIAS,
                                  SOFTPLUS, ALIGNED)
            for i in tl.static_range(4):
                # The state before token t0 + 3 - i.
                if i == 0:
                    h_prev = h_2
                elif i == 1:
                    h_prev = h_1
                elif i == 2:
                    h_prev = h_0
                else:
                    h_prev = h_s
                mu, dA_acc, dD_acc, dbias_acc = _bwd_lane_token(
                    h_prev, mu, dA_acc, dD_acc, dbias_acc, t0 + 3 - i, u_ptr, delta_ptr, B_ptr, C_ptr, D, z_ptr, dy_ptr,
                    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, s_ub, s_ue, s_ul, s_db, s_de, s_dl, s_Bb, s_Bn, s_Bl,
                    s_Cb, s_Cn, s_Cl, s_zb, s_ze, s_zl, s_gb, s_ge, s_gl, s_xb, s_xe, s_xl, pid_b, partial_base, L, N,
                    s_part, e, e_mask, n, n_mask, lane, A2, W, bias, DT_RANK, RANK_PAD, HAS_BIAS, SOFTPLUS, HAS_D,
                    HAS_Z, ALIGNED, BLOCK_E, BLOCK_N, WARP_SUMS)
    prog = pid_b * n_chunks + pid_c
    tl.store(dA_ptr + prog * E * N + ne_offs, dA_acc, mask=en_mask)
    tl.store(dD_ptr + prog * E + e, dD_acc, mask=e_mask)
    tl.store(dbias_ptr + prog * E + e, dbias_acc, mask=e_mask)
