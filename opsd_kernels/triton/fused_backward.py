"""Triton kernels: the fused backward, recomputing logit tiles instead of storing them.

Derivation (opsd_kernels/divergences.py): the gradient with respect to the
student logits of token i, times the token's upstream factor r_i (the upstream
gradient for reduction "none"; the scalar upstream gradient times 1/count for
"mean", times 1 for "sum"), is the tile

    dS_iv = r_i (g_iv - pS_iv G_i) / tau            (clipped entries: g_iv = 0)

and d(student_hidden) = dS @ W, d(weight) = dS^T @ h_S, d(bias) = column sums
of dS. The forward stored LSE_S, LSE_T and G per token (O(N)), so a tile of dS
needs only the recomputed logit tiles (a dot over H).

Kernels (float32 accumulation throughout):

- deterministic (default; the fp32 summation order is fixed, results are
  bitwise reproducible run to run):
  * ``_fused_dh_kernel``: one program per (token block, vocabulary split) loops
    over the split's vocabulary blocks, recomputes the tile, forms dS and adds
    dS @ W[v] into its own rows of the split's float32 dH accumulator (only this
    program touches those rows); the splits' partial sums are added in a fixed order.
  * ``_fused_dw_kernel`` (only when the weight or the bias is trainable; a frozen
    lm_head never launches it): one program per vocabulary block loops over the
    token blocks, recomputes the tile, adds dS^T @ h_S into its rows of a float32
    dW accumulator and keeps the bias gradient (column sums) in registers.
  Each tile is recomputed once with a frozen lm_head (4NHV + 2NHV = 6NHV) and
  twice with a trainable one (12NHV).
- ``deterministic=False``: ``_fused_backward_kernel``, one program per tile
  (grouped order), recomputes the tile ONCE and feeds both dH and dW (and db)
  through float32 atomic adds: 8NHV trainable, 6NHV frozen; the summation order,
  hence the last bits, vary run to run.

Tile skipping and its bound
---------------------------
The forward recorded, per tile T (token block x vocabulary block), the largest
scaled logits M_S(T), M_T(T) over the block's counted tokens. With m_S, m_T the
smallest LSE_S, LSE_T over those tokens, every entry of the tile obeys

    pS_iv = exp(b_iv - LSE_S,i) <= exp(M_S(T) - m_S) =: P_S(T),   pT_iv <= P_T(T).

A tile is skipped (not recomputed) when max(P_S(T), P_T(T)) < threshold
(:func:`skipped_tiles`, computed once in torch; the kernels read the map). The
loss is never affected. A skipped entry drops from the logit gradient

    |dS_iv| = |r_i| |g_iv - pS_iv G_i| / tau,       with pS_iv, pT_iv < threshold:

- forward_kl: g = -pT (0 if clipped) and G = -sum_kept pT lies in [-1, 0], so
  g - pS G = pS |G| - pT, a difference of two numbers in [0, threshold):
  ``|dS_iv| < threshold |r_i| / tau``;
- jsd(beta): g = (1-beta) pS (lS - lM) with lS - lM <= log(1/(1-beta)) and
  pS (lM - lS) <= M / e <= threshold / e (x log(M/x) peaks at x = M/e, M the
  mixture), so |g| < (1-beta) threshold max(1/e, log(1/(1-beta))) <= threshold / e;
  G = (1-beta) KL(pS || M) lies in [0, 1/e]; hence ``|dS_iv| < threshold |r_i| / tau``;
- reverse_kl: |g| = pS |lS - lT + 1| < threshold (1 + |lS_iv - lT_iv|) and
  |G| = |L + 1|: the log ratio is not bounded by the probabilities, so the
  threshold bounds reverse KL's error only together with that factor.

Consequences (forward KL and JSD): per token row i the dropped entries sum to
``sum_v |error dS_iv| < n_skipped_i * threshold * |r_i| / tau <= V threshold |r_i| / tau``;
row i of the hidden-state gradient errs by at most that times ``max_v |W_vk|``
in column k, and row v of the weight gradient by at most
``sum_i |error dS_iv| |h_ik|``. ``tests/test_fused.py`` builds inputs where
these bounds are tight (the dropped teacher probabilities sit just below the
threshold, the student's near 0) and checks them.

``skip_threshold="auto"`` (:func:`~opsd_kernels.triton.configs.resolve_skip_threshold`):
0 (exact) for float32; for a 16-bit gradient ``u / V`` with u the dtype's unit
roundoff (2^-8 bfloat16, 2^-11 float16), so the dropped entries of row i sum to
less than ``V (u / V) |r_i| / tau = u |r_i| / tau``: half an ulp of the row's
gradient scale (forward KL and JSD).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import block_args, option_args
from .fused_forward import ForwardStats, block_extreme, device_programs
from .tiles import (
    INPUT_FLAGS,
    count_tile,
    gradient_operand,
    grouped_tile,
    logit_grad_tile,
    logit_tiles,
    token_block,
    vocab_block,
)

_BACKWARD_FLAGS = {
    **INPUT_FLAGS,
    "SKIP": lambda a: a["skip_ptr"] is not None,
    "SCALE16": lambda a: a["hs_ptr"].dtype == torch.float16,
}


@triton.heuristics(_BACKWARD_FLAGS)
@triton.jit
def _fused_dh_kernel(
    hs_ptr,
    ht_ptr,
    w_ptr,
    wt_ptr,
    b_ptr,
    bt_ptr,
    mask_ptr,
    lse_s_ptr,
    lse_t_ptr,
    g_sum_ptr,
    scale_ptr,
    skip_ptr,
    count_ptr,
    dh_ptr,
    N,
    V,
    H,
    H_T,
    stride_hs,
    stride_ht,
    stride_w,
    stride_wt,
    stride_map,
    stride_dh,
    stride_split,
    blocks_per_split,
    scale_stride,
    inv_temp,
    beta,
    log_beta,
    log_1m_beta,
    clip,
    KIND: tl.constexpr,
    ONE_PASS: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    HAS_MASK: tl.constexpr,
    SKIP: tl.constexpr,
    COUNT: tl.constexpr,
    SCALE16: tl.constexpr,
    SHARED_W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_TBIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)  # vocabulary split: its own float32 partial dH (fixed-order sum)
    dh_ptr += split.to(tl.int64) * stride_split
    vb_lo = split * blocks_per_split
    vb_hi = tl.minimum(vb_lo + blocks_per_split, tl.cdiv(V, BLOCK_V))
    rows, in_range, row_ok = token_block(pid_n, N, mask_ptr, HAS_MASK, BLOCK_N)
    lse_s = tl.load(lse_s_ptr + rows, mask=in_range, other=0.0)
    lse_t = tl.load(lse_t_ptr + rows, mask=in_range, other=0.0)
    G = tl.load(g_sum_ptr + rows, mask=in_range, other=0.0)
    coef = tl.load(scale_ptr + rows * scale_stride, mask=in_range, other=0.0) * inv_temp
    ks = tl.arange(0, BLOCK_K)
    for vb in range(vb_lo, vb_hi):
        compute = True
        if SKIP:
            compute = tl.load(skip_ptr + pid_n.to(tl.int64) * stride_map + vb) == 0
        if compute:
            count_tile(count_ptr, pid_n, vb, stride_map, COUNT)
            cols, col_ok = vocab_block(vb, V, BLOCK_V)
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
                SHARED_W,
                HAS_BIAS,
                HAS_TBIAS,
                UPCAST,
                DOT_PRECISION,
                BLOCK_N,
                BLOCK_V,
                BLOCK_K,
            )
            dS = logit_grad_tile(
                b,
                a,
                lse_s,
                lse_t,
                G,
                coef,
                row_ok,
                col_ok,
                beta,
                log_beta,
                log_1m_beta,
                clip,
                KIND,
                HAS_CLIP,
            )
            op, inv = gradient_operand(dS, hs_ptr, SCALE16, UPCAST)
            for k0 in range(0, H, BLOCK_K):
                k = k0 + ks
                k_ok = k < H
                w = tl.load(
                    w_ptr + cols[:, None] * stride_w + k[None, :],
                    mask=col_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )
                if UPCAST:
                    w = w.to(tl.float32)
                ptrs = dh_ptr + rows[:, None] * stride_dh + k[None, :]
                io = in_range[:, None] & k_ok[None, :]
                acc = tl.load(ptrs, mask=io, other=0.0)
                if SCALE16:
                    acc += tl.dot(op, w, input_precision=DOT_PRECISION) * inv
                else:
                    acc = tl.dot(op, w, acc, input_precision=DOT_PRECISION)
                tl.store(ptrs, acc, mask=io)


@triton.heuristics(
    {
        **_BACKWARD_FLAGS,
        "WANT_DW": lambda a: a["dw_ptr"] is not None,
        "WANT_DB": lambda a: a["db_ptr"] is not None,
    }
)
@triton.jit
def _fused_dw_kernel(
    hs_ptr,
    ht_ptr,
    w_ptr,
    wt_ptr,
    b_ptr,
    bt_ptr,
    mask_ptr,
    lse_s_ptr,
    lse_t_ptr,
    g_sum_ptr,
    scale_ptr,
    skip_ptr,
    count_ptr,
    dw_ptr,
    db_ptr,
    N,
    V,
    H,
    H_T,
    stride_hs,
    stride_ht,
    stride_w,
    stride_wt,
    stride_map,
    stride_dw,
    scale_stride,
    inv_temp,
    beta,
    log_beta,
    log_1m_beta,
    clip,
    KIND: tl.constexpr,
    ONE_PASS: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    HAS_MASK: tl.constexpr,
    SKIP: tl.constexpr,
    COUNT: tl.constexpr,
    SCALE16: tl.constexpr,
    SHARED_W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_TBIAS: tl.constexpr,
    WANT_DW: tl.constexpr,
    WANT_DB: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    vb = tl.program_id(0)
    cols, col_ok = vocab_block(vb, V, BLOCK_V)
    ks = tl.arange(0, BLOCK_K)
    db = tl.zeros((BLOCK_V,), tl.float32)
    for nb in range(0, tl.cdiv(N, BLOCK_N)):
        compute = True
        if SKIP:
            compute = tl.load(skip_ptr + nb * stride_map + vb) == 0
        if compute:
            count_tile(count_ptr, nb, vb, stride_map, COUNT)
            rows, in_range, row_ok = token_block(nb, N, mask_ptr, HAS_MASK, BLOCK_N)
            lse_s = tl.load(lse_s_ptr + rows, mask=in_range, other=0.0)
            lse_t = tl.load(lse_t_ptr + rows, mask=in_range, other=0.0)
            G = tl.load(g_sum_ptr + rows, mask=in_range, other=0.0)
            coef = tl.load(scale_ptr + rows * scale_stride, mask=in_range, other=0.0) * inv_temp
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
                SHARED_W,
                HAS_BIAS,
                HAS_TBIAS,
                UPCAST,
                DOT_PRECISION,
                BLOCK_N,
                BLOCK_V,
                BLOCK_K,
            )
            dS = logit_grad_tile(
                b,
                a,
                lse_s,
                lse_t,
                G,
                coef,
                row_ok,
                col_ok,
                beta,
                log_beta,
                log_1m_beta,
                clip,
                KIND,
                HAS_CLIP,
            )
            if WANT_DB:
                db += tl.sum(dS, axis=0)
            if WANT_DW:
                op, inv = gradient_operand(dS, hs_ptr, SCALE16, UPCAST)
                dS_t = tl.trans(op)
                for k0 in range(0, H, BLOCK_K):
                    k = k0 + ks
                    k_ok = k < H
                    # masked tokens read zeros: their padding never reaches dW
                    x = tl.load(
                        hs_ptr + rows[:, None] * stride_hs + k[None, :],
                        mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0,
                    )
                    if UPCAST:
                        x = x.to(tl.float32)
                    ptrs = dw_ptr + cols[:, None] * stride_dw + k[None, :]
                    io = col_ok[:, None] & k_ok[None, :]
                    acc = tl.load(ptrs, mask=io, other=0.0)
                    if SCALE16:
                        acc += tl.dot(dS_t, x, input_precision=DOT_PRECISION) * inv
                    else:
                        acc = tl.dot(dS_t, x, acc, input_precision=DOT_PRECISION)
                    tl.store(ptrs, acc, mask=io)
    if WANT_DB:
        tl.store(db_ptr + cols, db, mask=col_ok)


@triton.heuristics(
    {
        **_BACKWARD_FLAGS,
        "WANT_DH": lambda a: a["dh_ptr"] is not None,
        "WANT_DW": lambda a: a["dw_ptr"] is not None,
        "WANT_DB": lambda a: a["db_ptr"] is not None,
    }
)
@triton.jit
def _fused_backward_kernel(
    hs_ptr,
    ht_ptr,
    w_ptr,
    wt_ptr,
    b_ptr,
    bt_ptr,
    mask_ptr,
    lse_s_ptr,
    lse_t_ptr,
    g_sum_ptr,
    scale_ptr,
    skip_ptr,
    count_ptr,
    dh_ptr,
    dw_ptr,
    db_ptr,
    N,
    V,
    H,
    H_T,
    stride_hs,
    stride_ht,
    stride_w,
    stride_wt,
    stride_map,
    stride_dh,
    stride_dw,
    scale_stride,
    inv_temp,
    beta,
    log_beta,
    log_1m_beta,
    clip,
    KIND: tl.constexpr,
    ONE_PASS: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    HAS_MASK: tl.constexpr,
    SKIP: tl.constexpr,
    COUNT: tl.constexpr,
    SCALE16: tl.constexpr,
    SHARED_W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_TBIAS: tl.constexpr,
    WANT_DH: tl.constexpr,
    WANT_DW: tl.constexpr,
    WANT_DB: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
):
    n_blocks = tl.cdiv(N, BLOCK_N)
    nb, vb = grouped_tile(tl.program_id(0), n_blocks, tl.cdiv(V, BLOCK_V), GROUP)
    compute = True
    if SKIP:
        compute = tl.load(skip_ptr + nb.to(tl.int64) * stride_map + vb) == 0
    if compute:
        count_tile(count_ptr, nb, vb, stride_map, COUNT)
        rows, in_range, row_ok = token_block(nb, N, mask_ptr, HAS_MASK, BLOCK_N)
        cols, col_ok = vocab_block(vb, V, BLOCK_V)
        lse_s = tl.load(lse_s_ptr + rows, mask=in_range, other=0.0)
        lse_t = tl.load(lse_t_ptr + rows, mask=in_range, other=0.0)
        G = tl.load(g_sum_ptr + rows, mask=in_range, other=0.0)
        coef = tl.load(scale_ptr + rows * scale_stride, mask=in_range, other=0.0) * inv_temp
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
            SHARED_W,
            HAS_BIAS,
            HAS_TBIAS,
            UPCAST,
            DOT_PRECISION,
            BLOCK_N,
            BLOCK_V,
            BLOCK_K,
        )
        dS = logit_grad_tile(
            b,
            a,
            lse_s,
            lse_t,
            G,
            coef,
            row_ok,
            col_ok,
            beta,
            log_beta,
            log_1m_beta,
            clip,
            KIND,
            HAS_CLIP,
        )
        if WANT_DB:
            tl.atomic_add(db_ptr + cols, tl.sum(dS, axis=0), mask=col_ok)
        dS16, inv = gradient_operand(dS, hs_ptr, SCALE16, UPCAST)
        dS_t = tl.trans(dS16)
        ks = tl.arange(0, BLOCK_K)
        for k0 in range(0, H, BLOCK_K):
            k = k0 + ks
            k_ok = k < H
            if WANT_DH:
                w = tl.load(
                    w_ptr + cols[:, None] * stride_w + k[None, :],
                    mask=col_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )
                if UPCAST:
                    w = w.to(tl.float32)
                part = tl.dot(dS16, w, input_precision=DOT_PRECISION) * inv
                tl.atomic_add(
                    dh_ptr + rows[:, None] * stride_dh + k[None, :],
                    part,
                    mask=in_range[:, None] & k_ok[None, :],
                )
            if WANT_DW:
                x = tl.load(
                    hs_ptr + rows[:, None] * stride_hs + k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )
                if UPCAST:
                    x = x.to(tl.float32)
                part = tl.dot(dS_t, x, input_precision=DOT_PRECISION) * inv
                tl.atomic_add(
                    dw_ptr + cols[:, None] * stride_dw + k[None, :],
                    part,
                    mask=col_ok[:, None] & k_ok[None, :],
                )


def skipped_tiles(
    stats: ForwardStats, threshold: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """(token blocks, vocabulary blocks) bool: the tiles the backward skips at ``threshold``.

    ``exp(tile max - min over the block's counted tokens of LSE) < threshold`` for
    the student and the teacher (the rule of the module docstring; the kernels
    read this map). All False for ``threshold`` 0.
    """
    bn = stats.cfg.block_n
    bound_s = torch.exp(stats.tmax_s - block_extreme(stats.lse_s, bn, mask, False)[:, None])
    bound_t = torch.exp(stats.tmax_t - block_extreme(stats.lse_t, bn, mask, False)[:, None])
    return torch.maximum(bound_s, bound_t) < threshold


def fused_backward(
    hs: torch.Tensor,
    ht: torch.Tensor,
    weight: torch.Tensor,
    teacher_weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    stats: ForwardStats,
    row_scale: torch.Tensor,
    opts,
    *,
    skip_threshold: float,
    want_h: bool,
    want_w: bool,
    want_b: bool,
    weight_grad_dtype: torch.dtype = torch.float32,
    deterministic: bool = True,
    tile_counts: dict | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(d student_hidden (N, H) in its dtype, d weight (V, H) in
    ``weight_grad_dtype``, d bias (V,) float32)``, None where not wanted.

    ``row_scale``: float32, (N,) per-token factors or (1,) for all tokens;
    ``opts``: the :class:`~opsd_kernels._validation.DivergenceOptions` of the forward;
    ``skip_threshold``: a probability threshold (module docstring; 0 is exact).
    Accumulation is always float32. Deterministic mode: dH is accumulated in
    full-size float32 buffers when one is at most max(``cfg.scratch_bytes``, a
    quarter of the weight's bytes): one per vocabulary split (``cfg.dh_splits``,
    by default enough programs to fill the device twice, as many as that budget
    allows), summed in a fixed order; otherwise float32 outputs accumulate in place
    and 16-bit ones in token slices of at most ``cfg.scratch_bytes``. dW is
    accumulated in place for a float32 ``weight_grad_dtype``, else in vocabulary
    slices of ``cfg.scratch_bytes``, or of as many BLOCK_V rows as the device runs
    programs at a time (2 per SM) if that is more.
    ``deterministic=False``: one kernel, full-size float32 buffers, atomic adds.
    ``tile_counts``: as in :func:`~opsd_kernels.triton.fused_forward.fused_forward`,
    keys ``"dh"``, ``"dw"`` (deterministic) or ``"backward"`` (one pass).
    """
    cfg = stats.cfg
    N, H = hs.shape
    V = weight.shape[0]
    dev = hs.device
    BN, BV = cfg.block_n, cfg.block_v
    n_blocks, n_vblocks = triton.cdiv(N, BN), triton.cdiv(V, BV)
    skip = None
    if skip_threshold > 0:
        skip = skipped_tiles(stats, skip_threshold, mask).to(torch.uint8)
    per_row = row_scale.numel() > 1

    def counter(name):
        if tile_counts is None:
            return None
        tile_counts[name] = torch.zeros(n_blocks, n_vblocks, dtype=torch.int32, device=dev)
        return tile_counts[name]

    common = dict(
        ht_ptr=ht,
        wt_ptr=teacher_weight,
        bt_ptr=teacher_bias if teacher_weight is not None else None,
        H=H,
        H_T=ht.shape[1],
        stride_hs=hs.stride(0),
        stride_ht=ht.stride(0),
        stride_w=weight.stride(0),
        stride_wt=0 if teacher_weight is None else teacher_weight.stride(0),
        stride_map=n_vblocks,
        scale_stride=1 if per_row else 0,
        **option_args(opts),
        **block_args(cfg, hs.dtype),
    )
    mask_u8 = None if mask is None else mask.view(torch.uint8)
    if not deterministic:
        return _one_pass_backward(
            hs,
            weight,
            bias,
            mask_u8,
            stats,
            row_scale,
            skip,
            common,
            cfg,
            want_h,
            want_w,
            want_b,
            weight_grad_dtype,
            counter("backward"),
        )

    grad_h = grad_w = grad_b = None
    if want_h:
        # float32 accumulation: one full-size buffer when it is small next to the weight
        # (then S vocabulary splits, each with its own partial buffer summed in a fixed
        # order, fill the device), else token slices (a multiple of BLOCK_N) of bounded
        # scratch
        budget = max(cfg.scratch_bytes, weight.numel() * weight.element_size() // 4)
        dh_bytes = 4 * N * H
        if dh_bytes <= budget:
            step = N
            splits = cfg.dh_splits or triton.cdiv(device_programs(dev), n_blocks)
            splits = max(1, min(splits, n_vblocks, budget // dh_bytes))
        elif hs.dtype == torch.float32:  # accumulate in the gradient itself
            step, splits = N, 1
        else:
            step, splits = max(BN, cfg.scratch_bytes // (4 * H) // BN * BN), 1
        per_split = triton.cdiv(n_vblocks, splits)
        splits = triton.cdiv(n_vblocks, per_split)  # no empty split
        direct = hs.dtype == torch.float32 and splits == 1
        grad_h = (torch.zeros if direct else torch.empty)(N, H, dtype=hs.dtype, device=dev)
        scratch = (
            None
            if direct
            else torch.empty(splits, min(step, N), H, dtype=torch.float32, device=dev)
        )
        count = counter("dh")
        for lo in range(0, N, step):
            hi = min(N, lo + step)
            acc = grad_h[None] if direct else scratch[:, : hi - lo].zero_()
            sl = slice(lo, hi)
            blocks = slice(lo // BN, None)
            _fused_dh_kernel[(triton.cdiv(hi - lo, BN), splits)](
                hs_ptr=hs[sl],
                ht_ptr=ht[sl],
                w_ptr=weight,
                b_ptr=bias,
                mask_ptr=None if mask_u8 is None else mask_u8[sl],
                lse_s_ptr=stats.lse_s[sl],
                lse_t_ptr=stats.lse_t[sl],
                g_sum_ptr=stats.g_sum[sl],
                scale_ptr=row_scale[sl] if per_row else row_scale,
                skip_ptr=None if skip is None else skip[blocks],
                count_ptr=None if count is None else count[blocks],
                dh_ptr=acc,
                N=hi - lo,
                V=V,
                stride_dh=acc.stride(1),
                stride_split=acc.stride(0),
                blocks_per_split=per_split,
                **{k: v for k, v in common.items() if k != "ht_ptr"},
            )
            if not direct:
                grad_h[sl].copy_(acc[0] if splits == 1 else acc.sum(0))
    if want_w or want_b:
        grad_b = torch.empty(V, dtype=torch.float32, device=dev) if want_b else None
        # float32 weight gradient: accumulate in place; a 16-bit one: in float32 scratch
        # over vocabulary slices (a multiple of BLOCK_V) of bounded size, cast per slice;
        # a slice has at least one program per device slot (no launch that idles SMs)
        direct = not want_w or weight_grad_dtype == torch.float32
        rows = max(cfg.scratch_bytes // (4 * H), device_programs(dev) * BV)
        step = V if direct else max(BV, rows // BV * BV)
        if want_w:
            grad_w = torch.zeros(V, H, dtype=weight_grad_dtype, device=dev)
        scratch = None if direct else torch.empty(min(step, V), H, dtype=torch.float32, device=dev)
        count = counter("dw")
        for lo in range(0, V, step):
            hi = min(V, lo + step)
            vs = slice(lo, hi)
            blocks = (slice(None), slice(lo // BV, None))
            acc = None if not want_w else grad_w[vs] if direct else scratch[: hi - lo].zero_()
            _fused_dw_kernel[(triton.cdiv(hi - lo, BV),)](
                hs_ptr=hs,
                w_ptr=weight[vs],
                b_ptr=None if bias is None else bias[vs],
                mask_ptr=mask_u8,
                lse_s_ptr=stats.lse_s,
                lse_t_ptr=stats.lse_t,
                g_sum_ptr=stats.g_sum,
                scale_ptr=row_scale,
                skip_ptr=None if skip is None else skip[blocks],
                count_ptr=None if count is None else count[blocks],
                dw_ptr=acc,
                db_ptr=grad_b[vs] if want_b else None,
                N=N,
                V=hi - lo,
                stride_dw=H,
                **{
                    **common,
                    "wt_ptr": None if teacher_weight is None else teacher_weight[vs],
                    "bt_ptr": None if common["bt_ptr"] is None else teacher_bias[vs],
                },
            )
            if want_w and not direct:
                grad_w[vs].copy_(acc)
    return grad_h, grad_w, grad_b


def _one_pass_backward(
    hs,
    weight,
    bias,
    mask_u8,
    stats,
    row_scale,
    skip,
    common,
    cfg,
    want_h,
    want_w,
    want_b,
    weight_grad_dtype,
    count,
):
    """``deterministic=False``: one tile recompute feeds dH, dW and db (atomic adds)."""
    N, H = hs.shape
    V = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hs.device)
    dh = torch.zeros(N, H, **f32) if want_h else None
    dw = torch.zeros(V, H, **f32) if want_w else None
    db = torch.zeros(V, **f32) if want_b else None
    n_tiles = triton.cdiv(N, cfg.block_n) * triton.cdiv(V, cfg.block_v)
    _fused_backward_kernel[(n_tiles,)](
        hs_ptr=hs,
        w_ptr=weight,
        b_ptr=bias,
        mask_ptr=mask_u8,
        lse_s_ptr=stats.lse_s,
        lse_t_ptr=stats.lse_t,
        g_sum_ptr=stats.g_sum,
        scale_ptr=row_scale,
        skip_ptr=skip,
        count_ptr=count,
        dh_ptr=dh,
        dw_ptr=dw,
        db_ptr=db,
        N=N,
        V=V,
        stride_dh=H,
        stride_dw=H,
        GROUP=cfg.group,
        **common,
    )
    return (
        None if dh is None else dh.to(hs.dtype),
        None if dw is None else dw.to(weight_grad_dtype),
        db,
    )
