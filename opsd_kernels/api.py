"""Public functions: validation, implementation dispatch, reductions. Thin by design."""

from __future__ import annotations

import torch

from . import gemm
from ._validation import (
    SAME_AS_STUDENT,
    check_chunk_size,
    check_impl,
    check_linear_inputs,
    check_logits_inputs,
    check_options,
    check_skip_threshold,
)
from .autograd import (
    ChunkedSweep,
    DivergenceFunction,
    FusedLinearDivergenceFunction,
    auto_chunk_size,
)
from .stats import DivergenceStats, new_stats_buffer, public_stats
from .torch_impl import divergence_rows_torch


def _row_function(impl: str):
    if impl == "torch":
        return divergence_rows_torch
    from .triton.divergence_rows import divergence_rows_triton

    return divergence_rows_triton


def _with_stats(loss: torch.Tensor, buffer: torch.Tensor | None, lead: torch.Size):
    return loss if buffer is None else (loss, public_stats(buffer, lead))


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    clip: float | None = None,
    clip_mode: str = "entry",
    logit_scale: float = 1.0,
    softcap: float | None = None,
    teacher_logit_scale: float | str = SAME_AS_STUDENT,
    teacher_softcap: float | str | None = SAME_AS_STUDENT,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    impl: str = "auto",
    process_group=None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, DivergenceStats]:
    """Per-token divergence between teacher and student next-token distributions.

    Args:
        student_logits: (..., V) float32, bfloat16, float16 (or float64) logits.
        teacher_logits: (..., V) logits of the same shape and device.
        kind: ``"forward_kl"`` = KL(p_T || p_S) (the OPSD paper's final choice),
            ``"reverse_kl"`` = KL(p_S || p_T), ``"jsd"`` = generalized JSD:
            ``beta KL(p_T || m) + (1 - beta) KL(p_S || m)``, ``m = beta p_T + (1 - beta) p_S``.
        beta: JSD mixture weight, strictly between 0 and 1 (ignored by the KL kinds).
        temperature: both logits are divided by it before the softmax (after the
            logit transform below).
        clip: None, or tau > 0: clip the loss, as ``clip_mode`` says.
        clip_mode: how ``clip`` applies (ignored without ``clip``):
            ``"entry"`` (default; the method's v3 loss): ``sum_v min(phi_v, tau)``,
            clipped entries pass no gradient through their own term (the clipped sum
            can be negative, and with forward KL a clipped entry's student logit is
            pushed DOWN: it still sits in the softmax);
            ``"token"``: ``min(sum_v phi_v, tau)`` per token, a clipped token passes no
            gradient at all;
            ``"entry_keep"``: the loss value and teacher gradient of ``"entry"``, but
            each clipped entry's student-logit gradient is replaced by the
            ``p_S``-weighted mean of the unclipped entries' gradients, so that a descent
            step leaves every clipped entry's student probability unchanged (to first
            order). Exact definitions: :class:`opsd_kernels._validation.DivergenceOptions`.
        logit_scale, softcap: the student's logit transform, applied to the raw
            logits ``x`` before the temperature: ``z = softcap * tanh(logit_scale * x /
            softcap)`` (Gemma 2's final soft-capping: ``softcap=30``), or
            ``logit_scale * x`` with ``softcap=None`` (default). Gradients are with
            respect to the raw logits. Under a cap a ``-inf`` logit becomes ``-softcap``
            (``tanh(-inf) = -1``): a finite logit, as in the capped model itself.
        teacher_logit_scale, teacher_softcap: the teacher's transform; ``"same"``
            (default) takes the student's values (``teacher_softcap=None`` leaves a
            teacher uncapped beside a capped student).
        mask: None or bool (...): False positions contribute nothing and get zero
            gradient; their contents never reach an output (padding may hold anything).
        reduction: ``"mean"`` (sum over counted tokens / number of counted tokens;
            0 when none is counted), ``"sum"``, or ``"none"`` (per-token losses of
            shape (...), whose backward accepts any upstream gradient).
        impl: ``"auto"`` (Triton on CUDA tensors, torch otherwise), ``"triton"``,
            or ``"torch"`` (row-chunked; bounded extra memory).
        process_group: None, or a ``torch.distributed.ProcessGroup`` across which the
            vocabulary is split (tensor parallelism): each rank passes its contiguous,
            possibly uneven, slice of the last dimension of both logits, in rank order.
            Every rank returns the full loss; each logit gradient is the rank's own
            slice. Forward: 2 all-reduces of O(N) values (KL kinds without clip, or with
            ``clip_mode="token"``) or 3 (jsd, or a per-entry clip); backward: none. See
            :mod:`opsd_kernels.vocab_parallel`.
        return_stats: also return per-token statistics (student entropy, teacher mass
            on clipped entries, clipped-entry count, whether the teacher's top-1 entry
            was clipped), computed in the same passes; see
            :class:`opsd_kernels.DivergenceStats`.

    Returns:
        float32 loss (float64 for float64 inputs on the torch path): a scalar,
        or shape (...) for ``reduction="none"``. Gradients flow to both logits
        when they require grad, in their own dtypes. Arithmetic is float32.
        With ``return_stats=True``: ``(loss, DivergenceStats)``, each statistic of
        shape (...), without gradient, 0 where ``mask`` is False.

    Special values: -inf logits (banned tokens) are exact: ``0 log 0 = 0``, and a
    KL is +inf where one side puts mass on a token the other bans (the
    gradient of an infinite loss is not meaningful). NaN in a counted row gives
    NaN. A counted row must have at least one finite logit on each side.

    Example: replace a naive ``F.kl_div`` chain with one call.

    >>> import torch, torch.nn.functional as F
    >>> s = torch.randn(2, 6, 50, requires_grad=True); t = torch.randn(2, 6, 50)
    >>> naive = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1),
    ...                  log_target=True, reduction="none").sum(-1).mean()
    >>> loss = divergence(s, t)                  # forward KL(p_T || p_S), token mean
    >>> torch.allclose(loss, naive, atol=1e-6)
    True
    >>> loss.backward(); s.grad.shape
    torch.Size([2, 6, 50])

    Per-token statistics beside the loss, here with a soft cap and the token clip:

    >>> loss, stats = divergence(s, t, softcap=30.0, clip=0.5, clip_mode="token",
    ...                          return_stats=True)
    >>> stats.student_entropy.shape, stats.clipped_entries.dtype
    (torch.Size([2, 6]), torch.int32)
    """
    opts = check_options(
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
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {return_stats!r}")
    check_logits_inputs(student_logits, teacher_logits, mask)
    impl = check_impl(
        impl,
        ("auto", "torch", "triton"),
        student_logits.device,
        torch.promote_types(student_logits.dtype, teacher_logits.dtype),
    )
    if not torch.is_grad_enabled():
        # a custom Function sees requires_grad even under no_grad: detach so that no
        # gradient is formed (and no (N, V) gradient buffer allocated) for nothing
        student_logits, teacher_logits = student_logits.detach(), teacher_logits.detach()
    lead = student_logits.shape[:-1]
    stats = new_stats_buffer(lead.numel(), student_logits.device) if return_stats else None
    if process_group is not None:
        from .vocab_parallel import check_process_group, divergence_vocab_parallel

        loss = divergence_vocab_parallel(
            student_logits,
            teacher_logits,
            mask,
            opts,
            check_process_group(process_group, impl),
            impl,
            stats,
        )
        return _with_stats(loss, stats, lead)
    loss = DivergenceFunction.apply(
        student_logits, teacher_logits, mask, opts, _row_function(impl), stats
    )
    return _with_stats(loss, stats, lead)


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    teacher_weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    clip: float | None = None,
    clip_mode: str = "entry",
    logit_scale: float = 1.0,
    softcap: float | None = None,
    teacher_logit_scale: float | str = SAME_AS_STUDENT,
    teacher_softcap: float | str | None = SAME_AS_STUDENT,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    impl: str = "auto",
    chunk_size: int | None = None,
    fp32_weight_grad: bool = True,
    skip_threshold: float | str = "auto",
    deterministic: bool = True,
    process_group=None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, DivergenceStats]:
    """Divergence computed from hidden states and the lm_head, never the full logits.

    Equals ``divergence(student_hidden @ weight.T + bias, teacher_hidden @ W_T.T + b_T)``
    with the teacher side held constant.

    Args:
        student_hidden: (..., H) final hidden states of the student context.
        teacher_hidden: (..., H_T) teacher hidden states, same leading shape
            (the positions that predict the same tokens).
        weight: (V, H) lm_head weight.
        teacher_weight: None (self-distillation: the teacher shares ``weight``
            and ``bias``; the fastest case, one GEMM for both roles) or (V, H_T).
        bias: None or (V,) lm_head bias.
        teacher_bias: None or (V,); only with a separate ``teacher_weight``.
        kind, beta, temperature, clip, clip_mode, mask, reduction, return_stats: as
            :func:`divergence`.
        logit_scale, softcap: the student's logit transform, as :func:`divergence`'s,
            applied to ``h W^T + b`` (a head whose scale is already folded into the
            hidden states or weight keeps the default 1.0).
        teacher_logit_scale, teacher_softcap: the teacher's, as :func:`divergence`'s;
            ``"same"`` (default) takes the student's values.
        impl: ``"auto"`` (Triton on CUDA, torch otherwise), ``"torch"``, ``"triton"``,
            ``"fused"``. ``"torch"`` and ``"triton"`` are token-chunked: per chunk one
            float32 logits GEMM, the row divergence (gradient written over the logits
            buffer), then the gradient GEMMs; extra memory O(chunk * V); 8NHV flops
            (6NHV with a frozen weight). ``"fused"`` (CUDA, or the Triton interpreter)
            never writes logits to global memory: Triton tiles over (tokens x
            vocabulary) form both logits with ``tl.dot`` and reduce them at once into
            per-token statistics; the backward recomputes the tiles. Extra memory O(N)
            statistics plus per-tile maxima, a bounded gradient slab and a float32 dH
            accumulator per token slice (``FusedConfig.scratch_bytes``); flops 4NHV
            forward (plus the tiles an exact bound cannot clear, for clip; every tile
            again for jsd), backward 6NHV frozen / 8NHV trainable: one recompute per
            tile, its logit gradient passed through a bounded slab to the gradient GEMMs
            (deterministic) or to float32 atomic adds (``deterministic=False``). See
            :mod:`opsd_kernels.triton.fused_forward`
            and :mod:`opsd_kernels.triton.fused_backward` for the derivations and bounds.
        chunk_size: tokens per chunk of the chunked impls; None picks it from
            ``opsd_kernels.config.chunk_memory_budget`` (default 512 MiB).
        fp32_weight_grad: accumulate the weight (and bias) gradient over chunks in
            float32 (default; for 16-bit weights this holds a float32 (V, H) buffer, and
            its cast to the weight's dtype at the end); False accumulates in the
            weight's dtype (a float16 accumulator is then filled in the backward, after
            the upstream factor, so loss scaling still protects it). ``"fused"`` always
            accumulates in float32; False only avoids a float32 (V, H) buffer.
        skip_threshold: ``impl="fused"`` only: ``"auto"`` (default) or a float in
            [0, 1] (0.0 is exact). The backward skips, without recomputing it, every
            tile whose teacher and student probabilities are provably all below the
            threshold; the loss is never affected. ``"auto"`` is exact for float32 and
            float64, and for 16-bit gradients drops only what provably sums, per token
            row, to less than half an ulp of the row's gradient scale (forward KL and
            JSD). The bound and its proof: :mod:`opsd_kernels.triton.fused_backward`.
        deterministic: ``impl="fused"`` only. True (default): a backward without
            atomics, bitwise reproducible on one GPU model and software stack: each tile
            is recomputed once into a bounded gradient slab, and library GEMMs add the
            slabs into dH, dW and db in a fixed order (under
            ``torch.use_deterministic_algorithms(True)``, set
            ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` as for any CUDA matmul). False: one
            kernel that recomputes each tile once and feeds dH, dW and db through
            float32 atomic adds (no slab; skipped tiles save their gradient
            work too; the last bits may vary between runs).
        process_group: None, or a ``torch.distributed.ProcessGroup`` across which the
            vocabulary is split (tensor parallelism): each rank passes its contiguous,
            possibly uneven, rows of ``weight``, ``bias``, ``teacher_weight`` and
            ``teacher_bias`` (in rank order), with the hidden states and mask replicated.
            Every rank returns the full loss; the ``student_hidden`` gradient is the full
            gradient on every rank (summed over the group inside the backward); the
            weight and bias gradients are the rank's own rows. ``impl="torch"`` or
            ``"triton"`` (chunk GEMMs, then the row phases between collectives as torch
            operations or Triton kernels); ``"fused"`` is refused. Forward: 2 (KL kinds
            without clip) or 3 all-reduces of O(chunk) values per token chunk; backward:
            one all-reduce of the (N, H) hidden gradient. See
            :mod:`opsd_kernels.vocab_parallel`.

    Gradients flow to ``student_hidden``, ``weight`` and ``bias`` when they require
    grad; a frozen weight (``requires_grad=False``, the LoRA case) skips the weight
    gradient entirely. No gradient flows to ``teacher_hidden``, ``teacher_weight``
    or ``teacher_bias``: the teacher is a constant (the method's stop-gradient).
    Chunked impls: with ``reduction="mean"``/``"sum"`` the gradients are formed
    during the forward; with ``"none"`` and a trainable weight or bias they are
    recomputed in the backward from the upstream per-token gradients. ``"fused"``
    always recomputes in the backward (nothing is stored but the statistics), so its
    graph may also be backpropagated twice (``retain_graph=True``).

    Returns: float32 loss, scalar or shape (...) for ``reduction="none"``; with
    ``return_stats=True``, ``(loss, DivergenceStats)`` (per token, shape (...)).

    >>> torch.manual_seed(0) and None
    >>> h_s = torch.randn(4, 7, 16, requires_grad=True)   # student hidden states
    >>> h_t = torch.randn(4, 7, 16)                       # teacher hidden states
    >>> lm_head = torch.nn.Linear(16, 100, bias=False)
    >>> loss = fused_linear_divergence(h_s, h_t, lm_head.weight, temperature=1.1, clip=0.05)
    >>> loss.backward()
    >>> h_s.grad.shape, lm_head.weight.grad.shape
    (torch.Size([4, 7, 16]), torch.Size([100, 16]))

    A Gemma-2-style soft-capped head, with per-token statistics:

    >>> loss, stats = fused_linear_divergence(h_s, h_t, lm_head.weight, softcap=30.0,
    ...                                       clip=0.05, clip_mode="entry_keep",
    ...                                       return_stats=True)
    >>> bool((stats.teacher_clipped_mass <= 1).all()), stats.teacher_top1_clipped.dtype
    (True, torch.bool)
    """
    opts = check_options(
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
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {return_stats!r}")
    check_linear_inputs(
        student_hidden, teacher_hidden, weight, teacher_weight, bias, teacher_bias, mask
    )
    check_chunk_size(chunk_size)
    tensors = [
        t
        for t in (student_hidden, teacher_hidden, weight, teacher_weight, bias, teacher_bias)
        if t is not None
    ]
    dtypes = {t.dtype for t in tensors}
    cdt = gemm.compute_dtype(*dtypes)
    impl = check_impl(
        impl,
        ("auto", "torch", "triton", "fused"),
        student_hidden.device,
        cdt if len(dtypes) > 1 else weight.dtype,
    )
    if impl == "fused" and len(dtypes) > 1:
        raise TypeError(
            "impl='fused' needs student_hidden, teacher_hidden, weight and the biases in one "
            f"dtype, got {sorted(str(d) for d in dtypes)}; cast them, or use impl='triton' or "
            "'torch', which accept mixed dtypes"
        )
    skip_threshold = check_skip_threshold(skip_threshold, impl)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {deterministic!r}")
    V, H = weight.shape
    if chunk_size is None:
        s_op = gemm.operand_dtype(student_hidden.dtype, weight.dtype)
        chunk_size = auto_chunk_size(
            V,
            impl,
            student_hidden.numel() // H,
            logit_bytes=cdt.itemsize,
            operand_bytes=s_op.itemsize if s_op != cdt else 0,
        )
    if cdt == torch.float64:
        grad_dtype = torch.float64
    else:
        grad_dtype = torch.float32 if fp32_weight_grad else weight.dtype
    # the teacher is a constant: detach so no graph is kept for it
    teacher_hidden = teacher_hidden.detach()
    teacher_weight = None if teacher_weight is None else teacher_weight.detach()
    teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    if not torch.is_grad_enabled():
        # see divergence(): no gradient work under no_grad
        student_hidden, weight = student_hidden.detach(), weight.detach()
        bias = None if bias is None else bias.detach()
    lead = student_hidden.shape[:-1]
    stats = new_stats_buffer(lead.numel(), student_hidden.device) if return_stats else None
    if process_group is not None:
        # this rank's vocabulary slice (check_process_group refuses impl="fused")
        from .vocab_parallel import VocabParallelSweep, check_process_group

        group = check_process_group(process_group, impl)
        sweep = VocabParallelSweep(group, chunk_size, impl)
    elif impl == "fused":
        from .triton.fused_function import FusedTritonLinearDivergenceFunction

        loss = FusedTritonLinearDivergenceFunction.apply(
            student_hidden,
            teacher_hidden,
            weight,
            teacher_weight,
            bias,
            teacher_bias,
            mask,
            opts,
            skip_threshold,
            grad_dtype,
            deterministic,
            stats,  # stats_out: filled in place
        )
        return _with_stats(loss, stats, lead)
    else:
        sweep = ChunkedSweep(_row_function(impl), chunk_size)
    loss = FusedLinearDivergenceFunction.apply(
        student_hidden,
        teacher_hidden,
        weight,
        teacher_weight,
        bias,
        teacher_bias,
        mask,
        opts,
        sweep,
        grad_dtype,
        stats,
    )
    return _with_stats(loss, stats, lead)
