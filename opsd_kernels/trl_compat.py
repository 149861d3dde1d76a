"""TRL-convention loss: ``generalized_jsd`` is a drop-in for TRL's ``generalized_jsd_loss``.

Mirrors the static method ``generalized_jsd_loss`` of TRL's ``GKDTrainer`` and
``GOLDTrainer`` (``trl.experimental.gkd`` / ``trl.experimental.gold``), checked
against TRL 1.16.0 by ``tests/test_trl_compat.py``. Both TRL trainers share the
formula; GOLD adds ``logits_are_probs`` before ``num_items_in_batch`` and its
order is kept here (TRL's trainers pass both by keyword).

Switching a TRL trainer over is one line::

    from trl.experimental.gkd import GKDTrainer
    from opsd_kernels import generalized_jsd
    GKDTrainer.generalized_jsd_loss = staticmethod(generalized_jsd)

That removes TRL's float32 temporaries of the divergence itself, but the trainer
still forms both full logits; ``opsd_kernels.integrations.trl`` avoids those too.
"""

from __future__ import annotations

import math

import torch

from .api import divergence
from .divergences import KINDS

__all__ = ["generalized_jsd", "generalized_jsd_loss"]

_REDUCTIONS = ("batchmean", "mean", "sum", "none")
# GOLD's floor for probabilities given as inputs (``logits_are_probs=True``)
_PROB_FLOOR = 1e-8


def _kind(beta: float) -> str:
    return "forward_kl" if beta == 0 else "reverse_kl" if beta == 1 else "jsd"


