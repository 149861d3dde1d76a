"""Triton kernels: the fused forward, logits only ever as (token block x vocab block) tiles.

Derivation (formula sheet: opsd_kernels/divergences.py). Per token i, with
b = s/tau, a = t/tau and s = h_S W^T + bias, t = h_T W_T^T + bias_T:

    L_i = sum_v c(phi_iv),     dL_i/ds_iv = (g_iv - pS_iv * G_i) / tau,   G_i = sum_v g_iv

One program owns a block of BLOCK_N tokens and a contiguous range of vocabulary
blocks (one "split"; several splits per token block keep the GPU busy when
N / BLOCK_N is small). Each (BLOCK_N x BLOCK_V) tile of both logits is formed
by ``tl.dot`` over the hidden size in BLOCK_K steps; with a shared lm_head each
W tile is loaded once and serves the student and the teacher dot. A tile
never leaves the chip: it is reduced at once into per-token running statistics.

Passes:
- stats pass (always): per token and split the online max and sum-exp of both
  logits, and for the one-pass kinds (forward/reverse KL without clip) the
  weighted sum, e.g. forward KL w = sum_v e^(a - m_T) (a - b), so that
  L = w / z_T - LSE_T + LSE_S (G = -1 forward, G = L + 1 reverse). It also
  records each tile's maximum scaled logit of both sides over its counted
  tokens (the backward's skip bound). The splits' partial statistics are
  merged on the host side of the launcher, in torch (O(N * splits) values).
- terms pass (jsd or clip): tiles recomputed; with the LSEs known it forms
  phi, the clip, and per token the partial sums of c(phi) (the loss) and g (G).

Global memory beyond the inputs: O(N * splits) statistics and
(N / BLOCK_N) x (V / BLOCK_V) tile maxima per side.

Masked tokens (HAS_MASK, mask 0) load their hidden state as zeros, so nothing
they hold (NaN padding included) reaches an output; their loss is 0, they do
not count in the tile maxima, and the backward gives them a zero gradient.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..divergences import KindSpec
from .formulas import (
    divergence_terms,
    online_logsumexp_update_rows,
    rescale_sum,
    weighted_log_ratio,
)


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
def logit_tiles(
    hs_ptr, ht_ptr, w_ptr, wt_ptr, b_ptr, bt_ptr,
    rows, row_ok, cols, col_ok,
    H, H_T, stride_hs, stride_ht, stride_w, stride_wt, inv_temp,
    SHARED_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TBIAS: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Scaled student and teacher logit tiles ``(b, a)``, (BLOCK_N, BLOCK_V) float32.

    ``rows``/``cols`` are int64 token and vocabulary indices; rows with
    ``row_ok`` False read zero hidden states, columns outside the vocabulary
    (``col_ok`` False) are -inf. ``UPCAST`` converts operands to float32 before
    the dot (the interpreter's bf16 dot is wrong).
    """
    ks = tl.arange(0, BLOCK_K)
    acc_s = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        k_ok = k < H
        # W^T tile (BLOCK_K, BLOCK_V): shared by the student and (if SHARED_W) the teacher
        w = tl.load(w_ptr + cols[None, :] * stride_w + k[:, None],
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        x = tl.load(hs_ptr + rows[:, None] * stride_hs + k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            w = w.to(tl.float32)
            x = x.to(tl.float32)
        acc_s = tl.dot(x, w, acc_s, input_precision=DOT_PRECISION)
        if SHARED_W:
            y = tl.load(ht_ptr + rows[:, None] * stride_ht + k[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                y = y.to(tl.float32)
            acc_t = tl.dot(y, w, acc_t, input_precision=DOT_PRECISION)
    if not SHARED_W:
        for k0 in range(0, H_T, BLOCK_K):
            k = k0 + ks
            k_ok = k < H_T
            wt = tl.load(wt_ptr + cols[None, :] * stride_wt + k[:, None],
                         mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            y = tl.load(ht_ptr + rows[:, None] * stride_ht + k[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
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
    b = tl.where(col_ok[None, :], acc_s * inv_temp, float("-inf"))
    a = tl.where(col_ok[None, :], acc_t * inv_temp, float("-inf"))
    return b, a


@triton.jit
def _fused_stats_kernel(
    hs_ptr, ht_ptr, w_ptr, wt_ptr, b_ptr, bt_ptr, mask_ptr,
    m_s_ptr, z_s_ptr, m_t_ptr, z_t_ptr, w_sum_ptr, tmax_s_ptr, tmax_t_ptr,
    N, V, H, H_T, stride_hs, stride_ht, stride_w, stride_wt, stride_tmax,
    blocks_per_split, inv_temp,
    KIND: tl.constexpr, ONE_PASS: tl.constexpr, HAS_MASK: tl.constexpr,
    SHARED_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TBIAS: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows, _, row_ok = token_block(pid_n, N, mask_ptr, HAS_MASK, BLOCK_N)
    n_vblocks = tl.cdiv(V, BLOCK_V)
    vb_lo = split * blocks_per_split
    vb_hi = tl.minimum(vb_lo + blocks_per_split, n_vblocks)

    m_s = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    m_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    z_s = tl.zeros((BLOCK_N,), tl.float32)
    z_t = tl.zeros((BLOCK_N,), tl.float32)
    w = tl.zeros((BLOCK_N,), tl.float32)
    for vb in range(vb_lo, vb_hi):
        cols = (vb * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_ok = cols < V
        b, a = logit_tiles(hs_ptr, ht_ptr, w_ptr, wt_ptr, b_ptr, bt_ptr, rows, row_ok, cols,
                           col_ok, H, H_T, stride_hs, stride_ht, stride_w, stride_wt, inv_temp,
                           SHARED_W, HAS_BIAS, HAS_TBIAS, UPCAST, DOT_PRECISION,
                           BLOCK_N, BLOCK_V, BLOCK_K)
        m_s, z_s, rescale_s, shift_s = online_logsumexp_update_rows(m_s, z_s, b)
        m_t, z_t, rescale_t, shift_t = online_logsumexp_update_rows(m_t, z_t, a)
        if ONE_PASS:
            if KIND == 0:
                p = tl.exp(a - shift_t[:, None])
                w = rescale_sum(w, rescale_t) + tl.sum(weighted_log_ratio(p, a, b), axis=1)
            else:
                p = tl.exp(b - shift_s[:, None])
                w = rescale_sum(w, rescale_s) + tl.sum(weighted_log_ratio(p, b, a), axis=1)
        # the tile's largest scaled logit over its counted tokens: the backward's skip bound
        tile_s = tl.max(tl.max(tl.where(row_ok[:, None], b, float("-inf")), axis=1), axis=0)
        tile_t = tl.max(tl.max(tl.where(row_ok[:, None], a, float("-inf")), axis=1), axis=0)
        tl.store(tmax_s_ptr + pid_n * stride_tmax + vb, tile_s)
        tl.store(tmax_t_ptr + pid_n * stride_tmax + vb, tile_t)
    out = split.to(tl.int64) * N + rows
    in_range = rows < N
    tl.store(m_s_ptr + out, m_s, mask=in_range)
    tl.store(z_s_ptr + out, z_s, mask=in_range)
    tl.store(m_t_ptr + out, m_t, mask=in_range)
    tl.store(z_t_ptr + out, z_t, mask=in_range)
    if ONE_PASS:
        tl.store(w_sum_ptr + out, w, mask=in_range)


@triton.jit
def _fused_terms_kernel(
    hs_ptr, ht_ptr, w_ptr, wt_ptr, b_ptr, bt_ptr, mask_ptr,
    lse_s_ptr, lse_t_ptr, loss_ptr, g_sum_ptr,
    N, V, H, H_T, stride_hs, stride_ht, stride_w, stride_wt,
    blocks_per_split, inv_temp, beta, log_beta, log_1m_beta, clip,
    KIND: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_MASK: tl.constexpr,
    SHARED_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TBIAS: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows, in_range, row_ok = token_block(pid_n, N, mask_ptr, HAS_MASK, BLOCK_N)
    lse_s = tl.load(lse_s_ptr + rows, mask=in_range, other=0.0)
    lse_t = tl.load(lse_t_ptr + rows, mask=in_range, other=0.0)
    n_vblocks = tl.cdiv(V, BLOCK_V)
    vb_lo = split * blocks_per_split
    vb_hi = tl.minimum(vb_lo + blocks_per_split, n_vblocks)
    loss = tl.zeros((BLOCK_N,), tl.float32)
    G = tl.zeros((BLOCK_N,), tl.float32)
    for vb in range(vb_lo, vb_hi):
        cols = (vb * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_ok = cols < V
        b, a = logit_tiles(hs_ptr, ht_ptr, w_ptr, wt_ptr, b_ptr, bt_ptr, rows, row_ok, cols,
                           col_ok, H, H_T, stride_hs, stride_ht, stride_w, stride_wt, inv_temp,
                           SHARED_W, HAS_BIAS, HAS_TBIAS, UPCAST, DOT_PRECISION,
                           BLOCK_N, BLOCK_V, BLOCK_K)
        lS = b - lse_s[:, None]
        lT = a - lse_t[:, None]
        phi, g, h = divergence_terms(lT, lS, tl.exp(lT), tl.exp(lS), beta, log_beta,
                                     log_1m_beta, KIND)
        if HAS_CLIP:
            kept = phi < clip
            phi = tl.minimum(phi, clip)
            g = tl.where(kept, g, 0.0)
        loss += tl.sum(tl.where(col_ok[None, :], phi, 0.0), axis=1)
        G += tl.sum(tl.where(col_ok[None, :], g, 0.0), axis=1)
    out = split.to(tl.int64) * N + rows
    tl.store(loss_ptr + out, loss, mask=in_range)
    tl.store(g_sum_ptr + out, G, mask=in_range)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass
class FusedConfig:
    """Tile sizes and launch options of the fused kernels (see the README's tuning notes).

    ``splits``: vocabulary splits of the forward per token block; None picks
    enough programs to fill the device. ``dot_precision``: ``input_precision``
    of ``tl.dot`` for float32 operands ("ieee" exact, "tf32" faster on GPU);
    ignored for 16-bit operands. ``scratch_bytes``: bound on the backward's
    float32 accumulation buffers for 16-bit gradients (processed in slices).
    """

    block_n: int = 64
    block_v: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    splits: int | None = None
    dot_precision: str = "ieee"
    scratch_bytes: int = 32 * 2**20


#: defaults per device type; the interpreter uses small tiles (tl.dot needs each dim >= 16)
CONFIGS: dict[str, FusedConfig] = {
    "cuda": FusedConfig(),
    "cpu": FusedConfig(block_n=16, block_v=32, block_k=16, num_warps=4, num_stages=1,
                       splits=1),
}


def config_for(device: torch.device) -> FusedConfig:
    return CONFIGS["cuda" if device.type == "cuda" else "cpu"]


@dataclass
class ForwardStats:
    """What the backward needs from the forward: O(N) per token plus the tile maxima."""

    loss: torch.Tensor  # (N,) float32, 0 on masked tokens
    lse_s: torch.Tensor  # (N,) float32, log-sum-exp of the scaled student logits
    lse_t: torch.Tensor  # (N,) float32
    g_sum: torch.Tensor  # (N,) float32, G = sum_v g_v
    tmax_s: torch.Tensor  # (N / BLOCK_N, V / BLOCK_V) float32 tile maxima, scaled logits
    tmax_t: torch.Tensor


def kernel_flags(dtype: torch.dtype, cfg: FusedConfig) -> dict:
    upcast = interpreting() and dtype == torch.bfloat16
    return dict(UPCAST=upcast, DOT_PRECISION=cfg.dot_precision)


def _rescale_sum(w: torch.Tensor, log_factor: torch.Tensor) -> torch.Tensor:
    """Torch twin of ``formulas.rescale_sum``: ``w * exp(log_factor)``, +inf kept."""
    return torch.where(w == float("inf"), w, w * torch.exp(log_factor))


def _merge_lse(m: torch.Tensor, z: torch.Tensor):
    """Merge per-split (max, sum-exp) rows (S, N) into (lse (N,), shift (N,))."""
    top = m.max(0).values
    shift = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    z_tot = (z * torch.exp(m - shift)).sum(0)
    return shift + torch.log(z_tot), shift, z_tot


def fused_forward(
    hs: torch.Tensor, ht: torch.Tensor, weight: torch.Tensor,
    teacher_weight: torch.Tensor | None, bias: torch.Tensor | None,
    teacher_bias: torch.Tensor | None, mask: torch.Tensor | None, *,
    spec: KindSpec, beta: float, temperature: float, clip: float | None,
    cfg: FusedConfig | None = None,
) -> ForwardStats:
    """Launch the fused forward on (N, H) / (N, H_T) hidden states; see the module docstring.

    Hidden states and weights must be contiguous in their last dimension.
    """
    cfg = cfg or config_for(hs.device)
    N, H = hs.shape
    V = weight.shape[0]
    H_T = ht.shape[1]
    dev = hs.device
    BN, BV = cfg.block_n, cfg.block_v
    n_blocks = triton.cdiv(N, BN)
    n_vblocks = triton.cdiv(V, BV)
    if cfg.splits is not None:
        splits = cfg.splits
    elif dev.type == "cuda":
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        splits = triton.cdiv(2 * sms, max(n_blocks, 1))
    else:
        splits = 1
    splits = max(1, min(splits, n_vblocks))
    per_split = triton.cdiv(n_vblocks, splits)
    splits = triton.cdiv(n_vblocks, per_split)  # no empty split

    one_pass = spec.one_pass and clip is None
    f32 = dict(dtype=torch.float32, device=dev)
    m_s, z_s, m_t, z_t = (torch.empty(splits, N, **f32) for _ in range(4))
    w_sum = torch.empty(splits, N, **f32) if one_pass else m_s
    tmax_s = torch.empty(n_blocks, n_vblocks, **f32)
    tmax_t = torch.empty(n_blocks, n_vblocks, **f32)
    shared = teacher_weight is None
    wt = weight if shared else teacher_weight
    mask_arg = mask.view(torch.uint8) if mask is not None else m_s
    b_arg = bias if bias is not None else m_s
    bt_arg = teacher_bias if teacher_bias is not None else m_s
    common = dict(
        SHARED_W=shared, HAS_BIAS=bias is not None,
        HAS_TBIAS=(not shared) and teacher_bias is not None, HAS_MASK=mask is not None,
        BLOCK_N=BN, BLOCK_V=BV, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **kernel_flags(hs.dtype, cfg),
    )
    grid = (n_blocks, splits)
    _fused_stats_kernel[grid](
        hs, ht, weight, wt, b_arg, bt_arg, mask_arg,
        m_s, z_s, m_t, z_t, w_sum, tmax_s, tmax_t,
        N, V, H, H_T, hs.stride(0), ht.stride(0), weight.stride(0), wt.stride(0),
        tmax_s.stride(0), per_split, 1.0 / temperature,
        KIND=spec.kind_id, ONE_PASS=one_pass, **common,
    )
    lse_s, shift_s, zs_tot = _merge_lse(m_s, z_s)
    lse_t, shift_t, zt_tot = _merge_lse(m_t, z_t)
    if one_pass:
        if spec.kind_id == 0:  # forward KL: w weighted by e^(a - m_T)
            w_tot = _rescale_sum(w_sum, m_t - shift_t).sum(0)
            loss = w_tot / zt_tot - lse_t + lse_s
            g_sum = torch.full_like(loss, -1.0)
        else:  # reverse KL: w weighted by e^(b - m_S)
            w_tot = _rescale_sum(w_sum, m_s - shift_s).sum(0)
            loss = w_tot / zs_tot - lse_s + lse_t
            g_sum = loss + 1.0
    else:
        b = beta if spec.needs_beta else 0.5  # keep the logs finite for the KL kinds
        part_loss = torch.empty(splits, N, **f32)
        part_g = torch.empty(splits, N, **f32)
        _fused_terms_kernel[grid](
            hs, ht, weight, wt, b_arg, bt_arg, mask_arg,
            lse_s, lse_t, part_loss, part_g,
            N, V, H, H_T, hs.stride(0), ht.stride(0), weight.stride(0), wt.stride(0),
            per_split, 1.0 / temperature, b, math.log(b), math.log1p(-b),
            clip if clip is not None else 0.0,
            KIND=spec.kind_id, HAS_CLIP=clip is not None, **common,
        )
        loss = part_loss.sum(0)
        g_sum = part_g.sum(0)
    if mask is not None:
        loss = torch.where(mask, loss, torch.zeros_like(loss))
    return ForwardStats(loss, lse_s, lse_t, g_sum, tmax_s, tmax_t)
