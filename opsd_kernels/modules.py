"""nn.Module forms of the public functions (options fixed at construction)."""

from __future__ import annotations

import torch

from ._validation import check_options
from .api import divergence, fused_linear_divergence


class Divergence(torch.nn.Module):
    """Module form of :func:`opsd_kernels.divergence`.

    >>> loss_fn = Divergence(kind="jsd", beta=0.5, temperature=1.1)
    >>> s, t = torch.randn(3, 20), torch.randn(3, 20)
    >>> loss_fn(s, t).shape
    torch.Size([])
    """

    def __init__(
        self,
        kind="forward_kl",
        beta=0.5,
        temperature=1.0,
        clip=None,
        reduction="mean",
        impl="auto",
        process_group=None,
    ):
        super().__init__()
        check_options(kind, beta, temperature, clip, reduction)  # fail at construction
        self.kind, self.beta, self.temperature = kind, beta, temperature
        self.clip, self.reduction, self.impl = clip, reduction, impl
        self.process_group = process_group  # vocabulary-parallel: see opsd_kernels.vocab_parallel

    def forward(self, student_logits, teacher_logits, mask=None):
        return divergence(
            student_logits,
            teacher_logits,
            kind=self.kind,
            beta=self.beta,
            temperature=self.temperature,
            clip=self.clip,
            mask=mask,
            reduction=self.reduction,
            impl=self.impl,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, beta={self.beta}, temperature={self.temperature}, "
            f"clip={self.clip}, reduction={self.reduction!r}, impl={self.impl!r}"
        )


class FusedLinearDivergence(torch.nn.Module):
    """Module form of :func:`opsd_kernels.fused_linear_divergence`.

    The lm_head weight is passed at call time (it belongs to the model).

    >>> loss_fn = FusedLinearDivergence(kind="forward_kl", clip=0.05)
    >>> head = torch.nn.Linear(8, 30, bias=False)
    >>> loss_fn(torch.randn(5, 8), torch.randn(5, 8), head.weight).shape
    torch.Size([])
    """

    def __init__(
        self,
        kind="forward_kl",
        beta=0.5,
        temperature=1.0,
        clip=None,
        reduction="mean",
        impl="auto",
        chunk_size=None,
        fp32_weight_grad=True,
        skip_threshold="auto",
        deterministic=True,
        process_group=None,
    ):
        super().__init__()
        check_options(kind, beta, temperature, clip, reduction)
        self.kind, self.beta, self.temperature = kind, beta, temperature
        self.clip, self.reduction, self.impl = clip, reduction, impl
        self.chunk_size, self.fp32_weight_grad = chunk_size, fp32_weight_grad
        self.skip_threshold, self.deterministic = skip_threshold, deterministic
        self.process_group = process_group  # weight rows are this rank's vocabulary slice

    def forward(
        self,
        student_hidden,
        teacher_hidden,
        weight,
        *,
        teacher_weight=None,
        bias=None,
        teacher_bias=None,
        mask=None,
    ):
        return fused_linear_divergence(
            student_hidden,
            teacher_hidden,
            weight,
            teacher_weight=teacher_weight,
            bias=bias,
            teacher_bias=teacher_bias,
            kind=self.kind,
            beta=self.beta,
            temperature=self.temperature,
            clip=self.clip,
            mask=mask,
            reduction=self.reduction,
            impl=self.impl,
            chunk_size=self.chunk_size,
            fp32_weight_grad=self.fp32_weight_grad,
            skip_threshold=self.skip_threshold,
            deterministic=self.deterministic,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, beta={self.beta}, temperature={self.temperature}, "
            f"clip={self.clip}, reduction={self.reduction!r}, impl={self.impl!r}, "
            f"chunk_size={self.chunk_size}"
        )


class TopkDivergence(torch.nn.Module):
    """Module form of :func:`opsd_kernels.topk_divergence` (a top-k teacher).

    >>> loss_fn = TopkDivergence(kind="forward_kl", tail="bucket", clip=0.05)
    >>> s = torch.randn(3, 20)
    >>> lp, ids = torch.log_softmax(torch.randn(3, 20), -1).topk(4, dim=-1)
    >>> loss_fn(s, ids, lp).shape
    torch.Size([])
    """

    def __init__(
        self,
        kind="forward_kl",
        beta=0.5,
        tail="bucket",
        temperature=1.0,
        clip=None,
        reduction="mean",
        impl="auto",
        validate=None,
    ):
        super().__init__()
        from .topk import _check_topk_options

        _check_topk_options(kind, beta, tail, temperature, clip, reduction)
        self.kind, self.beta, self.tail, self.temperature = kind, beta, tail, temperature
        self.clip, self.reduction, self.impl, self.validate = clip, reduction, impl, validate

    def forward(self, student_logits, teacher_ids, teacher_logprobs, mask=None):
        from .topk import topk_divergence

        return topk_divergence(
            student_logits,
            teacher_ids,
            teacher_logprobs,
            kind=self.kind,
            beta=self.beta,
            tail=self.tail,
            temperature=self.temperature,
            clip=self.clip,
            mask=mask,
            reduction=self.reduction,
            impl=self.impl,
            validate=self.validate,
        )

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, tail={self.tail!r}, temperature={self.temperature}, "
            f"clip={self.clip}, reduction={self.reduction!r}, impl={self.impl!r}"
        )


class FusedLinearTopkDivergence(TopkDivergence):
    """Module form of :func:`opsd_kernels.fused_linear_topk_divergence`; the lm_head
    weight (and bias) are passed at call time.

    >>> loss_fn = FusedLinearTopkDivergence(temperature=1.1)
    >>> head = torch.nn.Linear(8, 30, bias=False)
    >>> lp, ids = torch.log_softmax(torch.randn(5, 30), -1).topk(4, dim=-1)
    >>> loss_fn(torch.randn(5, 8), head.weight, ids, lp).shape
    torch.Size([])
    """

    def __init__(
        self,
        kind="forward_kl",
        beta=0.5,
        tail="bucket",
        temperature=1.0,
        clip=None,
        reduction="mean",
        impl="auto",
        chunk_size=None,
        validate=None,
    ):
        super().__init__(kind, beta, tail, temperature, clip, reduction, impl, validate)
        self.chunk_size = chunk_size

    def forward(
        self, student_hidden, weight, teacher_ids, teacher_logprobs, *, bias=None, mask=None
    ):
        from .topk import fused_linear_topk_divergence

        return fused_linear_topk_divergence(
            student_hidden,
            weight,
            teacher_ids,
            teacher_logprobs,
            bias=bias,
            kind=self.kind,
            beta=self.beta,
            tail=self.tail,
            temperature=self.temperature,
            clip=self.clip,
            mask=mask,
            reduction=self.reduction,
            impl=self.impl,
            chunk_size=self.chunk_size,
            validate=self.validate,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", chunk_size={self.chunk_size}"
