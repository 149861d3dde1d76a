"""TRL-convention losses: ``generalized_jsd`` mirrors TRL's GKD/GOLD ``generalized_jsd_loss``."""

from __future__ import annotations

import torch

from .api import divergence


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    *,
    ignore_index: int = -100,
    impl: str = "auto",
) -> torch.Tensor:
    """Drop-in for TRL's GKD/GOLD ``generalized_jsd_loss`` convention.

    ``beta=0`` is forward KL(p_T || p_S), ``beta=1`` reverse KL(p_S || p_T),
    otherwise the generalized JSD with mixture ``beta p_T + (1 - beta) p_S``.
    ``labels`` (..., ) marks ignored positions with ``ignore_index``.
    ``reduction``: ``"batchmean"`` or ``"mean"`` (sum / number of counted tokens, as
    TRL does for (batch, sequence, vocab) logits), ``"sum"`` or ``"none"`` (per-token
    losses).

    >>> s, t = torch.randn(2, 3, 10), torch.randn(2, 3, 10)
    >>> a = generalized_jsd(s, t, beta=0.0)
    >>> torch.allclose(a, divergence(s, t, kind="forward_kl"))
    True
    """
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    if reduction not in ("batchmean", "mean", "sum", "none"):
        raise ValueError(
            f"reduction must be one of ('batchmean', 'mean', 'sum', 'none'), got {reduction!r}"
        )
    kind = "forward_kl" if beta == 0 else "reverse_kl" if beta == 1 else "jsd"
    mask = None if labels is None else labels != ignore_index
    return divergence(
        student_logits, teacher_logits, kind=kind, beta=beta if kind == "jsd" else 0.5,
        temperature=temperature, mask=mask,
        reduction="mean" if reduction == "batchmean" else reduction, impl=impl,
    )
