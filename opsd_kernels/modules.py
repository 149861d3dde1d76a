"""nn.Module forms of the public functions (options fixed at construction)."""

from __future__ import annotations

import torch

from ._validation import SAME_AS_STUDENT, check_options
from .api import divergence, fused_linear_divergence


class _LossModule(torch.nn.Module):
    """Options kept as attributes (validated at construction, changeable later) and
    passed to the function by keyword on every call; ``repr`` lists them."""

    def __init__(self, **options):
        super().__init__()
        self._option_names = tuple(options)
        for name, value in options.items():
            setattr(self, name, value)

    def _add_option(self, name: str, value) -> None:
        self._option_names += (name,)
        setattr(self, name, value)

    def _options(self) -> dict:
        return {name: getattr(self, name) for name in self._option_names}

    def extra_repr(self) -> str:
        return ", ".join(
            f"{name}={value!r}"
            for name, value in self._options().items()
            if name != "process_group" or value is not None
        )


class Divergence(_LossModule):
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
        clip_mode="entry",
        logit_scale=1.0,
        softcap=None,
        teacher_logit_scale=SAME_AS_STUDENT,
        teacher_softcap=SAME_AS_STUDENT,
        reduction="mean",
        impl="auto",
        process_group=None,
        return_stats=False,
    ):
        # fail at construction
        check_options(
            kind,
            beta,
            temperature,
            clip,
            reduction,
            clip_mode,
            logit_scale,
            softcap,
            teacher_logit_scale,
            teacher_softcap,
        )
        # process_group: vocabulary-parallel, see opsd_kernels.vocab_parallel
        super().__init__(
            kind=kind,
            beta=beta,
            temperature=temperature,
            clip=clip,
            clip_mode=clip_mode,
            logit_scale=logit_scale,
            softcap=softcap,
            teacher_logit_scale=teacher_logit_scale,
            teacher_softcap=teacher_softcap,
            reduction=reduction,
            impl=impl,
            process_group=process_group,
            return_stats=return_stats,
        )

    def forward(self, student_logits, teacher_logits, mask=None):
        return divergence(student_logits, teacher_logits, mask=mask, **self._options())


class FusedLinearDivergence(_LossModule):
    """Module form of :func:`opsd_kernels.fused_linear_divergence`.

    The lm_head weight is passed at call time (it belongs to the model).

    >>> loss_fn = FusedLinearDivergence(kind="forward_kl", clip=0.05)
    >>> head = torch.nn.Linear(8, 30, bias=False)
    >>> loss_fn(torch.randn(5, 8), torch.randn(5, 8), head.weight).shape
    torch.Size([])
    >>> capped = FusedLinearDivergence(softcap=30.0, clip=0.05, clip_mode="token",
    ...                                return_stats=True)
    >>> loss, stats = capped(torch.randn(5, 8), torch.randn(5, 8), head.weight)
    >>> stats.student_entropy.shape
    torch.Size([5])
    """

    def __init__(
        self,
        kind="forward_kl",
        beta=0.5,
        temperature=1.0,
        clip=None,
        clip_mode="entry",
        logit_scale=1.0,
        softcap=None,
        teacher_logit_scale=SAME_AS_STUDENT,
        teacher_softcap=SAME_AS_STUDENT,
        reduction="mean",
        impl="auto",
        chunk_size=None,
        fp32_weight_grad=True,
        skip_threshold="auto",
        deterministic=True,
        process_group=None,
        return_stats=False,
    ):
        check_options(
            kind,
            beta,
            temperature,
            clip,
            reduction,
            clip_mode,
            logit_scale,
            softcap,
            teacher_logit_scale,
            teacher_softcap,
        )
        # process_group: the weight rows are this rank's vocabulary slice
        super().__init__(
            kind=kind,
            beta=beta,
            temperature=temperature,
            clip=clip,
            clip_mode=clip_mode,
            logit_scale=logit_scale,
            softcap=softcap,
            teacher_logit_scale=teacher_logit_scale,
            teacher_softcap=teacher_softcap,
            reduction=reduction,
            impl=impl,
            chunk_size=chunk_size,
            fp32_weight_grad=fp32_weight_grad,
            skip_threshold=skip_threshold,
            deterministic=deterministic,
            process_group=process_group,
            return_stats=return_stats,
        )

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
            mask=mask,
            **self._options(),
        )


class TopkDivergence(_LossModule):
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
        clip_mode="entry",
        logit_scale=1.0,
        softcap=None,
        return_stats=False,
    ):
        from .topk import _check_topk_options

        _check_topk_options(
            kind,
            beta,
            tail,
            temperature,
            clip,
            reduction,
            clip_mode,
            logit_scale,
            softcap,
            return_stats,
        )
        super().__init__(
            kind=kind,
            beta=beta,
            tail=tail,
            temperature=temperature,
            clip=clip,
            reduction=reduction,
            impl=impl,
            validate=validate,
            clip_mode=clip_mode,
            logit_scale=logit_scale,
            softcap=softcap,
            return_stats=return_stats,
        )

    def forward(self, student_logits, teacher_ids, teacher_logprobs, mask=None):
        from .topk import topk_divergence

        return topk_divergence(
            student_logits, teacher_ids, teacher_logprobs, mask=mask, **self._options()
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
        clip_mode="entry",
        logit_scale=1.0,
        softcap=None,
        return_stats=False,
    ):
        super().__init__(
            kind,
            beta,
            tail,
            temperature,
            clip,
            reduction,
            impl,
            validate,
            clip_mode,
            logit_scale,
            softcap,
            return_stats,
        )
        self._add_option("chunk_size", chunk_size)

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
            mask=mask,
            **self._options(),
        )
