"""Triton helpers shared by the ``impl="fused"`` kernels: blocks, logit tiles, gradient tiles.

A tile is (BLOCK_N tokens) x (BLOCK_V vocabulary entries) of the scaled student
and teacher logits ``b = s / tau``, ``a = t / tau`` (``s``, ``t``: each role's
logit transform of the raw logits); it is formed by ``tl.dot``
over the hidden size in BLOCK_K steps and never leaves the chip. The kernels in
:mod:`~opsd_kernels.triton.fused_forward` and
:mod:`~opsd_kernels.triton.fused_backward` are built from these helpers, so
that a change here (a faster dot loop, another operand layout) reaches all of
them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .formulas import divergence_terms, transform_grad, transform_logit

#: ``triton.heuristics`` of the fused kernels: constexpr flags from optional inputs
#: passed as None (no dummy pointers)
INPUT_FLAGS = {
    "HAS_MASK": lambda a: a["mask_ptr"] is not None,
    "SHARED_W": lambda a: a["wt_ptr"] is None,
    "HAS_BIAS": lambda a: a["b_ptr"] is not None,
    "HAS_TBIAS": lambda a: a["bt_ptr"] is not None,
    "COUNT": lambda a: a["count_ptr"] is not None,
}


@triton.jit
def token_block(nb, N, mask_ptr, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    """Token block ``nb``: int64 ``rows``, ``in_range`` (rows < N) and ``row_ok``
    (in range and counted by the mask)."""
    rows = (nb * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # nb * BLOCK_N < N: int32 is safe
    in_range = rows < N
    row_ok = in_range
    if HAS_MASK:
        row_ok = row_ok & (tl.load(mask_ptr + rows, mask=in_range, other=0) != 0)
    return rows, in_range, row_ok


@triton.jit
def vocab_block(vb, V, BLOCK_V: tl.constexpr):
    """Vocabulary block ``vb``: int64 ``cols`` and ``col_ok`` (cols < V)."""
    cols = (vb * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    return cols, cols < V


@triton.jit
def grouped_tile(pid, n_rows, n_cols, GROUP: tl.constexpr):
    """(row, col) of program ``pid`` in grouped order: GROUP consecutive rows walk the
    columns side by side, so that programs running at the same time share column
    operands (W tiles) in L2, as in the Triton matmul tutorial's ordering."""
    per_group = GROUP * n_cols
    first_row = (pid // per_group) * GROUP
    rows_here = tl.minimum(n_rows - first_row, GROUP)
    row = first_row + (pid % per_group) % rows_here
    col = (pid % per_group) // rows_here
    return row, col


@triton.jit
def logit_tiles(
    hs_ptr,
    ht_ptr,
    w_ptr,
    wt_ptr,
    b_ptr,
    bt_ptr,
    rows,
    row_ok,
    cols,
    col_ok,
    H,
    H_T,
    stride_hs,
    stride_ht,
    stride_w,
    stride_wt,
    inv_temp,
    s_scale,
    s_cap,
    t_scale,
    t_cap,
    S_SOFTCAP: tl.constexpr,
    T_SOFTCAP: tl.constexpr,
    SHARED_W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_TBIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Scaled student and teacher logit tiles ``(b, a)``, (BLOCK_N, BLOCK_V) float32:
    ``b = transform(s) / tau`` with the student's logit transform (``s_scale``,
    ``s_cap``, ``S_SOFTCAP``; :func:`~opsd_kernels.triton.formulas.transform_logit`),
    ``a`` likewise with the teacher's, applied in float32 right after the dot and bias.

    ``rows``/``cols`` are int64 token and vocabulary indices; rows with
    ``row_ok`` False read zero hidden states, columns outside the vocabulary
    (``col_ok`` False) are -inf. With ``SHARED_W`` each W tile is loaded once
    for both dots. ``UPCAST`` converts operands to float32 before the dot (the
    interpreter's bf16 dot is wrong).
    """
    ks = tl.arange(0, BLOCK_K)
    acc_s = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        k_ok = k < H
        # W^T tile (BLOCK_K, BLOCK_V): shared by the student and (if SHARED_W) the teacher
        w = tl.load(
            w_ptr + cols[None, :] * stride_w + k[:, None],
            mask=col_ok[None, :] & k_ok[:, None],
            other=0.0,
        )
        x = tl.load(
            hs_ptr + rows[:, None] * stride_hs + k[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            w = w.to(tl.float32)
            x = x.to(tl.float32)
        acc_s = tl.dot(x, w, acc_s, input_precision=DOT_PRECISION)
        if SHARED_W:
            y = tl.load(
                ht_ptr + rows[:, None] * stride_ht + k[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            if UPCAST:
                y = y.to(tl.float32)
            acc_t = tl.dot(y, w, acc_t, input_precision=DOT_PRECISION)
    if not SHARED_W:
        for k0 in range(0, H_T, BLOCK_K):
            k = k0 + ks
            k_ok = k < H_T
            wt = tl.load(
                wt_ptr + cols[None, :] * stride_wt + k[:, None],
                mask=col_ok[None, :] & k_ok[:, None],
                other=0.0,
            )
            y = tl.load(
                ht_ptr + rows[:, None] * stride_ht + k[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            if UPCAST:
                wt = wt.to(tl.float32)
                y = y.to(tl.float32)
            acc_t = tl.dot(y, wt, acc_t, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc_s += bias[None, :]
        if SHARED_W:
            acc_t += bias[None, :]
    if HAS_TBIAS:
        acc_t += tl.load(bt_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if S_SOFTCAP:
        acc_s = transform_logit(acc_s, s_scale, s_cap, True) * inv_temp
    else:  # one multiply by the scalar scale / tau
        acc_s = acc_s * (s_scale * inv_temp)
    if T_SOFTCAP:
        acc_t = transform_logit(acc_t, t_scale, t_cap, True) * inv_temp
    else:
        acc_t = acc_t * (t_scale * inv_temp)
    b = tl.where(col_ok[None, :], acc_s, float("-inf"))
    a = tl.where(col_ok[None, :], acc_t, float("-inf"))
    return b, a


@triton.jit
def clipped_terms(
    b,
    a,
    lse_s,
    lse_t,
    beta,
    log_beta,
    log_1m_beta,
    clip,
    KIND: tl.constexpr,
    HAS_CLIP: tl.constexpr,
):
    """On a tile: ``(phi, c(phi), g kept, g, pS, pT)``: the pointwise loss term, its
    clipped value, its student derivative (0 where clipped, and unclipped) and the
    student and teacher probabilities. An entry is clipped where ``not phi < clip``
    (NaN included)."""
    lS = b - lse_s[:, None]
    lT = a - lse_t[:, None]
    pS = tl.exp(lS)
    pT = tl.exp(lT)
    phi, g, h = divergence_terms(lT, lS, pT, pS, beta, log_beta, log_1m_beta, KIND)
    c_phi = phi
    g_kept = g
    if HAS_CLIP:
        c_phi = tl.minimum(phi, clip)
        g_kept = tl.where(phi < clip, g, 0.0)
    return phi, c_phi, g_kept, g, pS, pT


@triton.jit
def logit_grad_tile(
    b,
    a,
    lse_s,
    lse_t,
    G,
    mu,
    coef,
    row_ok,
    col_ok,
    temperature,
    s_scale,
    s_cap,
    beta,
    log_beta,
    log_1m_beta,
    clip,
    KIND: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    KEEP: tl.constexpr,
    S_SOFTCAP: tl.constexpr,
):
    """The gradient tile with respect to the RAW student logits x, zero outside counted
    rows and the vocabulary::

        dS = coef * dz/dx * (g - pS * G)       (clipped entries: g = 0)

    ``coef`` holds the row's upstream factor / tau, and without a soft cap also the
    constant ``dz/dx = s_scale``; with ``S_SOFTCAP`` ``dz/dx = s_scale (1 - (z/cap)^2)``
    is formed here in float32 from ``z = b * tau``. ``KEEP`` (clip_mode "entry_keep"):
    a clipped entry's ``g - pS G`` is replaced by the row's ``mu`` (see
    :class:`~opsd_kernels._validation.DivergenceOptions`)."""
    phi, c_phi, g, g_all, pS, pT = clipped_terms(
        b, a, lse_s, lse_t, beta, log_beta, log_1m_beta, clip, KIND, HAS_CLIP
    )
    d = g - pS * G[:, None]
    if KEEP:
        d = tl.where(phi < clip, d, mu[:, None])
    if S_SOFTCAP:
        d = d * transform_grad(b * temperature, s_scale, s_cap, True)
    dS = d * coef[:, None]
    return tl.where(row_ok[:, None] & col_ok[None, :], dS, 0.0)


@triton.jit
def recompute_grad_tile(
    hs_ptr,
    ht_ptr,
    w_ptr,
    wt_ptr,
    b_ptr,
    bt_ptr,
    lse_s_ptr,
    lse_t_ptr,
    g_sum_ptr,
    mu_ptr,
    scale_ptr,
    rows,
    in_range,
    row_ok,
    cols,
    col_ok,
    H,
    H_T,
    stride_hs,
    stride_ht,
    stride_w,
    stride_wt,
    scale_stride,
    inv_temp,
    s_scale,
    s_cap,
    t_scale,
    t_cap,
    beta,
    log_beta,
    log_1m_beta,
    clip,
    KIND: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    KEEP: tl.constexpr,
    S_SOFTCAP: tl.constexpr,
    T_SOFTCAP: tl.constexpr,
    SHARED_W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_TBIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The backward's float32 gradient tile dS (:func:`logit_grad_tile`, with respect to
    the raw student logits) from the forward's per-token statistics (LSE_S, LSE_T, G,
    and with ``KEEP`` mu) and upstream factors (``scale_ptr``, stride 0 for one factor),
    both logit tiles recomputed (4 x BLOCK_N x BLOCK_V x H flops)."""
    lse_s = tl.load(lse_s_ptr + rows, mask=in_range, other=0.0)
    lse_t = tl.load(lse_t_ptr + rows, mask=in_range, other=0.0)
    G = tl.load(g_sum_ptr + rows, mask=in_range, other=0.0)
    mu = G
    if KEEP:
        mu = tl.load(mu_ptr + rows, mask=in_range, other=0.0)
    coef = tl.load(scale_ptr + rows * scale_stride, mask=in_range, other=0.0) * inv_temp
    if not S_SOFTCAP:
        coef = coef * s_scale  # dz/dx of z = s_scale * x
    b, a = logit_tiles(
        hs_ptr,
        ht_ptr,
        w_ptr,
        wt_ptr,
        b_ptr,
        bt_ptr,
        rows,
        row_ok,
        cols,
        col_ok,
        H,
        H_T,
        stride_hs,
        stride_ht,
        stride_w,
        stride_wt,
        inv_temp,
        s_scale,
        s_cap,
        t_scale,
        t_cap,
        S_SOFTCAP,
        T_SOFTCAP,
        SHARED_W,
        HAS_BIAS,
        HAS_TBIAS,
        UPCAST,
        DOT_PRECISION,
        BLOCK_N,
        BLOCK_V,
        BLOCK_K,
    )
    return logit_grad_tile(
        b,
        a,
        lse_s,
        lse_t,
        G,
        mu,
        coef,
        row_ok,
        col_ok,
        1.0 / inv_temp,
        s_scale,
        s_cap,
        beta,
        log_beta,
        log_1m_beta,
        clip,
        KIND,
        HAS_CLIP,
        KEEP,
        S_SOFTCAP,
    )


@triton.jit
def gradient_operand(dS, like_ptr, SCALE16: tl.constexpr, UPCAST: tl.constexpr):
    """``(op, inv)``: the float32 tile ``dS`` as an operand of the gradient dots (the
    dtype of ``like_ptr``'s elements) and the float32 factor that undoes its scaling
    (``dot(op, x) * inv``).

    ``SCALE16`` (float16 inputs): ``dS`` is first multiplied by the power of two that
    puts the tile's largest magnitude in [2^14, 2^15), so small entries keep float16's
    relative precision instead of going subnormal or to zero (an upstream factor of
    1/N makes them ~1e-8); scaling and unscaling by powers of two are exact. bfloat16
    has float32's exponent range and needs no scaling (``inv`` = 1).
    """
    inv = 1.0
    if SCALE16:
        top = tl.max(tl.max(tl.abs(dS), axis=1), axis=0)
        biased = (top.to(tl.int32, bitcast=True) >> 23) & 0xFF  # top in [2^(b-127), 2^(b-126))
        e = tl.minimum(tl.maximum(141 - biased, -100), 100)  # top * 2^e < 2^15
        dS = dS * ((e + 127) << 23).to(tl.float32, bitcast=True)
        inv = ((127 - e) << 23).to(tl.float32, bitcast=True)
    op = dS.to(like_ptr.dtype.element_ty)
    if UPCAST:
        op = op.to(tl.float32)
    return op, inv


@triton.jit
def count_tile(count_ptr, nb, vb, n_vblocks, COUNT: tl.constexpr):
    """Debug counter: add 1 to tile (nb, vb) of an int32 (token blocks, vocab blocks)
    buffer (tests count the tiles each pass computes)."""
    if COUNT:
        tl.atomic_add(count_ptr + nb * n_vblocks + vb, 1)  # small maps: int32 is safe
