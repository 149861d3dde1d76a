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
import torch.nn.functional as F

from . import config
from ._validation import DivergenceOptions
from .torch_impl import _TEMPS_PER_ROW

RowFunction = Callable[..., torch.Tensor]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward_scale(reduction: str, mask, rows: int, device, dtype) -> torch.Tensor:
    """(1,) per-row gradient factor known in the forward: 1/count for "mean", else 1.

    Formed on the device, without a host sync.
    """
    if reduction != "mean":
        return torch.ones(1, dtype=dtype, device=device)
    if mask is None:
        return torch.full((1,), 1.0 / max(rows, 1), dtype=dtype, device=device)
    return mask.sum(dtype=dtype).clamp(min=1.0).reciprocal().reshape(1)


def _reduce(loss_rows: torch.Tensor, reduction: str, scale: torch.Tensor, lead_shape):
    if reduction == "none":
        return loss_rows.view(lead_shape)
    total = loss_rows.sum()
    return total * scale[0] if reduction == "mean" else total


def _check_single_backward(ctx) -> None:
    # the stored gradients are scaled in place: a second backward through the
    # same graph would see them already scaled
    if getattr(ctx, "consumed", False):
        raise RuntimeError(
            "opsd_kernels losses support a single backward per forward "
            "(retain_graph=True followed by a second backward is not supported)"
        )
    ctx.consumed = True


class DivergenceFunction(torch.autograd.Function):
    """Divergence on logits; gradients to both logits when they require grad."""

    @staticmethod
    def forward(ctx, student, teacher, mask, opts: DivergenceOptions, row_fn: RowFunction):
        V = student.shape[-1]
        lead = student.shape[:-1]
        s2 = student.reshape(-1, V)
        t2 = teacher.reshape(-1, V)
        s2 = s2 if s2.stride(-1) == 1 else s2.contiguous()
        t2 = t2 if t2.stride(-1) == 1 else t2.contiguous()
        mask1 = None if mask is None else mask.reshape(-1).contiguous()
        want_s, want_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        scale = _forward_scale(opts.reduction, mask1, s2.shape[0], student.device,
                               _compute_dtype(torch.promote_types(student.dtype, teacher.dtype)))
        grad_s = torch.empty_like(s2, memory_format=torch.contiguous_format) if want_s else None
        grad_t = torch.empty_like(t2, memory_format=torch.contiguous_format) if want_t else None
        loss_rows = row_fn(
            s2, t2, spec=opts.spec, beta=opts.beta, temperature=opts.temperature,
            clip=opts.clip, mask=mask1, scale=scale, grad_student=grad_s, grad_teacher=grad_t,
        )
        ctx.grads = (grad_s, grad_t)
        ctx.shapes = (student.shape, teacher.shape)
        ctx.reduction = opts.reduction
        return _reduce(loss_rows, opts.reduction, scale, lead)

    @staticmethod
    def backward(ctx, grad_out):
        _check_single_backward(ctx)
        go = grad_out.reshape(-1, 1) if ctx.reduction == "none" else grad_out
        outs = []
        for g, shape in zip(ctx.grads, ctx.shapes, strict=True):
            outs.append(None if g is None else g.mul_(go).view(shape))
        ctx.grads = None
        return outs[0], outs[1], None, None, None


