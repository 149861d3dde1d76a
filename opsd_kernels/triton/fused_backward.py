"""Triton kernels: the fused backward, recomputing logit tiles instead of storing them.

Derivation (opsd_kernels/divergences.py): the gradient with respect to the
student logits of token i, times the token's upstream factor r_i (the upstream
gradient for reduction "none"; the scalar upstream gradient times 1/count for
"mean", times 1 for "sum"), is the tile

    dS_iv = r_i (g_iv - pS_iv G_i) / tau            (clipped entries: g_iv = 0)

and d(student_hidden) = dS @ W, d(weight) = dS^T @ h_S, d(bias) = column sums
of dS. The forward stored LSE_S, LSE_T and G per token (O(N)), so a tile of dS
needs only the recomputed logit tiles (a dot over H).

Passes (float32 accumulation throughout):

- deterministic (default; bitwise reproducible run to run): the vocabulary is
  walked in slabs of at most ``cfg.scratch_bytes`` of gradient (and, for a 16-bit
  hidden state, the tokens in slices whose float32 dH accumulator takes at most
  half that). Per slab, ``_fused_grad_slab_kernel`` (one program per tile, grouped
  order) recomputes each logit tile ONCE and writes its dS into the slab; then
  library GEMMs (:mod:`opsd_kernels.gemm`) add ``dS @ W[slab]`` into dH and
  ``dS^T @ h_S`` into dW[slab] (and the column sums into db), slab after slab in
  a fixed order. The logits never leave the chip; their gradient passes through
  the bounded slab so that the two gradient GEMMs run at the library's rate,
  with K = slab width (dH) and K = token slice (dW) accumulated in registers
  instead of re-reading float32 accumulators once per tile.
  FLOPs: 4NHV recompute + 2NHV dH (+ 2NHV dW, trainable): 6NHV frozen, 8NHV
  trainable, the floor for a backward that keeps no logits.
  Reproducible bit for bit on one GPU model and software stack: the library
  GEMMs are cuBLAS's, so under ``torch.use_deterministic_algorithms(True)`` set
  ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` as for any CUDA matmul, and leave
  ``PYTORCH_TUNABLEOP_ENABLED`` off. For float32 inputs the GEMMs follow torch's
  float32 matmul precision (TF32 when the caller enables it), the recompute
  ``cfg.dot_precision``. float16: one power-of-two scale per slab (gemm.gradient_operand),
  so a token whose upstream factor is below ~2^-24 of the slice's largest loses
  relative precision (per-token factors of reduction "none" that differ that much).
- ``deterministic=False``: ``_fused_backward_kernel``, one program per tile
  (grouped order), recomputes the tile once and feeds dH and dW (and db)
  through float32 atomic adds: 6 / 8NHV, no slab; the summation order, hence the
  last bits, vary run to run. Skipped tiles save their GEMM work too, whereas the
  deterministic path skips only their recompute (4NHV x skipped fraction).

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

With a logit transform (DivergenceOptions' logit_scale / softcap) M_S, M_T and the
LSEs are those of the transformed logits (see fused_forward: the transform is
strictly increasing, so these are the transforms of the raw extremes and the
probability bound above holds as stated). The kernels write the gradient with
respect to the RAW logits x, dS_iv * dz/dx_iv with 0 < dz/dx = logit_scale
(1 - (z/softcap)^2) <= logit_scale: every bound below on a dropped entry, and so
on the dropped rows and columns, multiplies by logit_scale (the student's).

Clip modes: "token" excludes a clipped token from the backward like a masked one
(its gradient is exactly 0), and a token block with no token left is skipped at
any threshold. "entry_keep" gives a clipped entry the row's mu, which no tile
probability bounds: tiles that may hold a clipped entry (the terms pass's map; for
forward/reverse KL the clip test's tiles) are never skipped, so every dropped
entry is an unclipped one and the bounds below hold.

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
less than ``V (u / V) |r_i| / tau = u |r_i| / tau`` (times logit_scale with a
transform): half an ulp of the row's gradient scale (forward KL and JSD).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import gemm
from ..chunked import zero_masked_rows
from .configs import block_args
from .fused_forward import ForwardStats, block_extreme, device_programs, kernel_options
from .tiles import (
    INPUT_FLAGS,
    count_tile,
    gradient_operand,
    grouped_tile,
    recompute_grad_tile,
    token_block,
    vocab_block,
)

_BACKWARD_FLAGS = {
    **INPUT_FLAGS,
    "SKIP": lambda a: a["skip_ptr"] is not None,
    "SCALE16": lambda a: a["hs_ptr"].dtype == torch.float16,
}


@triton.heuristics({**INPUT_FLAGS, "SKIP": lambda a: a["skip_ptr"] is not None})
@triton.jit(do_not_specialize=["map_row0", "map_col0"])  # one compile for every slab
def _fused_grad_slab_kernel(
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
    mu_ptr,
    scale_ptr,
    skip_ptr,
    count_ptr,
    out_ptr,
    N,
    V,
    H,
    H_T,
    stride_hs,
    stride_ht,
    stride_w,
    stride_wt,
    stride_map,
    map_row0,
    map_col0,
    stride_out,
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
    ONE_PASS: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    KEEP: tl.constexpr,
    S_SOFTCAP: tl.constexpr,
    T_SOFTCAP: tl.constexpr,
    HAS_MASK: tl.constexpr,
    SKIP: tl.constexpr,
    COUNT: tl.constexpr,
    SHARED_W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_TBIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
):
    """One tile of the slab: recompute both logit tiles, write dS (0 where skipped).

    The skip and count maps are the whole (token blocks, vocabulary blocks) maps; the
    slab starts at block (map_row0, map_col0) of them."""
    nb, vb = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP)
    map_nb, map_vb = (nb + map_row0).to(tl.int64), vb + map_col0
    rows, in_range, row_ok = token_block(nb, N, mask_ptr, HAS_MASK, BLOCK_N)
    cols, col_ok = vocab_block(vb, V, BLOCK_V)
    out_ptrs = out_ptr + rows[:, None] * stride_out + cols[None, :]
    out_ok = in_range[:, None] & col_ok[None, :]
    compute = True
    if SKIP:
        compute = tl.load(skip_ptr + map_nb * stride_map + map_vb) == 0
        if not compute:  # the slab is reused: a skipped tile writes its zeros
            tl.store(out_ptrs, tl.zeros((BLOCK_N, BLOCK_V), dtype=out_ptr.dtype.element_ty), out_ok)
    if compute:
        count_tile(count_ptr, map_nb, map_vb, stride_map, COUNT)
        dS = recompute_grad_tile(
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
            KIND,
            HAS_CLIP,
            KEEP,
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
        tl.store(out_ptrs, dS.to(out_ptr.dtype.element_ty), mask=out_ok)


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
    mu_ptr,
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
    s_scale,
    s_cap,
    t_scale,
    t_cap,
    beta,
    log_beta,
    log_1m_beta,
    clip,
    KIND: tl.constexpr,
    ONE_PASS: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    KEEP: tl.constexpr,
    S_SOFTCAP: tl.constexpr,
    T_SOFTCAP: tl.constexpr,
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
        dS = recompute_grad_tile(
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
            KIND,
            HAS_CLIP,
            KEEP,
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
    Accumulation is always float32. Deterministic mode (:func:`_slab_backward`):
    extra memory is a gradient slab of about ``cfg.scratch_bytes`` plus, for a
    16-bit hidden state, a float32 dH accumulator of at most half that (a full-size
    (N, H) one when a 16-bit weight gradient is wanted: dW is then formed from a
    single token slice, each row rounded once).
    ``deterministic=False``: one kernel, full-size float32 buffers, atomic adds.
    ``tile_counts``: as in :func:`~opsd_kernels.triton.fused_forward.fused_forward`,
    key ``"backward"``: the tiles whose logits the backward recomputed.
    """
    cfg = stats.cfg
    N, H = hs.shape
    V = weight.shape[0]
    dev = hs.device
    n_blocks, n_vblocks = triton.cdiv(N, cfg.block_n), triton.cdiv(V, cfg.block_v)
    if stats.grad_mask is not None:  # clip_mode "token": clipped tokens get no gradient
        mask = stats.grad_mask
    skip = None
    if skip_threshold > 0:
        skip = skipped_tiles(stats, skip_threshold, mask)
        if stats.clipped_tiles is not None:  # "entry_keep": clipped entries' mu is not small
            skip &= ~stats.clipped_tiles
    if stats.grad_mask is not None:  # token blocks without a token that takes a gradient
        dead = block_extreme(mask.to(torch.float32), cfg.block_n, None, True) == 0
        dead = dead[:, None].expand(n_blocks, n_vblocks)
        skip = dead if skip is None else skip | dead
    if skip is not None:
        skip = skip.to(torch.uint8).contiguous()
    count = None
    if tile_counts is not None:
        count = torch.zeros(n_blocks, n_vblocks, dtype=torch.int32, device=dev)
        tile_counts["backward"] = count
    per_row = row_scale.numel() > 1
    common = dict(
        ht_ptr=ht,
        wt_ptr=teacher_weight,
        bt_ptr=teacher_bias if teacher_weight is not None else None,
        mask_ptr=None if mask is None else mask.view(torch.uint8),
        lse_s_ptr=stats.lse_s,
        lse_t_ptr=stats.lse_t,
        g_sum_ptr=stats.g_sum,
        mu_ptr=stats.mu,
        scale_ptr=row_scale,
        skip_ptr=skip,
        count_ptr=count,
        H=H,
        H_T=ht.shape[1],
        stride_hs=hs.stride(0),
        stride_ht=ht.stride(0),
        stride_w=weight.stride(0),
        stride_wt=0 if teacher_weight is None else teacher_weight.stride(0),
        stride_map=n_vblocks,
        scale_stride=1 if per_row else 0,
        GROUP=cfg.group,
        **kernel_options(opts),
        **{**block_args(cfg, hs.dtype), "num_stages": cfg.backward_stages or cfg.num_stages},
    )
    if not deterministic:
        return _one_pass_backward(
            hs, weight, bias, common, cfg, want_h, want_w, want_b, weight_grad_dtype
        )
    return _slab_backward(
        hs, weight, bias, teacher_bias, mask, common, cfg, want_h, want_w, want_b,
        weight_grad_dtype,
    )  # fmt: skip


