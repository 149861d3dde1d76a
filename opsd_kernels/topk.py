"""Top-k teachers: the divergence against a teacher given as its top-k log-probabilities.

The teacher is not in the process (served by vLLM/SGLang, or cached offline): per
token it is K distinct ids ``I`` and their log-probabilities ``lt`` (used as given;
the caller applies any teacher temperature; ``-inf`` entries are padding for rows
with fewer than K entries). The student is the full-vocabulary softmax,
``lS = log_softmax(s / temperature)``, ``pS_k = exp(lS[I_k])``.

Two ways to compare a K-entry teacher with a V-entry student (``tail``):

* ``"bucket"`` (default): two distributions over K + 1 outcomes, the K ids and
  "everything else". Teacher: ``pT_k`` and ``rT = max(0, 1 - sum_k pT_k)``;
  student: ``pS_k`` and ``rS = sum_{v not in I} pS_v``, formed as
  ``LSE(complement) - LSE(all)`` (never ``1 - sum``, which cancels).
* ``"renormalize"``: both renormalised over I: ``q_k = pT_k / sum pT``,
  ``u_k = pS_k / sum_I pS``. Needs no full-vocabulary pass at all.

Row loss ``L = sum_j c(phi(lT_j, lS_j))`` over the outcomes j, with the kinds of
:mod:`opsd_kernels.divergences` (forward_kl, reverse_kl, jsd) and the per-entry
clip ``c(x) = min(x, clip)``.

Gradient (b = s / tau, g_j = d c(phi_j) / d lS_j, 0 where clipped, G = sum_j g_j):

* bucket: ``lS_k = b_{I_k} - LSE``, ``log rS = LSE_C - LSE`` (LSE_C: over the
  complement), so
  ``dL/db_{I_k} = g_k - pS_k G`` and, for v not in I,
  ``dL/db_v = g_R e^(b_v - LSE_C) - G pS_v = e^(b_v - LSE_C) (g_R - G rS)``:
  one coefficient per row times the complement's own softmax (always <= 1,
  never a division by a small rS).
* renormalize: ``dL/db_{I_k} = g_k - u_k G``, zero elsewhere.
* ``dL/ds = dL/db / tau``.

Edge conventions: when the ids cover the whole vocabulary (K = V) the bucket is
empty and ``rT`` is taken as 0 (the teacher's own rounding of ``1 - sum`` is no
mass), so both tails then equal :func:`opsd_kernels.divergence` on the full
teacher. ``0 log 0 = 0``; a side that puts mass where the other has none gives
``+inf`` (e.g. reverse KL, bucket tail, a teacher whose top-k mass reaches 1
while the student keeps mass outside).

Input checks on the values (ids in range, log-probs <= 0, teacher mass <= 1 +
tol, no duplicate ids among the non-padding entries of a counted row) are
computed on the device without a host sync, as one flag per row. With
``validate=True`` (the default for CPU tensors, where it costs no device
synchronisation) a flagged row raises a clear error; otherwise (the default on
CUDA, to keep the hot path free of host syncs) a flagged row's loss and
gradient are NaN, never a silently wrong number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import config, gemm
from ._validation import check_float_tensor, check_impl, check_mask, check_options
from .chunked import ChunkGradients, apply_upstream
from .divergences import KindSpec, transform_grad
from .reductions import forward_scale, reduce_rows
from .stats import (
    CLIPPED_ENTRIES,
    STUDENT_ENTROPY,
    TEACHER_CLIPPED_MASS,
    TEACHER_TOP1_CLIPPED,
    new_stats_buffer,
    public_stats,
)

TAILS = ("bucket", "renormalize")
_NEG_INF = float("-inf")


@dataclass(frozen=True)
class TopkOptions:
    spec: KindSpec
    beta: float
    temperature: float
    clip: float | None
    reduction: str
    tail: str
    clip_mode: str = "entry"
    logit_scale: float = 1.0
    softcap: float | None = None

    def row_options(self) -> dict:
        """The keywords of the row functions (``topk_rows_torch`` and its Triton twin)."""
        return dict(
            spec=self.spec,
            beta=self.beta,
            temperature=self.temperature,
            clip=self.clip,
            clip_mode=self.clip_mode,
            logit_scale=self.logit_scale,
            softcap=self.softcap,
        )


@dataclass
class TeacherRows:
    """The teacher, prepared once per call (all (N, K) or (N,); no (N, V) tensor).

    ids: int64, padding/invalid entries replaced by 0 (a safe index, contributing 0);
    logprobs: compute dtype, the teacher log-probabilities of the K outcomes
    (renormalised over the valid entries for ``tail="renormalize"``), -inf where
    not valid; valid: bool, real entries of counted rows with an in-range id;
    log_rest: (N,) log rT for the bucket tail, None for renormalize;
    bad: (N,) bool, rows that failed a value check (NaN output), or None.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    valid: torch.Tensor
    log_rest: torch.Tensor | None
    bad: torch.Tensor | None

    def rows(self, lo: int, hi: int) -> dict:
        return dict(
            ids=self.ids[lo:hi],
            logprobs=self.logprobs[lo:hi],
            valid=self.valid[lo:hi],
            log_rest=None if self.log_rest is None else self.log_rest[lo:hi],
        )


def mass_tolerance(dtype: torch.dtype) -> float:
    """How far above 1 a row's teacher mass ``sum_k exp(lt_k)`` may be (rounding of
    ``dtype`` log-probs) before it is rejected: ``max(1e-4, 4 eps(dtype))``."""
    return max(1e-4, 4 * torch.finfo(dtype).eps)


# --------------------------------------------------------------------------- validation


#: the clip modes of the top-k losses (all of them; "entry_keep" on the vocabulary entries,
#: each clipped with its outcome: see :func:`topk_divergence`)
TOPK_CLIP_MODES = ("entry", "token", "entry_keep")


