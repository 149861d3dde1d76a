"""Triton kernel: the local phases of the vocabulary-parallel row divergence.

The row kernel of :mod:`opsd_kernels.triton.divergence_rows` split at the points
where :mod:`opsd_kernels.vocab_parallel` all-reduces; one program per row, the
rank's vocabulary slice swept in BLOCK_V blocks. Same formulas
(:mod:`opsd_kernels.triton.formulas`):

- PHASE 0 (:func:`local_stats_triton`): one online sweep gives the slice's
  max and sum-exp of both rows, and for forward/reverse KL without clip the
  weighted sum relative to the weighting side's max;
- PHASE 1 (:func:`local_term_sums_triton`): given the full-row LSEs, the slice's
  sums of the clipped ``phi``, ``g`` and ``h``;
- PHASE 2 (:func:`local_gradients_triton`): given the LSEs, ``G`` and ``H``, the
  slice's gradients times the row factors (may overwrite the logits in place).

A masked row (mask 0) sweeps nothing in phases 0 and 1 (max -inf, sums 0) and
gets a zero gradient in phase 2; its contents never reach an output.
"""

import torch
import triton
import triton.language as tl

from .._validation import DivergenceOptions
from .configs import option_args
from .divergence_rows import check_rows_contiguous, default_block_v
from .formulas import (
    row_online_stats,
    row_term_sums,
    write_row_gradients,
)


@triton.heuristics(
    {
        "HAS_MASK": lambda a: a["mask_ptr"] is not None,
        "GRAD_S": lambda a: a["grad_s_ptr"] is not None,
        "GRAD_T": lambda a: a["grad_t_ptr"] is not None,
    }
)
@triton.jit
def _vocab_parallel_rows_kernel(
    s_ptr,
    t_ptr,
    grad_s_ptr,
    grad_t_ptr,
    mask_ptr,
    scale_ptr,
    stats_ptr,
    out_ptr,
    s_stride,
    t_stride,
    grad_s_stride,
    grad_t_stride,
    scale_stride,
    V,
    inv_temp,
    beta,
    log_beta,
    log_1m_beta,
    clip,
    PHASE: tl.constexpr,
    KIND: tl.constexpr,
    ONE_PASS: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    HAS_MASK: tl.constexpr,
    GRAD_S: tl.constexpr,
    GRAD_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    if HAS_MASK:
        valid = tl.load(mask_ptr + row) != 0
    else:
        valid = True
    v_stat = tl.where(valid, V, 0)
    # the one-pass weighted sum only for a one-pass kind without clip
    SWEEP: tl.constexpr = ONE_PASS and not HAS_CLIP

    if PHASE == 0:
        m_s, z_s, m_t, z_t, w = row_online_stats(
            s_row, t_row, V, v_stat, inv_temp, KIND, SWEEP, BLOCK_V
        )
        out = out_ptr + row * 5
        tl.store(out, m_s)
        tl.store(out + 1, z_s)
        tl.store(out + 2, m_t)
        tl.store(out + 3, z_t)
        tl.store(out + 4, w)
    else:
        lse_s = tl.load(stats_ptr + row * 4)
        lse_t = tl.load(stats_ptr + row * 4 + 1)
        if PHASE == 1:
            loss, G, H = row_term_sums(
                s_row,
                t_row,
                V,
                v_stat,
                lse_s,
                lse_t,
                inv_temp,
                beta,
                log_beta,
                log_1m_beta,
                clip,
                KIND,
                HAS_CLIP,
                BLOCK_V,
            )
            out = out_ptr + row * 3
            tl.store(out, loss)
            tl.store(out + 1, G)
            tl.store(out + 2, H)
        else:
            G = tl.load(stats_ptr + row * 4 + 2)
            H = tl.load(stats_ptr + row * 4 + 3)
            scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32) * inv_temp
            write_row_gradients(
                s_row,
                t_row,
                grad_s_ptr,
                row * grad_s_stride,
                grad_t_ptr,
                row * grad_t_stride,
                V,
                lse_s,
                lse_t,
                G,
                H,
                scale,
                valid,
                inv_temp,
                beta,
                log_beta,
                log_1m_beta,
                clip,
                KIND,
                HAS_CLIP,
                GRAD_S,
                GRAD_T,
                BLOCK_V,
            )


def _launch(
    phase,
    student,
    teacher,
    opts: DivergenceOptions,
    mask,
    *,
    stats=None,
    out=None,
    scale=None,
    grad_student=None,
    grad_teacher=None,
):
    R, V = student.shape
    if R == 0:
        return
    check_rows_contiguous(
        student=student, teacher=teacher, grad_student=grad_student, grad_teacher=grad_teacher
    )
    block = default_block_v(V, student.device)
    _vocab_parallel_rows_kernel[(R,)](
        s_ptr=student,
        t_ptr=teacher,
        grad_s_ptr=grad_student,
        grad_t_ptr=grad_teacher,
        mask_ptr=None if mask is None else mask.view(torch.uint8),
        scale_ptr=scale,
        stats_ptr=stats,
        out_ptr=out,
        s_stride=student.stride(0),
        t_stride=teacher.stride(0),
        grad_s_stride=0 if grad_student is None else grad_student.stride(0),
        grad_t_stride=0 if grad_teacher is None else grad_teacher.stride(0),
        scale_stride=scale.stride(0) if scale is not None and scale.numel() > 1 else 0,
        V=V,
        PHASE=phase,
        **option_args(opts),
        BLOCK_V=block,
        num_warps=8 if block >= 2048 else 4,
    )


def local_stats_triton(student, teacher, opts, mask) -> torch.Tensor:
    """(R, 5) float32: the slice's ``max_S, sumexp_S, max_T, sumexp_T, w`` per row
    (sum-exps and ``w`` relative to their side's max, 0 shift while it is -inf)."""
    out = torch.empty(student.shape[0], 5, dtype=torch.float32, device=student.device)
    _launch(0, student, teacher, opts, mask, out=out)
    return out


def local_term_sums_triton(student, teacher, opts, mask, stats) -> torch.Tensor:
    """(R, 3) float32: the slice's sums of clipped ``phi, g, h`` given ``stats`` (R, 4)
    (columns LSE_S, LSE_T, G, H; float32, contiguous)."""
    out = torch.empty(student.shape[0], 3, dtype=torch.float32, device=student.device)
    _launch(1, student, teacher, opts, mask, stats=stats, out=out)
    return out


def local_gradients_triton(
    student, teacher, opts, mask, stats, scale, grad_student, grad_teacher
) -> None:
    """Writes the slice's gradients times ``scale`` ((1,) or (R,) float32)."""
    _launch(
        2,
        student,
        teacher,
        opts,
        mask,
        stats=stats,
        scale=scale,
        grad_student=grad_student,
        grad_teacher=grad_teacher,
    )
