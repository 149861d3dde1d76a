"""Triton twins of the formula sheet in :mod:`opsd_kernels.divergences`.

Each function here mirrors the torch function of the same name there; the
derivations live in that module's docstring. ``KIND`` is a ``tl.constexpr``
(``KindSpec.kind_id``), so each kind compiles to its own lean specialisation.
"""

import triton
import triton.language as tl


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
def divergence_terms(lT, lS, pT, pS, beta, log_beta, log_1m_beta, KIND: tl.constexpr):
    """Pointwise ``(phi, g, h)``: loss term, d phi/d lS, d phi/d lT (see divergences.py)."""
    if KIND == 0:  # forward_kl: pT (lT - lS)
        phi = weighted_log_ratio(pT, lT, lS)
        g = -pT
        h = tl.where(pT == 0, 0.0, phi + pT)
    elif KIND == 1:  # reverse_kl: pS (lS - lT)
        phi = weighted_log_ratio(pS, lS, lT)
        g = tl.where(pS == 0, 0.0, phi + pS)
        h = -pS
    else:  # jsd(beta)
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
