"""Autograd Function of ``fused_linear_divergence(impl="fused")``.

The forward runs :func:`~opsd_kernels.triton.fused_forward.fused_forward` and
keeps only O(N) per-token statistics and the tile maxima besides references
to the inputs; the backward recomputes logit tiles
(:func:`~opsd_kernels.triton.fused_backward.fused_backward`) with the per-token
upstream factors, so every reduction (including "none" with arbitrary
upstream gradients) goes through the same kernels. Nothing is modified in
place, so the graph may be backpropagated more than once (``retain_graph``).
"""

from __future__ import annotations

import torch

from .._validation import DivergenceOptions
from ..reductions import as_rows, forward_scale, reduce_rows
from ..stats import NUM_STATS
from .configs import resolve_skip_threshold
from .fused_backward import fused_backward
from .fused_forward import fused_forward


class FusedTritonLinearDivergenceFunction(torch.autograd.Function):
    """Fully fused fused-linear divergence: logits exist only as on-chip tiles.

    ``apply(student_hidden, teacher_hidden, weight, teacher_weight, bias, teacher_bias,
    mask, opts, skip_threshold, weight_grad_dtype, deterministic=True, stats_out=None)``:
    validated inputs (one dtype per side, as ``fused_linear_divergence`` checks; mixed
    dtypes raise TypeError here), ``opts`` a
    :class:`~opsd_kernels._validation.DivergenceOptions` (every kind, clip mode and
    logit transform), ``skip_threshold`` a float in [0, 1] or ``"auto"``
    (:func:`~opsd_kernels.triton.configs.resolve_skip_threshold`), ``deterministic``
    False for the one-pass backward with atomic adds. ``stats_out``: None, or a float32
    ``(N, 4)`` tensor (N: the tokens, leading dimensions flattened; layout of
    :mod:`opsd_kernels.stats`, e.g. :func:`~opsd_kernels.stats.new_stats_buffer`) that the
    forward fills with the per-token statistics (masked rows 0); a plain output buffer,
    written in place, never differentiated.
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
        skip_threshold,
        weight_grad_dtype: torch.dtype,
        deterministic: bool = True,
        stats_out: torch.Tensor | None = None,
    ):
        if (
            student_hidden.dtype != weight.dtype
            or (teacher_weight is not None and teacher_hidden.dtype != teacher_weight.dtype)
            or (teacher_weight is None and teacher_hidden.dtype != weight.dtype)
        ):
            raise TypeError(
                "impl='fused' needs each hidden state in its weight's dtype, got student_hidden "
                f"{student_hidden.dtype}, teacher_hidden {teacher_hidden.dtype}, weight "
                f"{weight.dtype}, teacher_weight "
                f"{None if teacher_weight is None else teacher_weight.dtype}"
            )
        lead = student_hidden.shape[:-1]
        hs, ht = as_rows(student_hidden), as_rows(teacher_hidden)
        w, wt = as_rows(weight), as_rows(teacher_weight)
        b = None if bias is None else bias.contiguous()
        bt = None if teacher_bias is None else teacher_bias.contiguous()
        mask1 = None if mask is None else mask.reshape(-1).contiguous()
        N = hs.shape[0]
        if stats_out is not None and (
            not isinstance(stats_out, torch.Tensor)
            or stats_out.shape != (N, NUM_STATS)
            or stats_out.dtype != torch.float32
            or stats_out.device != hs.device
        ):
            raise ValueError(
                f"stats_out must be None or a float32 ({N}, {NUM_STATS}) tensor on "
                f"{hs.device}, got "
                + (
                    type(stats_out).__name__
                    if not isinstance(stats_out, torch.Tensor)
                    else f"{stats_out.dtype} {tuple(stats_out.shape)} on {stats_out.device}"
                )
            )
        scale = forward_scale(opts.reduction, mask1, N, hs.device, torch.float32)
        if N == 0:
            loss = torch.zeros(0, dtype=torch.float32, device=hs.device)
            stats = None
        else:
            want = stats_out is not None
            stats = fused_forward(hs, ht, w, wt, b, bt, mask1, opts, want_stats=want)
            loss = stats.loss
            if stats_out is not None:
                stats_out.copy_(stats.stats)
                stats.stats = None
        ctx.save_for_backward(hs, ht, w, wt, b, bt, mask1, scale)
        ctx.stats = stats
        ctx.opts = opts
        ctx.skip_threshold = resolve_skip_threshold(skip_threshold, hs.dtype, w.shape[0])
        ctx.weight_grad_dtype = weight_grad_dtype
        ctx.deterministic = deterministic
        ctx.meta = (student_hidden.shape, weight.dtype, None if bias is None else bias.dtype)
        return reduce_rows(loss, opts.reduction, scale, lead)

    @staticmethod
    def backward(ctx, grad_out):
        hs, ht, w, wt, b, bt, mask1, scale = ctx.saved_tensors
        shape, w_dtype, b_dtype = ctx.meta
        want_h, want_w, want_b = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[2],
            ctx.needs_input_grad[4],
        )
        opts = ctx.opts
        if ctx.stats is None:  # no tokens
            grad_h = torch.zeros_like(hs) if want_h else None
            grad_w = torch.zeros_like(w) if want_w else None
            grad_b = torch.zeros_like(b) if want_b else None
        else:
            # the upstream factor is applied to dS in float32, before any 16-bit store
            if opts.reduction == "none":
                row_scale = grad_out.reshape(-1).to(torch.float32).contiguous()
            else:
                row_scale = (grad_out.to(torch.float32) * scale).reshape(1)
            grad_h, grad_w, grad_b = fused_backward(
                hs,
                ht,
                w,
                wt,
                b,
                bt,
                mask1,
                ctx.stats,
                row_scale,
                opts,
                skip_threshold=ctx.skip_threshold,
                want_h=want_h,
                want_w=want_w,
                want_b=want_b,
                weight_grad_dtype=ctx.weight_grad_dtype,
                deterministic=ctx.deterministic,
            )
        return (
            None if grad_h is None else grad_h.view(shape),
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
            None,
        )