def auto_chunk_size(V: int, element_size: int, impl: str, N: int | None = None) -> int:
    """Tokens per chunk so the chunk's working memory fits ``config.chunk_memory_budget``.

    Per token the Triton path holds the student and teacher logit rows
    (``2 * V * element_size`` bytes); the torch path also holds its float32
    temporaries (about ``10 * V * 4`` bytes). Given the token count ``N``, the
    chunk is also capped at ``max(128, ceil(N / 8))`` tokens so that small
    inputs, which would fit the budget in one chunk, still work in pieces and
    stay leaner than the naive path (a chunk of 128+ tokens keeps the GEMMs
    efficient).
    """
    per_token = 2 * V * element_size + (_TEMPS_PER_ROW * V * 4 if impl == "torch" else 0)
    c = max(1, config.chunk_memory_budget // per_token)
    c = c // 64 * 64 if c >= 128 else c
    if N is not None:
        c = min(c, max(128, -(-N // 8)))
    return c


def _chunked_linear_pass(hs, ht, weight, teacher_weight, bias, teacher_bias, mask, opts,
                         row_fn, chunk, scale, want_h, want_w, want_b, weight_grad_dtype):
    """One sweep over token chunks: logits, row kernel, gradient GEMMs.

    ``scale``: (1,) or (N,) float32 per-row gradient factors. Returns
    ``(loss_rows, grad_hidden, grad_weight, grad_bias)`` (None where unwanted).
    """
    N = hs.shape[0]
    V = weight.shape[0]
    loss = torch.empty(N, dtype=_compute_dtype(hs.dtype), device=hs.device)
    grad_h = torch.empty_like(hs) if want_h else None
    grad_w = (torch.zeros(weight.shape, dtype=weight_grad_dtype, device=weight.device)
              if want_w else None)
    grad_b = (torch.zeros(V, dtype=weight_grad_dtype, device=weight.device)
              if want_b else None)
    any_grad = want_h or want_w or want_b
    shared = teacher_weight is None
    # vocabulary rows per slice of the weight-gradient temporary (<= 64 MiB)
    w_slice = max(1, min(V, (64 * 2**20) // max(1, weight.shape[1] * weight.element_size())))
    for lo in range(0, N, chunk):
        hi = min(N, lo + chunk)
        c = hi - lo
        hs_c = hs[lo:hi]
        if shared:
            # one GEMM for both roles: one read of the lm_head serves teacher and student
            logits = F.linear(torch.cat([hs_c, ht[lo:hi]]), weight, bias)
            s_l, t_l = logits[:c], logits[c:]
        else:
            s_l = F.linear(hs_c, weight, bias)
            t_l = F.linear(ht[lo:hi], teacher_weight, teacher_bias)
        rows = row_fn(
            s_l, t_l, spec=opts.spec, beta=opts.beta, temperature=opts.temperature,
            clip=opts.clip, mask=None if mask is None else mask[lo:hi],
            scale=scale if scale.numel() == 1 else scale[lo:hi],
            grad_student=s_l if any_grad else None, grad_teacher=None,
        )
        loss[lo:hi] = rows
        del t_l
        # s_l now holds dL/d(student logits) for this chunk
        if want_h:
            torch.mm(s_l, weight, out=grad_h[lo:hi])
        if want_w:
            if grad_w.dtype == s_l.dtype:
                grad_w.addmm_(s_l.t(), hs_c)
            else:
                # fp32 accumulation of a 16-bit GEMM: the product of one slice of
                # vocabulary rows at a time, so the temporary stays small (not V x H)
                for v0 in range(0, V, w_slice):
                    grad_w[v0:v0 + w_slice].add_(torch.mm(s_l[:, v0:v0 + w_slice].t(), hs_c))
        if want_b:
            grad_b.add_(s_l.sum(0, dtype=grad_b.dtype))
        del s_l
    return loss, grad_h, grad_w, grad_b


class FusedLinearDivergenceFunction(torch.autograd.Function):
    """Chunked fused-linear divergence; gradients to student hidden, weight and bias."""

    @staticmethod
    def forward(ctx, student_hidden, teacher_hidden, weight, teacher_weight, bias, teacher_bias,
                mask, opts: DivergenceOptions, row_fn: RowFunction, chunk: int,
                weight_grad_dtype: torch.dtype):
        H = student_hidden.shape[-1]
        lead = student_hidden.shape[:-1]
        hs = student_hidden.reshape(-1, H).contiguous()
        ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).contiguous()
        mask1 = None if mask is None else mask.reshape(-1).contiguous()
        want_h = ctx.needs_input_grad[0]
        want_w = ctx.needs_input_grad[2]
        want_b = ctx.needs_input_grad[4]
        N = hs.shape[0]
        # "none" with weight/bias gradients: rows mix in dW and db, so the backward recomputes
        defer = opts.reduction == "none" and (want_w or want_b)
        scale = _forward_scale(opts.reduction, mask1, N, hs.device, _compute_dtype(hs.dtype))
        loss, grad_h, grad_w, grad_b = _chunked_linear_pass(
            hs, ht, weight, teacher_weight, bias, teacher_bias, mask1, opts, row_fn, chunk,
            scale, want_h and not defer, want_w and not defer, want_b and not defer,
            weight_grad_dtype,
        )
        ctx.defer = defer
        ctx.reduction = opts.reduction
        ctx.wants = (want_h, want_w, want_b)
        ctx.weight_grad_dtype = weight_grad_dtype
        ctx.shapes = (student_hidden.shape, weight.dtype, None if bias is None else bias.dtype)
        if defer:
            ctx.save_for_backward(hs, ht, weight, teacher_weight, bias, teacher_bias)
            ctx.args = (mask1, opts, row_fn, chunk)
        else:
            ctx.grads = (grad_h, grad_w, grad_b)
        return _reduce(loss, opts.reduction, scale, lead)

    @staticmethod
    def backward(ctx, grad_out):
        _check_single_backward(ctx)
        want_h, want_w, want_b = ctx.wants
        shape, w_dtype, b_dtype = ctx.shapes
        if ctx.defer:
            hs, ht, weight, teacher_weight, bias, teacher_bias = ctx.saved_tensors
            mask1, opts, row_fn, chunk = ctx.args
            scale = grad_out.reshape(-1).to(_compute_dtype(hs.dtype)).contiguous()
            _, grad_h, grad_w, grad_b = _chunked_linear_pass(
                hs, ht, weight, teacher_weight, bias, teacher_bias, mask1, opts, row_fn, chunk,
                scale, want_h, want_w, want_b, ctx.weight_grad_dtype,
            )
        else:
            grad_h, grad_w, grad_b = ctx.grads
            ctx.grads = None
            go_rows = grad_out.reshape(-1, 1) if ctx.reduction == "none" else grad_out
            if grad_h is not None:
                grad_h.mul_(go_rows)
            if grad_w is not None:
                grad_w.mul_(grad_out)
            if grad_b is not None:
                grad_b.mul_(grad_out)
        return (
            None if grad_h is None else grad_h.view(shape),
            None,
            None if grad_w is None else grad_w.to(w_dtype),
            None,
            None if grad_b is None else grad_b.to(b_dtype),
            None, None, None, None, None, None,
        )