def _slab_layout(N, H, V, cfg, slab_elem, want_w, weight_grad_dtype, dev):
    """``(token slice rows, slab width)`` of the deterministic backward, multiples of
    the block sizes.

    Token slices bound the float32 dH accumulator to half the scratch (and keep the
    slab's width from shrinking with N); they are used whenever dW can accumulate over
    them exactly: a float32 weight gradient, or none. The slab width fills the
    scratch, with at least enough tiles per slab launch to fill the device. Slices and
    scratch-sized slabs are evened out (:func:`even_split`), so the last launch is not a
    sliver that leaves the device idle.
    """
    BN, BV = cfg.block_n, cfg.block_v
    rows = N
    if (not want_w) or weight_grad_dtype == torch.float32:
        rows = even_split(N, max(BN, cfg.scratch_bytes // 2 // (4 * H) // BN * BN), BN)
    width = even_split(V, max(BV, cfg.scratch_bytes // (slab_elem * rows) // BV * BV), BV)
    width = max(width, triton.cdiv(device_programs(dev), triton.cdiv(rows, BN)) * BV)
    return rows, min(width, triton.cdiv(V, BV) * BV)


def even_split(total: int, most: int, multiple: int) -> int:
    """The piece size, a multiple of ``multiple`` and at most ``max(most, multiple)``,
    that covers ``total`` in as few pieces as ``most`` allows, as evenly as possible.

    >>> even_split(8192, 1600, 64), even_split(151936, 11904, 128), even_split(10, 64, 16)
    (1408, 11776, 16)
    """
    pieces = triton.cdiv(total, max(most, multiple))
    return triton.cdiv(triton.cdiv(total, pieces), multiple) * multiple


def _slab_backward(
    hs, weight, bias, teacher_bias, mask, common, cfg, want_h, want_w, want_b, weight_grad_dtype
):
    """Deterministic backward: per (token slice, vocabulary slab), one recompute of
    every tile writes the slab's dS; library GEMMs add it into dH, dW and db in a
    fixed order (module docstring)."""
    N, H = hs.shape
    V = weight.shape[0]
    dev, f32 = hs.device, torch.float32
    BN, BV = cfg.block_n, cfg.block_v
    # dS goes to the GEMMs as an operand of the inputs' dtype: written so directly,
    # except float16 (a slab-wide power-of-two scale first, gemm.gradient_operand)
    # and a wanted bias gradient (float32 column sums)
    slab_dtype = f32 if (hs.dtype == torch.float16 or want_b) else hs.dtype
    slab_elem = torch.finfo(slab_dtype).bits // 8
    rows, width = _slab_layout(N, H, V, cfg, slab_elem, want_w, weight_grad_dtype, dev)
    slab = torch.empty(rows, width, dtype=slab_dtype, device=dev)
    direct_h = hs.dtype == f32  # accumulate dH in the float32 gradient itself
    grad_h = None
    if want_h:
        grad_h = (torch.zeros if direct_h else torch.empty)(N, H, dtype=hs.dtype, device=dev)
    acc_h = None if (not want_h or direct_h) else torch.empty(rows, H, dtype=f32, device=dev)
    grad_w = torch.zeros(V, H, dtype=weight_grad_dtype, device=dev) if want_w else None
    grad_b = torch.zeros(V, dtype=f32, device=dev) if want_b else None
    # float32 products of 16-bit CUDA operands land in one reused buffer of a token
    # slice's dH size (dW in row blocks of that size) where the GEMM cannot add them in
    # place: float16 (a scale to divide out), a 16-bit weight gradient, or torch < 2.10
    buf = None
    if (
        hs.is_cuda
        and hs.dtype != f32
        and (
            hs.dtype == torch.float16
            or (want_w and weight_grad_dtype != f32)
            or not gemm.adds_in_place(hs)
        )
    ):
        buf = torch.empty(rows, H, dtype=f32, device=dev)
    keep = ("ht_ptr", "skip_ptr", "count_ptr")
    kernel_args = {k: v for k, v in common.items() if not k.endswith("_ptr") or k in keep}
    teacher_weight = common["wt_ptr"]
    for lo in range(0, N, rows):
        hi = min(N, lo + rows)
        ts = slice(lo, hi)
        mask_c = None if mask is None else mask[ts]
        # masked rows of dS are 0, but their hidden states may hold NaN (padding):
        # 0 * NaN would reach dW through the GEMM
        x = zero_masked_rows(hs[ts], mask_c) if want_w else None
        dh = None
        if want_h:
            dh = grad_h[ts] if direct_h else acc_h[: hi - lo].zero_()
        for v0 in range(0, V, width):
            v1 = min(V, v0 + width)
            vs = slice(v0, v1)
            out = slab[: hi - lo, : v1 - v0]
            grid = (triton.cdiv(hi - lo, BN) * triton.cdiv(v1 - v0, BV),)
            _fused_grad_slab_kernel[grid](
                hs_ptr=hs[ts],
                w_ptr=weight[vs],
                b_ptr=None if bias is None else bias[vs],
                **{
                    **kernel_args,
                    "ht_ptr": common["ht_ptr"][ts],
                    "wt_ptr": None if teacher_weight is None else teacher_weight[vs],
                    "bt_ptr": None if common["bt_ptr"] is None else teacher_bias[vs],
                },
                mask_ptr=None if mask_c is None else common["mask_ptr"][ts],
                lse_s_ptr=common["lse_s_ptr"][ts],
                lse_t_ptr=common["lse_t_ptr"][ts],
                g_sum_ptr=common["g_sum_ptr"][ts],
                mu_ptr=None if common["mu_ptr"] is None else common["mu_ptr"][ts],
                scale_ptr=common["scale_ptr"][ts]
                if common["scale_stride"]
                else common["scale_ptr"],
                map_row0=lo // BN,
                map_col0=v0 // BV,
                out_ptr=out,
                N=hi - lo,
                V=v1 - v0,
                stride_out=out.stride(0),
            )
            if want_b:
                grad_b[vs] += out.sum(0)
            op, inv = gemm.gradient_operand(out, hs.dtype, in_place=True)
            if want_h:
                gemm.add_product(dh, op, weight[vs], inv, _rows_of(buf, hi - lo))
            if want_w:
                step = v1 - v0 if buf is None else rows
                for u0 in range(0, v1 - v0, step):
                    u1 = min(v1 - v0, u0 + step)
                    w_rows, op_t = grad_w[v0 + u0 : v0 + u1], op[:, u0:u1].t()
                    part = _rows_of(buf, u1 - u0)
                    if w_rows.dtype == f32:
                        gemm.add_product(w_rows, op_t, x, inv, part)
                    else:  # one token slice (see _slab_layout): each row written once
                        w_rows.copy_(gemm.product(op_t, x, f32, inv, part))
        if want_h and not direct_h:
            grad_h[ts].copy_(dh)
    return grad_h, grad_w, grad_b


def _rows_of(buf: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if buf is None else buf[:n]


def _one_pass_backward(hs, weight, bias, common, cfg, want_h, want_w, want_b, weight_grad_dtype):
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
        dh_ptr=dh,
        dw_ptr=dw,
        db_ptr=db,
        N=N,
        V=V,
        stride_dh=H,
        stride_dw=H,
        **common,
    )
    return (
        None if dh is None else dh.to(hs.dtype),
        None if dw is None else dw.to(weight_grad_dtype),
        db,
    )
