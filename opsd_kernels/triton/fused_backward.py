"""Triton kernels: the fused backward, recomputing logit tiles instead of storing them.

Derivation (opsd_kernels/divergences.py): the gradient with respect to the
student logits of token i, times the token's upstream factor r_i (the upstream
gradient for reduction "none"; the scalar upstream gradient times 1/count for
"mean", times 1 for "sum"), is the tile

    dS_iv = r_i (g_iv - pS_iv G_i) / tau            (clipped entries: g_iv = 0)

and d(student_hidden) = dS @ W, d(weight) = dS^T @ h_S, d(bias) = column sums
of dS. The forward stored LSE_S, LSE_T and G per token (O(N)), so a tile of dS
needs only the recomputed logit tiles (``logit_tiles``, a dot over H).

Two deterministic kernels, no atomics (the fp32 summation order is fixed, so
results are bitwise reproducible run to run):
- ``_fused_dh_kernel``: one program per token block loops over all vocabulary
  blocks, recomputes the tile, forms dS and adds dS @ W[v] into its own rows of
  a float32 dH accumulator (read-modify-write in global memory; only this
  program touches those rows).
- ``_fused_dw_kernel`` (only when the weight or the bias is trainable; a frozen
  lm_head never launches it): one program per vocabulary block loops over all
  token blocks, recomputes the tile, adds dS^T @ h_S into its rows of a float32
  dW accumulator and keeps the bias gradient (column sums) in registers.
With a trainable weight the tiles are thus recomputed twice (12NHV flops in
total for the backward, 6NHV with a frozen weight).

Tile skipping (SKIP): the forward recorded M_S, M_T = the largest scaled logit
of each (token block, vocab block) tile. With m_S = min over the block's
counted tokens of LSE_S (m_T likewise), every probability of the tile obeys
pS <= exp(M_S - m_S) and pT <= exp(M_T - m_T). When both bounds are below
``skip_threshold`` the tile is skipped without being recomputed. The error
this allows per token row i: the skipped entries' |dS_iv| sum to at most
|r_i| / tau * (sum_skipped |g_iv| + |G_i| sum_skipped pS_iv); see
``fused_linear_divergence``'s docstring for the per-kind bound on g.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..divergences import KindSpec
from .formulas import divergence_terms
from .fused_forward import (
    ForwardStats,
    FusedConfig,
    config_for,
    kernel_flags,
    logit_tiles,
    token_block,
)


@triton.jit
def _logit_grad_tile(b, a, lse_s, lse_t, G, coef, row_ok, col_ok, beta, log_beta, log_1m_beta,
                     clip, KIND: tl.constexpr, HAS_CLIP: tl.constexpr):
    """dS = coef * (g - pS * G) on a tile, zero outside counted rows and the vocabulary."""
    lS = b - lse_s[:, None]
    lT = a - lse_t[:, None]
    pS = tl.exp(lS)
    phi, g, h = divergence_terms(lT, lS, tl.exp(lT), pS, beta, log_beta, log_1m_beta, KIND)
    if HAS_CLIP:
        g = tl.where(phi < clip, g, 0.0)
    dS = (g - pS * G[:, None]) * coef[:, None]
    return tl.where(row_ok[:, None] & col_ok[None, :], dS, 0.0)


@triton.jit
def _skip_tile(tmax_s_ptr, tmax_t_ptr, lse_s, lse_t, row_ok, skip_threshold):
    """True when exp(tile max - min counted LSE) < threshold on both sides."""
    min_s = tl.min(tl.where(row_ok, lse_s, float("inf")), axis=0)
    min_t = tl.min(tl.where(row_ok, lse_t, float("inf")), axis=0)
    bound_s = tl.exp(tl.load(tmax_s_ptr) - min_s)
    bound_t = tl.exp(tl.load(tmax_t_ptr) - min_t)
    return tl.maximum(bound_s, bound_t) < skip_threshold


@triton.jit
def _fused_dh_kernel(
    hs_ptr, ht_ptr, w_ptr, wt_ptr, b_ptr, bt_ptr, mask_ptr,
    lse_s_ptr, lse_t_ptr, g_sum_ptr, scale_ptr, tmax_s_ptr, tmax_t_ptr, dh_ptr,
    N, V, H, H_T, stride_hs, stride_ht, stride_w, stride_wt, stride_tmax, stride_dh,
    scale_stride, inv_temp, beta, log_beta, log_1m_beta, clip, skip_threshold,
    KIND: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_MASK: tl.constexpr, SKIP: tl.constexpr,
    SHARED_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TBIAS: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    rows, in_range, row_ok = token_block(pid_n, N, mask_ptr, HAS_MASK, BLOCK_N)
    lse_s = tl.load(lse_s_ptr + rows, mask=in_range, other=0.0)
    lse_t = tl.load(lse_t_ptr + rows, mask=in_range, other=0.0)
    G = tl.load(g_sum_ptr + rows, mask=in_range, other=0.0)
    coef = tl.load(scale_ptr + rows * scale_stride, mask=in_range, other=0.0) * inv_temp
    ks = tl.arange(0, BLOCK_K)
    for vb in range(0, tl.cdiv(V, BLOCK_V)):
        compute = True
        if SKIP:
            compute = _skip_tile(tmax_s_ptr + pid_n * stride_tmax + vb,
                                     tmax_t_ptr + pid_n * stride_tmax + vb,
                                     lse_s, lse_t, row_ok, skip_threshold) == 0
        if compute:
            cols = (vb * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
            col_ok = cols < V
            b, a = logit_tiles(hs_ptr, ht_ptr, w_ptr, wt_ptr, b_ptr, bt_ptr, rows, row_ok, cols,
                               col_ok, H, H_T, stride_hs, stride_ht, stride_w, stride_wt,
                               inv_temp, SHARED_W, HAS_BIAS, HAS_TBIAS, UPCAST, DOT_PRECISION,
                               BLOCK_N, BLOCK_V, BLOCK_K)
            dS = _logit_grad_tile(b, a, lse_s, lse_t, G, coef, row_ok, col_ok, beta, log_beta,
                                  log_1m_beta, clip, KIND, HAS_CLIP)
            dS = dS.to(w_ptr.dtype.element_ty)
            if UPCAST:
                dS = dS.to(tl.float32)
            for k0 in range(0, H, BLOCK_K):
                k = k0 + ks
                k_ok = k < H
                w = tl.load(w_ptr + cols[:, None] * stride_w + k[None, :],
                            mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                if UPCAST:
                    w = w.to(tl.float32)
                ptrs = dh_ptr + rows[:, None] * stride_dh + k[None, :]
                io = in_range[:, None] & k_ok[None, :]
                acc = tl.load(ptrs, mask=io, other=0.0)
                acc = tl.dot(dS, w, acc, input_precision=DOT_PRECISION)
                tl.store(ptrs, acc, mask=io)


@triton.jit
def _fused_dw_kernel(
    hs_ptr, ht_ptr, w_ptr, wt_ptr, b_ptr, bt_ptr, mask_ptr,
    lse_s_ptr, lse_t_ptr, g_sum_ptr, scale_ptr, tmax_s_ptr, tmax_t_ptr, dw_ptr, db_ptr,
    N, V, H, H_T, stride_hs, stride_ht, stride_w, stride_wt, stride_tmax, stride_dw,
    scale_stride, inv_temp, beta, log_beta, log_1m_beta, clip, skip_threshold,
    KIND: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_MASK: tl.constexpr, SKIP: tl.constexpr,
    SHARED_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TBIAS: tl.constexpr,
    WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    vb = tl.program_id(0)
    cols = (vb * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    col_ok = cols < V
    ks = tl.arange(0, BLOCK_K)
    db = tl.zeros((BLOCK_V,), tl.float32)
    for nb in range(0, tl.cdiv(N, BLOCK_N)):
        rows, in_range, row_ok = token_block(nb, N, mask_ptr, HAS_MASK, BLOCK_N)
        lse_s = tl.load(lse_s_ptr + rows, mask=in_range, other=0.0)
        lse_t = tl.load(lse_t_ptr + rows, mask=in_range, other=0.0)
        compute = True
        if SKIP:
            compute = _skip_tile(tmax_s_ptr + nb * stride_tmax + vb,
                                     tmax_t_ptr + nb * stride_tmax + vb,
                                     lse_s, lse_t, row_ok, skip_threshold) == 0
        if compute:
            G = tl.load(g_sum_ptr + rows, mask=in_range, other=0.0)
            coef = tl.load(scale_ptr + rows * scale_stride, mask=in_range, other=0.0) * inv_temp
            b, a = logit_tiles(hs_ptr, ht_ptr, w_ptr, wt_ptr, b_ptr, bt_ptr, rows, row_ok, cols,
                               col_ok, H, H_T, stride_hs, stride_ht, stride_w, stride_wt,
                               inv_temp, SHARED_W, HAS_BIAS, HAS_TBIAS, UPCAST, DOT_PRECISION,
                               BLOCK_N, BLOCK_V, BLOCK_K)
            dS = _logit_grad_tile(b, a, lse_s, lse_t, G, coef, row_ok, col_ok, beta, log_beta,
                                  log_1m_beta, clip, KIND, HAS_CLIP)
            if WANT_DB:
                db += tl.sum(dS, axis=0)
            if WANT_DW:
                dS_t = tl.trans(dS.to(hs_ptr.dtype.element_ty))
                if UPCAST:
                    dS_t = dS_t.to(tl.float32)
                for k0 in range(0, H, BLOCK_K):
                    k = k0 + ks
                    k_ok = k < H
                    # masked tokens read zeros: their padding never reaches dW
                    x = tl.load(hs_ptr + rows[:, None] * stride_hs + k[None, :],
                                mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    if UPCAST:
                        x = x.to(tl.float32)
                    ptrs = dw_ptr + cols[:, None] * stride_dw + k[None, :]
                    io = col_ok[:, None] & k_ok[None, :]
                    acc = tl.load(ptrs, mask=io, other=0.0)
                    acc = tl.dot(dS_t, x, acc, input_precision=DOT_PRECISION)
                    tl.store(ptrs, acc, mask=io)
    if WANT_DB:
        tl.store(db_ptr + cols, db, mask=col_ok)


def skipped_tiles(stats: ForwardStats, threshold: float, block_n: int,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """(token blocks, vocabulary blocks) bool: the tiles the backward skips at ``threshold``.

    The same rule as the kernels' ``_skip_tile``, in torch, for reports and tests:
    ``exp(tile max - min over the block's counted tokens of LSE) < threshold`` for
    the student and the teacher.
    """
    N = stats.lse_s.shape[0]
    pad = (-N) % block_n
    mins = []
    for lse in (stats.lse_s, stats.lse_t):
        lse = lse if mask is None else torch.where(mask, lse, torch.full_like(lse, math.inf))
        padded = torch.nn.functional.pad(lse, (0, pad), value=math.inf)
        mins.append(padded.view(-1, block_n).min(1).values)
    bound = torch.maximum((stats.tmax_s - mins[0][:, None]).exp(),
                          (stats.tmax_t - mins[1][:, None]).exp())
    return bound < threshold


def fused_backward(
    hs: torch.Tensor, ht: torch.Tensor, weight: torch.Tensor,
    teacher_weight: torch.Tensor | None, bias: torch.Tensor | None,
    teacher_bias: torch.Tensor | None, mask: torch.Tensor | None, stats: ForwardStats,
    row_scale: torch.Tensor, *, spec: KindSpec, beta: float, temperature: float,
    clip: float | None, skip_threshold: float, want_h: bool, want_w: bool, want_b: bool,
    weight_grad_dtype: torch.dtype = torch.float32, cfg: FusedConfig | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(d student_hidden (N, H) in its dtype, d weight (V, H) in
    ``weight_grad_dtype``, d bias (V,) float32)``, None where not wanted.

    ``row_scale``: float32, (N,) per-token factors or (1,) for all tokens.
    Accumulation is always float32: for 16-bit outputs dH (dW) is accumulated
    in float32 scratch over token (vocabulary) slices of at most
    ``cfg.scratch_bytes`` and cast per slice.
    """
    cfg = cfg or config_for(hs.device)
    N, H = hs.shape
    V = weight.shape[0]
    H_T = ht.shape[1]
    dev = hs.device
    BN, BV = cfg.block_n, cfg.block_v
    shared = teacher_weight is None
    wt = weight if shared else teacher_weight
    dummy = stats.lse_s
    b = beta if spec.needs_beta else 0.5
    skip = skip_threshold > 0
    per_row = row_scale.numel() > 1
    flags = dict(
        KIND=spec.kind_id, HAS_CLIP=clip is not None, HAS_MASK=mask is not None, SKIP=skip,
        SHARED_W=shared, HAS_BIAS=bias is not None,
        HAS_TBIAS=(not shared) and teacher_bias is not None,
        BLOCK_N=BN, BLOCK_V=BV, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **kernel_flags(hs.dtype, cfg),
    )
    scalars = (1.0 / temperature, b, math.log(b), math.log1p(-b),
               clip if clip is not None else 0.0, float(skip_threshold))
    mask_u8 = mask.view(torch.uint8) if mask is not None else None

    grad_h = grad_w = grad_b = None
    if want_h:
        grad_h = torch.zeros(N, H, dtype=hs.dtype, device=dev)
        # token slices, a multiple of BLOCK_N, so the float32 scratch stays bounded
        direct = hs.dtype == torch.float32
        step = N if direct else max(BN, cfg.scratch_bytes // (4 * H) // BN * BN)
        scratch = None if direct else torch.empty(min(step, N), H, dtype=torch.float32,
                                                  device=dev)
        for lo in range(0, N, step):
            hi = min(N, lo + step)
            acc = grad_h if direct else scratch[: hi - lo].zero_()
            sl = slice(lo, hi)
            _fused_dh_kernel[(triton.cdiv(hi - lo, BN),)](
                hs[sl], ht[sl], weight, wt,
                bias if bias is not None else dummy,
                teacher_bias if teacher_bias is not None else dummy,
                mask_u8[sl] if mask_u8 is not None else dummy,
                stats.lse_s[sl], stats.lse_t[sl], stats.g_sum[sl],
                row_scale[sl] if per_row else row_scale,
                stats.tmax_s[lo // BN:], stats.tmax_t[lo // BN:], acc,
                hi - lo, V, H, H_T, hs.stride(0), ht.stride(0), weight.stride(0), wt.stride(0),
                stats.tmax_s.stride(0), acc.stride(0), 1 if per_row else 0, *scalars,
                **flags,
            )
            if not direct:
                grad_h[sl].copy_(acc)
    if want_w or want_b:
        grad_b = torch.empty(V, dtype=torch.float32, device=dev) if want_b else None
        # float32 weight gradient: accumulate in place; a 16-bit one: in float32 scratch
        # over vocabulary slices (a multiple of BLOCK_V) of bounded size, cast per slice
        direct = not want_w or weight_grad_dtype == torch.float32
        step = V if direct else max(BV, cfg.scratch_bytes // (4 * H) // BV * BV)
        if want_w:
            grad_w = torch.zeros(V, H, dtype=weight_grad_dtype, device=dev)
        scratch = None if direct else torch.empty(min(step, V), H, dtype=torch.float32,
                                                  device=dev)
        for lo in range(0, V, step):
            hi = min(V, lo + step)
            vs = slice(lo, hi)
            acc = dummy if not want_w else grad_w[vs] if direct else scratch[: hi - lo].zero_()
            _fused_dw_kernel[(triton.cdiv(hi - lo, BV),)](
                hs, ht, weight[vs], wt[vs],
                bias[vs] if bias is not None else dummy,
                teacher_bias[vs] if teacher_bias is not None else dummy,
                mask_u8 if mask_u8 is not None else dummy,
                stats.lse_s, stats.lse_t, stats.g_sum, row_scale,
                stats.tmax_s[:, lo // BV:], stats.tmax_t[:, lo // BV:],
                acc, grad_b[vs] if want_b else dummy,
                N, hi - lo, H, H_T, hs.stride(0), ht.stride(0), weight.stride(0),
                wt.stride(0), stats.tmax_s.stride(0), H if want_w else 0,
                1 if per_row else 0, *scalars,
                WANT_DW=want_w, WANT_DB=want_b, **flags,
            )
            if want_w and not direct:
                grad_w[vs].copy_(acc)
    return grad_h, grad_w, grad_b
