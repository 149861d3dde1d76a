"""Triton twins of the formula sheet in :mod:`opsd_kernels.divergences`.

Each function here mirrors the torch function of the same name there; the
derivations live in that module's docstring. ``KIND`` is a ``tl.constexpr``
(``KindSpec.kind_id``), so each kind compiles to its own lean specialisation.
"""

import triton
import triton.language as tl

from ..divergences import FORWARD_KL_ID, JSD_ID, REVERSE_KL_ID
from .configs import CLIP_MODE_IDS

# kind ids as compile-time constants (KindSpec.kind_id selects the twin)
FORWARD_KL: tl.constexpr = tl.constexpr(FORWARD_KL_ID)
REVERSE_KL: tl.constexpr = tl.constexpr(REVERSE_KL_ID)
JSD: tl.constexpr = tl.constexpr(JSD_ID)
# clip_mode ids (configs.CLIP_MODE_IDS), for the CLIP_MODE constexpr
CLIP_TOKEN: tl.constexpr = tl.constexpr(CLIP_MODE_IDS["token"])
CLIP_ENTRY_KEEP: tl.constexpr = tl.constexpr(CLIP_MODE_IDS["entry_keep"])


@triton.jit
def weighted_log_ratio(p, lp, lq):
    """``p * (lp - lq)``, 0 where ``p == 0`` exactly, +inf where only ``lq`` is -inf."""
    term = p * tl.where(p == 0, 0.0, lp - lq)
    return tl.where((lq == float("-inf")) & (lp > float("-inf")), float("inf"), term)


@triton.jit
def rescale_sum(w, rescale):
    """``w * rescale`` for a running weighted sum, keeping ``+inf`` (an infinite KL)
    infinite when the rescale factor underflows to 0 (never ``inf * 0 = NaN``)."""
    return tl.where(w == float("inf"), w, w * rescale)


@triton.jit
def log_add_exp(x, y):
    """``log(exp(x) + exp(y))`` without overflow, -inf when both are -inf."""
    m = tl.maximum(x, y)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return m_safe + tl.log(tl.exp(x - m_safe) + tl.exp(y - m_safe))


@triton.jit
def transform_logit(x, scale, cap, HAS_CAP: tl.constexpr):
    """The logit transform of ``DivergenceOptions`` on float32 raw logits ``x``:
    ``cap * tanh(scale * x / cap)`` with a cap, else ``scale * x``. Monotone increasing
    in ``x`` (scale, cap > 0), so maxima map to maxima. ``tanh(y) = 2 sigmoid(2y) - 1``
    (Triton has no portable tanh across 3.6 and 3.9); +-inf map to +-cap."""
    if HAS_CAP:
        y = scale * x / cap
        return cap * (2.0 * tl.sigmoid(2.0 * y) - 1.0)
    else:
        return scale * x


@triton.jit
def transform_grad(z, scale, cap, HAS_CAP: tl.constexpr):
    """``dz/dx`` of :func:`transform_logit` from its output ``z``:
    ``scale * (1 - (z / cap)^2)`` with a cap, else the scalar ``scale`` (never
    ``scale + 0 * z``, which is NaN where a logit is -inf and its gradient 0)."""
    if HAS_CAP:
        r = z / cap
        return scale * (1.0 - r * r)
    else:
        return scale


@triton.jit
def divergence_terms(lT, lS, pT, pS, beta, log_beta, log_1m_beta, KIND: tl.constexpr):
    """Pointwise ``(phi, g, h)``: loss term, d phi/d lS, d phi/d lT (see divergences.py)."""
    if KIND == FORWARD_KL:  # pT (lT - lS)
        phi = weighted_log_ratio(pT, lT, lS)
        g = -pT
        h = tl.where(pT == 0, 0.0, phi + pT)
    elif KIND == REVERSE_KL:  # pS (lS - lT)
        phi = weighted_log_ratio(pS, lS, lT)
        g = tl.where(pS == 0, 0.0, phi + pS)
        h = -pS
    else:  # JSD(beta)
        lM = log_add_exp(lT + log_beta, lS + log_1m_beta)
        g = (1.0 - beta) * weighted_log_ratio(pS, lS, lM)
        h = beta * weighted_log_ratio(pT, lT, lM)
        phi = g + h
    return phi, g, h


