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

The options of :class:`~opsd_kernels._validation.DivergenceOptions` are constexpr
specialisations as in the row kernel: each role's logit transform is applied to the
raw logits in every phase (gradients with respect to the raw logits); ``clip_mode``
"token" runs the phases without the per-entry clip (the caller clamps the all-reduced
loss and zeroes the clipped rows' ``scale``); "entry_keep" and the per-token statistics
add columns to the phases' outputs (``extras``), which the caller all-reduces with the
others:

- phase 0, ``entropy=True``: column 5 is ``u = sum e^(b - max_S) (b - max_S)`` over the
  slice (:func:`~opsd_kernels.triton.formulas.entropy_update`); over the ranks,
  ``U = sum_r e^(m_r - M) (u_r + z_r (m_r - M))`` and the entropy is
  ``log Z - U / Z`` (``Z = sum_r e^(m_r - M) z_r``);
- phase 1, ``extras=True``: columns 3-9 are the slice's ``sum_U pS``, ``sum_U pS g``,
  ``sum_U pS^2`` (U: the unclipped entries, "entry_keep" only), the clipped teacher
  mass and count (SUM over the ranks), the largest scaled teacher logit over the
  clipped entries and over all (MAX over the ranks; the teacher's top-1 is clipped when
  the two maxima are equal);
- phase 2, "entry_keep": ``stats`` has a 5th column, ``mu T`` of
  :func:`keep_mean_torch` from the all-reduced sums.

A masked row (mask 0) sweeps nothing in phases 0 and 1 (max -inf, sums 0) and
gets a zero gradient in phase 2; its contents never reach an output.
"""

import torch
import triton
import triton.language as tl

from .._validation import DivergenceOptions
from .configs import option_args, transform_args
from .divergence_rows import check_rows_contiguous, clip_mode_id, default_block_v
from .formulas import (
    CLIP_ENTRY_KEEP,
    CLIP_TOKEN,
    row_online_stats,
    row_term_sums,
    write_row_gradients,
)

#: columns of phase 0's output (``entropy=True`` adds ``u``) and phase 1's (``extras``)
PHASE0_COLUMNS = ("max_s", "sumexp_s", "max_t", "sumexp_t", "w", "u")
PHASE1_COLUMNS = (
    "loss",
    "G",
    "H",
    "keep_p",
    "keep_pg",
    "keep_p2",
    "clipped_mass",
    "clipped_count",
    "top_clipped",
    "top",
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
    stats_stride,
    out_stride,
    V,
    inv_temp,
    beta,
    log_beta,
    log_1m_beta,
    clip,
    s_scale,
    s_cap,
    t_scale,
    t_cap,
    PHASE: tl.constexpr,
    KIND: tl.constexpr,
    ONE_PASS: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    CLIP_MODE: tl.constexpr,
    S_SOFTCAP: tl.constexpr,
    T_SOFTCAP: tl.constexpr,
    EXTRAS: tl.constexpr,
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
    CLIP_ENTRY: tl.constexpr = HAS_CLIP and CLIP_MODE != CLIP_TOKEN
    KEEP: tl.constexpr = CLIP_ENTRY and CLIP_MODE == CLIP_ENTRY_KEEP
    # the one-pass weighted sum only for a one-pass kind without a per-entry clip
    SWEEP: tl.constexpr = ONE_PASS and not CLIP_ENTRY

    if PHASE == 0:
        out = out_ptr + row * out_stride
        m_s, z_s, m_t, z_t, w, u = row_online_stats(
            s_row,
            t_row,
            V,
            v_stat,
            inv_temp,
            s_scale,
            s_cap,
            t_scale,
            t_cap,
            KIND,
            SWEEP,
            EXTRAS,
            S_SOFTCAP,
            T_SOFTCAP,
            BLOCK_V,
        )
        tl.store(out, m_s)
        tl.store(out + 1, z_s)
        tl.store(out + 2, m_t)
        tl.store(out + 3, z_t)
        tl.store(out + 4, w)
        if EXTRAS:
            tl.store(out + 5, u)
    else:
        lse_s = tl.load(stats_ptr + row * stats_stride)
        lse_t = tl.load(stats_ptr + row * stats_stride + 1)
        if PHASE == 1:
            out = out_ptr + row * out_stride
            loss, G, H, keep_p, keep_pg, keep_p2, mass, count, top_clipped, top = row_term_sums(
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
                KIND,
                CLIP_ENTRY,
                KEEP,
                EXTRAS,
                S_SOFTCAP,
                T_SOFTCAP,
                BLOCK_V,
            )
            tl.store(out, loss)
            tl.store(out + 1, G)
            tl.store(out + 2, H)
            if EXTRAS:
                tl.store(out + 3, keep_p)
                tl.store(out + 4, keep_pg)
                tl.store(out + 5, keep_p2)
                tl.store(out + 6, mass)
                tl.store(out + 7, count)
                tl.store(out + 8, top_clipped)
                tl.store(out + 9, top)
        else:
            G = tl.load(stats_ptr + row * stats_stride + 2)
            H = tl.load(stats_ptr + row * stats_stride + 3)
            if KEEP:
                mu = tl.load(stats_ptr + row * stats_stride + 4)
            else:
                mu = 0.0
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
                KIND,
                CLIP_ENTRY,
                KEEP,
                S_SOFTCAP,
                T_SOFTCAP,
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
    extras=False,
):
    R, V = student.shape
    if R == 0:
        return
    check_rows_contiguous(
        student=student, teacher=teacher, grad_student=grad_student, grad_teacher=grad_teacher
    )
    if stats is not None and (stats.dtype != torch.float32 or stats.stride(1) != 1):
        raise ValueError("stats must be float32 with contiguous rows")
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
        stats_stride=0 if stats is None else stats.stride(0),
        out_stride=0 if out is None else out.stride(0),
        V=V,
        PHASE=phase,
        **option_args(opts),
        **transform_args(opts),
        CLIP_MODE=clip_mode_id(opts),
        EXTRAS=extras,
        BLOCK_V=block,
        num_warps=8 if block >= 2048 else 4,
    )


def _keeps_mean(opts: DivergenceOptions) -> bool:
    return opts.clip is not None and opts.clip_mode == "entry_keep"


def local_stats_triton(student, teacher, opts, mask, entropy: bool = False) -> torch.Tensor:
    """(R, 5) float32: the slice's ``max_S, sumexp_S, max_T, sumexp_T, w`` per row
    (sum-exps and ``w`` relative to their side's max, 0 shift while it is -inf); with
    ``entropy`` (R, 6), column 5 the student's ``u`` (module docstring)."""
    out = torch.empty(
        student.shape[0], 6 if entropy else 5, dtype=torch.float32, device=student.device
    )
    _launch(0, student, teacher, opts, mask, out=out, extras=entropy)
    return out


def local_term_sums_triton(
    student, teacher, opts, mask, stats, extras: bool = False
) -> torch.Tensor:
    """(R, 3) float32: the slice's sums of clipped ``phi, g, h`` given ``stats`` (R, 4)
    (columns LSE_S, LSE_T, G, H; float32, contiguous); with ``extras`` (R, 10), the
    columns :data:`PHASE1_COLUMNS` (module docstring; "entry_keep" needs them)."""
    out = torch.empty(
        student.shape[0], 10 if extras else 3, dtype=torch.float32, device=student.device
    )
    _launch(1, student, teacher, opts, mask, stats=stats, out=out, extras=extras)
    return out


def keep_mean_torch(keep_p, keep_pg, keep_p2, G):
    """ "entry_keep"'s ``mu T`` from the all-reduced phase-1 sums (torch twin of
    :func:`opsd_kernels.triton.formulas.keep_mean`): ``(sum_U pS g - G sum_U pS^2) /
    sum_U pS``, 0 where ``sum_U pS = 0``."""
    mean = (keep_pg - G * keep_p2) / keep_p
    return torch.where(keep_p == 0, torch.zeros_like(mean), mean)


def local_gradients_triton(
    student, teacher, opts, mask, stats, scale, grad_student, grad_teacher
) -> None:
    """Writes the slice's gradients (with respect to the raw logits) times ``scale``
    ((1,) or (R,) float32). ``stats``: (R, 4) columns LSE_S, LSE_T, G, H; with
    ``clip_mode="entry_keep"`` (R, 5), column 4 :func:`keep_mean_torch`."""
    if _keeps_mean(opts) and stats.shape[1] < 5:
        raise ValueError("clip_mode='entry_keep' needs stats with a 5th column (keep_mean_torch)")
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