def _per_entry_terms(student, teacher, beta, temperature, logits_are_probs):
    """TRL's per-entry terms ``jsd`` (..., V) in float32 (float64 for float64 input).

    ``logits_are_probs``: the inputs are probabilities; TRL takes ``log(clamp(p, 1e-8))``
    as log-probabilities without renormalising and without the temperature.
    """
    dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    student, teacher = student.to(dtype), teacher.to(dtype)
    if logits_are_probs:
        lS = student.clamp_min(_PROB_FLOOR).log()
        lT = teacher.clamp_min(_PROB_FLOOR).log()
    else:
        lS = torch.log_softmax(student / temperature, dim=-1)
        lT = torch.log_softmax(teacher / temperature, dim=-1)
    phi, _, _ = KINDS[_kind(beta)].terms(lT, lS, lT.exp(), lS.exp(), beta)
    return phi


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    logits_are_probs: bool = False,
    num_items_in_batch: torch.Tensor | int | float | None = None,
    *,
    ignore_index: int = -100,
    impl: str = "auto",
) -> torch.Tensor:
    """Drop-in for TRL's GKD/GOLD ``generalized_jsd_loss`` (same signature and defaults).

    Per vocabulary entry, with ``lS``/``lT`` the student/teacher log-softmax of
    ``logits / temperature``: ``beta=0`` gives the forward KL term ``pT (lT - lS)``,
    ``beta=1`` the reverse KL term ``pS (lS - lT)``, otherwise the generalized JSD
    ``beta pT (lT - lM) + (1 - beta) pS (lS - lM)`` with ``lM = log(beta pT + (1 - beta) pS)``.

    Args:
        student_logits, teacher_logits: (..., V) logits, e.g. (B, T, V) or (N, V).
        labels: None or (...) with ``ignore_index`` (-100) at positions to ignore.
        beta: in [0, 1].
        temperature: both logits are divided by it (ignored with ``logits_are_probs``).
        reduction: as TRL, over the per-entry terms of the counted positions:
            ``"batchmean"``: sum / number of counted positions when ``labels`` is given,
            else sum / ``student_logits.shape[0]`` (the batch size B of (B, T, V) input);
            ``"mean"``: sum / (counted positions x V), i.e. the mean over tokens AND
            vocabulary; ``"sum"``; ``"none"``: the per-entry terms, (..., V) without
            labels or (counted positions, V) with them (a tokens x V tensor, as TRL).
        logits_are_probs: the inputs are probabilities (GOLD's matched-vocabulary ULD
            path): the terms use ``log(clamp(p, 1e-8))`` without softmax or temperature.
            This path computes with full (..., V) temporaries, like TRL (its inputs are
            full probability tensors already).
        num_items_in_batch: when given, the result is sum / ``num_items_in_batch``
            whatever ``reduction`` says (TRL's gradient-accumulation normalisation).
        ignore_index: the label value that marks ignored positions (TRL: -100).
        impl: ``divergence`` implementation for the logits path of the scalar
            reductions (``"auto"``, ``"torch"``, ``"triton"``).

    Returns:
        float32 (float64 for float64 inputs) scalar, or per-entry terms for ``"none"``.

    Differences from TRL, all deliberate: arithmetic and result are float32 (TRL
    computes in the input dtype, e.g. bfloat16); ``0 log 0`` counts as 0 where TRL's
    ``F.kl_div`` gives NaN (e.g. a token banned with -inf logits by both sides);
    ``reduction="mean"`` with no counted position returns 0 (TRL: NaN from an empty
    mean). The scalar reductions of logits never form a float32 (..., V) temporary
    beyond the gradient itself (``divergence`` works in row blocks).

    >>> s, t = torch.randn(2, 3, 10), torch.randn(2, 3, 10)
    >>> labels = torch.tensor([[-100, 4, 2], [7, 1, -100]])
    >>> loss = generalized_jsd(s, t, labels, beta=0.0)      # forward KL, per counted token
    >>> torch.allclose(loss, divergence(s, t, kind="forward_kl", mask=labels != -100))
    True
    >>> generalized_jsd(s, t, labels, reduction="none").shape  # 4 counted positions x V
    torch.Size([4, 10])
    """
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not isinstance(logits_are_probs, bool):
        raise TypeError(f"logits_are_probs must be a bool, got {logits_are_probs!r}")
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0:
            raise TypeError(
                f"{name} must be a floating-point tensor of shape (..., V), got "
                f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x}"
            )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if not logits_are_probs and (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    mask = None
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.shape != student_logits.shape[:-1]:
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(
                f"labels must be a tensor of shape {tuple(student_logits.shape[:-1])} "
                f"(the logits without the vocabulary dimension), got {got}"
            )
        mask = labels.to(student_logits.device) != ignore_index
    if num_items_in_batch is not None and (
        isinstance(num_items_in_batch, bool)
        or not isinstance(num_items_in_batch, (int, float, torch.Tensor))
    ):
        raise TypeError(
            f"num_items_in_batch must be None, a number or a tensor, got {num_items_in_batch!r}"
        )
    vocab = student_logits.shape[-1]

    if logits_are_probs or (reduction == "none" and num_items_in_batch is None):
        terms = _per_entry_terms(
            student_logits, teacher_logits, beta, temperature, logits_are_probs
        )
        if mask is not None:
            terms = terms[mask]
        total = terms.sum()
        if num_items_in_batch is None and reduction == "none":
            return terms
    else:
        kind = _kind(beta)
        total = divergence(
            student_logits,
            teacher_logits,
            kind=kind,
            beta=beta if kind == "jsd" else 0.5,
            temperature=temperature,
            mask=mask,
            reduction="sum",
            impl=impl,
        )

    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    if mask is None:
        count = math.prod(student_logits.shape[:-1])
        if reduction == "batchmean":
            return total / max(student_logits.shape[0], 1)
        return total / max(count * vocab, 1)  # "mean" over tokens and vocabulary
    count = mask.sum().clamp_min(1)  # a tensor: no host sync
    return total / (count if reduction == "batchmean" else count * vocab)


# TRL's name, for code that looks the loss up by it
generalized_jsd_loss = generalized_jsd
