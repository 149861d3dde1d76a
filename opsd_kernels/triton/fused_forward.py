"""Triton kernels: the fused forward, logits only ever as (token block x vocab block) tiles.

Derivation (formula sheet: opsd_kernels/divergences.py). Per token i, with
b = s/tau, a = t/tau and s = h_S W^T + bias, t = h_T W_T^T + bias_T:

    L_i = sum_v c(phi_iv),     dL_i/ds_iv = (g_iv - pS_iv * G_i) / tau,   G_i = sum_v g_iv

One program owns a block of BLOCK_N tokens and a contiguous range of vocabulary
blocks (one "split"; several splits per token block keep the GPU busy when
N / BLOCK_N is small). Programs are launched in grouped order
(:func:`~opsd_kernels.triton.tiles.grouped_tile`): ``group`` token blocks walk
the splits side by side, so the hidden states that running programs re-read
stay in L2. Each tile of both logits is formed by ``tl.dot`` over H
(:func:`~opsd_kernels.triton.tiles.logit_tiles`); with a shared lm_head each W
tile serves the student and the teacher dot. A tile never leaves the chip.

Passes:
- stats pass (always, every tile): per token and split the online max and
  sum-exp of both logits, and for the one-pass kinds (forward/reverse KL) the
  weighted sum, e.g. forward KL w = sum_v e^(a - m_T) (a - b), so that the
  unclipped loss is L^u = w / z_T - LSE_T + LSE_S (G^u = -1 forward, L^u + 1
  reverse). Per tile it records, over the tile's counted tokens, the largest
  scaled logit of both sides (the backward's skip bound) and, with a clip, the
  smallest (the clip bound below). Splits are merged in torch (O(N * splits)).
- terms pass: tiles recomputed; with the LSEs known it forms phi, the clip, and
  per token the partial sums of c(phi) (the loss) and of the kept g (G).
  * jsd: every tile (its loss needs the LSEs).
  * forward/reverse KL with clip: only the tiles where some phi could reach the
    clip (an exact test, below); the pass then returns the corrections
    ``sum (c(phi) - phi)`` and ``sum (g kept - g)``, and
    ``L = L^u + correction``, ``G = G^u + correction``.
  * forward/reverse KL without clip: no terms pass (4NHV in all).

Exact clip test (forward KL; reverse KL swaps the roles of S and T). For entry
(i, v) of a tile with largest teacher logit A and smallest student logit B
over its counted tokens, and the token block's smallest LSE_T and largest LSE_S:

    lT_iv <= uT := min(0, A - min LSE_T),     lS_iv >= wS := B - max LSE_S,
    phi_iv = e^lT (lT - lS) <= e^lT (lT - wS) <= max(0, e^uT (uT - wS)),

the last step because x -> e^x (x - wS) increases for x > wS - 1 and is negative
below. If that bound is below the clip (with a 1e-3 relative margin for float32
rounding), no entry of the tile is clipped, c(phi) = phi there, and the tile's
share of L^u and G^u is already exact: the tile is not recomputed. A row whose
L^u is not finite (an infinite KL, NaN input) makes its whole token block
recomputed and takes its loss and G from the terms pass alone.

Global memory beyond the inputs: O(N * splits) statistics and
(N / BLOCK_N) x (V / BLOCK_V) tile maxima per side (and minima with a clip).

Masked tokens (mask 0) load their hidden state as zeros, so nothing they hold
(NaN padding included) reaches an output; their loss is 0, they do not count in
the tile extrema, and the backward gives them a zero gradient.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._validation import DivergenceOptions
from .configs import FusedConfig, block_args, config_for, option_args
from .formulas import online_logsumexp_update_rows, rescale_sum, weighted_log_ratio
from .tiles import (
    INPUT_FLAGS,
    clipped_terms,
    count_tile,
    grouped_tile,
    logit_tiles,
    token_block,
    vocab_block,
)

#: relative margin of the exact clip test against float32 rounding of the bound
CLIP_TEST_MARGIN = 1e-3


@triton.heuristics({**INPUT_FLAGS, "TILE_MIN": lambda a: a["tmin_s_ptr"] is not None})
@triton.jit
def _fused_stats_kernel(
    hs_ptr,
    ht_ptr,
    w_ptr,
    wt_ptr,
    b_ptr,
    bt_ptr,
    mask_ptr,
    m_s_ptr,
    z_s_ptr,
    m_t_ptr,
    z_t_ptr,
    w_sum_ptr,
    tmax_s_ptr,
    tmax_t_ptr,
    tmin_s_ptr,
    tmin_t_ptr,
    count_ptr,
    N,
    V,
    H,
    H_T,
    stride_hs,
    stride_ht,
    stride_w,
    stride_wt,
    n_blocks,
    n_splits,
    blocks_per_split,
    inv_temp,
    beta,
    log_beta,
    log_1m_beta,
    clip,
    KIND: tl.constexpr,
    ONE_PASS: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    HAS_MASK: tl.constexpr,
    SHARED_W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_TBIAS: tl.constexpr,
    TILE_MIN: tl.constexpr,
    COUNT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
):
    pid_n, split = grouped_tile(tl.program_id(0), n_blocks, n_splits, GROUP)
    rows, in_range, row_ok = token_block(pid_n, N, mask_ptr, HAS_MASK, BLOCK_N)
    n_vblocks = tl.cdiv(V, BLOCK_V)
    vb_lo = split * blocks_per_split
    vb_hi = tl.minimum(vb_lo + blocks_per_split, n_vblocks)

    m_s = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    m_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    z_s = tl.zeros((BLOCK_N,), tl.float32)
    z_t = tl.zeros((BLOCK_N,), tl.float32)
    w = tl.zeros((BLOCK_N,), tl.float32)
    tile_out = pid_n.to(tl.int64) * n_vblocks
    for vb in range(vb_lo, vb_hi):
        count_tile(count_ptr, pid_n, vb, n_vblocks, COUNT)
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
        m_s, z_s, rescale_s, shift_s = online_logsumexp_update_rows(m_s, z_s, b)
        m_t, z_t, rescale_t, shift_t = online_logsumexp_update_rows(m_t, z_t, a)
        if ONE_PASS:
            if KIND == 0:
                p = tl.exp(a - shift_t[:, None])
                w = rescale_sum(w, rescale_t) + tl.sum(weighted_log_ratio(p, a, b), axis=1)
            else:
                p = tl.exp(b - shift_s[:, None])
                w = rescale_sum(w, rescale_s) + tl.sum(weighted_log_ratio(p, b, a), axis=1)
        # the tile's extreme scaled logits over its counted tokens: skip and clip bounds
        counted = row_ok[:, None]
        tl.store(
            tmax_s_ptr + tile_out + vb,
            tl.max(tl.max(tl.where(counted, b, float("-inf")), axis=1), axis=0),
        )
        tl.store(
            tmax_t_ptr + tile_out + vb,
            tl.max(tl.max(tl.where(counted, a, float("-inf")), axis=1), axis=0),
        )
        if TILE_MIN:
            inside = counted & col_ok[None, :]
            tl.store(
                tmin_s_ptr + tile_out + vb,
                tl.min(tl.min(tl.where(inside, b, float("inf")), axis=1), axis=0),
            )
            tl.store(
                tmin_t_ptr + tile_out + vb,
                tl.min(tl.min(tl.where(inside, a, float("inf")), axis=1), axis=0),
            )
    out = split.to(tl.int64) * N + rows
    tl.store(m_s_ptr + out, m_s, mask=in_range)
    tl.store(z_s_ptr + out, z_s, mask=in_range)
    tl.store(m_t_ptr + out, m_t, mask=in_range)
    tl.store(z_t_ptr + out, z_t, mask=in_range)
    if ONE_PASS:
        tl.store(w_sum_ptr + out, w, mask=in_range)


@triton.heuristics(
    {
        **INPUT_FLAGS,
        "HAS_TODO": lambda a: a["todo_ptr"] is not None,
        "HAS_CORR": lambda a: a["corr_ptr"] is not None,
    }
)
@triton.jit
def _fused_terms_kernel(
    hs_ptr,
    ht_ptr,
    w_ptr,
    wt_ptr,
    b_ptr,
    bt_ptr,
    mask_ptr,
    lse_s_ptr,
    lse_t_ptr,
    loss_ptr,
    g_sum_ptr,
    corr_ptr,
    g_corr_ptr,
    todo_ptr,
    count_ptr,
    N,
    V,
    H,
    H_T,
    stride_hs,
    stride_ht,
    stride_w,
    stride_wt,
    n_blocks,
    n_splits,
    blocks_per_split,
    inv_temp,
    beta,
    log_beta,
    log_1m_beta,
    clip,
    KIND: tl.constexpr,
    ONE_PASS: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    HAS_MASK: tl.constexpr,
    SHARED_W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_TBIAS: tl.constexpr,
    HAS_TODO: tl.constexpr,
    HAS_CORR: tl.constexpr,
    COUNT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
):
    pid_n, split = grouped_tile(tl.program_id(0), n_blocks, n_splits, GROUP)
    rows, in_range, row_ok = token_block(pid_n, N, mask_ptr, HAS_MASK, BLOCK_N)
    lse_s = tl.load(lse_s_ptr + rows, mask=in_range, other=0.0)
    lse_t = tl.load(lse_t_ptr + rows, mask=in_range, other=0.0)
    n_vblocks = tl.cdiv(V, BLOCK_V)
    vb_lo = split * blocks_per_split
    vb_hi = tl.minimum(vb_lo + blocks_per_split, n_vblocks)
    loss = tl.zeros((BLOCK_N,), tl.float32)
    G = tl.zeros((BLOCK_N,), tl.float32)
    corr = tl.zeros((BLOCK_N,), tl.float32)
    g_corr = tl.zeros((BLOCK_N,), tl.float32)
    for vb in range(vb_lo, vb_hi):
        compute = True
        if HAS_TODO:
            compute = tl.load(todo_ptr + pid_n.to(tl.int64) * n_vblocks + vb) != 0
        if compute:
            count_tile(count_ptr, pid_n, vb, n_vblocks, COUNT)
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
            phi, c_phi, g, g_all, pS = clipped_terms(
                b, a, lse_s, lse_t, beta, log_beta, log_1m_beta, clip, KIND, HAS_CLIP
            )
            inside = col_ok[None, :]
            loss += tl.sum(tl.where(inside, c_phi, 0.0), axis=1)
            G += tl.sum(tl.where(inside, g, 0.0), axis=1)
            if HAS_CORR:
                # only clipped entries (phi >= clip, as in the g kept) differ
                clipped = inside & ~(phi < clip)
                corr += tl.sum(tl.where(clipped, c_phi - phi, 0.0), axis=1)
                g_corr += tl.sum(tl.where(clipped, g - g_all, 0.0), axis=1)
    out = split.to(tl.int64) * N + rows
    tl.store(loss_ptr + out, loss, mask=in_range)
    tl.store(g_sum_ptr + out, G, mask=in_range)
    if HAS_CORR:
        tl.store(corr_ptr + out, corr, mask=in_range)
        tl.store(g_corr_ptr + out, g_corr, mask=in_range)


@dataclass
class ForwardStats:
    """What the backward needs from the forward: O(N) per token plus the tile maxima."""

    loss: torch.Tensor  # (N,) float32, 0 on masked tokens
    lse_s: torch.Tensor  # (N,) float32, log-sum-exp of the scaled student logits
    lse_t: torch.Tensor  # (N,) float32
    g_sum: torch.Tensor  # (N,) float32, G = sum_v g_v (kept entries)
    tmax_s: torch.Tensor  # (N / BLOCK_N, V / BLOCK_V) float32 tile maxima, scaled logits
    tmax_t: torch.Tensor
    cfg: FusedConfig  # the tile sizes these maps use; the backward uses the same


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_programs(device: torch.device) -> int:
    """Programs that fill ``device`` twice over (2 per SM on CUDA; 1 elsewhere)."""
    if device.type == "cuda":
        return 2 * _sm_count(
            device.index if device.index is not None else torch.cuda.current_device()
        )
    return 1


def _rescale_sum(w: torch.Tensor, log_factor: torch.Tensor) -> torch.Tensor:
    """Torch twin of ``formulas.rescale_sum``: ``w * exp(log_factor)``, +inf kept."""
    return torch.where(w == float("inf"), w, w * torch.exp(log_factor))


def _merge_lse(m: torch.Tensor, z: torch.Tensor):
    """Merge per-split (max, sum-exp) rows (S, N) into (lse (N,), shift (N,), sum (N,))."""
    top = m.max(0).values
    shift = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    z_tot = (z * torch.exp(m - shift)).sum(0)
    return shift + torch.log(z_tot), shift, z_tot


def block_extreme(
    x: torch.Tensor, block_n: int, mask: torch.Tensor | None, largest: bool
) -> torch.Tensor:
    """Per token block of ``block_n`` rows, the max (``largest``) or min of ``x`` (N,)
    over the counted rows; -inf / +inf for a block without counted rows. NaN stays NaN."""
    fill = -torch.inf if largest else torch.inf
    if mask is not None:
        x = torch.where(mask, x, torch.full_like(x, fill))
    x = torch.nn.functional.pad(x, (0, (-x.shape[0]) % block_n), value=fill).view(-1, block_n)
    return x.amax(1) if largest else x.amin(1)


def clip_tiles(
    kind_id: int,
    clip: float,
    lse_s,
    lse_t,
    tmax_s,
    tmax_t,
    tmin_s,
    tmin_t,
    block_n: int,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """(token blocks, vocab blocks) bool: the tiles where some phi could reach ``clip``
    (the exact test of the module docstring; forward KL ``kind_id`` 0, reverse KL 1)."""
    if kind_id == 1:  # reverse KL: phi = pS (lS - lT): the student's bound, teacher's floor
        lse_s, lse_t, tmax_s, tmax_t, tmin_s, tmin_t = (
            lse_t,
            lse_s,
            tmax_t,
            tmax_s,
            tmin_t,
            tmin_s,
        )
    u = torch.clamp(tmax_t - block_extreme(lse_t, block_n, mask, False)[:, None], max=0.0)
    w = tmin_s - block_extreme(lse_s, block_n, mask, True)[:, None]
    bound = torch.exp(u) * torch.clamp(u - w, min=0.0)
    return ~(bound * (1.0 + CLIP_TEST_MARGIN) < clip)  # NaN (inf * 0): recompute


def _splits(cfg: FusedConfig, device: torch.device, n_blocks: int, n_vblocks: int):
    splits = (
        cfg.splits
        if cfg.splits is not None
        else triton.cdiv(device_programs(device), max(n_blocks, 1))
    )
    splits = max(1, min(splits, n_vblocks))
    per_split = triton.cdiv(n_vblocks, splits)
    return triton.cdiv(n_vblocks, per_split), per_split  # no empty split


def fused_forward(
    hs: torch.Tensor,
    ht: torch.Tensor,
    weight: torch.Tensor,
    teacher_weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    opts: DivergenceOptions,
    cfg: FusedConfig | None = None,
    tile_counts: dict | None = None,
) -> ForwardStats:
    """Launch the fused forward on (N, H) / (N, H_T) hidden states; see the module docstring.

    Hidden states and weights must be contiguous in their last dimension; ``mask``
    is None or (N,) bool. ``cfg``: tile sizes (default: :func:`~.configs.config_for`).
    ``tile_counts``: a dict to receive, per pass (``"stats"``, ``"terms"``), an int32
    (token blocks, vocab blocks) tensor counting how often each tile was computed
    (a debug aid for tests; None in normal use).
    """
    N, H = hs.shape
    V = weight.shape[0]
    dev = hs.device
    cfg = cfg or config_for(dev, H, hs.dtype)
    BN, BV = cfg.block_n, cfg.block_v
    n_blocks, n_vblocks = triton.cdiv(N, BN), triton.cdiv(V, BV)
    splits, per_split = _splits(cfg, dev, n_blocks, n_vblocks)
    spec, clip = opts.spec, opts.clip
    one_pass = spec.one_pass
    f32 = dict(dtype=torch.float32, device=dev)
    tile_map = dict(size=(n_blocks, n_vblocks), **f32)

    def counter(name):
        if tile_counts is None:
            return None
        tile_counts[name] = torch.zeros(n_blocks, n_vblocks, dtype=torch.int32, device=dev)
        return tile_counts[name]

    m_s, z_s, m_t, z_t = (torch.empty(splits, N, **f32) for _ in range(4))
    w_sum = torch.empty(splits, N, **f32) if one_pass else None
    tmax_s, tmax_t = torch.empty(**tile_map), torch.empty(**tile_map)
    with_min = one_pass and clip is not None
    tmin_s = torch.empty(**tile_map) if with_min else None
    tmin_t = torch.empty(**tile_map) if with_min else None
    inputs = dict(
        hs_ptr=hs,
        ht_ptr=ht,
        w_ptr=weight,
        wt_ptr=teacher_weight,
        b_ptr=bias,
        bt_ptr=teacher_bias if teacher_weight is not None else None,
        mask_ptr=None if mask is None else mask.view(torch.uint8),
        N=N,
        V=V,
        H=H,
        H_T=ht.shape[1],
        stride_hs=hs.stride(0),
        stride_ht=ht.stride(0),
        stride_w=weight.stride(0),
        stride_wt=0 if teacher_weight is None else teacher_weight.stride(0),
        n_blocks=n_blocks,
        n_splits=splits,
        blocks_per_split=per_split,
        GROUP=cfg.group,
        **option_args(opts),
        **block_args(cfg, hs.dtype),
    )
    grid = (n_blocks * splits,)
    _fused_stats_kernel[grid](
        m_s_ptr=m_s,
        z_s_ptr=z_s,
        m_t_ptr=m_t,
        z_t_ptr=z_t,
        w_sum_ptr=w_sum,
        tmax_s_ptr=tmax_s,
        tmax_t_ptr=tmax_t,
        tmin_s_ptr=tmin_s,
        tmin_t_ptr=tmin_t,
        count_ptr=counter("stats"),
        **inputs,
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
    if not one_pass or clip is not None:
        todo = corr = g_corr = None
        if one_pass:  # clip: recompute only the tiles that may clip (exact test)
            todo = clip_tiles(
                spec.kind_id, clip, lse_s, lse_t, tmax_s, tmax_t, tmin_s, tmin_t, BN, mask
            )
            finite = torch.isfinite(loss)
            full_block = block_extreme((~finite).to(torch.float32), BN, mask, True) > 0
            todo = (todo | full_block[:, None]).to(torch.uint8)
            corr, g_corr = torch.empty(splits, N, **f32), torch.empty(splits, N, **f32)
        part_loss, part_g = torch.empty(splits, N, **f32), torch.empty(splits, N, **f32)
        _fused_terms_kernel[grid](
            lse_s_ptr=lse_s,
            lse_t_ptr=lse_t,
            loss_ptr=part_loss,
            g_sum_ptr=part_g,
            corr_ptr=corr,
            g_corr_ptr=g_corr,
            todo_ptr=todo,
            count_ptr=counter("terms"),
            **inputs,
        )
        if one_pass:
            loss = torch.where(finite, loss + corr.sum(0), part_loss.sum(0))
            g_sum = torch.where(finite, g_sum + g_corr.sum(0), part_g.sum(0))
        else:
            loss, g_sum = part_loss.sum(0), part_g.sum(0)
    elif tile_counts is not None:
        counter("terms")
    if mask is not None:
        loss = torch.where(mask, loss, torch.zeros_like(loss))
    return ForwardStats(loss, lse_s, lse_t, g_sum, tmax_s, tmax_t, cfg)