def _check_topk_options(
    kind,
    beta,
    tail,
    temperature,
    clip,
    reduction,
    clip_mode="entry",
    logit_scale=1.0,
    softcap=None,
    return_stats=False,
) -> TopkOptions:
    o = check_options(kind, beta, temperature, clip, reduction, clip_mode, logit_scale, softcap)
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {return_stats!r}")
    return TopkOptions(
        o.spec,
        o.beta,
        o.temperature,
        o.clip,
        o.reduction,
        tail,
        o.clip_mode,
        o.logit_scale,
        o.softcap,
    )


def _check_teacher(teacher_ids, teacher_logprobs, lead_shape, device) -> int:
    """Types, shapes and devices of the teacher tensors; returns K."""
    if not isinstance(teacher_ids, torch.Tensor):
        raise TypeError(f"teacher_ids must be a torch.Tensor, got {type(teacher_ids).__name__}")
    if teacher_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"teacher_ids must have dtype torch.int64 or torch.int32, got {teacher_ids.dtype}"
        )
    check_float_tensor("teacher_logprobs", teacher_logprobs)
    if teacher_ids.shape != teacher_logprobs.shape:
        raise ValueError(
            "teacher_ids and teacher_logprobs must have the same shape (..., K), got "
            f"{tuple(teacher_ids.shape)} and {tuple(teacher_logprobs.shape)}"
        )
    if teacher_ids.dim() != len(lead_shape) + 1 or teacher_ids.shape[:-1] != lead_shape:
        raise ValueError(
            f"teacher_ids must have shape (*{tuple(lead_shape)}, K) (the student's leading "
            f"shape, then K), got {tuple(teacher_ids.shape)}"
        )
    K = teacher_ids.shape[-1]
    if K == 0:
        raise ValueError("teacher_ids has K = 0 entries per token; at least 1 is needed")
    for name, x in (("teacher_ids", teacher_ids), ("teacher_logprobs", teacher_logprobs)):
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but the student is on {device}")
    return K


def prepare_teacher(
    teacher_ids, teacher_logprobs, mask, V: int, tail: str, compute: torch.dtype, validate: bool
) -> TeacherRows:
    """Flatten the teacher to (N, K), check its values, form the K (+1) teacher outcomes.

    No host sync unless ``validate`` (then one, plus more on the error path).
    """
    K = teacher_ids.shape[-1]
    ids = teacher_ids.reshape(-1, K).long()
    lt = teacher_logprobs.reshape(-1, K)
    N = ids.shape[0]
    # -inf is padding; NaN is not (it must stay visible)
    real = lt != _NEG_INF
    if mask is not None:
        real = real & mask.reshape(-1, 1)  # masked rows' contents are never looked at
    in_range = (ids >= 0) & (ids < V)
    valid = real & in_range
    # the teacher's mass in float64: its rounding, not ours, decides the rest rT
    lt64 = torch.where(real, lt.to(torch.float64), _NEG_INF)
    mass = lt64.exp().sum(-1)
    bad_range = real & ~in_range
    bad_logprob = real & (lt > 0)
    bad_mass = mass > 1.0 + mass_tolerance(lt.dtype)
    # duplicates among the real in-range entries: sort with distinct negative sentinels
    sentinel = -1 - torch.arange(K, device=ids.device).expand(N, K)
    key = torch.where(valid, ids, sentinel).sort(-1).values
    dup = (key[:, 1:] == key[:, :-1]).any(-1) if K > 1 else torch.zeros_like(bad_mass)
    bad = bad_range.any(-1) | bad_logprob.any(-1) | bad_mass | dup
    if validate:
        _raise_on_bad(bad_range, bad_logprob, bad_mass, dup, mass, ids, lt, V, tail)
        bad = None
    safe_ids = torch.where(valid, ids, 0)
    if tail == "bucket":
        # no complement when the ids cover the vocabulary: no rest outcome, rT := 0
        covers = valid.sum(-1) >= V
        rest = torch.where(covers, 0.0, (1.0 - mass).clamp(min=0.0))
        log_rest = rest.log().to(compute)
        logprobs = torch.where(valid, lt64, _NEG_INF).to(compute)
    else:
        lse = torch.logsumexp(torch.where(valid, lt64, _NEG_INF), -1, keepdim=True)
        lse = torch.where(lse == _NEG_INF, 0.0, lse)  # a row without entries: loss 0
        logprobs = torch.where(valid, lt64 - lse, _NEG_INF).to(compute)
        log_rest = None
    return TeacherRows(safe_ids, logprobs, valid, log_rest, bad)


def _raise_on_bad(bad_range, bad_logprob, bad_mass, dup, mass, ids, lt, V, tail) -> None:
    flags = torch.stack([bad_range.any(), bad_logprob.any(), bad_mass.any(), dup.any()]).tolist()
    if not any(flags):
        return

    def first(t):
        return tuple(int(i) for i in t.nonzero()[0])

    if flags[0]:
        r, k = first(bad_range)
        raise ValueError(
            f"teacher_ids must lie in [0, V={V}) for every non-padding entry; token row {r} "
            f"(flattened), entry {k} has id {int(ids[r, k])}"
        )
    if flags[1]:
        r, k = first(bad_logprob)
        raise ValueError(
            f"teacher_logprobs must be <= 0 (log-probabilities; -inf marks padding); token "
            f"row {r} (flattened), entry {k} is {float(lt[r, k])}"
        )
    if flags[2]:
        (r,) = first(bad_mass)
        raise ValueError(
            f"teacher_logprobs of a row must sum (as probabilities) to at most 1 + "
            f"{mass_tolerance(lt.dtype):g}; token row {r} (flattened) sums to "
            f"{float(mass[r]):.6g} (log-probs over the full vocabulary, not logits?)"
        )
    (r,) = first(dup)
    raise ValueError(
        f"teacher_ids must be distinct within a row (padding entries, log-prob -inf, "
        f"excepted); token row {r} (flattened) repeats an id: {ids[r].tolist()}"
    )


# --------------------------------------------------------------------------- row math


