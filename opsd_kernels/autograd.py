"""Autograd functions shared by the torch and Triton implementations.

Both take a *row function* with the signature of
:func:`opsd_kernels.torch_impl.divergence_rows_torch` (the chunked torch
path) or :func:`opsd_kernels.triton.divergence_rows.divergence_rows_triton`
(the Triton kernel): it returns per-row losses and writes unit-upstream
gradients, times a per-row ``scale``, into the buffers it is given.

Gradient in the forward: a row's loss depends on that row alone, so the
gradient of any reduction is the per-row gradient times a per-row factor.
For "mean"/"sum" the factor is known in the forward (1/count or 1), so the
gradients are formed there and the backward only multiplies them by the
scalar upstream gradient. For "none" the logit-level gradient is formed with
factor 1 and each row is multiplied by its upstream gradient in the backward.
The fused-linear weight and bias gradients mix rows, so with "none" they are
recomputed in the backward with the upstream gradients as the row factors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import config, gemm
from ._validation import DivergenceOptions
from .chunked import (
    ChunkGradients,
    apply_upstream,
    chunk_logits,
    defer_mixed_gradients,
)
from .reductions import as_rows, forward_scale, reduce_rows
from .torch_impl import TEMPS_PER_ROW

RowFunction = Callable[..., torch.Tensor]


def check_single_backward(ctx) -> None:
    # the stored gradients are scaled in place: a second backward through the
    # same graph would see them already scaled
    if getattr(ctx, "consumed", False):
        raise RuntimeError(
            "opsd_kernels losses support a single backward per forward "
            "(retain_graph=True followed by a second backward is not supported)"
        )
    ctx.consumed = True


class DivergenceFunction(torch.autograd.Function):
    """Divergence on logits; gradients to both logits when they require grad.

    float32/bfloat16/float64: the gradients are formed in the forward (one pass
    fewer) and scaled by the upstream gradient in the backward. float16: a
    gradient formed before the upstream factor (e.g. a GradScaler's 65536) would
    underflow in a float16 buffer, so the forward computes only the loss and the
    backward forms the gradients with the upstream factor already applied.
    """

    @staticmethod
    def forward(
        ctx, student, teacher, mask, opts: DivergenceOptions, row_fn: RowFunction, stats=None
    ):
        lead = student.shape[:-1]
        s2, t2 = as_rows(student), as_rows(teacher)
        mask1 = None if mask is None else mask.reshape(-1).contiguous()
        want_s, want_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        scale = forward_scale(
            opts.reduction,
            mask1,
            s2.shape[0],
            student.device,
            gemm.compute_dtype(student.dtype, teacher.dtype),
        )
        defer = (want_s and student.dtype == torch.float16) or (
            want_t and teacher.dtype == torch.float16
        )
        now_s, now_t = want_s and not defer, want_t and not defer
        grad_s = torch.empty_like(s2, memory_format=torch.contiguous_format) if now_s else None
        grad_t = torch.empty_like(t2, memory_format=torch.contiguous_format) if now_t else None
        # ``stats``: None, or the caller's (R, NUM_STATS) buffer, filled here (no gradient)
        extra = {} if stats is None else {"stats": stats}
        loss_rows = row_fn(
            s2, t2, opts, mask=mask1, scale=scale, grad_student=grad_s, grad_teacher=grad_t, **extra
        )
        ctx.defer = defer
        ctx.wants = (want_s, want_t)
        ctx.shapes = (student.shape, teacher.shape)
        ctx.reduction = opts.reduction
        if defer:
            ctx.save_for_backward(s2, t2, scale)
            ctx.args = (mask1, opts, row_fn)
        else:
            ctx.grads = (grad_s, grad_t)
        return reduce_rows(loss_rows, opts.reduction, scale, lead)

    @staticmethod
    def backward(ctx, grad_out):
        check_single_backward(ctx)
        if ctx.defer:
            s2, t2, fwd_scale = ctx.saved_tensors
            mask1, opts, row_fn = ctx.args
            want_s, want_t = ctx.wants
            scale = (fwd_scale * grad_out.reshape(-1).to(fwd_scale.dtype)).contiguous()
            grad_s = torch.empty_like(s2, memory_format=torch.contiguous_format) if want_s else None
            grad_t = torch.empty_like(t2, memory_format=torch.contiguous_format) if want_t else None
            row_fn(s2, t2, opts, mask=mask1, scale=scale, grad_student=grad_s, grad_teacher=grad_t)
            outs = [
                None if g is None else g.view(shape)
                for g, shape in zip((grad_s, grad_t), ctx.shapes, strict=True)
            ]
            return outs[0], outs[1], None, None, None, None
        go = grad_out.reshape(-1, 1) if ctx.reduction == "none" else grad_out
        outs = []
        for g, shape in zip(ctx.grads, ctx.shapes, strict=True):
            outs.append(None if g is None else g.mul_(go).view(shape))
        ctx.grads = None
        return outs[0], outs[1], None, None, None, None


def auto_chunk_size(
    V: int, impl: str, N: int | None = None, *, logit_bytes: int = 4, operand_bytes: int = 0
) -> int:
    """Tokens per chunk so the chunk's working memory fits ``config.chunk_memory_budget``.

    Per token the chunked paths hold the student and teacher logit rows in the
    compute dtype (``2 * V * logit_bytes``: float32 logits, see
    :mod:`opsd_kernels.gemm`), plus, for 16-bit weights, the logit gradient as
    a 16-bit GEMM operand (``V * operand_bytes``); the torch row function also
    holds its float32 temporaries (about ``10 * V * 4`` bytes). Given the token
    count ``N``, the chunk is also capped at ``max(128, ceil(N / 8))`` tokens so
    that small inputs, which would fit the budget in one chunk, still work in
    pieces and stay leaner than the naive path (a chunk of 128+ tokens keeps the
    GEMMs efficient).
    """
    per_token = V * (2 * logit_bytes + operand_bytes)
    per_token += TEMPS_PER_ROW * V * 4 if impl == "torch" else 0
    c = max(1, config.chunk_memory_budget // per_token)
    c = c // 64 * 64 if c >= 128 else c
    if N is not None:
        c = min(c, max(128, -(-N // 8)))
    return c


class ChunkedSweep:
    """The token-chunked sweep of :class:`FusedLinearDivergenceFunction` over the whole
    vocabulary: per chunk float32 logits, the row function, the gradient GEMMs.

    A sweep is called as ``sweep(hs, ht, weight, teacher_weight, bias, teacher_bias,
    mask, opts, scale, want_h, want_w, want_b, weight_grad_dtype, stats=None,
    token_stats=None)`` and returns ``(loss_rows, stats, grad_hidden, grad_weight,
    grad_bias)``: ``scale`` is (1,) or (N,) per-row gradient factors in the compute dtype;
    ``stats`` are internal per-token values a deferred backward may reuse (None here: this
    sweep recomputes them); ``token_stats``: None, or the float32 (N, NUM_STATS) buffer of
    the public per-token statistics (:mod:`opsd_kernels.stats`), filled by the forward;
    the hidden and bias gradients are in the compute dtype (float32 or float64), the
    weight gradient in ``weight_grad_dtype``, None where unwanted.
    :meth:`reduce_hidden` finishes the hidden gradient (the identity here; a
    vocabulary-parallel sweep sums it over its ranks).
    """

    def __init__(self, row_fn: RowFunction, chunk: int):
        self.row_fn, self.chunk = row_fn, chunk

    def __call__(
        self,
        hs,
        ht,
        weight,
        teacher_weight,
        bias,
        teacher_bias,
        mask,
        opts,
        scale,
        want_h,
        want_w,
        want_b,
        weight_grad_dtype,
        stats=None,
        token_stats=None,
    ):
        N = hs.shape[0]
        cdt = gemm.compute_dtype(
            hs.dtype,
            ht.dtype,
            weight.dtype,
            (weight if teacher_weight is None else teacher_weight).dtype,
        )
        loss = torch.empty(N, dtype=cdt, device=hs.device)
        grads = ChunkGradients(hs, weight, cdt, weight_grad_dtype, want_h, want_w, want_b)
        for lo in range(0, N, self.chunk):
            hi = min(N, lo + self.chunk)
            mask_c = None if mask is None else mask[lo:hi]
            hs_c, s_l, t_l = chunk_logits(
                hs[lo:hi], ht[lo:hi], weight, teacher_weight, bias, teacher_bias, mask_c
            )
            extra = {} if token_stats is None else {"stats": token_stats[lo:hi]}
            loss[lo:hi] = self.row_fn(
                s_l,
                t_l,
                opts,
                mask=mask_c,
                scale=scale if scale.numel() == 1 else scale[lo:hi],
                grad_student=s_l if grads.any else None,
                grad_teacher=None,
                **extra,
            )
            del t_l
            if grads.any:
                # s_l now holds dL/d(student logits), with the rows' factors applied
                grads.add(lo, hi, s_l, hs_c, weight)
            del s_l
        return (loss, None, *grads.as_tuple())

    def reduce_hidden(self, grad_h: torch.Tensor) -> torch.Tensor:
        return grad_h


class FusedLinearDivergenceFunction(torch.autograd.Function):
    """Chunked fused-linear divergence; gradients to student hidden, weight and bias.

    ``apply(student_hidden, teacher_hidden, weight, teacher_weight, bias, teacher_bias,
    mask, opts, sweep, weight_grad_dtype, token_stats=None)``: ``sweep`` a
    :class:`ChunkedSweep`, or a vocabulary-parallel one
    (:class:`opsd_kernels.vocab_parallel.VocabParallelSweep`); ``token_stats`` None or a
    float32 (N, NUM_STATS) buffer the forward fills (:mod:`opsd_kernels.stats`).

    Logits are float32 (:mod:`opsd_kernels.gemm`). Gradients formed in the forward
    are kept in float32 until the backward has applied the upstream factor (e.g. a
    GradScaler's loss scale), and only then cast to each input's dtype. Gradients
    that mix rows and cannot be formed in the forward (per-row upstream factors of
    reduction "none", or a float16 weight-gradient accumulator:
    :func:`~opsd_kernels.chunked.defer_mixed_gradients`) are formed by a second
    sweep in the backward, with the upstream factors applied first.
    """

    @staticmethod
    def forward(
        ctx,
        student_hidden,
        teacher_hidden,
        weight,
        teacher_weight,
        bias,
        teacher_bias,
        mask,
        opts: DivergenceOptions,
        sweep,
        weight_grad_dtype: torch.dtype,
        token_stats=None,
    ):
        H = student_hidden.shape[-1]
        lead = student_hidden.shape[:-1]
        hs = student_hidden.reshape(-1, H).contiguous()
        ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).contiguous()
        mask1 = None if mask is None else mask.reshape(-1).contiguous()
        want_h, want_w, want_b = (ctx.needs_input_grad[i] for i in (0, 2, 4))
        N = hs.shape[0]
        cdt = gemm.compute_dtype(hs.dtype, ht.dtype, weight.dtype)
        defer = defer_mixed_gradients(opts.reduction, want_w, want_b, weight_grad_dtype)
        scale = forward_scale(opts.reduction, mask1, N, hs.device, cdt)
        with torch.autocast(hs.device.type, enabled=False):
            loss, stats, grad_h, grad_w, grad_b = sweep(
                hs,
                ht,
                weight,
                teacher_weight,
                bias,
                teacher_bias,
                mask1,
                opts,
                scale,
                want_h and not defer,
                want_w and not defer,
                want_b and not defer,
                weight_grad_dtype,
                token_stats=token_stats,
            )
        ctx.defer = defer
        ctx.sweep = sweep
        ctx.reduction = opts.reduction
        ctx.wants = (want_h, want_w, want_b)
        ctx.weight_grad_dtype = weight_grad_dtype
        ctx.dtypes = (
            student_hidden.shape,
            student_hidden.dtype,
            weight.dtype,
            None if bias is None else bias.dtype,
        )
        if defer:
            ctx.save_for_backward(hs, ht, weight, teacher_weight, bias, teacher_bias, scale, stats)
            ctx.args = (mask1, opts)
        else:
            ctx.grads = (grad_h, grad_w, grad_b)
        return reduce_rows(loss, opts.reduction, scale, lead)

    @staticmethod
    def backward(ctx, grad_out):
        check_single_backward(ctx)
        want_h, want_w, want_b = ctx.wants
        shape, h_dtype, w_dtype, b_dtype = ctx.dtypes
        if ctx.defer:
            hs, ht, weight, teacher_weight, bias, teacher_bias, fwd_scale, stats = ctx.saved_tensors
            mask1, opts = ctx.args
            # the upstream factor goes in first: no 16-bit buffer holds an unscaled value
            scale = (fwd_scale * grad_out.reshape(-1).to(fwd_scale.dtype)).contiguous()
            with torch.autocast(hs.device.type, enabled=False):
                _, _, grad_h, grad_w, grad_b = ctx.sweep(
                    hs,
                    ht,
                    weight,
                    teacher_weight,
                    bias,
                    teacher_bias,
                    mask1,
                    opts,
                    scale,
                    want_h,
                    want_w,
                    want_b,
                    ctx.weight_grad_dtype,
                    stats=stats,
                )
        else:
            grad_h, grad_w, grad_b = ctx.grads
            ctx.grads = None
            grad_h, grad_w, grad_b = apply_upstream(
                (grad_h, grad_w, grad_b), grad_out, ctx.reduction
            )
        if grad_h is not None:
            grad_h = ctx.sweep.reduce_hidden(grad_h)
        return (
            None if grad_h is None else grad_h.to(h_dtype).view(shape),
            None,
            None if grad_w is None else grad_w.to(w_dtype),
            None,
            None if grad_b is None else grad_b.to(b_dtype),
            None,
            None,
            None,
            None,
            None,
            None,
        )