@triton.jit
def online_logsumexp_update(m, z, x):
    """One block of an online log-sum-exp: running max ``m`` and sum ``z`` of exp(x - m).

    Returns ``(m_new, z_new, rescale, m_safe)`` where ``rescale`` multiplies
    any other running sum weighted by exp(x - m) and ``m_safe`` is the finite
    shift used for this block (0 while every value seen so far is -inf).
    """
    m_new = tl.maximum(m, tl.max(x, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    rescale = tl.exp(m - m_safe)
    z_new = z * rescale + tl.sum(tl.exp(x - m_safe), axis=0)
    return m_new, z_new, rescale, m_safe


@triton.jit
def online_logsumexp_update_rows(m, z, x):
    """:func:`online_logsumexp_update` for a 2-D tile: one running (max, sum) per row.

    ``m``, ``z``: (R,) running max and sum of exp(x - m); ``x``: (R, C) block.
    Returns ``(m_new, z_new, rescale, m_safe)``, each (R,).
    """
    m_new = tl.maximum(m, tl.max(x, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    rescale = tl.exp(m - m_safe)
    z_new = z * rescale + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
    return m_new, z_new, rescale, m_safe


# ---- one-pass kinds (KindSpec.one_pass): the loss from one online sweep -------------
# forward KL: L = sum pT (a - b) = w_T / z_T - LSE_T + LSE_S with w_T = sum e^(a - m_T) (a - b);
# reverse KL mirrors it with the student's weights. A new one-pass kind adds a branch to
# each of the three helpers below.


@triton.jit
def one_pass_terms(a, b, shift_s, shift_t, KIND: tl.constexpr):
    """Elementwise contributions to the running weighted sum (same shape as ``a``).

    ``shift_*`` broadcast against ``a``/``b`` (scalars in the row kernel, ``[:, None]``
    columns in tiled kernels)."""
    if KIND == FORWARD_KL:
        return weighted_log_ratio(tl.exp(a - shift_t), a, b)
    else:
        return weighted_log_ratio(tl.exp(b - shift_s), b, a)


@triton.jit
def one_pass_rescale(rescale_s, rescale_t, KIND: tl.constexpr):
    """The rescale factor of the running weighted sum: that of its weighting side."""
    if KIND == FORWARD_KL:
        return rescale_t
    else:
        return rescale_s


@triton.jit
def one_pass_finish(w, z_s, z_t, lse_s, lse_t, KIND: tl.constexpr):
    """``(L, G, H)`` from the sweep: the loss and the sums of g and h in closed form
    (forward KL: G = -1, H = L + 1; reverse KL: G = L + 1, H = -1)."""
    if KIND == FORWARD_KL:
        loss = w / z_t - lse_t + lse_s
        return loss, -1.0 + 0.0 * loss, loss + 1.0
    else:
        loss = w / z_s - lse_s + lse_t
        return loss, loss + 1.0, -1.0 + 0.0 * loss


# ---- row sweeps shared by the row kernels (plain and vocabulary-parallel) -----------
# Every sweep reads RAW logits and applies the role's transform (load_scaled); the
# flags CLIP_ENTRY (a per-entry clip: clip_mode "entry" or "entry_keep"), KEEP
# ("entry_keep") and the stats flags are constexprs, so a launch without them compiles
# to the plain kernel.


@triton.jit
def load_scaled(row_ptr, offs, inside, other, scale, cap, inv_temp, HAS_CAP: tl.constexpr):
    """``(b, z)`` of one block of raw logits: ``z = transform_logit(x)`` and
    ``b = z / temperature``, both ``other`` outside the row (a soft cap would map an
    ``other`` of -inf to the finite -cap)."""
    x = tl.load(row_ptr + offs, mask=inside, other=other).to(tl.float32)
    z = transform_logit(x, scale, cap, HAS_CAP)
    if HAS_CAP:
        z = tl.where(inside, z, other)
    return z * inv_temp, z


@triton.jit
def entropy_update(u, z_old, m_old, x, shift):
    """The running ``u = sum e^(x - m) (x - m)`` of one side, moved to this block's
    shift ``shift`` (``m_old``, ``z_old``: the running max and sum-exp BEFORE the block,
    as :func:`online_logsumexp_update` received them). With ``z = sum e^(x - m)`` the
    entropy is ``log z - u / z``: no cancellation against ``m`` (a raw ``sum p x`` would
    lose ``eps |m|``). Entries with ``e^(x - m) = 0`` add exactly 0 (no ``0 * -inf``)."""
    m_old_safe = tl.where(m_old == float("-inf"), 0.0, m_old)
    moved = u + tl.where(z_old == 0, 0.0, z_old * (m_old_safe - shift))
    e = tl.exp(x - shift)
    return tl.exp(m_old - shift) * moved + tl.sum(tl.where(e == 0, 0.0, e * (x - shift)), axis=0)


@triton.jit
def row_online_stats(
    s_row,
    t_row,
    V,
    v_stat,
    inv_temp,
    s_scale,
    s_cap,
    t_scale,
    t_cap,
    KIND: tl.constexpr,
    SWEEP: tl.constexpr,
    ENTROPY: tl.constexpr,
    S_SOFTCAP: tl.constexpr,
    T_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One sweep over a row's first ``v_stat`` entries (V, or 0 for a masked row): the
    online log-sum-exp states ``(m_s, z_s, m_t, z_t)`` of the scaled student and teacher
    logits, with ``SWEEP`` (a one-pass kind whose loss needs no clip pass) the rescaled
    weighted sum ``w`` of :func:`one_pass_terms`, and with ``ENTROPY`` the student's
    :func:`entropy_update` sum ``u`` (each 0 otherwise)."""
    cols = tl.arange(0, BLOCK_V)
    m_s = float("-inf")
    z_s = 0.0
    m_t = float("-inf")
    z_t = 0.0
    w = 0.0
    u = 0.0
    for start in range(0, v_stat, BLOCK_V):
        offs = start + cols
        inside = offs < V
        b, _zs = load_scaled(
            s_row, offs, inside, float("-inf"), s_scale, s_cap, inv_temp, S_SOFTCAP
        )
        a, _zt = load_scaled(
            t_row, offs, inside, float("-inf"), t_scale, t_cap, inv_temp, T_SOFTCAP
        )
        m_s_old = m_s
        z_s_old = z_s
        m_s, z_s, rescale_s, shift_s = online_logsumexp_update(m_s, z_s, b)
        m_t, z_t, rescale_t, shift_t = online_logsumexp_update(m_t, z_t, a)
        if SWEEP:
            w = rescale_sum(w, one_pass_rescale(rescale_s, rescale_t, KIND)) + tl.sum(
                one_pass_terms(a, b, shift_s, shift_t, KIND), axis=0
            )
        if ENTROPY:
            u = entropy_update(u, z_s_old, m_s_old, b, shift_s)
    return m_s, z_s, m_t, z_t, w, u


@triton.jit
def row_term_sums(
    s_row,
    t_row,
    V,
    v_stat,
    lse_s,
    lse_t,
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
    CLIP_ENTRY: tl.constexpr,
    KEEP: tl.constexpr,
    CLIP_STATS: tl.constexpr,
    S_SOFTCAP: tl.constexpr,
    T_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One sweep over a row's first ``v_stat`` entries (V, or 0 for a masked row).

    Returns ``(L, G, H, keep_p, keep_pg, keep_p2, mass, count, top_clipped, top)``:
    the sums of the (per-entry clipped, with ``CLIP_ENTRY``) terms phi and of g and h
    (0 where clipped); with ``KEEP`` the sums over the unclipped entries U of pS,
    pS g and pS^2 ("entry_keep"'s mean, :func:`keep_mean`); with ``CLIP_STATS`` the
    teacher mass and the number of the clipped entries, and the largest scaled teacher
    logit over the clipped entries and over all (the teacher's top-1 is clipped when
    they are equal). The sums a flag leaves off are 0."""
    cols = tl.arange(0, BLOCK_V)
    loss = 0.0
    G = 0.0
    H = 0.0
    keep_p = 0.0
    keep_pg = 0.0
    keep_p2 = 0.0
    mass = 0.0
    count = 0.0
    top_clipped = float("-inf")
    top = float("-inf")
    for start in range(0, v_stat, BLOCK_V):
        offs = start + cols
        inside = offs < V
        b, _zs = load_scaled(
            s_row, offs, inside, float("-inf"), s_scale, s_cap, inv_temp, S_SOFTCAP
        )
        a, _zt = load_scaled(
            t_row, offs, inside, float("-inf"), t_scale, t_cap, inv_temp, T_SOFTCAP
        )
        lS = b - lse_s
        lT = a - lse_t
        pS = tl.exp(lS)
        pT = tl.exp(lT)
        phi, g, h = divergence_terms(lT, lS, pT, pS, beta, log_beta, log_1m_beta, KIND)
        if CLIP_ENTRY:
            kept = phi < clip
            phi = tl.minimum(phi, clip)
            g = tl.where(kept, g, 0.0)
            h = tl.where(kept, h, 0.0)
            if KEEP:
                p_kept = tl.where(kept & inside, pS, 0.0)
                keep_p += tl.sum(p_kept, axis=0)
                keep_pg += tl.sum(p_kept * g, axis=0)
                keep_p2 += tl.sum(p_kept * pS, axis=0)
            if CLIP_STATS:
                clipped = (kept == 0) & inside  # not phi < clip: NaN counts as clipped
                mass += tl.sum(tl.where(clipped, pT, 0.0), axis=0)
                count += tl.sum(clipped.to(tl.float32), axis=0)
                top_clipped = tl.maximum(
                    top_clipped, tl.max(tl.where(clipped, a, float("-inf")), axis=0)
                )
                top = tl.maximum(top, tl.max(a, axis=0))
        loss += tl.sum(tl.where(inside, phi, 0.0), axis=0)
        G += tl.sum(tl.where(inside, g, 0.0), axis=0)
        H += tl.sum(tl.where(inside, h, 0.0), axis=0)
    return loss, G, H, keep_p, keep_pg, keep_p2, mass, count, top_clipped, top


@triton.jit
def keep_mean(keep_p, keep_pg, keep_p2, G):
    """ "entry_keep"'s gradient on a clipped entry, times the temperature:
    ``mu T = (sum_U pS g - G sum_U pS^2) / sum_U pS``, 0 when ``sum_U pS = 0``
    (DivergenceOptions; a NaN mass stays NaN)."""
    return tl.where(keep_p == 0, 0.0, (keep_pg - G * keep_p2) / keep_p)


@triton.jit
def write_row_gradients(
    s_row,
    t_row,
    grad_s_ptr,
    grad_s_off,
    grad_t_ptr,
    grad_t_off,
    V,
    lse_s,
    lse_t,
    G,
    H,
    mu,
    scale,
    valid,
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
    CLIP_ENTRY: tl.constexpr,
    KEEP: tl.constexpr,
    S_SOFTCAP: tl.constexpr,
    T_SOFTCAP: tl.constexpr,
    GRAD_S: tl.constexpr,
    GRAD_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """The last sweep: ``dL/dx_s = (g - pS G) scale dz_s/dx`` and
    ``dL/dx_t = (h - pT H) scale dz_t/dx`` (``scale`` already holds 1/temperature and
    the row's upstream factor; ``dz/dx``: the transform's derivative,
    :func:`transform_grad`), 0 where ``valid`` is False. With ``KEEP`` ("entry_keep")
    a clipped entry's student term is ``mu`` (:func:`keep_mean`) instead. Each entry
    is read before it is written, by the same program, so the gradient may overwrite
    the logits in place. ``grad_*_ptr`` may be None (constexpr) when ``GRAD_*`` is off;
    ``grad_*_off`` is the row's element offset."""
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        inside = offs < V
        b, z_s = load_scaled(s_row, offs, inside, 0.0, s_scale, s_cap, inv_temp, S_SOFTCAP)
        a, z_t = load_scaled(t_row, offs, inside, 0.0, t_scale, t_cap, inv_temp, T_SOFTCAP)
        lS = b - lse_s
        lT = a - lse_t
        pS = tl.exp(lS)
        pT = tl.exp(lT)
        phi, g, h = divergence_terms(lT, lS, pT, pS, beta, log_beta, log_1m_beta, KIND)
        if CLIP_ENTRY:
            kept = phi < clip
            g = tl.where(kept, g, 0.0)
            h = tl.where(kept, h, 0.0)
        if GRAD_S:
            d_s = g - pS * G
            if KEEP:
                d_s = tl.where(kept, d_s, mu)
            grad_s = tl.where(
                valid, d_s * scale * transform_grad(z_s, s_scale, s_cap, S_SOFTCAP), 0.0
            )
            tl.store(
                grad_s_ptr + grad_s_off + offs, grad_s.to(grad_s_ptr.dtype.element_ty), mask=inside
            )
        if GRAD_T:
            d_t = (h - pT * H) * scale * transform_grad(z_t, t_scale, t_cap, T_SOFTCAP)
            grad_t = tl.where(valid, d_t, 0.0)
            tl.store(
                grad_t_ptr + grad_t_off + offs, grad_t.to(grad_t_ptr.dtype.element_ty), mask=inside
            )
