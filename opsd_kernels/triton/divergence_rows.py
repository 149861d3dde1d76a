"""Triton kernel: per-row divergence between two logit rows, with its gradient.

One program per row; the row is swept in BLOCK_V blocks. Derivation (see
opsd_kernels/divergences.py): with b = s/tau, a = t/tau,

    L      = sum_v c(phi_v)
    dL/ds  = (g - pS * G) / tau,   G = sum_v g_v   (clipped entries: g_v = 0)
    dL/dt  = (h - pT * H) / tau,   H = sum_v h_v

Passes over the row (each pass reads both rows once):
- forward/reverse KL without clip (ONE_PASS): pass 1 keeps online max and
  sum-exp of both rows plus one weighted sum, e.g. for forward KL
  w = sum e^(a - m_T) (a - b), so L = w / z_T - LSE_T + LSE_S; then G and H are
  closed forms (forward: G = -1, H = L + 1; reverse: G = L + 1, H = -1).
- jsd or clip: pass 1 gives the two log-sum-exps, pass 2 forms phi, L, G, H.
- last pass (only if a gradient is wanted) writes the gradients, multiplied
  by the row's upstream scale. The gradient may be written over the input
  logits in place (grad_s_ptr == s_ptr): each element is read before it is
  written, by the same program.

A masked row (HAS_MASK, mask 0) skips the statistic passes, stores loss 0 and
a zero gradient, and never lets its contents (NaN padding included) reach an
output.
"""

import torch
import triton
import triton.language as tl

from .._validation import DivergenceOptions
from .configs import option_args
from .formulas import (
    one_pass_finish,
    row_online_stats,
    row_term_sums,
    write_row_gradients,
)


@triton.heuristics(
    {
        "HAS_MASK": lambda a: a["mask_ptr"] is not None,
        "GRAD_S": lambda a: a["grad_s_ptr"] is not None,
        "GRAD_T": lambda a: a["grad_t_ptr"] is not None,
        "ROW_SCALES": lambda a: a["scale_stride"] != 0,
    }
)
@triton.jit
def _divergence_rows_kernel(
    s_ptr,
    t_ptr,
    grad_s_ptr,
    grad_t_ptr,
    loss_ptr,
    mask_ptr,
    scale_ptr,
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
    KIND: tl.constexpr,
    ONE_PASS: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    HAS_MASK: tl.constexpr,
    GRAD_S: tl.constexpr,
    GRAD_T: tl.constexpr,
    ROW_SCALES: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    if HAS_MASK:
        valid = tl.load(mask_ptr + row) != 0
    else:
        valid = True
    # masked rows run no statistics pass at all
    v_stat = tl.where(valid, V, 0)
    # the loss follows from one sweep only for a one-pass kind without clip
    SWEEP: tl.constexpr = ONE_PASS and not HAS_CLIP

    # ---- pass 1: online log-sum-exp of both rows (+ the KL weighted sum) ----
    m_s, z_s, m_t, z_t, w = row_online_stats(
        s_row, t_row, V, v_stat, inv_temp, KIND, SWEEP, BLOCK_V
    )
    lse_s = tl.where(m_s == float("-inf"), 0.0, m_s) + tl.log(z_s)
    lse_t = tl.where(m_t == float("-inf"), 0.0, m_t) + tl.log(z_t)

    if SWEEP:
        loss, G, H = one_pass_finish(w, z_s, z_t, lse_s, lse_t, KIND)
    else:
        # ---- pass 2: pointwise terms, clip, and their sums ----
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

    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))

    # ---- last pass: gradients (unit upstream times the row's scale) ----
    if GRAD_S or GRAD_T:
        if ROW_SCALES:
            scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32) * inv_temp
        else:
            scale = tl.load(scale_ptr).to(tl.float32) * inv_temp
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


def default_block_v(V: int, device: torch.device) -> int:
    """Vocabulary block: big enough to stream, small enough for registers."""
    cap = 4096 if device.type == "cuda" else 1024
    return max(16, min(cap, triton.next_power_of_2(V)))


def check_rows_contiguous(**rows: torch.Tensor | None) -> None:
    """Every given (R, V) tensor must be contiguous in its last dimension (row kernels)."""
    for name, x in rows.items():
        if x is not None and x.stride(-1) != 1:
            raise ValueError(f"{name} rows must be contiguous (stride(-1) == 1)")


def divergence_rows_triton(
    student: torch.Tensor,
    teacher: torch.Tensor,
    opts: DivergenceOptions,
    *,
    mask: torch.Tensor | None,
    scale: torch.Tensor,
    grad_student: torch.Tensor | None,
    grad_teacher: torch.Tensor | None,
    block_v: int | None = None,
) -> torch.Tensor:
    """Launch the row kernel on (R, V) logits; returns float32 row losses (R,).

    ``opts``: the validated options (:class:`~opsd_kernels._validation.DivergenceOptions`).
    ``scale``: float32 tensor of shape (R,) or (1,) (broadcast): each row's
    gradient is multiplied by it. ``grad_student``/``grad_teacher``: (R, V)
    outputs (may be the inputs themselves, for in-place use) or None.
    Rows must be contiguous in the last dimension.
    """
    R, V = student.shape
    loss = torch.empty(R, dtype=torch.float32, device=student.device)
    if R == 0:
        return loss
    check_rows_contiguous(
        student=student, teacher=teacher, grad_student=grad_student, grad_teacher=grad_teacher
    )
    block = block_v or default_block_v(V, student.device)
    _divergence_rows_kernel[(R,)](
        s_ptr=student,
        t_ptr=teacher,
        grad_s_ptr=grad_student,
        grad_t_ptr=grad_teacher,
        loss_ptr=loss,
        mask_ptr=None if mask is None else mask.view(torch.uint8),
        scale_ptr=scale,
        s_stride=student.stride(0),
        t_stride=teacher.stride(0),
        grad_s_stride=0 if grad_student is None else grad_student.stride(0),
        grad_t_stride=0 if grad_teacher is None else grad_teacher.stride(0),
        scale_stride=scale.stride(0) if scale.numel() > 1 else 0,
        V=V,
        **option_args(opts),
        BLOCK_V=block,
        num_warps=8 if block >= 2048 else 4,
    )
    return loss
