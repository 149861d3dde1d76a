"""Triton kernels: the fused forward, logits only ever as (token block x vocab block) tiles.

Derivation (formula sheet: opsd_kernels/divergences.py). Per token i, with raw
logits x_S = h_S W^T + bias, x_T = h_T W_T^T + bias_T, each role's logit transform
(DivergenceOptions: s = softcap tanh(logit_scale x_S / softcap), or logit_scale x_S;
t likewise with the teacher's values) applied in float32 to each tile right after
the dot and bias, and b = s/tau, a = t/tau:

    L_i = sum_v c(phi_iv),     dL_i/ds_iv = (g_iv - pS_iv * G_i) / tau,   G_i = sum_v g_iv

and the backward chains dL/dx_S = ds/dx_S * dL/ds in float32 (0 < ds/dx <= logit_scale).

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

The logit transform and these bounds. Every recorded extreme (tile maxima and
minima, per-token LSEs) is taken of the TRANSFORMED scaled logits b, a themselves,
the very values the softmax and phi read, so the clip test above and the
backward's skip bound (fused_backward) hold as derived, word for word. Nothing is
lost by extremising after the transform: it is strictly increasing (d/dx of
c tanh(k x / c) is k (1 - tanh^2) > 0, of k x it is k > 0, with k, c > 0), so the
tile's largest (smallest) transformed logit is the transform of its largest
(smallest) raw logit, the same entry: the order of the entries, hence which entry
attains a tile's extreme, is unchanged, and the bounds are as tight as without a
transform.

clip_mode (DivergenceOptions):
- "entry": as above.
- "token": the kernels run without clip (no terms pass for forward/reverse KL);
  L_i = min(L^u_i, clip) in torch, and a clipped token (not L^u_i < clip) is
  excluded from the backward like a masked one (``ForwardStats.grad_mask``).
- "entry_keep": loss and G as "entry"; the backward writes
  mu_i = (sum_U pS g - G sum_U pS^2) / sum_U pS on clipped entries. The sums over
  the unclipped entries U come without an extra pass: jsd's terms pass visits every
  tile and sums U directly; for forward/reverse KL the stats pass also sums
  e^(2 (b - m_S)) and e^(b - m_S) e^(a - m_T) (forward) or e^(2 (b - m_S)) (b - a)
  (reverse) online, giving sum pS^2 and sum pS g over the whole vocabulary, and
  the terms pass sums pS, pS g, pS^2 over the clipped entries C of the tiles it
  recomputes (tiles the exact test clears hold no clipped entry): U = all - C
  (sum pS = 1). The subtraction costs float32 a factor (sum_v |pS g|) / sum_U pS in
  mu's relative accuracy (tests/test_fused_options.py checks the estimate).

Per-token statistics (``want_stats``; opsd_kernels.stats): the student entropy
log z_S - sum e^(b - M_S) (b - M_S) / z_S from one more online sum of the stats
pass; the clipped teacher mass, count and (from the largest clipped pT) the
teacher's top-1 from the terms pass (tiles it does not recompute hold no clipped
entry and contribute 0); "token": 1, V, 1 for a clipped token.

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
from ..stats import CLIPPED_ENTRIES, STUDENT_ENTROPY, TEACHER_CLIPPED_MASS, TEACHER_TOP1_CLIPPED
from .configs import FusedConfig, block_args, config_for, option_args, transform_args
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


@triton.heuristics(
    {
        **INPUT_FLAGS,
        "TILE_MIN": lambda a: a["tmin_s_ptr"] is not None,
        "STATS": lambda a: a["ent_ptr"] is not None,
        "KEEP_SUMS": lambda a: a["keep_sums_ptr"] is not None,
    }
)
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
    ent_ptr,
    keep_sums_ptr,
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
    SHARED_W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_TBIAS: tl.constexpr,
    TILE_MIN: tl.constexpr,
    STATS: tl.constexpr,
    KEEP_SUMS: tl.constexpr,
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
    ent = tl.zeros((BLOCK_N,), tl.float32)  # STATS: sum e^(b - m_S) (b - m_S)
    q2 = tl.zeros((BLOCK_N,), tl.float32)  # KEEP: sum e^(2 (b - m_S))
    x2 = tl.zeros((BLOCK_N,), tl.float32)  # KEEP: the kind's sum pS g, unnormalised
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
        m_s_old = m_s
        z_s_old = z_s
        m_s, z_s, rescale_s, shift_s = online_logsumexp_update_rows(m_s, z_s, b)
        m_t, z_t, rescale_t, shift_t = online_logsumexp_update_rows(m_t, z_t, a)
        # probabilities up to each row's factor (eliminated by the compiler where unused);
        # each tile temporary is read by consecutive sums and then dies (registers)
        p_s = tl.exp(b - shift_s[:, None])
        if ONE_PASS:
            if KIND == 0:
                p_t = tl.exp(a - shift_t[:, None])
                w = rescale_sum(w, rescale_t) + tl.sum(weighted_log_ratio(p_t, a, b), axis=1)
                if KEEP_SUMS:  # sum pS pT = sum e^(b - m_S) e^(a - m_T) / (z_S z_T)
                    x2 = x2 * (rescale_s * rescale_t) + tl.sum(p_s * p_t, axis=1)
            else:
                term = weighted_log_ratio(p_s, b, a)
                w = rescale_sum(w, rescale_s) + tl.sum(term, axis=1)
                if KEEP_SUMS:  # sum pS^2 (b - a) over finite a (+inf: a = -inf, left out)
                    x2 = x2 * (rescale_s * rescale_s) + tl.sum(
                        tl.where(term < float("inf"), p_s * term, 0.0), axis=1
                    )
        if STATS:
            # the student entropy: ent = sum e^(b - m) (b - m) follows the running max m
            # as e^(b - m') (b - m') = e^(m - m') e^(b - m) ((b - m) + (m - m'))
            moved = tl.where(z_s_old > 0, (m_s_old - shift_s) * z_s_old, 0.0)
            ent = rescale_s * (ent + moved) + tl.sum(
                tl.where(p_s == 0, 0.0, p_s * (b - shift_s[:, None])), axis=1
            )
        if KEEP_SUMS:  # "entry_keep", forward/reverse KL: sum over the whole vocabulary of
            # pS^2 (and of pS g above); the terms pass subtracts the clipped entries' share
            q2 = q2 * (rescale_s * rescale_s) + tl.sum(p_s * p_s, axis=1)
    out = split.to(tl.int64) * N + rows
    tl.store(m_s_ptr + out, m_s, mask=in_range)
    tl.store(z_s_ptr + out, z_s, mask=in_range)
    tl.store(m_t_ptr + out, m_t, mask=in_range)
    tl.store(z_t_ptr + out, z_t, mask=in_range)
    if ONE_PASS:
        tl.store(w_sum_ptr + out, w, mask=in_range)
    if STATS:
        tl.store(ent_ptr + out, ent, mask=in_range)
    if KEEP_SUMS:
        part = n_splits * N
        tl.store(keep_sums_ptr + out, q2, mask=in_range)
        tl.store(keep_sums_ptr + part + out, x2, mask=in_range)


@triton.heuristics(
    {
        **INPUT_FLAGS,
        "HAS_TODO": lambda a: a["todo_ptr"] is not None,
        "HAS_CORR": lambda a: a["finite_ptr"] is not None,
        "STATS": lambda a: a["clip_stats_ptr"] is not None,
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
    finite_ptr,
    keep_sums_ptr,
    clip_stats_ptr,
    clipped_map_ptr,
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
    SHARED_W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_TBIAS: tl.constexpr,
    HAS_TODO: tl.constexpr,
    HAS_CORR: tl.constexpr,
    STATS: tl.constexpr,
    COUNT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
    SUB: tl.constexpr,
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
    # HAS_CORR (forward/reverse KL): rows with a finite unclipped loss take corrections
    # (loss, G: sums of c(phi) - phi and g kept - g), the others whole sums
    finite = tl.zeros((BLOCK_N,), tl.int1)
    if HAS_CORR:
        finite = tl.load(finite_ptr + rows, mask=in_range, other=0) != 0
    # KEEP: sum pS, pS g, pS^2 over the unclipped entries U (every tile is computed), or
    # with HAS_CORR over the clipped entries C of the computed tiles (pS g only where the
    # teacher logit is finite: the stats pass's sum leaves the others out too)
    k1 = tl.zeros((BLOCK_N,), tl.float32)
    k2 = tl.zeros((BLOCK_N,), tl.float32)
    k3 = tl.zeros((BLOCK_N,), tl.float32)
    # STATS: among the clipped entries, the teacher mass, their count and the largest pT
    mass = tl.zeros((BLOCK_N,), tl.float32)
    n_clipped = tl.zeros((BLOCK_N,), tl.float32)
    top1 = tl.zeros((BLOCK_N,), tl.float32)
    for vb in range(vb_lo, vb_hi):
        compute = True
        if HAS_TODO:
            compute = tl.load(todo_ptr + pid_n.to(tl.int64) * n_vblocks + vb) != 0
        if compute:
            count_tile(count_ptr, pid_n, vb, n_vblocks, COUNT)
            # the tile in SUB column slices (fewer live registers where many sums are taken)
            hit = 0.0
            for sub in tl.static_range(SUB):
                cols, col_ok = vocab_block(vb * SUB + sub, V, BLOCK_V // SUB)
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
                    BLOCK_V // SUB,
                    BLOCK_K,
                )
                phi, c_phi, g, g_all, pS, pT = clipped_terms(
                    b, a, lse_s, lse_t, beta, log_beta, log_1m_beta, clip, KIND, HAS_CLIP
                )
                inside = col_ok[None, :]
                # each tile temporary is read by consecutive sums and then dies (registers)
                if HAS_CORR:  # only clipped entries (not phi < clip, as in the g kept) differ:
                    # c(phi) - phi = clip - phi and g kept - g = -g there
                    whole = inside & ~finite[:, None]
                    clipped = inside & ~(phi < clip)
                    fix = clipped & finite[:, None]
                    loss += tl.sum(tl.where(whole, c_phi, tl.where(fix, clip - phi, 0.0)), axis=1)
                    G += tl.sum(tl.where(whole, g, tl.where(fix, -g_all, 0.0)), axis=1)
                else:
                    loss += tl.sum(tl.where(inside, c_phi, 0.0), axis=1)
                    G += tl.sum(tl.where(inside, g, 0.0), axis=1)
                if HAS_CLIP:
                    clipped = inside & ~(phi < clip)
                    row_clipped = tl.sum(clipped.to(tl.float32), axis=1)  # (folded where unused)
                    if STATS:  # teacher mass, count and largest teacher probability clipped
                        pT_c = tl.where(clipped, pT, 0.0)
                        mass += tl.sum(pT_c, axis=1)
                        top1 = tl.maximum(top1, tl.max(pT_c, axis=1))
                        n_clipped += row_clipped
                    if KEEP:
                        if HAS_CORR:
                            part_of = clipped
                        else:
                            part_of = inside & (phi < clip)
                        # pS g over finite g only (+inf: reverse KL against a -inf teacher
                        # logit, always clipped; the stats pass leaves it out too)
                        if KIND == 1:
                            part_of_g = part_of & (g_all < float("inf"))
                        else:
                            part_of_g = part_of
                        k2 += tl.sum(tl.where(part_of_g, pS * g_all, 0.0), axis=1)
                        k1 += tl.sum(tl.where(part_of, pS, 0.0), axis=1)
                        k3 += tl.sum(tl.where(part_of, pS * pS, 0.0), axis=1)
                        if not HAS_CORR:  # a clipped entry of a counted token in the tile
                            hit = tl.maximum(hit, tl.max(tl.where(row_ok, row_clipped, 0.0), 0))
            if KEEP and not HAS_CORR:
                # tiles holding a clipped entry of a counted token: never skipped by the
                # backward (their clipped entries' gradient is mu); forward and reverse KL
                # use the clip test's map instead (a superset)
                tl.store(
                    clipped_map_ptr + pid_n.to(tl.int64) * n_vblocks + vb, (hit > 0).to(tl.uint8)
                )
    out = split.to(tl.int64) * N + rows
    part = n_splits * N
    tl.store(loss_ptr + out, loss, mask=in_range)
    tl.store(g_sum_ptr + out, G, mask=in_range)
    if KEEP:
        tl.store(keep_sums_ptr + out, k1, mask=in_range)
        tl.store(keep_sums_ptr + part + out, k2, mask=in_range)
        tl.store(keep_sums_ptr + 2 * part + out, k3, mask=in_range)
    if STATS:
        tl.store(clip_stats_ptr + out, mass, mask=in_range)
        tl.store(clip_stats_ptr + part + out, n_clipped, mask=in_range)
        tl.store(clip_stats_ptr + 2 * part + out, top1, mask=in_range)


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
    #: clip_mode "entry_keep": (N,) float32 mu, the gradient (times tau / upstream factor)
    #: of a clipped entry
    mu: torch.Tensor | None = None
    #: (token blocks, vocab blocks) bool, "entry_keep": the tiles holding a clipped entry of
    #: a counted token (forward/reverse KL: the clip test's tiles, a superset); the
    #: backward never skips them
    clipped_tiles: torch.Tensor | None = None
    #: (N,) bool, clip_mode "token": the tokens that receive a gradient (the mask's tokens
    #: whose loss is not clipped); None: the forward's mask
    grad_mask: torch.Tensor | None = None
    #: (N, 4) float32 per-token statistics (opsd_kernels.stats layout) when asked for
    stats: torch.Tensor | None = None


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


def kernel_options(opts: DivergenceOptions) -> dict:
    """The fused kernels' option keywords: :func:`~.configs.option_args` and
    :func:`~.configs.transform_args`, with ``HAS_CLIP`` (a per-entry clip: clip_mode
    "entry" or "entry_keep"; "token" clips after the sum, outside the kernels) and
    ``KEEP`` (clip_mode "entry_keep" with a clip)."""
    clipped = opts.clip is not None
    return {
        **option_args(opts),
        **transform_args(opts),
        "HAS_CLIP": clipped and opts.clip_mode != "token",
        "KEEP": clipped and opts.clip_mode == "entry_keep",
    }


def _merge_entropy(m, z, ent, shift, z_tot):
    """Student entropy (N,) from per-split (max, sum-exp, sum e^(b - m) (b - m)) rows
    (S, N): H = log z - sum e^(b - M) (b - M) / z at the global shift M."""
    live = z > 0
    d = torch.where(live, m - shift, torch.zeros_like(m))
    part = torch.where(live, torch.exp(d) * (ent + d * z), torch.zeros_like(z))
    return torch.log(z_tot) - part.sum(0) / z_tot


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
    want_stats: bool = False,
) -> ForwardStats:
    """Launch the fused forward on (N, H) / (N, H_T) hidden states; see the module docstring.

    Hidden states and weights must be contiguous in their last dimension; ``mask``
    is None or (N,) bool. ``cfg``: tile sizes (default: :func:`~.configs.config_for`).
    ``tile_counts``: a dict to receive, per pass (``"stats"``, ``"terms"``), an int32
    (token blocks, vocab blocks) tensor counting how often each tile was computed
    (a debug aid for tests; None in normal use). ``want_stats``: fill
    ``ForwardStats.stats`` (the per-token statistics of :mod:`opsd_kernels.stats`).
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
    kopts = kernel_options(opts)
    entry_clip, keep = kopts["HAS_CLIP"], kopts["KEEP"]
    token_clip = clip is not None and not entry_clip
    f32 = dict(dtype=torch.float32, device=dev)
    tile_map = dict(size=(n_blocks, n_vblocks), **f32)

    def counter(name):
        if tile_counts is None:
            return None
        tile_counts[name] = torch.zeros(n_blocks, n_vblocks, dtype=torch.int32, device=dev)
        return tile_counts[name]

    m_s, z_s, m_t, z_t = (torch.empty(splits, N, **f32) for _ in range(4))
    w_sum = torch.empty(splits, N, **f32) if one_pass else None
    ent = torch.empty(splits, N, **f32) if want_stats else None
    keep_all = torch.empty(2, splits, N, **f32) if keep and one_pass else None
    tmax_s, tmax_t = torch.empty(**tile_map), torch.empty(**tile_map)
    with_min = one_pass and entry_clip
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
        **kopts,
        **block_args(cfg, hs.dtype),
    )
    grid = (n_blocks * splits,)
    _fused_stats_kernel[grid](
        m_s_ptr=m_s,
        z_s_ptr=z_s,
        m_t_ptr=m_t,
        z_t_ptr=z_t,
        w_sum_ptr=w_sum,
        ent_ptr=ent,
        keep_sums_ptr=keep_all,
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
    mu = clipped_map = clip_stats = None
    if not one_pass or entry_clip:
        todo = finite_rows = None
        if one_pass:  # clip: recompute only the tiles that may clip (exact test)
            todo = clip_tiles(
                spec.kind_id, clip, lse_s, lse_t, tmax_s, tmax_t, tmin_s, tmin_t, BN, mask
            )
            finite = torch.isfinite(loss)
            full_block = block_extreme((~finite).to(torch.float32), BN, mask, True) > 0
            todo = (todo | full_block[:, None]).to(torch.uint8)
            finite_rows = finite.to(torch.uint8)
        part_loss, part_g = torch.empty(splits, N, **f32), torch.empty(splits, N, **f32)
        keep_part = torch.empty(3, splits, N, **f32) if keep else None
        if keep:  # jsd: written by the pass; forward/reverse KL: the tiles that may clip
            clipped_map = (
                todo
                if one_pass
                else torch.zeros(n_blocks, n_vblocks, dtype=torch.uint8, device=dev)
            )
        want_clip_stats = want_stats and entry_clip
        clip_stats = torch.empty(3, splits, N, **f32) if want_clip_stats else None
        _fused_terms_kernel[grid](
            lse_s_ptr=lse_s,
            lse_t_ptr=lse_t,
            loss_ptr=part_loss,
            g_sum_ptr=part_g,
            finite_ptr=finite_rows,
            keep_sums_ptr=keep_part,
            clip_stats_ptr=clip_stats,
            clipped_map_ptr=clipped_map,
            todo_ptr=todo,
            count_ptr=counter("terms"),
            SUB=_terms_slices(want_clip_stats, keep, hs.dtype),
            **{**inputs, "num_stages": cfg.terms_stages or cfg.num_stages},
        )
        if one_pass:
            part_loss, part_g = part_loss.sum(0), part_g.sum(0)  # corrections where finite
            loss = torch.where(finite, loss + part_loss, part_loss)
            g_sum = torch.where(finite, g_sum + part_g, part_g)
        else:
            loss, g_sum = part_loss.sum(0), part_g.sum(0)
        if keep:
            u = keep_part.sum(1)  # (3, N): sums over U (jsd) or C (forward/reverse KL)
            if one_pass:  # U = everything (stats pass) - C
                all_sums = _keep_totals(spec.kind_id, keep_all, m_s, m_t, shift_s, shift_t,
                                        zs_tot, zt_tot, lse_s, lse_t)  # fmt: skip
                u = all_sums - u
            u1, u2, u3 = u
            mu = torch.where(u1 > 0, (u2 - g_sum * u3) / u1, torch.zeros_like(u1))
    elif tile_counts is not None:
        counter("terms")
    grad_mask = None
    if mask is not None:
        loss = torch.where(mask, loss, torch.zeros_like(loss))
    if token_clip:  # min(L, clip); a clipped token passes no gradient (NaN counts as clipped)
        token_clipped = ~(loss < clip)
        loss = torch.clamp(loss, max=clip)
        grad_mask = ~token_clipped if mask is None else mask & ~token_clipped
    stats = None
    if want_stats:
        stats = torch.zeros(N, 4, **f32)
        stats[:, STUDENT_ENTROPY] = _merge_entropy(m_s, z_s, ent, shift_s, zs_tot)
        if entry_clip:
            stats[:, TEACHER_CLIPPED_MASS] = clip_stats[0].sum(0)
            stats[:, CLIPPED_ENTRIES] = clip_stats[1].sum(0)
            # the teacher's top-1 is clipped where the largest clipped pT is its largest pT
            # (from its largest logit, less a margin: the terms pass's recompute may differ
            # from the stats pass in the last bits)
            top_t = m_t.amax(0)
            top_p = torch.exp(top_t - 1e-6 * top_t.abs() - lse_t)
            top1 = (clip_stats[2].amax(0) >= top_p) & (clip_stats[1].sum(0) > 0)
            stats[:, TEACHER_TOP1_CLIPPED] = top1.to(torch.float32)
        elif token_clip:
            hit = token_clipped.to(torch.float32)
            stats[:, TEACHER_CLIPPED_MASS] = hit
            stats[:, CLIPPED_ENTRIES] = hit * V
            stats[:, TEACHER_TOP1_CLIPPED] = hit
        if mask is not None:
            stats = torch.where(mask[:, None], stats, torch.zeros_like(stats))
    clipped_tiles = None if clipped_map is None else clipped_map.bool()
    return ForwardStats(
        loss, lse_s, lse_t, g_sum, tmax_s, tmax_t, cfg, mu, clipped_tiles, grad_mask, stats
    )


def _terms_slices(stats: bool, keep: bool, dtype: torch.dtype) -> int:
    """Column slices per tile of the terms pass: 2 where its many per-tile sums (clip
    statistics) would otherwise spill registers on sm_90 as ptxas allocates them
    (tests/test_triton_compile.py: 16-bit tiles with "entry_keep" and statistics, float32
    tiles with statistics but not "entry_keep"); 1 elsewhere."""
    return 2 if stats and (keep != (dtype == torch.float32)) else 1


def _keep_totals(kind_id, keep_all, m_s, m_t, shift_s, shift_t, zs_tot, zt_tot, lse_s, lse_t):
    """(3, N): the sums over the whole vocabulary of pS (1), pS g and pS^2, from the stats
    pass's per-split sums e^(2 (b - m_S)) and (forward KL) e^(b - m_S) e^(a - m_T) or
    (reverse KL) e^(2 (b - m_S)) (b - a). Entries with a -inf teacher logit are left out of
    sum pS g (reverse KL's g is +inf there; such an entry is always clipped, never in U,
    and the terms pass leaves it out of the clipped sum too)."""
    d_s = m_s - shift_s
    q2 = (keep_all[0] * torch.exp(2 * d_s)).sum(0)
    sum_p2 = q2 / (zs_tot * zs_tot)
    if kind_id == 0:  # g = -pT
        x = (keep_all[1] * torch.exp(d_s + (m_t - shift_t))).sum(0)
        sum_pg = -x / (zs_tot * zt_tot)
    else:  # g = pS (lS - lT + 1), lS - lT = (b - a) - (LSE_S - LSE_T)
        w2 = (keep_all[1] * torch.exp(2 * d_s)).sum(0)
        sum_pg = (w2 - (lse_s - lse_t - 1.0) * q2) / (zs_tot * zs_tot)
    return torch.stack((torch.ones_like(sum_p2), sum_pg, sum_p2))