def _tail_outcomes(b, ids, logprobs, valid, log_rest):
    """Student log-probs of the outcomes, from scaled logits ``b`` (modified in place).

    Returns ``(lT, lS, outcome_valid, z_c, lse)`` where the bucket's outcome is
    last; for the bucket ``b`` then holds ``exp(b - m)`` (m: the complement's max, 0 at
    the ids) and ``z_c`` its row sums; ``z_c`` is None for renormalize.
    """
    zk = b.gather(1, ids)
    zk = torch.where(valid, zk, _NEG_INF)
    lse_k = torch.logsumexp(zk, 1)
    if log_rest is None:  # renormalize: only the K logits matter
        lse_k_safe = torch.where(lse_k == _NEG_INF, 0.0, lse_k)
        return logprobs, zk - lse_k_safe[:, None], valid, None, lse_k_safe
    # exclude the ids from the row: -inf at each valid id ("amin" keeps other rows'
    # and padding entries' values whatever duplicates the safe index 0 has)
    fill = torch.where(valid, _NEG_INF, math.inf).to(b.dtype)
    b.scatter_reduce_(1, ids, fill, reduce="amin")
    # log-sum-exp of the complement, in place: b becomes e = exp(b - m) (<= 1), which the
    # gradient reuses (exp(b - LSE_C) = e / z_c); no (R, V) temporary
    m = b.amax(1)
    m = torch.where(m == _NEG_INF, 0.0, m)
    z_c = b.sub_(m[:, None]).exp_().sum(1)
    lse_c = m + z_c.log()
    lse = torch.logaddexp(lse_c, lse_k)
    lS = torch.cat([zk - lse[:, None], (lse_c - lse)[:, None]], 1)
    lT = torch.cat([logprobs, log_rest[:, None]], 1)
    ones = torch.ones_like(valid[:, :1])
    return lT, lS, torch.cat([valid, ones], 1), z_c, lse


def outcome_terms(lT, lS, ok, spec: KindSpec, beta: float, clip: float | None):
    """Per-outcome ``(phi, g)`` with the per-entry clip applied (``clip`` None: no clip)
    and invalid outcomes set to 0."""
    zero = torch.zeros((), dtype=lT.dtype, device=lT.device)
    lT_s = torch.where(ok, lT, zero)
    lS_s = torch.where(ok, lS, zero)
    phi, g, _ = spec.terms(lT_s, lS_s, lT_s.exp(), lS_s.exp(), beta)
    if clip is not None:
        kept = phi < clip
        phi = torch.clamp(phi, max=clip)
        g = torch.where(kept, g, zero)
    return torch.where(ok, phi, zero), torch.where(ok, g, zero)


