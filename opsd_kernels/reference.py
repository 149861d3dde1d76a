"""The readable spec: naive implementations that materialise everything.

Every faster path is tested against these. They follow the formula sheet in
:mod:`opsd_kernels.divergences` literally: full log-softmax of both logits,
the pointwise terms, per-entry clipping, a sum over the vocabulary, then the
reduction over tokens. Gradients come from autograd (not from the analytic
formulas the fast paths use), so the tests compare two independent routes.

They default to float64 arithmetic and use O(N * V) memory: never use them
for training at real sizes.
"""

from __future__ import annotations

import math

import torch

from .divergences import KINDS
from .stats import DivergenceStats


def _safe_weighted_log_ratio(p, lp, lq):
    # p * (lp - lq) with 0 * log 0 = 0, written so that autograd produces no NaN
    # through the unused branch of the where (both operands are made finite there).
    zero = p == 0
    lp_s = torch.where(zero, torch.zeros_like(lp), lp)
    lq_s = torch.where(zero, torch.zeros_like(lq), lq)
    return torch.where(zero, torch.zeros_like(p), p * (lp_s - lq_s))


def _forward_kl(lT, lS, beta):
    return _safe_weighted_log_ratio(lT.exp(), lT, lS)


def _reverse_kl(lT, lS, beta):
    return _safe_weighted_log_ratio(lS.exp(), lS, lT)


def _jsd(lT, lS, beta):
    pT, pS = lT.exp(), lS.exp()
    # log(beta pT + (1-beta) pS), formed without taking the log of an underflowed sum;
    # where both are banned the mixture is unused (both weights are 0), and the
    # inputs are made finite there so that autograd sees no -inf - -inf
    none = (pT == 0) & (pS == 0)
    lT_s = torch.where(none, torch.zeros_like(lT), lT)
    lS_s = torch.where(none, torch.zeros_like(lS), lS)
    lM = torch.logaddexp(lT_s + math.log(beta), lS_s + math.log1p(-beta))
    return beta * _safe_weighted_log_ratio(pT, lT, lM) + (1 - beta) * _safe_weighted_log_ratio(
        pS, lS, lM
    )


# The reference's own formulas, written independently of the fast paths' formula sheet
# (divergences.py) so that the tests compare two routes; the kinds themselves come from
# the one registry, divergences.KINDS (a test checks that both name the same kinds).
POINTWISE = {"forward_kl": _forward_kl, "reverse_kl": _reverse_kl, "jsd": _jsd}


def _pointwise(kind: str, lT, lS, beta: float):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    return POINTWISE[kind](lT, lS, beta)


def _transform(x, scale: float, cap: float | None):
    """The logit transform: ``cap * tanh(scale * x / cap)``, or ``scale * x`` uncapped."""
    return scale * x if cap is None else cap * torch.tanh(scale * x / cap)


class _KeepClippedEntries(torch.autograd.Function):
    """Identity on the student's transformed logits ``z`` whose backward applies
    ``clip_mode="entry_keep"``'s replacement to the gradient autograd formed for the
    ``"entry"`` loss: on each row, every clipped entry's gradient becomes
    ``sum_U pS_u grad_u / sum_U pS_u`` over the unclipped entries U (0 when that mass
    is 0). The replacement is linear in the gradient, so a per-row upstream factor
    commutes with it."""

    @staticmethod
    def forward(ctx, z, clipped, p_student):
        ctx.save_for_backward(clipped, p_student)
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad):
        clipped, p_student = ctx.saved_tensors
        weight = torch.where(clipped, torch.zeros_like(p_student), p_student)
        mass = weight.sum(-1, keepdim=True)
        mean = (weight * grad).sum(-1, keepdim=True) / torch.where(mass == 0, 1.0, mass)
        mean = torch.where(mass == 0, torch.zeros_like(mean), mean)
        return torch.where(clipped, mean, grad), None, None


def _reduce(per_token, mask, reduction):
    if mask is not None:
        per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    count = max(per_token.numel(), 1) if mask is None else mask.sum().clamp(min=1)
    return per_token.sum() / count


