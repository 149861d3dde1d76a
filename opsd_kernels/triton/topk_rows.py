"""Triton kernel: one top-k-teacher row of float32 chunk logits, with its gradient.

One program per token row (the math is in :mod:`opsd_kernels.topk`). The
launcher first gathers the student logits at the K ids and, for the bucket
tail, writes -inf over those ids in the row, so that the row itself is the
complement. Then, per row (b = logit / tau):

- bucket only, pass 1 over V: online log-sum-exp of the complement, LSE_C;
- over the K entries: LSE_K, then LSE = logaddexp(LSE_C, LSE_K) (renormalize:
  LSE = LSE_K), the outcomes' log-probs lS_k = b_k - LSE and
  log rS = LSE_C - LSE, the pointwise terms (divergence_terms, the Triton twin
  of the formula sheet), clip, the loss L and G = sum_j g_j;
- with a gradient, over the K entries: ``(g_k - pS_k G) * scale / tau`` into a
  (R, K) buffer, and (bucket) a last pass over V writing
  ``exp(b_v - LSE_C) (g_R - G rS) * scale / tau`` over the row in place (the ids
  hold -inf there, so they get 0); renormalize writes zeros. The launcher then
  adds the K entry gradients at the ids.

The teacher side ((R, K) log-probs, -inf where not an outcome, and log rT) is
prepared in torch (in float64 for the mass 1 - sum pT); the kernel never sees
padding or masked entries as outcomes.

Options (constexpr specialisations, as in the row kernel): the student's logit
transform (``logit_scale``, ``softcap``) is applied to the raw logits in every sweep,
b = transform_logit(x) / tau, and the gradient is multiplied by transform_grad (with
respect to the raw logits). A raw -inf is the launcher's mark of an excluded entry (an
id, in the bucket sweep; a padding entry) and stays -inf under a soft cap; a genuine
-inf student logit is first raised to -1e30, which the cap maps to -cap with derivative
0, as tanh maps -inf. ``clip_mode="token"``: the outcomes unclipped, then
``L = min(L, clip)`` and a clipped row gets a zero gradient. ``"entry_keep"``: clipped
ids (and, for a clipped rest, every complement entry) get the pS-weighted mean of the
unclipped entries' gradient; its complement part needs ``sum e^2`` (e = exp(b - m_c)),
one more running sum in the complement sweep. ``HAS_STATS``: the per-token statistics
of ``opsd_kernels.topk.topk_stats`` (entropy of the student over the vocabulary, or of
the renormalised student; clip statistics over the outcomes) from the same sweeps.
"""

import math

import torch
import triton
import triton.language as tl

from .divergence_rows import default_block_v
from .formulas import (
    divergence_terms,
    entropy_update,
    log_add_exp,
    online_logsumexp_update,
    transform_grad,
    transform_logit,
)


@triton.jit
def _student_logits(x, scale, cap, inv_temp, HAS_CAP: tl.constexpr):
    """``(b, dz/dx)`` of raw student logits ``x``; a raw -inf (an excluded entry) stays
    -inf (``b``) with derivative 0."""
    z = transform_logit(x, scale, cap, HAS_CAP)
    if HAS_CAP:
        b = tl.where(x == float("-inf"), float("-inf"), z) * inv_temp
    else:
        b = z * inv_temp
    return b, transform_grad(z, scale, cap, HAS_CAP)