def topk_rows_torch(
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
    """Row losses (R,) of a block of student logits against the prepared teacher.

    ``logits``: (R, V) float32/float64 RAW logits in a buffer that this function owns:
    it is overwritten (with dL/ds times the row ``scale`` when ``want_grad``, else
    scratch). ``scale``: (1,) or (R,) per-row gradient factors. ``logit_scale``,
    ``softcap``: the student's logit transform (``DivergenceOptions``), applied first;
    the gradient is with respect to the raw logits. ``clip_mode``: "entry" (per
    outcome), "token" (``min(L, clip)`` per row, no gradient for a capped row) or
    "entry_keep" (:func:`_kept_mean` on the clipped entries).
    ``stats``: None, or an (R, NUM_STATS) tensor filled with the rows' statistics
    (:func:`topk_stats`).
    """
    inv_t = 1.0 / temperature
    dz = None
    if softcap is None:
        b = logits.mul_(logit_scale * inv_t)
    else:
        z = logits.mul_(logit_scale / softcap).tanh_().mul_(softcap)
        dz = transform_grad(z, logit_scale, softcap) if want_grad else None  # (R, V)
        b = z.mul_(inv_t)
    token = clip is not None and clip_mode == "token"
    lT, lS, ok, z_c, _ = _tail_outcomes(b, ids, logprobs, valid, log_rest)
    phi, g = outcome_terms(lT, lS, ok, spec, beta, None if token else clip)
    loss = phi.sum(1)
    if token:
        dropped = ~(loss < clip)
        loss = torch.clamp(loss, max=clip)  # a NaN sum stays NaN
    if stats is not None:
        topk_stats(stats, b, lT, lS, ok, z_c, phi, clip, dropped if token else None)
    if not want_grad:
        return loss
    G = g.sum(1)
    row = (scale.to(b.dtype) * inv_t).reshape(-1)
    if softcap is None and logit_scale != 1.0:
        row = row * logit_scale
    if token:
        row = torch.where(dropped, torch.zeros_like(row), row)
    K = ids.shape[1]
    pS = torch.where(ok[:, :K], lS[:, :K], _NEG_INF).exp()
    entry = (g[:, :K] - pS * G[:, None]) * row[:, None]
    keep = clip is not None and clip_mode == "entry_keep"
    if keep:
        clipped = ok & ~(phi < clip)
        mean = _kept_mean(b, entry, pS, clipped, lS, g, G, row, z_c, K)
        entry = torch.where(clipped[:, :K], mean[:, None], entry)
    if log_rest is None:
        b.zero_()
    else:
        coef = (g[:, K] - G * lS[:, K].exp()) * row
        # b holds exp(b - m): times 1 / z_c it is exp(b - LSE_C); the ids hold 0 here
        per_row = torch.where(z_c > 0, coef / z_c, 0.0)
        b.mul_(per_row.reshape(-1, 1))
        if keep:
            # a clipped rest outcome: every complement entry gets the mean; the ids back to 0
            rest = clipped[:, K : K + 1].to(b.dtype)
            b.mul_(1.0 - rest).add_(mean[:, None] * rest)
            b.scatter_reduce_(1, ids, torch.where(valid, _NEG_INF, math.inf).to(b.dtype), "amin")
            b.masked_fill_(b == _NEG_INF, 0.0)
    b.scatter_add_(1, ids, torch.where(valid, entry, 0.0))
    if dz is not None:
        b.mul_(dz)
    return loss


def _kept_mean(e, entry, pS, clipped, lS, g, G, row, z_c, K):
    """``clip_mode="entry_keep"``'s mean: ``sum_U pS_v grad_v / sum_U pS_v`` over the
    unclipped vocabulary entries U (the unclipped ids, and the complement when the rest
    outcome is unclipped; 0 when that mass is 0), with the row factors of ``entry``.

    ``e``: the complement buffer ``exp(b - m)`` (bucket; ``z_c`` None for renormalize,
    whose ``pS`` are the renormalised ``u``). Over the complement ``pS_v = rS e_v / z_c``
    and ``grad_v = coef e_v / z_c``, so its part is ``rS coef sum e^2 / z_c^2``.
    """
    zero = torch.zeros((), dtype=pS.dtype, device=pS.device)
    p_kept = torch.where(clipped[:, :K], zero, pS)
    num = (p_kept * entry).sum(1)
    mass = p_kept.sum(1)
    if z_c is not None:
        rest_kept = ~clipped[:, K] & (z_c > 0)
        r_s = lS[:, K].exp()
        coef = (g[:, K] - G * r_s) * row
        sum_sq = torch.linalg.vector_norm(e, dim=1).square()
        num = num + torch.where(rest_kept, r_s * coef * sum_sq / z_c.square(), zero)
        mass = mass + torch.where(rest_kept, r_s, zero)
    return torch.where(mass == 0, zero, num / mass)


def topk_stats(stats, e, lT, lS, ok, z_c, phi, clip, dropped) -> None:
    """Fill ``stats`` (R, NUM_STATS) for top-k teachers (see :func:`topk_divergence`).

    ``e``: the bucket tail's complement buffer ``exp(b - m)`` (0 at the ids; unused for
    renormalize, ``z_c`` None); ``lT``, ``lS``, ``ok``: the outcomes' log-probabilities
    and validity (the rest outcome last for the bucket); ``phi``: the outcomes' terms
    after any per-entry clip (``clip`` with ``dropped`` None) or unclipped ("token":
    ``dropped``, the capped rows).
    """
    zero = torch.zeros((), dtype=lS.dtype, device=lS.device)
    K = lT.shape[1] - (0 if z_c is None else 1)
    lS_k = torch.where(ok[:, :K], lS[:, :K], zero)
    neg = torch.where(lS_k.exp() == 0, zero, lS_k.exp() * lS_k).sum(1)
    if z_c is not None:
        # the complement's part of sum_v pS_v lS_v: pS_v = e_v rS / z_c, lS_v = log(e_v z_r)
        # with z_r = rS / z_c; so rS (sum e log e / z_c + log z_r)
        r_s = lS[:, K].exp()
        inner = torch.special.xlogy(e, e).sum(1) / z_c + lS[:, K] - z_c.log()
        neg = neg + torch.where(z_c > 0, r_s * inner, zero)
    stats[:, STUDENT_ENTROPY] = -neg
    if clip is None:
        stats[:, TEACHER_CLIPPED_MASS:] = 0
        return
    if dropped is not None:
        flag = dropped.to(stats.dtype)
        stats[:, TEACHER_CLIPPED_MASS] = flag
        stats[:, CLIPPED_ENTRIES] = flag * ok.sum(1)
        stats[:, TEACHER_TOP1_CLIPPED] = flag
        return
    clipped = ok & ~(phi < clip)
    pT = torch.where(ok, lT, -math.inf).exp()
    stats[:, TEACHER_CLIPPED_MASS] = torch.where(clipped, pT, zero).sum(1)
    stats[:, CLIPPED_ENTRIES] = clipped.sum(1)
    lT_k = torch.where(ok[:, :K], lT[:, :K], -math.inf)
    top1 = ok[:, :K] & (lT_k == lT_k.amax(1, keepdim=True))
    stats[:, TEACHER_TOP1_CLIPPED] = (clipped[:, :K] & top1).any(1)


# --------------------------------------------------------------------------- helpers


def _row_function(impl: str):
    if impl == "torch":
        return topk_rows_torch
    from .triton.topk_rows import topk_rows_triton

    return topk_rows_triton


def _finish_rows(loss, grad, keep, bad, stats=None):
    """Masked rows give 0 (loss, gradient, statistics); rows that failed a value check
    give NaN (their statistics NaN too)."""
    if keep is not None:
        loss = torch.where(keep, loss, 0.0)
        if grad is not None:
            grad.masked_fill_(~keep[:, None], 0.0)
        if stats is not None:
            stats.masked_fill_(~keep[:, None], 0.0)
    if bad is not None:
        loss = torch.where(bad, math.nan, loss)
        if grad is not None:
            grad.masked_fill_(bad[:, None], math.nan)
        if stats is not None:
            stats.masked_fill_(bad[:, None], math.nan)
    return loss


def _slice(x, lo, hi):
    return None if x is None else x[lo:hi]


def _rows_per_block(V: int, R: int) -> int:
    # about 2 float32 rows of width V alive per row (the buffer, one reduction temporary)
    budget = max(1, config.chunk_memory_budget // max(1, 2 * V * 4))
    return max(1, min(budget, max(16, -(-R // 8))))


# --------------------------------------------------------------------------- on logits


class TopkDivergenceFunction(torch.autograd.Function):
    """Top-k divergence on student logits. The forward forms no gradient; the backward
    recomputes each row block with its upstream factor (any reduction, any dtype: a
    16-bit gradient is only written after the upstream factor is applied)."""

    @staticmethod
    def forward(
        ctx, student, teacher: TeacherRows, mask1, opts: TopkOptions, row_fn, block, stats=None
    ):
        V = student.shape[-1]
        lead = student.shape[:-1]
        s2 = student.reshape(-1, V)
        N = s2.shape[0]
        compute = gemm.compute_dtype(student.dtype)
        scale = forward_scale(opts.reduction, mask1, N, student.device, compute)
        loss = torch.empty(N, dtype=compute, device=student.device)
        for lo in range(0, N, block):
            hi = min(N, lo + block)
            rows = _run_block(
                s2, lo, hi, teacher, mask1, opts, row_fn, compute, scale, False, stats
            )
            loss[lo:hi] = rows
        ctx.save_for_backward(student)
        ctx.args = (teacher, mask1, opts, row_fn, block, scale)
        return reduce_rows(loss, opts.reduction, scale, lead)

    @staticmethod
    def backward(ctx, grad_out):
        (student,) = ctx.saved_tensors
        teacher, mask1, opts, row_fn, block, scale = ctx.args
        V = student.shape[-1]
        s2 = student.reshape(-1, V)
        N = s2.shape[0]
        compute = gemm.compute_dtype(student.dtype)
        if opts.reduction == "none":
            factor = grad_out.reshape(-1).to(compute)
        else:
            factor = (scale * grad_out.to(compute)).reshape(1)
        grad = torch.empty(s2.shape, dtype=student.dtype, device=student.device)
        for lo in range(0, N, block):
            hi = min(N, lo + block)
            f = factor if factor.numel() == 1 else factor[lo:hi]
            buf = _run_block(s2, lo, hi, teacher, mask1, opts, row_fn, compute, f, True)
            grad[lo:hi] = buf
        return grad.view(student.shape), None, None, None, None, None, None


def _run_block(s2, lo, hi, teacher, mask1, opts, row_fn, compute, scale, want_grad, stats=None):
    """Loss rows of rows lo:hi (want_grad False) or their gradient buffer (True);
    ``stats``: None or the whole (N, NUM_STATS) buffer, whose rows lo:hi are filled."""
    buf = s2[lo:hi].to(compute, copy=True)
    keep = _slice(mask1, lo, hi)
    if keep is not None:
        buf.masked_fill_(~keep[:, None], 0.0)  # padding rows may hold anything (NaN)
    extra = {} if stats is None else {"stats": stats[lo:hi]}
    loss = row_fn(
        buf,
        **teacher.rows(lo, hi),
        **opts.row_options(),
        scale=scale,
        want_grad=want_grad,
        **extra,
    )
    loss = _finish_rows(
        loss,
        buf if want_grad else None,
        keep,
        _slice(teacher.bad, lo, hi),
        _slice(stats, lo, hi),
    )
    return buf if want_grad else loss


def _validate_default(validate, device) -> bool:
    if validate is None:
        return device.type == "cpu"
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be None, True or False, got {validate!r}")
    return validate


def topk_divergence(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    tail: str = "bucket",
    temperature: float = 1.0,
    clip: float | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    impl: str = "auto",
    validate: bool | None = None,
    clip_mode: str = "entry",
    logit_scale: float = 1.0,
    softcap: float | None = None,
    return_stats: bool = False,
) -> torch.Tensor:
    """Per-token divergence between a top-k teacher and the full student distribution.

    Args:
        student_logits: (..., V) float32, bfloat16, float16 (or float64) logits.
        teacher_ids: (..., K) int64 or int32 token ids, distinct within a row
            (padding entries excepted).
        teacher_logprobs: (..., K) float teacher log-probabilities of those ids,
            used as given (apply any teacher temperature before); ``-inf`` marks
            padding (rows with fewer than K entries; their ids are ignored).
        kind: ``"forward_kl"`` (KL(teacher || student)), ``"reverse_kl"``, or
            ``"jsd"`` (generalized JSD with ``beta``), on the two K(+1)-outcome
            distributions that ``tail`` defines.
        tail: ``"bucket"`` (default): K + 1 outcomes, the ids plus one bucket for
            the rest of the vocabulary (teacher ``rT = max(0, 1 - sum pT)``,
            student ``rS`` = its mass outside the ids, formed stably in log space);
            ``"renormalize"``: both sides renormalised over the ids.
        temperature: the student logits are divided by it before the softmax
            (the teacher's log-probs are not touched).
        clip: None, or tau > 0: each outcome's pointwise term is clipped,
            ``min(phi, tau)``, before the sum (clipped outcomes pass no gradient).
        clip_mode: ``"entry"`` (default, per outcome, as above), ``"token"``
            (``min(L, tau)`` per token; a capped token passes no gradient) or
            ``"entry_keep"`` (the loss of ``"entry"``; the student-logit gradient of every
            vocabulary entry whose outcome is clipped (an id, or the whole complement for
            the bucket's rest) is replaced by the ``pS``-weighted mean of the unclipped
            entries' gradients (``renormalize``: over the ids, weights ``u``), as
            :func:`opsd_kernels.divergence`'s).
        logit_scale, softcap: the student's logit transform before the temperature,
            ``softcap * tanh(logit_scale * x / softcap)`` (or ``logit_scale * x``), as
            :func:`opsd_kernels.divergence`'s; the teacher's log-probs are used as given.
        return_stats: also return per-token statistics, ``(loss, DivergenceStats)``, over
            the outcomes the loss uses: ``student_entropy`` of the student's full
            distribution for ``tail="bucket"``, of the student renormalised over the ids
            for ``"renormalize"`` (the only student distribution that tail forms);
            ``teacher_clipped_mass`` the teacher's probability of the clipped outcomes
            (the rest outcome ``rT`` included), ``clipped_entries`` their number, and
            ``teacher_top1_clipped`` whether the teacher's most likely id was clipped
            ("token": a capped token counts every valid outcome, mass 1). Masked rows 0;
            rows failing a value check NaN (float columns).
        mask, reduction: as :func:`opsd_kernels.divergence` (masked rows' logits,
            ids and log-probs are never read into an output).
        impl: ``"auto"`` (Triton on CUDA, torch otherwise), ``"torch"``, ``"triton"``.
        validate: raise on bad teacher values (ids out of range, log-probs > 0,
            mass > 1 + :func:`mass_tolerance`, duplicate ids) of counted rows.
            None (default): True for CPU tensors, False on CUDA (no host sync in
            the hot path; a bad row's loss and gradient are then NaN).

    Returns:
        float32 loss (float64 for float64 logits): a scalar, or shape (...) for
        ``reduction="none"``. Gradients flow to ``student_logits`` only. The forward
        stores nothing of size (..., V); the backward recomputes row blocks.

    With K = V (the whole teacher distribution) both tails equal
    ``divergence(student_logits, teacher_logits)`` for
    ``teacher_logprobs = log_softmax(teacher_logits / temperature)``.

    >>> import torch
    >>> s = torch.randn(4, 50, requires_grad=True)
    >>> t_lp = torch.log_softmax(torch.randn(4, 50), -1)
    >>> lp, ids = t_lp.topk(5, dim=-1)                 # what a serving engine returns
    >>> loss = topk_divergence(s, ids, lp, tail="bucket")
    >>> loss.backward(); s.grad.shape
    torch.Size([4, 50])
    >>> from opsd_kernels import divergence          # K = V: the full divergence
    >>> lp, ids = t_lp.topk(50, dim=-1)
    >>> full = divergence(s, t_lp)
    >>> torch.allclose(topk_divergence(s, ids, lp), full, atol=1e-5)
    True
    """
    opts = _check_topk_options(
        kind,
        beta,
        tail,
        temperature,
        clip,
        reduction,
        clip_mode,
        logit_scale,
        softcap,
        return_stats,
    )
    check_float_tensor("student_logits", student_logits)
    if student_logits.dim() == 0 or student_logits.shape[-1] == 0:
        raise ValueError("student_logits must have shape (..., V) with V > 0")
    device = student_logits.device
    _check_teacher(teacher_ids, teacher_logprobs, student_logits.shape[:-1], device)
    check_mask(mask, student_logits.shape[:-1], device)
    impl = check_impl(impl, ("auto", "torch", "triton"), device, student_logits.dtype)
    V = student_logits.shape[-1]
    compute = gemm.compute_dtype(student_logits.dtype)
    mask1 = None if mask is None else mask.reshape(-1)
    teacher = prepare_teacher(
        teacher_ids.detach(),
        teacher_logprobs.detach(),
        mask1,
        V,
        opts.tail,
        compute,
        _validate_default(validate, device),
    )
    if not torch.is_grad_enabled():
        student_logits = student_logits.detach()
    N = student_logits.numel() // V
    row_fn = _row_function(impl)
    stats = new_stats_buffer(N, device) if return_stats else None
    loss = TopkDivergenceFunction.apply(
        student_logits, teacher, mask1, opts, row_fn, _rows_per_block(V, N), stats
    )
    return loss if stats is None else (loss, public_stats(stats, student_logits.shape[:-1]))


# --------------------------------------------------------------------------- fused linear


def auto_topk_chunk(V: int, N: int) -> int:
    """Tokens per chunk: about 3 float32 rows of width V per token fit
    ``config.chunk_memory_budget``; at most ``max(128, ceil(N / 8))`` tokens."""
    c = max(1, config.chunk_memory_budget // (3 * V * 4))
    c = c // 64 * 64 if c >= 128 else c
    return min(c, max(128, -(-N // 8)))


def auto_renormalize_chunk(K: int, H: int, N: int) -> int:
    """Tokens per chunk of the renormalize tail: its (c, K, H) float32 gather of weight
    rows (and one temporary of that size) fit ``config.chunk_memory_budget``; at most
    ``max(128, ceil(N / 8))`` tokens, as the bucket tail's chunks."""
    return max(1, min(config.chunk_memory_budget // (2 * K * H * 4), max(128, -(-N // 8))))


def _renormalize_linear_pass(
    hs, weight, bias, teacher, mask1, opts, chunk, scale, want_h, want_w, want_b, compute, stats
):
    """The renormalize tail needs only the K logits per token: ``h . W[I_k] (+ b[I_k])``
    from gathered weight rows, O(N K H) flops instead of O(N V H); the gradient goes
    back to those rows only (``index_add_``)."""
    N, H = hs.shape
    K = teacher.ids.shape[1]
    loss = torch.empty(N, dtype=compute, device=hs.device)
    gh = torch.empty(hs.shape, dtype=compute, device=hs.device) if want_h else None
    gw = torch.zeros(weight.shape, dtype=compute, device=hs.device) if want_w else None
    gb = torch.zeros(weight.shape[0], dtype=compute, device=hs.device) if want_b else None
    want = want_h or want_w or want_b
    for lo in range(0, N, chunk):
        hi = min(N, lo + chunk)
        rows = teacher.rows(lo, hi)
        ids = rows.pop("ids")
        h_c = hs[lo:hi].to(compute)
        w_k = weight[ids].to(compute)  # (c, K, H)
        z = torch.bmm(w_k, h_c[:, :, None])[:, :, 0]
        if bias is not None:
            z = z + bias.to(compute)[ids]
        # the K logits are the whole "row": the entries are 0..K-1 of z
        local = torch.arange(K, device=hs.device).expand(hi - lo, K)
        out = topk_rows_torch(
            z,
            ids=local,
            **rows,
            **opts.row_options(),
            scale=scale if scale.numel() == 1 else scale[lo:hi],
            want_grad=want,
            stats=_slice(stats, lo, hi),
        )
        loss[lo:hi] = _finish_rows(
            out,
            z if want else None,
            _slice(mask1, lo, hi),
            _slice(teacher.bad, lo, hi),
            _slice(stats, lo, hi),
        )
        # z now holds dL/d(the K logits); padding entries hold 0
        if want_h:
            gh[lo:hi] = torch.bmm(z[:, None, :], w_k)[:, 0, :]
        if want_w:
            gw.index_add_(0, ids.reshape(-1), (z[:, :, None] * h_c[:, None, :]).reshape(-1, H))
        if want_b:
            gb.index_add_(0, ids.reshape(-1), z.reshape(-1))
    return loss, gh, gw, gb


def _linear_pass(
    hs,
    weight,
    bias,
    teacher,
    mask1,
    opts,
    row_fn,
    chunk,
    scale,
    want_h,
    want_w,
    want_b,
    compute,
    stats=None,
):
    """Loss rows and gradients of one sweep over the token chunks; ``stats``: None or an
    (N, NUM_STATS) buffer filled with the per-token statistics."""
    if opts.tail == "renormalize":
        return _renormalize_linear_pass(
            hs,
            weight,
            bias,
            teacher,
            mask1,
            opts,
            chunk,
            scale,
            want_h,
            want_w,
            want_b,
            compute,
            stats,
        )
    N = hs.shape[0]
    loss = torch.empty(N, dtype=compute, device=hs.device)
    grads = ChunkGradients(hs, weight, compute, compute, want_h, want_w, want_b)
    want = grads.any
    for lo in range(0, N, chunk):
        hi = min(N, lo + chunk)
        h_c = hs[lo:hi]
        # float32 (float64) logits whatever the operands' dtypes (the precision rule)
        logits = gemm.linear_logits(h_c, weight, bias)
        extra = {} if stats is None else {"stats": stats[lo:hi]}
        rows = row_fn(
            logits,
            **teacher.rows(lo, hi),
            **opts.row_options(),
            scale=scale if scale.numel() == 1 else scale[lo:hi],
            want_grad=want,
            **extra,
        )
        loss[lo:hi] = _finish_rows(
            rows,
            logits if want else None,
            _slice(mask1, lo, hi),
            _slice(teacher.bad, lo, hi),
            _slice(stats, lo, hi),
        )
        # logits now holds dL/d(student logits) of the chunk (float32/64)
        if want:
            # through opsd_kernels.gemm: the precision rule of every chunked path
            grads.add(lo, hi, logits, h_c, weight)
        del logits
    return (loss, *grads.as_tuple())


class FusedLinearTopkFunction(torch.autograd.Function):
    """Chunked fused-linear top-k divergence; gradients to hidden, weight and bias.

    "mean"/"sum" (and "none" with only the hidden-state gradient): the gradients
    are formed in the forward into float32 (float64) buffers, and the backward
    multiplies them by the upstream gradient before casting to the input dtypes
    (so a 16-bit gradient never holds an unscaled value). "none" with a weight or
    bias gradient: the chunks are recomputed in the backward with the per-token
    upstream gradients as the row factors.
    """

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        teacher: TeacherRows,
        mask1,
        opts: TopkOptions,
        row_fn,
        chunk,
        stats=None,
    ):
        H = hidden.shape[-1]
        lead = hidden.shape[:-1]
        hs = hidden.reshape(-1, H)
        if mask1 is not None:
            # masked rows are zeroed before any GEMM that mixes rows (0 * NaN = NaN)
            hs = torch.where(mask1[:, None], hs, torch.zeros((), dtype=hs.dtype, device=hs.device))
        hs = hs.contiguous()
        N = hs.shape[0]
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        compute = gemm.compute_dtype(hidden.dtype, weight.dtype)
        defer = opts.reduction == "none" and (want_w or want_b)
        scale = forward_scale(opts.reduction, mask1, N, hs.device, compute)
        loss, gh, gw, gb = _linear_pass(
            hs,
            weight,
            bias,
            teacher,
            mask1,
            opts,
            row_fn,
            chunk,
            scale,
            want_h and not defer,
            want_w and not defer,
            want_b and not defer,
            compute,
            stats,
        )
        ctx.defer = defer
        ctx.reduction = opts.reduction
        ctx.meta = (
            hidden.shape,
            hidden.dtype,
            weight.dtype,
            None if bias is None else bias.dtype,
            compute,
        )
        if defer:
            ctx.save_for_backward(hs, weight, bias)
            ctx.args = (teacher, mask1, opts, row_fn, chunk)
        else:
            ctx.grads = (gh, gw, gb)
        return reduce_rows(loss, opts.reduction, scale, lead)

    @staticmethod
    def backward(ctx, grad_out):
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        shape, h_dtype, w_dtype, b_dtype, compute = ctx.meta
        if ctx.defer:
            hs, weight, bias = ctx.saved_tensors
            teacher, mask1, opts, row_fn, chunk = ctx.args
            factor = grad_out.reshape(-1).to(compute)
            _, gh, gw, gb = _linear_pass(
                hs,
                weight,
                bias,
                teacher,
                mask1,
                opts,
                row_fn,
                chunk,
                factor,
                want_h,
                want_w,
                want_b,
                compute,
            )
        else:
            if ctx.grads is None:
                # the stored gradients were scaled in place by the first backward
                raise RuntimeError(
                    "fused_linear_topk_divergence supports one backward per forward with "
                    "reduction 'mean'/'sum' (retain_graph=True then a second backward is not "
                    "supported); recompute the loss instead"
                )
            gh, gw, gb = ctx.grads
            ctx.grads = None
            # in place: no second (V, H) float32 buffer at the peak
            gh, gw, gb = apply_upstream((gh, gw, gb), grad_out.to(compute), ctx.reduction)
        return (
            None if gh is None or not want_h else gh.to(h_dtype).view(shape),
            None if gw is None or not want_w else gw.to(w_dtype),
            None if gb is None or not want_b else gb.to(b_dtype),
            None,
            None,
            None,
            None,
            None,
            None,
        )


def fused_linear_topk_divergence(
    student_hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    kind: str = "forward_kl",
    beta: float = 0.5,
    tail: str = "bucket",
    temperature: float = 1.0,
    clip: float | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    impl: str = "auto",
    chunk_size: int | None = None,
    validate: bool | None = None,
    clip_mode: str = "entry",
    logit_scale: float = 1.0,
    softcap: float | None = None,
    return_stats: bool = False,
) -> torch.Tensor:
    """:func:`topk_divergence` from the student's hidden states and lm_head, never
    forming the (tokens x V) logits.

    Equals ``topk_divergence(student_hidden @ weight.T + bias, teacher_ids,
    teacher_logprobs, ...)``.

    ``tail="bucket"``: per chunk of tokens, one logits GEMM into a float32 (c, V)
    buffer (16-bit operands are upcast per chunk / per <= 64 MiB weight slice, or
    multiplied with a float32-output GEMM on CUDA: the logits are never 16-bit),
    one pass for the student's log-sum-exp and the complement's, a gather at the
    K ids, the row terms, the logit gradient written over the buffer, then the
    gradient GEMMs (2NHV flops forward, +2NHV for the hidden-state gradient,
    +2NHV for the weight gradient). Extra memory O(N * K) plus one chunk (about 3
    float32 rows of width V per token, bounded by
    ``opsd_kernels.config.chunk_memory_budget``).

    ``tail="renormalize"`` needs only the K logits of each token: they are formed
    from the gathered weight rows ``W[I_k]`` (O(N K H) flops, no pass over the
    vocabulary, chunks of (c, K, H) float32 within the budget), and the weight
    gradient goes to those rows only (``index_add_``: on CUDA its summation order,
    hence the last bits, may vary between runs). Both impls take this path; the
    Triton row kernel serves the bucket tail.

    Either tail adds float32 (N, H) and, for a trainable weight, (V, H) gradient
    accumulators (the upstream factor is applied to them before any cast to a
    16-bit dtype).

    Args:
        student_hidden: (..., H) final hidden states of the student.
        weight: (V, H) lm_head weight; bias: None or (V,). Any float dtypes
            (mixed allowed); arithmetic in float32 (float64 if any is float64);
            gradients returned in each input's dtype.
        teacher_ids, teacher_logprobs: (..., K), as :func:`topk_divergence`.
        kind, beta, tail, temperature, clip, clip_mode, logit_scale, softcap, mask,
            reduction, validate, return_stats: as :func:`topk_divergence` (the transform
            applies to ``h W^T + b``). Masked rows of ``student_hidden`` are
            zeroed before any GEMM, so whatever they hold never reaches an output
            (the weight gradient included).
        impl: ``"auto"`` (Triton on CUDA, torch otherwise), ``"torch"``, or
            ``"triton"`` (the same chunk loop with a Triton row kernel over the
            float32 chunk logits). ``"fused"`` (on-chip tiles) is not available for
            top-k teachers.
        chunk_size: tokens per chunk; None picks it from the memory budget.

    Gradients flow to ``student_hidden``, ``weight`` and ``bias`` when they require
    grad (a frozen weight skips the weight gradient). With ``reduction="none"``
    the backward accepts any per-token upstream gradient.

    Per-token negative log-likelihood of sampled tokens (K = 1, teacher log-prob
    0, bucket tail, forward KL): the loss is ``-log p_S(token)`` exactly.

    >>> import torch
    >>> h = torch.randn(6, 16, requires_grad=True)
    >>> lm_head = torch.nn.Linear(16, 40, bias=False)
    >>> tokens = torch.randint(0, 40, (6, 1))
    >>> nll = fused_linear_topk_divergence(h, lm_head.weight, tokens, torch.zeros(6, 1),
    ...                                    reduction="none")
    >>> ref = -torch.log_softmax(h @ lm_head.weight.T, -1).gather(-1, tokens)[:, 0]
    >>> torch.allclose(nll, ref, atol=1e-5)
    True
    >>> nll.sum().backward(); h.grad.shape
    torch.Size([6, 16])
    """
    opts = _check_topk_options(
        kind,
        beta,
        tail,
        temperature,
        clip,
        reduction,
        clip_mode,
        logit_scale,
        softcap,
        return_stats,
    )
    check_float_tensor("student_hidden", student_hidden)
    check_float_tensor("weight", weight)
    if student_hidden.dim() == 0:
        raise ValueError("student_hidden must have shape (..., H)")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (V, H), got {tuple(weight.shape)}")
    V, H = weight.shape
    if V == 0 or H == 0:
        raise ValueError(f"weight must have V > 0 rows and H > 0 columns, got {(V, H)}")
    if student_hidden.shape[-1] != H:
        raise ValueError(
            f"student_hidden has hidden size {student_hidden.shape[-1]} but weight is "
            f"(V={V}, H={H})"
        )
    device = student_hidden.device
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but student_hidden is on {device}")
    if bias is not None:
        check_float_tensor("bias", bias)
        if bias.shape != (V,):
            raise ValueError(f"bias must have shape (V={V},), got {tuple(bias.shape)}")
        if bias.device != device:
            raise ValueError(f"bias is on {bias.device} but student_hidden is on {device}")
    lead = student_hidden.shape[:-1]
    _check_teacher(teacher_ids, teacher_logprobs, lead, device)
    check_mask(mask, lead, device)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    if impl == "fused":
        raise ValueError(
            "impl='fused' is not available for top-k teachers (the student needs only one "
            "logits GEMM per chunk; use impl='triton' on CUDA or 'torch')"
        )
    dtypes = [student_hidden.dtype, weight.dtype] + ([] if bias is None else [bias.dtype])
    compute = gemm.compute_dtype(*dtypes)
    impl = check_impl(impl, ("auto", "torch", "triton"), device, compute)
    mask1 = None if mask is None else mask.reshape(-1)
    teacher = prepare_teacher(
        teacher_ids.detach(),
        teacher_logprobs.detach(),
        mask1,
        V,
        opts.tail,
        compute,
        _validate_default(validate, device),
    )
    if not torch.is_grad_enabled():
        student_hidden, weight = student_hidden.detach(), weight.detach()
        bias = None if bias is None else bias.detach()
    N = student_hidden.numel() // H
    if chunk_size is not None:
        chunk = chunk_size
    elif opts.tail == "renormalize":
        chunk = auto_renormalize_chunk(teacher_ids.shape[-1], H, N)
    else:
        chunk = auto_topk_chunk(V, N)
    row_fn = _row_function(impl)
    stats = new_stats_buffer(N, device) if return_stats else None
    loss = FusedLinearTopkFunction.apply(
        student_hidden, weight, bias, teacher, mask1, opts, row_fn, chunk, stats
    )
    return loss if stats is None else (loss, public_stats(stats, lead))