def _stats(lS, lT, phi, per_token, clip, clip_mode, mask) -> DivergenceStats:
    """The per-token statistics of :class:`opsd_kernels.DivergenceStats`, from the
    unclipped terms ``phi`` and the unclipped row sums ``per_token`` (float ``dtype``)."""
    with torch.no_grad():
        pS, pT = lS.exp(), lT.exp()
        entropy = -torch.where(pS == 0, torch.zeros_like(pS), pS * lS).sum(-1)
        V = phi.shape[-1]
        if clip is None:
            clipped = torch.zeros_like(phi, dtype=torch.bool)
        elif clip_mode == "token":
            # a clipped token counts every entry as clipped
            clipped = (~(per_token < clip)).unsqueeze(-1).expand(phi.shape)
        else:
            clipped = ~(phi < clip)
        mass = torch.where(clipped, pT, torch.zeros_like(pT)).sum(-1)
        count = clipped.sum(-1)
        top1 = (clipped & (pT == pT.amax(-1, keepdim=True))).any(-1)
        if clip is not None and clip_mode == "token":
            mass = clipped[..., 0].to(pT.dtype)  # exactly 1, not a rounded sum of pT
            count = clipped[..., 0].long() * V
        if mask is not None:
            entropy, mass = entropy * mask, mass * mask
            count, top1 = count * mask, top1 & mask
        return DivergenceStats(entropy, mass, count.to(torch.int32), top1)


def divergence_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    clip: float | None = None,
    clip_mode: str = "entry",
    logit_scale: float = 1.0,
    softcap: float | None = None,
    teacher_logit_scale: float | str = "same",
    teacher_softcap: float | str | None = "same",
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
    dtype: torch.dtype = torch.float64,
):
    """Naive divergence between student and teacher logits of shape (..., V).

    Same semantics as :func:`opsd_kernels.divergence` (every option); arithmetic in
    ``dtype`` (float64 by default); returns a tensor of ``dtype``, and with
    ``return_stats=True`` also a :class:`~opsd_kernels.DivergenceStats` (float columns
    in ``dtype``). Differentiable by autograd in both inputs: ``clip_mode="entry"`` and
    ``"token"`` are the autograd of ``sum_v min(phi_v, clip)`` and
    ``min(sum_v phi_v, clip)``; ``"entry_keep"`` is the autograd of the ``"entry"`` loss
    with the student gradient with respect to the transformed logits ``z`` replaced on
    the clipped entries (:class:`_KeepClippedEntries`), then the transform's chain rule.
    Masked rows are replaced by zeros before any arithmetic, so whatever they hold (NaN
    padding included) has no effect.

    >>> s, t = torch.randn(3, 5), torch.randn(3, 5)
    >>> float(divergence_reference(s, s)) == 0.0
    True
    >>> divergence_reference(s, t, reduction="none").shape
    torch.Size([3])
    >>> loss, stats = divergence_reference(s, t, clip=1e-3, softcap=2.0, return_stats=True)
    >>> int(stats.clipped_entries.sum()) > 0
    True
    """
    if teacher_logit_scale == "same":
        teacher_logit_scale = logit_scale
    if teacher_softcap == "same":
        teacher_softcap = softcap
    s = student_logits.to(dtype)
    t = teacher_logits.to(dtype)
    if mask is not None:
        keep = mask.unsqueeze(-1)
        s = torch.where(keep, s, torch.zeros_like(s))
        t = torch.where(keep, t, torch.zeros_like(t))
    z_s = _transform(s, logit_scale, softcap)
    z_t = _transform(t, teacher_logit_scale, teacher_softcap)
    if clip is not None and clip_mode == "entry_keep":
        with torch.no_grad():
            lS0 = torch.log_softmax(z_s / temperature, dim=-1)
            lT0 = torch.log_softmax(z_t / temperature, dim=-1)
            clipped = ~(_pointwise(kind, lT0, lS0, beta) < clip)
        z_s = _KeepClippedEntries.apply(z_s, clipped, lS0.exp())
    lS = torch.log_softmax(z_s / temperature, dim=-1)
    lT = torch.log_softmax(z_t / temperature, dim=-1)
    phi = _pointwise(kind, lT, lS, beta)
    if clip is None:
        per_token = phi.sum(-1)
    elif clip_mode == "token":
        per_token = torch.clamp(phi.sum(-1), max=clip)
    elif clip_mode in ("entry", "entry_keep"):
        per_token = torch.clamp(phi, max=clip).sum(-1)
    else:
        raise ValueError(f"clip_mode must be 'entry', 'token' or 'entry_keep', got {clip_mode!r}")
    loss = _reduce(per_token, mask, reduction)
    if not return_stats:
        return loss
    return loss, _stats(lS, lT, phi, phi.sum(-1), clip, clip_mode, mask)