@triton.jit
def _topk_rows_kernel(
    x_ptr,
    zk_ptr,
    lt_ptr,
    log_rest_ptr,
    loss_ptr,
    entry_ptr,
    scale_ptr,
    stats_ptr,
    x_stride,
    k_stride,
    scale_stride,
    stats_stride,
    V,
    K,
    inv_temp,
    beta,
    log_beta,
    log_1m_beta,
    clip,
    s_scale,
    s_cap,
    KIND: tl.constexpr,
    BUCKET: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    TOKEN: tl.constexpr,
    KEEP: tl.constexpr,
    S_SOFTCAP: tl.constexpr,
    HAS_STATS: tl.constexpr,
    GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    ks = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * x_stride
    zk_row = zk_ptr + row * k_stride
    lt_row = lt_ptr + row * k_stride
    CLIP_ENTRY: tl.constexpr = HAS_CLIP and not TOKEN

    # ---- log-sum-exp of the complement (bucket) and of the K entries ----
    # (with the statistics the complement's entropy sum u_c, with "entry_keep" its
    # sum of e^2, e = exp(b - m_c), both rescaled online)
    lse_c = float("-inf")
    z_c = 0.0
    u_c = 0.0
    sq_c = 0.0
    if BUCKET:
        m_c = float("-inf")
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            x = tl.load(x_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            b, _dz = _student_logits(x, s_scale, s_cap, inv_temp, S_SOFTCAP)
            m_old = m_c
            z_old = z_c
            m_c, z_c, rescale, shift = online_logsumexp_update(m_c, z_c, b)
            if HAS_STATS:
                u_c = entropy_update(u_c, z_old, m_old, b, shift)
            if KEEP:
                e = tl.exp(b - shift)
                sq_c = sq_c * rescale * rescale + tl.sum(e * e, axis=0)
        lse_c = tl.where(m_c == float("-inf"), 0.0, m_c) + tl.log(z_c)
    m_k = float("-inf")
    z_k = 0.0
    for start in range(0, K, BLOCK_K):
        offs = start + ks
        xk = tl.load(zk_row + offs, mask=offs < K, other=float("-inf"))
        zb, _dz = _student_logits(xk, s_scale, s_cap, inv_temp, S_SOFTCAP)
        m_k, z_k, _r, _s = online_logsumexp_update(m_k, z_k, zb)
    lse_k = tl.where(m_k == float("-inf"), 0.0, m_k) + tl.log(z_k)
    if BUCKET:
        lse = log_add_exp(lse_c, lse_k)
    else:
        lse = tl.where(m_k == float("-inf"), 0.0, lse_k)  # no entries: loss 0

    # ---- the outcomes' terms (and the sums "entry_keep" and the statistics need) ----
    loss = 0.0
    G = 0.0
    keep_p = 0.0
    keep_pg = 0.0
    keep_p2 = 0.0
    neg_ent = 0.0
    n_valid = 0.0
    mass = 0.0
    count = 0.0
    top = float("-inf")
    top_clipped = float("-inf")
    for start in range(0, K, BLOCK_K):
        offs = start + ks
        inside = offs < K
        xk = tl.load(zk_row + offs, mask=inside, other=float("-inf"))
        bk, _dz = _student_logits(xk, s_scale, s_cap, inv_temp, S_SOFTCAP)
        lS = bk - lse
        lT = tl.load(lt_row + offs, mask=inside, other=float("-inf"))
        ok = lT != float("-inf")  # an outcome (the launcher set -inf elsewhere)
        lS = tl.where(ok, lS, 0.0)
        lT = tl.where(ok, lT, 0.0)
        pS = tl.exp(lS)
        pT = tl.exp(lT)
        phi, g, _h_k = divergence_terms(lT, lS, pT, pS, beta, log_beta, log_1m_beta, KIND)
        if CLIP_ENTRY:
            kept = phi < clip
            g = tl.where(kept, g, 0.0)
            phi = tl.minimum(phi, clip)
            if KEEP:
                p_kept = tl.where(ok & kept, pS, 0.0)
                keep_p += tl.sum(p_kept, axis=0)
                keep_pg += tl.sum(p_kept * g, axis=0)
                keep_p2 += tl.sum(p_kept * pS, axis=0)
            if HAS_STATS:
                clipped = ok & (kept == 0)
                mass += tl.sum(tl.where(clipped, pT, 0.0), axis=0)
                count += tl.sum(clipped.to(tl.float32), axis=0)
                top = tl.maximum(top, tl.max(tl.where(ok, lT, float("-inf")), axis=0))
                top_clipped = tl.maximum(
                    top_clipped, tl.max(tl.where(clipped, lT, float("-inf")), axis=0)
                )
        if HAS_STATS:
            neg_ent += tl.sum(tl.where(ok & (pS != 0), pS * lS, 0.0), axis=0)
            n_valid += tl.sum(ok.to(tl.float32), axis=0)
        loss += tl.sum(tl.where(ok, phi, 0.0), axis=0)
        G += tl.sum(tl.where(ok, g, 0.0), axis=0)
    g_rest = 0.0
    rest_kept = True
    log_rs = lse_c - lse
    if BUCKET:
        log_rt = tl.load(log_rest_ptr + row)
        phi_r, g_rest, _h_r = divergence_terms(
            log_rt, log_rs, tl.exp(log_rt), tl.exp(log_rs), beta, log_beta, log_1m_beta, KIND
        )
        if CLIP_ENTRY:
            rest_kept = phi_r < clip
            g_rest = tl.where(rest_kept, g_rest, 0.0)
            phi_r = tl.minimum(phi_r, clip)
            if HAS_STATS:
                mass += tl.where(rest_kept, 0.0, tl.exp(log_rt))
                count += tl.where(rest_kept, 0.0, 1.0)
        loss += phi_r
        G += g_rest
        if HAS_STATS:
            n_valid += 1.0  # the rest is an outcome
            # the complement's part of sum pS lS: pS_v = rS e_v / z_c, lS_v = log(rS e_v / z_c)
            inner = u_c / z_c + log_rs - tl.log(z_c)
            neg_ent += tl.where(z_c > 0, tl.exp(log_rs) * inner, 0.0)
    # "token": min(L, clip) (a NaN L stays NaN); a clipped row passes no gradient
    token_kept = loss < clip
    if TOKEN:
        loss = tl.where(loss > clip, clip, loss)
    tl.store(loss_ptr + row, loss)
    if HAS_STATS:
        if TOKEN:
            flag = tl.where(token_kept, 0.0, 1.0)
            mass = flag
            count = flag * n_valid
            top1 = flag
        elif CLIP_ENTRY:
            top1 = tl.where((top_clipped == top) & (top_clipped > float("-inf")), 1.0, 0.0)
        else:
            top1 = 0.0
        out = stats_ptr + row * stats_stride
        tl.store(out, -neg_ent)
        tl.store(out + 1, mass)
        tl.store(out + 2, count)
        tl.store(out + 3, top1)

    # ---- gradient: the K entries, then the rest of the row in place ----
    if GRAD:
        factor = tl.load(scale_ptr + row * scale_stride).to(tl.float32) * inv_temp
        if TOKEN:
            factor = tl.where(token_kept, factor, 0.0)
        coef = (g_rest - G * tl.exp(log_rs)) * factor
        mean = 0.0
        if KEEP:
            # "entry_keep": the pS-weighted mean of the unclipped entries' gradient (per
            # unit dz/dx), over the unclipped ids and, when the rest is unclipped, the
            # complement (pS_v = rS e_v / z_c, gradient coef e_v / z_c)
            num = (keep_pg - G * keep_p2) * factor
            mass_u = keep_p
            if BUCKET:
                use_rest = rest_kept & (z_c > 0)
                r_s = tl.exp(log_rs)
                num += tl.where(use_rest, r_s * coef * sq_c / (z_c * z_c), 0.0)
                mass_u += tl.where(use_rest, r_s, 0.0)
            mean = tl.where(mass_u == 0, 0.0, num / mass_u)
        for start in range(0, K, BLOCK_K):
            offs = start + ks
            inside = offs < K
            xk = tl.load(zk_row + offs, mask=inside, other=float("-inf"))
            bk, dz = _student_logits(xk, s_scale, s_cap, inv_temp, S_SOFTCAP)
            lS = bk - lse
            lT = tl.load(lt_row + offs, mask=inside, other=float("-inf"))
            ok = lT != float("-inf")
            lS = tl.where(ok, lS, 0.0)
            lT = tl.where(ok, lT, 0.0)
            pS = tl.exp(lS)
            phi, g, _h_g = divergence_terms(
                lT, lS, tl.exp(lT), pS, beta, log_beta, log_1m_beta, KIND
            )
            d = (g - pS * G) * factor
            if CLIP_ENTRY:
                kept = phi < clip
                d = (tl.where(kept, g, 0.0) - pS * G) * factor
                if KEEP:
                    d = tl.where(kept, d, mean)
            entry = tl.where(ok, d * dz, 0.0)
            tl.store(entry_ptr + row * k_stride + offs, entry, mask=inside)
        if BUCKET:
            shift = tl.where(lse_c == float("-inf"), 0.0, lse_c)
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                inside = offs < V
                x = tl.load(x_row + offs, mask=inside, other=float("-inf")).to(tl.float32)
                b, dz = _student_logits(x, s_scale, s_cap, inv_temp, S_SOFTCAP)
                value = tl.exp(b - shift) * coef
                if KEEP:
                    # a clipped rest: every complement entry gets the mean, the ids 0
                    value = tl.where(rest_kept, value, tl.where(b == float("-inf"), 0.0, mean))
                tl.store(x_row + offs, value * dz, mask=inside)
        else:
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                tl.store(x_row + offs, tl.zeros([BLOCK_V], dtype=tl.float32), mask=offs < V)


def topk_rows_triton(
    logits,
    *,
    ids,
    logprobs,
    valid,
    log_rest,
    spec,
    beta,
    temperature,
    clip,
    scale,
    want_grad,
    clip_mode="entry",
    logit_scale=1.0,
    softcap=None,
    stats=None,
):
    """Launcher with the signature of :func:`opsd_kernels.topk.topk_rows_torch`.

    ``logits``: (R, V) float32 RAW logits, rows contiguous; overwritten (the gradient
    with respect to them times the row ``scale`` when ``want_grad``). ``ids``,
    ``logprobs``, ``valid``: (R, K); ``log_rest``: (R,) log rT (bucket) or None
    (renormalize). ``clip_mode``: "entry", "token" or "entry_keep"; ``logit_scale``,
    ``softcap``: the student's logit transform. ``stats``: None, or an (R, NUM_STATS)
    tensor that gets the rows' statistics (as ``topk_rows_torch``'s). Returns float32 (R,).
    """
    R, V = logits.shape
    K = ids.shape[1]
    loss = torch.empty(R, dtype=torch.float32, device=logits.device)
    if R == 0:
        return loss
    if logits.dtype != torch.float32 or logits.stride(-1) != 1:
        raise ValueError("topk_rows_triton needs float32 logits with contiguous rows")
    keep = clip is not None and clip_mode == "entry_keep"
    if softcap is not None or keep:
        # a genuine -inf logit to -1e30: the cap maps it to -cap (as tanh maps -inf), and
        # "entry_keep" gives it the mean like any complement entry, while -inf stays the
        # launcher's mark of an excluded entry (pS and the gradient factor are 0 alike)
        logits.clamp_(min=-1e30)
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float32, device=logits.device)
    zk = torch.where(valid, logits.gather(1, ids), neg_inf).contiguous()
    lt = torch.where(valid, logprobs.float(), neg_inf).contiguous()
    bucket = log_rest is not None
    if bucket:
        # the row becomes the complement: -inf at each valid id ("amin" leaves the
        # value of a padding entry's safe index untouched)
        fill = torch.where(valid, neg_inf, -neg_inf)
        logits.scatter_reduce_(1, ids, fill, reduce="amin")
        log_rest = log_rest.float().contiguous()
    entry = torch.empty((R, K), dtype=torch.float32, device=logits.device) if want_grad else zk
    scale = scale.float().contiguous()
    b = beta if spec.needs_beta else 0.5
    block_k = max(16, min(256, triton.next_power_of_2(K)))
    block_v = default_block_v(V, logits.device)
    out = stats
    if stats is not None and (stats.dtype != torch.float32 or stats.stride(1) != 1):
        out = torch.empty(R, stats.shape[1], dtype=torch.float32, device=logits.device)
    _topk_rows_kernel[(R,)](
        logits,
        zk,
        lt,
        log_rest if bucket else loss,
        loss,
        entry,
        scale,
        loss if out is None else out,
        logits.stride(0),
        K,
        scale.stride(0) if scale.numel() > 1 else 0,
        0 if out is None else out.stride(0),
        V,
        K,
        1.0 / temperature,
        b,
        math.log(b),
        math.log1p(-b),
        clip if clip is not None else 0.0,
        float(logit_scale),
        1.0 if softcap is None else float(softcap),
        KIND=spec.kind_id,
        BUCKET=bucket,
        HAS_CLIP=clip is not None,
        TOKEN=clip is not None and clip_mode == "token",
        KEEP=keep,
        S_SOFTCAP=softcap is not None,
        HAS_STATS=stats is not None,
        GRAD=want_grad,
        BLOCK_V=block_v,
        BLOCK_K=block_k,
        num_warps=8 if block_v >= 2048 else 4,
    )
    if out is not stats:
        stats.copy_(out)
    if want_grad:
        logits.scatter_add_(1, ids, entry)
    return loss
