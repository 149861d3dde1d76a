"""Chunked torch implementation of the row divergence: the CPU path.

Works on blocks of rows so that its float32 temporaries stay within
``config.chunk_memory_budget`` whatever the number of rows; it has the same
signature as the Triton launcher
(:func:`opsd_kernels.triton.divergence_rows.divergence_rows_triton`) so the
autograd functions can use either.
"""

from __future__ import annotations

import torch

from . import config
from ._validation import DivergenceOptions
from .divergences import rows_loss_and_grads

# float32 temporaries of width V alive at once in rows_loss_and_grads (upper bound:
# measured 10.25 rows with both gradients, a soft cap and clip_mode="entry_keep", plus the
# float32 copies of 16-bit inputs)
TEMPS_PER_ROW = 12


def rows_per_chunk(V: int, R: int, bytes_per_element: int = 4, temps: int = TEMPS_PER_ROW) -> int:
    """Rows per block: the float32 temporaries fit ``config.chunk_memory_budget``, and
    at most ``max(16, ceil(R / 8))`` rows so that small inputs also work in pieces
    (their temporaries then stay near the size of one input)."""
    budget_rows = max(1, config.chunk_memory_budget // max(1, V * bytes_per_element * temps))
    return min(budget_rows, max(16, -(-R // 8)))


def divergence_rows_torch(
    student: torch.Tensor,
    teacher: torch.Tensor,
    opts: DivergenceOptions,
    *,
    mask: torch.Tensor | None,
    scale: torch.Tensor,
    grad_student: torch.Tensor | None,
    grad_teacher: torch.Tensor | None,
    stats: torch.Tensor | None = None,
    block_rows: int | None = None,
) -> torch.Tensor:
    """Row losses (shape (R,), in the compute dtype) and gradients written into the outputs.

    Arguments as the Triton launcher's: ``student``/``teacher`` are RAW (R, V) logits
    (``opts``' logit transform is applied here), the gradients are with respect to them.
    ``stats``: None, or a float32 (R, NUM_STATS) buffer
    (:func:`opsd_kernels.stats.new_stats_buffer`) filled with the per-row statistics
    (masked rows 0). Arithmetic in float32 (float64 when either input is float64). The
    gradient outputs may alias the inputs.
    """
    R, V = student.shape
    wide = torch.float64 in (student.dtype, teacher.dtype)
    compute = torch.float64 if wide else torch.float32
    loss = torch.empty(R, dtype=compute, device=student.device)
    step = block_rows or rows_per_chunk(V, R)
    for lo in range(0, R, step):
        hi = min(R, lo + step)
        s = student[lo:hi].to(compute)
        t = teacher[lo:hi].to(compute)
        keep = None
        if mask is not None:
            # masked rows never reach the arithmetic (padding may hold NaN)
            keep = mask[lo:hi].unsqueeze(-1)
            s = torch.where(keep, s, torch.zeros((), dtype=compute, device=s.device))
            t = torch.where(keep, t, torch.zeros((), dtype=compute, device=t.device))
        rows_stats = (
            None if stats is None else stats.new_empty(hi - lo, stats.shape[1], dtype=compute)
        )
        rows_loss, g_s, g_t = rows_loss_and_grads(
            s, t, opts, grad_student is not None, grad_teacher is not None, rows_stats
        )
        del s, t
        row_scale = (scale if scale.numel() == 1 else scale[lo:hi]).to(compute).reshape(-1, 1)
        for out, g in ((grad_student, g_s), (grad_teacher, g_t)):
            if out is None:
                continue
            g = g * row_scale
            if keep is not None:
                g = torch.where(keep, g, torch.zeros((), dtype=compute, device=g.device))
            out[lo:hi].copy_(g)
        if keep is not None:
            rows_loss = torch.where(keep.squeeze(-1), rows_loss, torch.zeros_like(rows_loss))
        loss[lo:hi] = rows_loss
        if stats is not None:
            if keep is not None:
                rows_stats = torch.where(keep, rows_stats, torch.zeros_like(rows_stats))
            stats[lo:hi] = rows_stats
    return loss