def fused_linear_divergence_reference(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    teacher_weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    **divergence_options,
) -> torch.Tensor:
    """Naive fused-linear divergence: full logits ``h @ W.T + b`` then the reference.

    The teacher side is detached (the method's stop-gradient). Arithmetic in
    ``dtype``; differentiable in ``student_hidden``, ``weight`` and ``bias``.

    >>> h, w = torch.randn(4, 8), torch.randn(11, 8)
    >>> fused_linear_divergence_reference(h, h, w).item()
    0.0
    """
    w_s = weight.to(dtype)
    b_s = None if bias is None else bias.to(dtype)
    if teacher_weight is None:
        w_t, b_t = w_s, b_s
    else:
        w_t = teacher_weight.to(dtype)
        b_t = None if teacher_bias is None else teacher_bias.to(dtype)
    student_logits = torch.nn.functional.linear(student_hidden.to(dtype), w_s, b_s)
    with torch.no_grad():
        teacher_logits = torch.nn.functional.linear(teacher_hidden.to(dtype), w_t, b_t)
    return divergence_reference(student_logits, teacher_logits, dtype=dtype, **divergence_options)


def topk_divergence_reference(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    tail: str = "bucket",
    temperature: float = 1.0,
    clip: float | None = None,
    clip_mode: str = "entry",
    logit_scale: float = 1.0,
    softcap: float | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
    dtype: torch.dtype = torch.float64,
):
    """Naive top-k-teacher divergence (see :func:`opsd_kernels.topk_divergence`).

    Straight from the formulas, on the full student log-softmax (N x V):
    entries with teacher log-prob -inf are padding (not outcomes);
    ``tail="bucket"``: outcomes are the ids plus the rest of the vocabulary,
    teacher ``rT = max(0, 1 - sum pT)`` (0 when the ids cover the vocabulary),
    student ``rS`` = the student's mass outside the ids; ``tail="renormalize"``:
    ``q = pT / sum pT`` and ``u = pS / sum_I pS``. The student's logits go through
    the transform (``logit_scale``, ``softcap``) first; ``clip_mode`` "entry" clips each
    outcome's term, "token" the row sum, "entry_keep" is "entry" with the student gradient
    of each clipped outcome's vocabulary entries replaced (:class:`_KeepClippedEntries`
    over the vocabulary). Arithmetic in ``dtype``; differentiable in
    ``student_logits`` by autograd. Assumes valid teacher input. ``return_stats``: also
    the per-token statistics (their top-k definitions: :func:`opsd_kernels.topk_divergence`).

    >>> s = torch.randn(3, 6)
    >>> lp, ids = torch.log_softmax(s, -1).topk(2, dim=-1)
    >>> abs(float(topk_divergence_reference(s, ids, lp))) < 1e-6   # teacher = student
    True
    """
    s = student_logits.to(dtype)
    lt = teacher_logprobs.to(dtype)
    ids = teacher_ids.long()
    valid = lt != -math.inf
    if mask is not None:
        s = torch.where(mask.unsqueeze(-1), s, torch.zeros_like(s))
        valid = valid & mask.unsqueeze(-1)
    ids = torch.where(valid, ids, torch.zeros_like(ids))
    zero = torch.zeros((), dtype=dtype)
    if tail not in ("bucket", "renormalize"):
        raise ValueError(f"tail must be 'bucket' or 'renormalize', got {tail!r}")
    ids_valid, lt_ids = valid, lt
    in_ids = torch.zeros(s.shape, dtype=torch.long).scatter_add(-1, ids, valid.long()) > 0
    empty = in_ids.all(-1)  # the ids cover the vocabulary: no rest outcome

    def outcomes(z):
        """The outcomes' ``(lT, lS, valid, lS_full)`` from the student's transformed logits."""
        lS_full = torch.log_softmax(z / temperature, dim=-1)
        lS = lS_full.gather(-1, ids)
        pT = torch.where(ids_valid, lt.exp(), zero)
        lT = torch.where(ids_valid, lt, zero)
        valid = ids_valid
        if tail == "bucket":
            rest = torch.where(in_ids | empty.unsqueeze(-1), -math.inf, lS_full)
            lrS = torch.where(empty, -math.inf, torch.logsumexp(rest, dim=-1))
            rT = torch.where(empty, zero, torch.clamp(1 - pT.sum(-1), min=0))
            lT = torch.cat([lT, rT.log().unsqueeze(-1)], -1)
            lS = torch.cat([lS, lrS.unsqueeze(-1)], -1)
            valid = torch.cat([valid, ~empty.unsqueeze(-1)], -1)
        else:
            pS = torch.where(valid, lS.exp(), zero)
            one = torch.ones((), dtype=dtype)
            # padding: a placeholder 1 inside the log, so the unused branch has a finite
            # gradient
            lT = torch.where(
                valid, (torch.where(valid, pT, one) / pT.sum(-1, keepdim=True)).log(), zero
            )
            lS = torch.where(
                valid, (torch.where(valid, pS, one) / pS.sum(-1, keepdim=True)).log(), zero
            )
        # padding outcomes: finite placeholders (so autograd sees no NaN), then dropped
        return torch.where(valid, lT, zero), torch.where(valid, lS, zero), valid, lS_full

    z = _transform(s, logit_scale, softcap)
    if clip is not None and clip_mode == "entry_keep":
        # each vocabulary entry is clipped with its outcome (an id; the complement for the
        # bucket's rest); the mean is over the unclipped entries, weighted by pS (renormalize:
        # over the ids only, whose pS are proportional to u)
        with torch.no_grad():
            lT0, lS0, valid0, lS_full0 = outcomes(z)
            clipped = valid0 & ~(_pointwise(kind, lT0, lS0, beta) < clip)
            K = ids.shape[-1]
            entries = (
                torch.zeros(s.shape, dtype=torch.long).scatter_add(
                    -1, ids, (clipped[..., :K] & ids_valid).long()
                )
                > 0
            )
            weight = lS_full0.exp()
            if tail == "bucket":
                entries = entries | (~in_ids & clipped[..., K:])
            else:
                weight = torch.where(in_ids, weight, zero)
        z = _KeepClippedEntries.apply(z, entries, weight)
    lT, lS, valid, lS_full = outcomes(z)
    phi = _pointwise(kind, lT, lS, beta)
    stats = None
    if return_stats:
        with torch.no_grad():
            # the student's entropy: full distribution (bucket), over the ids (renormalize)
            lS_ent = lS_full if tail == "bucket" else torch.where(valid, lS, -math.inf)
            p_ent = lS_ent.exp()
            entropy = -torch.where(p_ent == 0, zero, p_ent * lS_ent).sum(-1)
            unclipped = torch.where(valid, phi, zero).sum(-1)
            if clip is None:
                clipped = torch.zeros_like(valid)
            elif clip_mode == "token":
                clipped = valid & ~(unclipped < clip).unsqueeze(-1)
            else:
                clipped = valid & ~(phi < clip)
            mass = torch.where(clipped, lT.exp(), zero).sum(-1)
            if clip is not None and clip_mode == "token":
                mass = clipped.any(-1).to(dtype)  # 1, not a rounded sum
            K = ids_valid.shape[-1]
            lt_top = torch.where(ids_valid, lt_ids, -math.inf)
            top1 = ids_valid & (lt_top == lt_top.amax(-1, keepdim=True))
            top1_clipped = (clipped[..., :K] & top1).any(-1)
            count = clipped.sum(-1)
            if mask is not None:
                entropy, mass = entropy * mask, mass * mask
                count, top1_clipped = count * mask, top1_clipped & mask
            stats = DivergenceStats(entropy, mass, count.to(torch.int32), top1_clipped)
    if clip is not None and clip_mode in ("entry", "entry_keep"):
        phi = torch.clamp(phi, max=clip)
    per_token = torch.where(valid, phi, zero).sum(-1)
    if clip is not None and clip_mode == "token":
        per_token = torch.clamp(per_token, max=clip)

    loss = _reduce(per_token, mask, reduction)
    return loss if stats is None else (loss, stats)


def fused_linear_topk_divergence_reference(
    student_hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    **options,
) -> torch.Tensor:
    """Naive: full logits ``h @ W.T + b`` (masked rows of ``h`` zeroed), then
    :func:`topk_divergence_reference`. Differentiable in ``student_hidden``,
    ``weight`` and ``bias``.

    >>> h, w = torch.randn(4, 8), torch.randn(11, 8)
    >>> ids = torch.arange(11).expand(4, 11)
    >>> lp = torch.log_softmax(h.double() @ w.double().T, -1)   # the full distribution
    >>> abs(float(fused_linear_topk_divergence_reference(h, w, ids, lp))) < 1e-12
    True
    """
    h = student_hidden.to(dtype)
    if mask is not None:
        h = torch.where(mask.unsqueeze(-1), h, torch.zeros_like(h))
    logits = torch.nn.functional.linear(
        h, weight.to(dtype), None if bias is None else bias.to(dtype)
    )
    return topk_divergence_reference(
        logits, teacher_ids, teacher_logprobs, mask=mask, dtype=dtype, **options
    )
