"""Triton kernels around the scan: LayerNorm over token rows and the causal depthwise Conv1d + SiLU.

Both work on token-major (batch, L, C) tensors of any strides, so the network never transposes
its activations. Imported only when the ``triton`` backend runs (see ``scan_triton_kernels``).
"""
import triton
import triton.language as tl


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _row_block(rows, L, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's block of token rows over (batch * L) rows of C channels: row indices, channel
    indices, their masks and the 2-D mask, and each row's batch index and position."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    r_mask = r < rows
    c_mask = c < C
    return r, c, r_mask, c_mask, r_mask[:, None] & c_mask[None, :], (r // L).to(tl.int64), r % L


@triton.jit
def _row_scales(scale_ptr, rb, r_mask, HAS_SCALE: tl.constexpr):
    """HAS_SCALE: each row's factor, its sample's entry of ``scale`` (batch,); else 1."""
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(scale_ptr + rb, mask=r_mask, other=0.0).to(tl.float32)
    return scale


@triton.jit
def _scaled_rows(x_ptr, rb, rl, c, mask, s_xb, s_xl, s_xc, scale, HAS_SCALE: tl.constexpr):
    """A block of token rows of x (batch index ``rb``, position ``rl``) in fp32, 0 outside ``mask``;
    HAS_SCALE: each row times its factor (``_row_scales``)."""
    x = tl.load(x_ptr + (rb * s_xb + rl * s_xl)[:, None] + c[None, :] * s_xc, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        x = x * scale[:, None]
    return x


@triton.jit
def _normalised_rows(x_ptr, w_ptr, b_ptr, rb, rl, c, c_mask, mask, C, s_xb, s_xl, s_xc, eps, scale,
                     HAS_SCALE: tl.constexpr):
    """LayerNorm of a block of token rows (batch index ``rb``, position ``rl``), fp32 (undefined
    outside ``mask``), with the rows' mean and 1/std. HAS_SCALE: each row is first multiplied by its
    factor in ``scale``."""
    x = _scaled_rows(x_ptr, rb, rl, c, mask, s_xb, s_xl, s_xc, scale, HAS_SCALE)
    mean = tl.sum(x, 1) / C
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / C + eps)
    w = tl.load(w_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    return centred * rstd[:, None] * w[None, :] + b[None, :], mean, rstd


@triton.jit
def _causal_conv_rows(x_ptr, w_ptr, b_ptr, pid_b, t, e, e_mask, L, s_xb, s_xl, s_xe, K: tl.constexpr,
                      BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr, HAS_BIAS: tl.constexpr):
    """bias + sum_k w_k x_{t-K+1+k} for tokens ``t`` x channels ``e`` (fp32), x_t = 0 before the sequence."""
    if HAS_BIAS:
        acc = tl.zeros([BLOCK_L, BLOCK_E], dtype=tl.float32) + tl.load(b_ptr + e, mask=e_mask, other=0.0)[None, :]
    else:
        acc = tl.zeros([BLOCK_L, BLOCK_E], dtype=tl.float32)
    for k in tl.static_range(K):
        src = t - (K - 1) + k
        xv = tl.load(x_ptr + pid_b * s_xb + src[:, None] * s_xl + e[None, :] * s_xe,
                     mask=((src >= 0) & (src < L))[:, None] & e_mask[None, :], other=0.0).to(tl.float32)
        acc += xv * tl.load(w_ptr + e * K + k, mask=e_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _store_times_weight(a, w_ptr, y_ptr, rows, row_mask, k, k_mask, K, WIDTH: tl.constexpr, plane_stride,
                        PLANES: tl.constexpr, BLOCK_O: tl.constexpr, TF32: tl.constexpr):
    """Store a @ W^T, W (PLANES * WIDTH, K) contiguous, as PLANES planes ``plane_stride`` apart, each
    of rows WIDTH wide: output j of token row r goes to plane j // WIDTH, at r * WIDTH + j % WIDTH.
    One loop over the planes' blocks of BLOCK_O outputs, which stays a loop (unrolled, its matmuls
    hold all their registers at once: 216 instead of 127 registers a thread at WIDTH = 120, in an
    offline sm_90 build)."""
    blocks = (WIDTH + BLOCK_O - 1) // BLOCK_O
    for i in tl.range(0, PLANES * blocks, loop_unroll_factor=1):
        plane = i // blocks
        o = (i % blocks) * BLOCK_O + tl.arange(0, BLOCK_O)
        o_mask = o < WIDTH
        wt = tl.load(w_ptr + (plane * WIDTH + o[None, :]) * K + k[:, None], mask=k_mask[:, None] & o_mask[None, :],
                     other=0.0)
        if TF32:
            y = tl.dot(a, wt.to(tl.float32), input_precision='tf32')
        else:
            y = tl.dot(a, wt.to(tl.float32), input_precision='ieee')
        tl.store(y_ptr + plane * plane_stride + rows[:, None] * WIDTH + o[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & o_mask[None, :])


@triton.jit(do_not_specialize=['rows', 'L', 's_xb', 's_yb'])
def _layer_norm_fwd(x_ptr, scale_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, rows, L, C, OUT_C, s_xb, s_xl, s_xc,
                    s_yb, s_yl, s_yc, eps, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SAVE_STATS: tl.constexpr,
                    HAS_SCALE: tl.constexpr):
    """y rows of OUT_C >= C columns: the normalised C, then zeros. HAS_SCALE: x's rows are first
    multiplied by their sample's factor ``scale`` (batch,)."""
    r, c, r_mask, c_mask, mask, rb, rl = _row_block(rows, L, C, BLOCK_R, BLOCK_C)
    scale = _row_scales(scale_ptr, rb, r_mask, HAS_SCALE)
    y, mean, rstd = _normalised_rows(x_ptr, w_ptr, b_ptr, rb, rl, c, c_mask, mask, C, s_xb, s_xl, s_xc, eps, scale,
                                     HAS_SCALE)
    tl.store(y_ptr + (rb * s_yb + rl * s_yl)[:, None] + c[None, :] * s_yc,
             tl.where(c_mask[None, :], y, 0.0).to(y_ptr.dtype.element_ty), mask=r_mask[:, None] & (c < OUT_C)[None, :])
    if SAVE_STATS:
        tl.store(mean_ptr + r, mean, mask=r_mask)
        tl.store(rstd_ptr + r, rstd, mask=r_mask)


@triton.jit(do_not_specialize=['rows', 'L', 's_xb', 's_gb'])
def _layer_norm_bwd(x_ptr, scale_ptr, w_ptr, dy_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr, rows, L, C, s_xb,
                    s_xl, s_xc, s_gb, s_gl, s_gc, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                    HAS_SCALE: tl.constexpr):
    """dx (rows, C) contiguous; dw, db: one partial row per program. HAS_SCALE: as ``_layer_norm_fwd``,
    dx is the gradient of the unscaled x."""
    pid = tl.program_id(0)
    r, c, r_mask, c_mask, mask, rb, rl = _row_block(rows, L, C, BLOCK_R, BLOCK_C)
    scale = _row_scales(scale_ptr, rb, r_mask, HAS_SCALE)
    x = _scaled_rows(x_ptr, rb, rl, c, mask, s_xb, s_xl, s_xc, scale, HAS_SCALE)
    dy = tl.load(dy_ptr + (rb * s_gb + rl * s_gl)[:, None] + c[None, :] * s_gc, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + r, mask=r_mask, other=0.0)
    rstd = tl.load(rstd_ptr + r, mask=r_mask, other=0.0)
    w = tl.load(w_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    wdy = dy * w[None, :]
    dx = (wdy - xhat * (tl.sum(xhat * wdy, 1) / C)[:, None] - (tl.sum(wdy, 1) / C)[:, None]) * rstd[:, None]
    if HAS_SCALE:
        dx = dx * scale[:, None]
    tl.store(dx_ptr + r.to(tl.int64)[:, None] * C + c[None, :], dx, mask=mask)
    tl.store(dw_ptr + pid * C + c, tl.sum(dy * xhat, 0), mask=c_mask)
    tl.store(db_ptr + pid * C + c, tl.sum(dy, 0), mask=c_mask)


@triton.jit(do_not_specialize=['L', 's_xb', 's_yb'])
def _causal_conv_silu_fwd(x_ptr, w_ptr, b_ptr, y_ptr, L, E, s_xb, s_xl, s_xe, s_yb, s_yl, s_ye, K: tl.constexpr,
                          BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr, HAS_BIAS: tl.constexpr):
    """y_t = silu(bias + sum_k w_k x_{t-K+1+k}) per channel, x_t = 0 before the sequence."""
    t = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    pid_b = tl.program_id(2).to(tl.int64)
    e_mask = e < E
    acc = _causal_conv_rows(x_ptr, w_ptr, b_ptr, pid_b, t, e, e_mask, L, s_xb, s_xl, s_xe, K, BLOCK_L, BLOCK_E,
                            HAS_BIAS)
    y = acc * _sigmoid(acc)
    tl.store(y_ptr + pid_b * s_yb + t[:, None] * s_yl + e[None, :] * s_ye, y.to(y_ptr.dtype.element_ty),
             mask=(t < L)[:, None] & e_mask[None, :])


@triton.jit(do_not_specialize=['L', 's_xb', 's_gb'])
def _causal_conv_silu_bwd_pre(x_ptr, w_ptr, b_ptr, dy_ptr, gpre_ptr, dw_ptr, db_ptr, L, E, n_lblk, s_xb, s_xl, s_xe,
                              s_gb, s_gl, s_ge, K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr,
                              HAS_BIAS: tl.constexpr):
    """gpre = dy * silu'(pre-activation), (batch, L, E) contiguous; dw (.., E, K), db: per-program partials."""
    pid_l = tl.program_id(0)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    pid_b = tl.program_id(2).to(tl.int64)
    e_mask = e < E
    te_mask = (t < L)[:, None] & e_mask[None, :]
    acc = _causal_conv_rows(x_ptr, w_ptr, b_ptr, pid_b, t, e, e_mask, L, s_xb, s_xl, s_xe, K, BLOCK_L, BLOCK_E,
                            HAS_BIAS)
    dy = tl.load(dy_ptr + pid_b * s_gb + t[:, None] * s_gl + e[None, :] * s_ge, mask=te_mask, other=0.0).to(tl.float32)
    sig = _sigmoid(acc)
    gpre = tl.where(te_mask, dy * sig * (1.0 + acc * (1.0 - sig)), 0.0)
    tl.store(gpre_ptr + (pid_b * L + t[:, None]) * E + e[None, :], gpre, mask=te_mask)
    prog = pid_b * n_lblk + pid_l
    for k in tl.static_range(K):
        src = t - (K - 1) + k
        xv = tl.load(x_ptr + pid_b * s_xb + src[:, None] * s_xl + e[None, :] * s_xe,
                     mask=((src >= 0) & (src < L))[:, None] & e_mask[None, :], other=0.0).to(tl.float32)
        tl.store(dw_ptr + (prog * E + e) * K + k, tl.sum(gpre * xv, 0), mask=e_mask)
    tl.store(db_ptr + prog * E + e, tl.sum(gpre, 0), mask=e_mask)


@triton.jit(do_not_specialize=['L'])
def _causal_conv_bwd_dx(gpre_ptr, w_ptr, dx_ptr, L, E, dx_row, K: tl.constexpr, BLOCK_L: tl.constexpr,
                        BLOCK_E: tl.constexpr):
    """dx_s = sum_k w_k gpre_{s+K-1-k}; gpre (batch, L, E) contiguous, dx (batch, L, E) in rows
    ``dx_row`` apart (>= E)."""
    t = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    pid_b = tl.program_id(2).to(tl.int64)
    e_mask = e < E
    acc = tl.zeros([BLOCK_L, BLOCK_E], dtype=tl.float32)
    for k in tl.static_range(K):
        dst = t + (K - 1) - k
        g = tl.load(gpre_ptr + (pid_b * L + dst[:, None]) * E + e[None, :], mask=(dst < L)[:, None] & e_mask[None, :],
                    other=0.0)
        acc += g * tl.load(w_ptr + e * K + k, mask=e_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(dx_ptr + (pid_b * L + t[:, None]) * dx_row + e[None, :], acc, mask=(t < L)[:, None] & e_mask[None, :])


@triton.jit(do_not_specialize=['rows', 'L', 's_xb'])
def _layer_norm_linear_fwd(x_ptr, nw_ptr, nb_ptr, w_ptr, y_ptr, rows, L, C, s_xb, s_xl, s_xc, eps, plane_stride,
                           WIDTH: tl.constexpr, PLANES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_O: tl.constexpr, TF32: tl.constexpr):
    """y = LayerNorm(x) @ W^T for a block of token rows: the normalised rows stay in registers.

    x (batch, L, C) any strides; W (PLANES * WIDTH, C) contiguous; y: PLANES planes of (rows, WIDTH)
    contiguous, ``plane_stride`` elements apart (see ``_store_times_weight``). C fits one block.
    """
    r, c, r_mask, c_mask, mask, rb, rl = _row_block(rows, L, C, BLOCK_R, BLOCK_C)
    xn, _, _ = _normalised_rows(x_ptr, nw_ptr, nb_ptr, rb, rl, c, c_mask, mask, C, s_xb, s_xl, s_xc, eps, 1.0, False)
    xn = tl.where(mask, xn, 0.0)  # padded columns and rows must add nothing to the matmul
    _store_times_weight(xn, w_ptr, y_ptr, r.to(tl.int64), r_mask, c, c_mask, C, WIDTH, plane_stride, PLANES, BLOCK_O,
                        TF32)


@triton.jit(do_not_specialize=['rows', 'L', 's_yb', 's_sb'])
def _add_bias_skip(y_ptr, b_ptr, s_ptr, rows, L, C, s_yb, s_yl, s_yc, s_sb, s_sl, s_sc, BLOCK_R: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """y += bias + skip over token rows; y and skip (batch, L, C) of any strides."""
    r, c, r_mask, c_mask, mask, rb, rl = _row_block(rows, L, C, BLOCK_R, BLOCK_C)
    y_offs = (rb * s_yb + rl * s_yl)[:, None] + c[None, :] * s_yc
    y = tl.load(y_ptr + y_offs, mask=mask, other=0.0).to(tl.float32)
    skip = tl.load(s_ptr + (rb * s_sb + rl * s_sl)[:, None] + c[None, :] * s_sc, mask=mask, other=0.0).to(tl.float32)
    y += skip + tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + y_offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=['H', 'W', 's_yb', 's_yh', 's_yw'])
def _pixel_shuffle_image(y_ptr, b_ptr, m_ptr, out_ptr, H, W, K, s_yb, s_yk, s_yh, s_yw, scale, R: tl.constexpr,
                         BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[b, c, hR + i, wR + j] = mean[c] + scale * (y[b, k, h, w] + bias[k]), k = cR² + iR + j: a
    convolution's output without its bias, through PixelShuffle(R), back in the image range. One
    program per input row block; out is (batch, K / R², HR, WR) contiguous."""
    row = tl.program_id(0)
    b = (row // H).to(tl.int64)
    h = row % H
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    k = tl.arange(0, BLOCK_K)
    k_mask = k < K
    mask = (w < W)[:, None] & k_mask[None, :]
    y = tl.load(y_ptr + b * s_yb + h * s_yh + w[:, None] * s_yw + k[None, :] * s_yk, mask=mask, other=0.0)
    c = k // (R * R)
    y = (y.to(tl.float32) + tl.load(b_ptr + k, mask=k_mask, other=0.0).to(tl.float32)[None, :]) * scale
    y += tl.load(m_ptr + c, mask=k_mask, other=0.0).to(tl.float32)[None, :]
    out_rows = (b * (K // (R * R)) + c) * (H * R) + h * R + (k // R) % R
    offs = out_rows[None, :] * (W * R) + w[:, None] * R + (k % R)[None, :]
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
