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
"token" runs the phases without the per-entry clip; the columns match the torch
phases of :mod:`opsd_kernels.vocab_parallel` (``local_*_torch``), so either can serve:

- phase 0: (R, 6) ``max_S, sumexp_S, max_T, sumexp_T, w, u``, ``u`` (only with
  ``entropy``, else 0) the slice's ``sum e^(b - max_S) (b - max_S)``
  (:func:`~opsd_kernels.triton.formulas.entropy_update`);
- phase 1: (R, 9) the sums of :data:`TERM_SUM_COLUMNS`: the (clipped) phi, g, h and,
  with a per-entry clip, ``sum_U pS g, sum_U pS^2, sum_U pS`` over the unclipped
  entries U ("entry_keep" only, else 0), the clipped entries' teacher mass and count,
  and 1 when a clipped entry holds the teacher's maximum (``stats`` column 6, MAX_T;
  0 when ``stats`` has no such column);
- phase 2: reads ``stats`` columns LSE_S, LSE_T, G_SUM, H_SUM and, "entry_keep",
  KEEP_MEAN (column 4: the clipped student entries' gradient per unit row factor),
  "token", DROPPED (column 5: 1 for a clipped row, which gets a zero gradient).

A masked row (mask 0) sweeps nothing in phases 0 and 1 (max -inf, sums 0) and
gets a zero gradient in phase 2; its contents never reach an output.
"""

import torch
import triton
import triton.language as tl

from .._validation import DivergenceOptions
from .configs import option_args, transform_args
from .divergence_rows import (
    carries_options,
    check_rows_contiguous,
    clip_mode_id,
    launch_config,
)
from .formulas import (
    CLIP_ENTRY_KEEP,
    CLIP_TOKEN,
    row_online_stats,
    row_term_sums,
    write_row_gradients,
)

#: columns of phase 1's output (``opsd_kernels.vocab_parallel``'s term sums)
TERM_SUM_COLUMNS = (
    "phi",
    "G",
    "H",
    "kept_ps_g",
    "kept_ps_sq",
    "kept_ps",
    "clipped_mass",
    "clipped_count",
    "top1_clipped",
)
#: ``stats`` columns the phases read (``opsd_kernels.vocab_parallel``'s row statistics)
LSE_S, LSE_T, G_SUM, H_SUM, KEEP_MEAN, DROPPED, MAX_T = range(7)


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
    ENTROPY: tl.constexpr,
    HAS_MAX_T: tl.constexpr,
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
    TOKEN: tl.constexpr = HAS_CLIP and CLIP_MODE == CLIP_TOKEN
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
            ENTROPY,
            S_SOFTCAP,
            T_SOFTCAP,
            BLOCK_V,
        )
        tl.store(out, m_s)
        tl.store(out + 1, z_s)
        tl.store(out + 2, m_t)
        tl.store(out + 3, z_t)
        tl.store(out + 4, w)
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
                CLIP_ENTRY,
                S_SOFTCAP,
                T_SOFTCAP,
                BLOCK_V,
            )
            if HAS_MAX_T:
                # the slice holds a teacher maximum that was clipped (>=: never missed
                # through a rounding of the recomputed logit)
                max_t = tl.load(stats_ptr + row * stats_stride + 6)
                top1 = tl.where((top_clipped >= max_t) & (top_clipped > float("-inf")), 1.0, 0.0)
            else:
                top1 = 0.0
            tl.store(out, loss)
            tl.store(out + 1, G)
            tl.store(out + 2, H)
            tl.store(out + 3, keep_pg)
            tl.store(out + 4, keep_p2)
            tl.store(out + 5, keep_p)
            tl.store(out + 6, mass)
            tl.store(out + 7, count)
            tl.store(out + 8, top1)
        else:
            G = tl.load(stats_ptr + row * stats_stride + 2)
            H = tl.load(stats_ptr + row * stats_stride + 3)
            if KEEP:  # per unit row factor (1/tau included); the kernel's scale has 1/tau
                mu = tl.load(stats_ptr + row * stats_stride + 4) / inv_temp
            else:
                mu = 0.0
            if TOKEN:
                valid = valid & (tl.load(stats_ptr + row * stats_stride + 5) == 0)
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
    entropy=False,
):
    R, V = student.shape
    if R == 0:
        return
    check_rows_contiguous(
        student=student, teacher=teacher, grad_student=grad_student, grad_teacher=grad_teacher
    )
    if stats is not None and (stats.dtype != torch.float32 or stats.stride(1) != 1):
        raise ValueError("stats must be float32 with contiguous rows")
    config = launch_config(V, student.device, opts, entropy or carries_options(opts, None))
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
        ENTROPY=entropy,
        HAS_MAX_T=phase == 1 and stats.shape[1] > MAX_T,
        **config,
    )


def local_stats_triton(student, teacher, opts, mask, entropy: bool = False) -> torch.Tensor:
    """(R, 6) float32: the slice's ``max_S, sumexp_S, max_T, sumexp_T, w, u`` per row
    (sum-exps, ``w`` and ``u`` relative to their side's max, 0 shift while it is -inf;
    ``u`` only with ``entropy``, else 0)."""
    out = torch.empty(student.shape[0], 6, dtype=torch.float32, device=student.device)
    _launch(0, student, teacher, opts, mask, out=out, entropy=entropy)
    return out


def local_term_sums_triton(student, teacher, opts, mask, stats) -> torch.Tensor:
    """(R, 9) float32: the slice's sums :data:`TERM_SUM_COLUMNS` given ``stats`` (R, 4+)
    (columns LSE_S, LSE_T, G_SUM, H_SUM and, for the top-1 flag, MAX_T; float32,
    contiguous rows)."""
    out = torch.empty(student.shape[0], 9, dtype=torch.float32, device=student.device)
    _launch(1, student, teacher, opts, mask, stats=stats, out=out)
    return out


def local_gradients_triton(
    student, teacher, opts, mask, stats, scale, grad_student, grad_teacher
) -> None:
    """Writes the slice's gradients (with respect to the raw logits) times ``scale``
    ((1,) or (R,) float32). ``stats``: (R, 4+) float32 (module docstring; "entry_keep"
    reads KEEP_MEAN, "token" DROPPED)."""
    need = {"entry_keep": KEEP_MEAN + 1, "token": DROPPED + 1}.get(
        None if opts.clip is None else opts.clip_mode, 4
    )
    if stats.shape[1] < need:
        raise ValueError(
            f"clip_mode={opts.clip_mode!r} needs stats with {need} columns, got {stats.shape[1]}"
        )
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
