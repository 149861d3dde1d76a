"""What every token-chunked fused-linear sweep shares (plain, top-k, vocabulary-parallel).

A sweep walks the tokens in chunks; per chunk it forms the float32 logits from
the hidden states and the lm_head (:mod:`opsd_kernels.gemm`), lets a row
function turn the student logits into their gradient in place, and feeds that
gradient to the gradient GEMMs. The row work differs between the losses; the
two ends do not, and live here:

- :func:`chunk_logits`: masked rows zeroed first (padding may hold NaN, and a
  GEMM that mixes rows would spread it: 0 * NaN = NaN), then one GEMM for both
  roles when they share the lm_head and a dtype (one read of W), else two;
- :class:`ChunkGradients`: the hidden, weight and bias gradient accumulators of
  a sweep and the per-chunk update from the float32 logit gradient.
"""

from __future__ import annotations

import torch

from . import gemm


def zero_masked_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` with the rows where ``mask`` is False set to 0 (``x`` itself without a mask)."""
    if mask is None:
        return x
    return torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))


def chunk_logits(hs_c, ht_c, weight, teacher_weight, bias, teacher_bias, mask_c):
    """``(hs_c, student_logits, teacher_logits)`` of one chunk, logits in float32 (float64).

    ``teacher_weight`` None: the teacher shares ``weight`` and ``bias``. The returned
    ``hs_c`` has its masked rows zeroed (use it in the weight-gradient GEMM).
    """
    hs_c, ht_c = zero_masked_rows(hs_c, mask_c), zero_masked_rows(ht_c, mask_c)
    if teacher_weight is None and hs_c.dtype == ht_c.dtype:
        logits = gemm.linear_logits(torch.cat([hs_c, ht_c]), weight, bias)
        c = hs_c.shape[0]
        return hs_c, logits[:c], logits[c:]
    t_w = weight if teacher_weight is None else teacher_weight
    t_b = bias if teacher_weight is None else teacher_bias
    return hs_c, gemm.linear_logits(hs_c, weight, bias), gemm.linear_logits(ht_c, t_w, t_b)


class ChunkGradients:
    """Gradient accumulators of one sweep, and their update from each chunk.

    ``hidden`` (N, H) and ``bias`` (V,) are in the compute dtype (float32, or
    float64); ``weight`` (V, H) in ``weight_grad_dtype``. Each is None when unwanted.
    """

    def __init__(
        self,
        hs: torch.Tensor,
        weight: torch.Tensor,
        compute: torch.dtype,
        weight_grad_dtype: torch.dtype,
        want_h: bool,
        want_w: bool,
        want_b: bool,
        zero_hidden: bool = False,
    ):
        new = torch.zeros if zero_hidden else torch.empty
        self.compute = compute
        self.operand = gemm.operand_dtype(hs.dtype, weight.dtype)
        self.hidden = new(hs.shape, dtype=compute, device=hs.device) if want_h else None
        self.weight = (
            torch.zeros(weight.shape, dtype=weight_grad_dtype, device=weight.device)
            if want_w
            else None
        )
        self.bias = (
            torch.zeros(weight.shape[0], dtype=compute, device=weight.device) if want_b else None
        )

    @property
    def any(self) -> bool:
        return self.hidden is not None or self.weight is not None or self.bias is not None

    def add(
        self, lo: int, hi: int, grad_logits: torch.Tensor, hs_c: torch.Tensor, weight: torch.Tensor
    ) -> None:
        """Chunk [lo, hi): ``grad_logits`` (c, V) float32 dL/d(student logits), every row
        factor applied; ``hs_c`` the chunk's hidden states (masked rows zeroed)."""
        if self.bias is not None:
            self.bias.add_(grad_logits.sum(0))
        if self.hidden is None and self.weight is None:
            return
        op, inv = gemm.gradient_operand(grad_logits, self.operand)
        if self.hidden is not None:
            self.hidden[lo:hi] = gemm.grad_hidden(op, inv, weight, self.compute)
        if self.weight is not None:
            gemm.accumulate_grad_weight(self.weight, op, inv, hs_c, self.compute)

    def as_tuple(self):
        return self.hidden, self.weight, self.bias


def defer_mixed_gradients(
    reduction: str, want_w: bool, want_b: bool, weight_grad_dtype: torch.dtype
) -> bool:
    """Whether the weight and bias gradients must be formed in the backward.

    They mix rows, so with ``"none"`` the per-row upstream factors are only known in
    the backward; and a float16 accumulator must not hold values before the upstream
    factor (a loss scale) is applied.
    """
    return (want_w or want_b) and (
        reduction == "none" or (want_w and weight_grad_dtype == torch.float16)
    )


def apply_upstream(grads, grad_out: torch.Tensor, reduction: str):
    """Multiply gradients formed in the forward (hidden, weight, bias; None allowed) by
    the upstream gradient, in place: per row for the hidden one under ``"none"``."""
    grad_h, grad_w, grad_b = grads
    go = grad_out
    if grad_h is not None:
        grad_h.mul_(go.reshape(-1, 1) if reduction == "none" else go)
    if grad_w is not None:
        grad_w.mul_(go)
    if grad_b is not None:
        grad_b.mul_(go)
    return grad_h, grad_w, grad_b
