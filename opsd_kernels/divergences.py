"""The formula sheet: one entry per divergence kind, with torch and Triton twins.

Notation (per token row, vocabulary length V, temperature ``tau``)::

    b = s / tau, a = t / tau                   student / teacher scaled logits
    lS = b - LSE(b), lT = a - LSE(a)           log-probabilities
    pS = exp(lS),    pT = exp(lT)
    L  = sum_v c(phi_v),  c(x) = min(x, clip) or x

For each kind the sheet gives three pointwise terms:

    phi_v  the contribution of entry v to the row loss
    g_v    d phi_v / d lS_v   (student side)
    h_v    d phi_v / d lT_v   (teacher side)

| kind       | phi_v                     | g_v                   | h_v               |
|------------|---------------------------|-----------------------|-------------------|
| forward_kl | pT (lT - lS)              | -pT                   | pT (lT - lS + 1)  |
| reverse_kl | pS (lS - lT)              | pS (lS - lT + 1)      | -pS               |
| jsd(beta)  | h_v + g_v                 | (1-beta) pS (lS - lM) | beta pT (lT - lM) |

with lM = log(beta pT + (1-beta) pS) formed by ``logaddexp`` (never the log of
an underflowed sum). Because lS = b - LSE(b), the chain rule through the
softmax gives, with clipped entries' g and h set to 0,

    dL/ds_j = (g_j - pS_j * G) / tau,   G = sum_v g_v
    dL/dt_j = (h_j - pT_j * H) / tau,   H = sum_v h_v

Before the temperature each role's raw logits go through the transform of
:class:`~opsd_kernels._validation.DivergenceOptions` (``s``, ``t`` above are its
outputs ``z``); the raw-logit gradient is ``dL/dz * dz/dx``. ``clip_mode="token"``
clips the row sum instead (``min(L, clip)``, no gradient for a clipped row) and
``"entry_keep"`` replaces ``dL/ds_j`` on the clipped entries by the
``pS``-weighted mean of the unclipped ones (:func:`rows_loss_and_grads`).

Special values: ``0 * log 0`` counts as 0 (a term whose weight probability is
exactly 0 contributes nothing, even where the other side is -inf), a term with
positive weight against a zero probability is ``+inf`` (the KL is infinite),
and NaN in a row propagates to that row's outputs.

Adding a kind: write its ``_terms`` function in torch here and its Triton twin
in ``opsd_kernels/triton/formulas.py``, then add one :class:`KindSpec` entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .stats import CLIPPED_ENTRIES, STUDENT_ENTROPY, TEACHER_CLIPPED_MASS, TEACHER_TOP1_CLIPPED

Terms = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def weighted_log_ratio(p: torch.Tensor, lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """``p * (lp - lq)`` with ``0 * anything = 0`` where ``p == 0`` exactly.

    ``p == 0`` is used (not ``p > 0``) so that a NaN probability stays NaN.
    Where ``lq`` is ``-inf`` and ``lp`` is finite the result is ``+inf`` even if
    ``p`` underflowed in floating point, matching the exact value.
    """
    safe = torch.where(p == 0, torch.zeros_like(lq), lp - lq)
    term = p * safe
    inf = torch.full_like(term, math.inf)
    return torch.where((lq == -math.inf) & (lp > -math.inf), inf, term)


def forward_kl_terms(lT, lS, pT, pS, beta: float) -> Terms:
    phi = weighted_log_ratio(pT, lT, lS)
    g = -pT
    h = torch.where(pT == 0, torch.zeros_like(pT), phi + pT)
    return phi, g, h


def reverse_kl_terms(lT, lS, pT, pS, beta: float) -> Terms:
    phi = weighted_log_ratio(pS, lS, lT)
    g = torch.where(pS == 0, torch.zeros_like(pS), phi + pS)
    h = -pS
    return phi, g, h


def jsd_terms(lT, lS, pT, pS, beta: float) -> Terms:
    # log of the mixture, stable: logaddexp never takes the log of an underflowed sum
    lM = torch.logaddexp(lT + math.log(beta), lS + math.log1p(-beta))
    teacher_part = weighted_log_ratio(pT, lT, lM)
    student_part = weighted_log_ratio(pS, lS, lM)
    g = (1.0 - beta) * student_part
    h = beta * teacher_part
    return g + h, g, h


# Kind ids: the ``tl.constexpr`` that selects a kind's Triton twin
# (opsd_kernels/triton/formulas.py names them FORWARD_KL, REVERSE_KL, JSD).
FORWARD_KL_ID, REVERSE_KL_ID, JSD_ID = 0, 1, 2


@dataclass(frozen=True)
class KindSpec:
    """One divergence kind.

    ``kind_id`` selects the Triton twin (a ``tl.constexpr``); ``one_pass`` says
    whether, without clipping, the row loss follows from one online pass over
    the vocabulary (running max, sum-exp and one weighted sum), so the kernels
    can skip the separate loss pass.
    """

    name: str
    kind_id: int
    terms: Callable[..., Terms]
    one_pass: bool
    needs_beta: bool


KINDS: dict[str, KindSpec] = {
    "forward_kl": KindSpec(
        "forward_kl", FORWARD_KL_ID, forward_kl_terms, one_pass=True, needs_beta=False
    ),
    "reverse_kl": KindSpec(
        "reverse_kl", REVERSE_KL_ID, reverse_kl_terms, one_pass=True, needs_beta=False
    ),
    "jsd": KindSpec("jsd", JSD_ID, jsd_terms, one_pass=False, needs_beta=True),
}


def transform_logits(x: torch.Tensor, scale: float, cap: float | None) -> torch.Tensor:
    """The logit transform of :class:`~opsd_kernels._validation.DivergenceOptions` on raw
    logits ``x`` (float32/float64): ``cap * tanh(scale * x / cap)``, or ``scale * x``
    without a cap. Torch twin of :func:`opsd_kernels.triton.formulas.transform_logit`."""
    if cap is None:
        return x * scale if scale != 1.0 else x
    return torch.tanh(x * (scale / cap)) * cap


def transform_grad(z: torch.Tensor, scale: float, cap: float | None) -> torch.Tensor | float:
    """``dz/dx`` of :func:`transform_logits` from its output ``z``: ``scale * (1 - (z/cap)^2)``,
    or the scalar ``scale`` without a cap."""
    if cap is None:
        return scale
    r = z / cap
    return (1.0 - r * r) * scale


def _shift_to_max(x: torch.Tensor) -> torch.Tensor:
    """``x - max(x)`` per row (0 shift for a row without a finite maximum).

    log_softmax is shift-invariant, but the scaling by 1/temperature is not safe
    before it: a float32 logit of 3e38 at temperature 0.5 overflows to inf and the
    row becomes NaN although its divergence is finite. After the shift every value
    is <= 0, so the scaling can only underflow (to -inf: a probability of 0).
    """
    m = x.amax(dim=-1, keepdim=True)
    return x - torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _scaled_logits(x: torch.Tensor, scale: float, cap: float | None, inv_t: float):
    """``z / tau`` shifted to its row max, of raw logits ``x`` (one role).

    Without a cap the scale commutes with the shift (``scale > 0``), so
    ``(x - max x) * scale / tau`` is formed without overflow. With a cap ``z`` is
    bounded by it.
    """
    if cap is None:
        return _shift_to_max(x) * (scale * inv_t)
    return _shift_to_max(transform_logits(x, scale, cap)) * inv_t


def _chain_rule(grad: torch.Tensor, x: torch.Tensor, scale: float, cap: float | None):
    """``grad * dz/dx``: a gradient with respect to ``z`` taken to the raw logits ``x``
    (``dz/dx`` recomputed from ``x`` here, so that no (R, V) derivative stays alive
    through the row math)."""
    if cap is None:
        return grad * scale if scale != 1.0 else grad
    return grad.mul_(transform_grad(transform_logits(x, scale, cap), scale, cap))


def _write_stats(stats, lS, pS, lT, pT, clipped, token_clipped) -> None:
    """Fill ``stats`` (R, NUM_STATS) with the per-row statistics of :mod:`opsd_kernels.stats`.

    ``clipped``: (R, V) bool of clipped entries ("entry"/"entry_keep"), or None;
    ``token_clipped``: (R,) bool of clipped tokens ("token"), or None.
    """
    zero = torch.zeros((), dtype=pS.dtype, device=pS.device)
    stats[:, STUDENT_ENTROPY] = -torch.where(pS == 0, zero, pS * lS).sum(-1)
    if token_clipped is not None:
        flag = token_clipped.to(pS.dtype)
        stats[:, TEACHER_CLIPPED_MASS] = flag
        stats[:, CLIPPED_ENTRIES] = flag * pS.shape[-1]
        stats[:, TEACHER_TOP1_CLIPPED] = flag
    elif clipped is not None:
        # the teacher's top entries: its largest log-probability (ties all count)
        top1 = lT == lT.amax(-1, keepdim=True)
        stats[:, TEACHER_CLIPPED_MASS] = torch.where(clipped, pT, zero).sum(-1)
        stats[:, CLIPPED_ENTRIES] = clipped.sum(-1)
        stats[:, TEACHER_TOP1_CLIPPED] = (clipped & top1).any(-1)
    else:
        stats[:, TEACHER_CLIPPED_MASS:] = 0


def rows_loss_and_grads(
    student: torch.Tensor,
    teacher: torch.Tensor,
    opts,
    want_student_grad: bool,
    want_teacher_grad: bool,
    stats: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Row losses and unit-upstream logit gradients of a block of rows, in float32+.

    ``student``/``teacher``: (R, V) RAW logits in float32 or float64 (the caller
    upcasts); ``opts``: :class:`~opsd_kernels._validation.DivergenceOptions`, whose
    per-role logit transform, temperature, kind and ``clip_mode`` are applied here.
    Returns ``(loss (R,), dL/ds (R, V) or None, dL/dt (R, V) or None)`` where the
    gradients are those of each row's own loss (upstream gradient 1) with respect to
    the RAW logits (the transform's chain rule applied). ``stats``: None, or an
    (R, NUM_STATS) tensor filled with the rows' :mod:`opsd_kernels.stats` columns.
    """
    spec, beta, clip = opts.spec, opts.beta, opts.clip
    inv_t = 1.0 / opts.temperature
    b = _scaled_logits(student, opts.logit_scale, opts.softcap, inv_t)
    a = _scaled_logits(teacher, opts.teacher_logit_scale, opts.teacher_softcap, inv_t)
    lS = torch.log_softmax(b, dim=-1)
    lT = torch.log_softmax(a, dim=-1)
    del a, b
    pS = lS.exp()
    pT = lT.exp()
    phi, g, h = spec.terms(lT, lS, pT, pS, beta)
    mode = None if clip is None else opts.clip_mode
    zero = torch.zeros((), dtype=phi.dtype, device=phi.device)
    clipped = token_clipped = None
    if mode == "token":
        loss = phi.sum(-1)
        token_clipped = ~(loss < clip)
        loss = torch.clamp(loss, max=clip)  # min(sum, clip); a NaN sum stays NaN
    else:
        if mode is not None:  # "entry", "entry_keep": min(phi_v, clip) per entry
            clipped = ~(phi < clip)
            phi = torch.clamp(phi, max=clip)
            g = g.masked_fill(clipped, 0.0)
            h = h.masked_fill(clipped, 0.0)
        loss = phi.sum(-1)
    if stats is not None:
        _write_stats(stats, lS, pS, lT, pT, clipped, token_clipped)
    del phi, lS, lT
    grad_s = grad_t = None
    if want_student_grad:
        grad_s = (g - pS * g.sum(-1, keepdim=True)) * inv_t
        if mode == "entry_keep":
            # clipped entries get mu, the pS-weighted mean of the unclipped gradient
            p_kept = pS.masked_fill_(clipped, 0.0)  # pS is not needed any more
            mass = p_kept.sum(-1, keepdim=True)
            mu = torch.einsum("rv,rv->r", p_kept, grad_s).unsqueeze(-1) / mass
            mu = torch.where(mass == 0, zero, mu)  # a NaN mass stays NaN
            grad_s = torch.where(clipped, mu, grad_s, out=grad_s)
        grad_s = _chain_rule(grad_s, student, opts.logit_scale, opts.softcap)
    if want_teacher_grad:
        grad_t = (h - pT * h.sum(-1, keepdim=True)) * inv_t
        grad_t = _chain_rule(grad_t, teacher, opts.teacher_logit_scale, opts.teacher_softcap)
    if token_clipped is not None:
        dropped = token_clipped.unsqueeze(-1)
        grad_s = None if grad_s is None else torch.where(dropped, zero, grad_s)
        grad_t = None if grad_t is None else torch.where(dropped, zero, grad_t)
    return loss, grad_s, grad_t
