"""Reductions shared by every implementation: the per-row gradient factor and the loss.

"mean" divides by the number of counted tokens (the method's token mean; 0
when none is counted), "sum" adds, "none" keeps the per-token losses. The
factor is formed on the device, without a host sync.
"""

from __future__ import annotations

import torch


def as_rows(x: torch.Tensor | None) -> torch.Tensor | None:
    """``x`` as (rows, last dim) with a unit last stride (a view when it already has
    one, else a contiguous copy; a 1-D tensor is one row); None stays None."""
    if x is None:
        return None
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def forward_scale(
    reduction: str, mask: torch.Tensor | None, rows: int, device, dtype: torch.dtype
) -> torch.Tensor:
    """(1,) per-row gradient factor known in the forward: 1/count for "mean", else 1."""
    if reduction != "mean":
        return torch.ones(1, dtype=dtype, device=device)
    if mask is None:
        return torch.full((1,), 1.0 / max(rows, 1), dtype=dtype, device=device)
    return mask.sum(dtype=dtype).clamp(min=1.0).reciprocal().reshape(1)


def reduce_rows(loss_rows: torch.Tensor, reduction: str, scale: torch.Tensor, lead_shape):
    """The returned loss: per-token rows viewed as ``lead_shape``, or their mean/sum."""
    if reduction == "none":
        return loss_rows.view(lead_shape)
    total = loss_rows.sum()
    return total * scale[0] if reduction == "mean" else total
