"""The OPSD loss step: teacher and student forwards over the same completion, exact position
alignment, and the divergence through :func:`opsd_kernels.fused_linear_divergence`.

Layout. Sample ``i`` has a student prompt of length ``Ls_i``, a teacher prompt of length
``Lt_i`` and a completion ``c_i`` of length ``C_i``. The student input is
``student_prompt_i + c_i`` and the teacher input ``teacher_prompt_i + c_i``, both right
padded (so position ids are the plain ``0..T-1`` of each row). Completion token ``j`` is
predicted by the hidden state at position ``Ls_i - 1 + j`` in the student row and
``Lt_i - 1 + j`` in the teacher row; :func:`gather_completion_states` collects exactly these
into ``(B, Cmax, H)`` tensors whose row ``j`` refers to the same token in both contexts,
with a mask of the ``C_i`` valid entries. Full logits are never formed: only the final
hidden states are computed (the model body, without its lm_head), and the lm_head weight
goes to the fused loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from opsd_kernels.hf import causal_lm_backbone, causal_lm_head, causal_lm_hidden_states

__all__ = [
    "LossConfig",
    "PackedBatch",
    "pack_batch",
    "get_body",
    "get_lm_head",
    "final_hidden_states",
    "gather_completion_states",
    "token_logprobs",
    "head_bias",
    "opsd_loss",
    "sft_loss",
    "grpo_step_loss",
]

LOSS_TYPES = ("full", "sampled_token")
IMPLS = ("auto", "torch", "triton", "fused")


def _kernel_kinds() -> tuple[str, ...]:
    from opsd_kernels.divergences import KINDS as registry

    return tuple(registry)


KINDS = _kernel_kinds()  # the kernels' registry of divergence kinds


@dataclass
class LossConfig:
    """Divergence settings.

    ``loss="full"`` is the full-vocabulary divergence ``kind`` (with ``beta`` for JSD,
    per-entry ``clip`` tau or ``None``); ``loss="sampled_token"`` is the paper's Eq. 9
    estimator ``-mean_n stopgrad(log pT(y_n) - log pS(y_n)) * log pS(y_n)``. Both divide
    logits by ``temperature``. ``impl``/``chunk_size`` are passed to the kernel.

    The divergence options are checked by the kernels' own validation
    (``opsd_kernels._validation.check_options``) here, at construction, so a bad value is
    reported before any model is loaded and with the kernels' wording.

    >>> LossConfig(kind="jsd", beta=1.0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: beta must lie strictly between 0 and 1 for kind='jsd', got 1.0 ...
    """

    loss: str = "full"
    kind: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    clip: float | None = None
    impl: str = "auto"
    chunk_size: int | None = None

    def __post_init__(self):
        from opsd_kernels._validation import check_options

        if self.loss not in LOSS_TYPES:
            raise ValueError(f"loss must be one of {LOSS_TYPES}, got {self.loss!r}")
        check_options(self.kind, self.beta, self.temperature, self.clip, "sum")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.chunk_size is not None and (
            isinstance(self.chunk_size, bool)
            or not isinstance(self.chunk_size, int)
            or self.chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be None or an integer >= 1, got {self.chunk_size!r}")


@dataclass
class PackedBatch:
    """Right-padded token ids with the completion start of every row.

    ``input_ids``/``attention_mask``: ``(B, T)``; ``starts``: ``(B,)`` index of the first
    completion token; ``completion``: ``(B, C)`` completion ids (pad beyond ``lengths``);
    ``mask``: ``(B, C)`` bool, True for real completion tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    starts: torch.Tensor
    completion: torch.Tensor
    mask: torch.Tensor

    def to(self, device) -> PackedBatch:
        """Move all tensors to ``device``."""
        return PackedBatch(
            *(
                t.to(device)
                for t in (
                    self.input_ids,
                    self.attention_mask,
                    self.starts,
                    self.completion,
                    self.mask,
                )
            )
        )


def pack_batch(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
) -> PackedBatch:
    """Concatenate prompt + completion per row, right-pad, and record the alignment.

    >>> b = pack_batch([[1, 2, 3], [4]], [[7, 8], [9]], pad_id=0)
    >>> b.input_ids.tolist(), b.starts.tolist(), b.mask.tolist()
    ([[1, 2, 3, 7, 8], [4, 9, 0, 0, 0]], [3, 1], [[True, True], [True, False]])
    """
    if len(prompts) != len(completions):
        raise ValueError("prompts and completions differ in number")
    if not prompts:
        raise ValueError("empty batch")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(
                f"row {i}: empty prompt (the first completion token needs a "
                "preceding position to be predicted from)"
            )
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    cmax = max(1, max(len(c) for c in completions))
    b = len(prompts)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    comp = torch.full((b, cmax), pad_id, dtype=torch.long)
    mask = torch.zeros((b, cmax), dtype=torch.bool)
    starts = torch.empty(b, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        row = list(p) + list(c)
        ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        attn[i, : len(row)] = 1
        starts[i] = len(p)
        if len(c):
            comp[i, : len(c)] = torch.as_tensor(list(c), dtype=torch.long)
            mask[i, : len(c)] = True
    return PackedBatch(ids, attn, starts, comp, mask)


def get_body(model):
    """The transformer body of a causal LM (the module producing final, normed hidden
    states), unwrapping ``peft`` models: :func:`opsd_kernels.hf.causal_lm_backbone` (the
    one place that follows ``transformers``' layout). Raises ``ValueError`` if there is
    none."""
    return causal_lm_backbone(model)


def get_lm_head(model) -> torch.nn.Module:
    """The model's lm_head module (output embeddings), checked by
    :func:`opsd_kernels.hf.causal_lm_head`; ``ValueError`` if it has none."""
    try:
        causal_lm_head(model)
    except ValueError as e:
        raise ValueError(f"{e}; OPSD needs a causal language model") from e
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_output_embeddings()


def head_bias(model) -> torch.Tensor | None:
    """The lm_head bias as the fused losses need it next to :func:`final_hidden_states`
    (scaled by the model's logit scale, like the hidden states), or ``None``."""
    _, bias, scale = causal_lm_head(model)
    return bias if bias is None or scale == 1.0 else bias * scale


def final_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Final (post-norm) hidden states ``(B, T, H)`` from the model body, no logits:
    :func:`opsd_kernels.hf.causal_lm_hidden_states` (scalar logit multipliers folded in,
    so ``hidden @ lm_head.weight.T + head_bias(model)`` are the model's logits)."""
    return causal_lm_hidden_states(model, input_ids, attention_mask).hidden_states


def gather_completion_states(hidden: torch.Tensor, starts: torch.Tensor, width: int):
    """Hidden states predicting each completion token: row ``i``, slot ``j`` is
    ``hidden[i, starts[i] - 1 + j]`` (clamped into range for padded slots, which the mask
    excludes). Returns ``(B, width, H)``.

    >>> h = torch.arange(10.).view(1, 5, 2)
    >>> gather_completion_states(h, torch.tensor([2]), 2)[0].tolist()
    [[2.0, 3.0], [4.0, 5.0]]
    """
    b, t, hdim = hidden.shape
    pos = starts.to(hidden.device).view(b, 1) - 1 + torch.arange(width, device=hidden.device)
    pos = pos.clamp(0, t - 1)
    return hidden.gather(1, pos.unsqueeze(-1).expand(b, width, hdim))


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """``log softmax(hidden @ weight.T / temperature)[target]`` for each row, float32
    (float64 for float64 inputs) whatever the weight's dtype:
    :func:`opsd_train.grpo.completion_logprobs` (never the full logits; the logits a loss
    reads are float32, the project's precision rule).

    >>> h, w = torch.randn(5, 4), torch.randn(7, 4)
    >>> y = torch.tensor([0, 1, 2, 3, 4])
    >>> ref = torch.log_softmax(h @ w.T, -1)[torch.arange(5), y]
    >>> torch.allclose(token_logprobs(h, w, y, chunk_size=2), ref, atol=1e-6)
    True
    >>> token_logprobs(h.bfloat16(), w.bfloat16(), y).dtype
    torch.float32
    """
    from .grpo import completion_logprobs

    return completion_logprobs(
        hidden,
        weight,
        targets,
        mask=mask,
        bias=bias,
        temperature=temperature,
        impl="chunked",
        chunk_size=chunk_size,
    )


def _fused_divergence():
    try:
        from opsd_kernels import fused_linear_divergence
    except ImportError as e:  # pragma: no cover - only before opsd_kernels exists
        raise ImportError("opsd_train needs opsd_kernels.fused_linear_divergence") from e
    return fused_linear_divergence


def opsd_loss(
    model,
    student: PackedBatch,
    teacher: PackedBatch,
    config: LossConfig,
    teacher_ctx=None,
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """The OPSD loss of one micro-batch.

    ``student``/``teacher`` are :func:`pack_batch` results over the *same* completions with
    the student and teacher prompts. ``teacher_ctx`` is a
    :meth:`opsd_train.teacher.Teacher.weights` context factory (``None``: current weights).
    The result is the sum of per-token divergences over completion tokens divided by
    ``normalizer`` (default: this micro-batch's token count), so accumulating micro-batches
    with the global token count gives the token mean of the whole batch.

    Returns ``(loss, stats)`` with ``stats["div_sum"]`` (the detached per-token sum) and
    ``stats["tokens"]``.
    """
    if not torch.equal(student.completion, teacher.completion) or not torch.equal(
        student.mask, teacher.mask
    ):
        raise ValueError("student and teacher batches must hold the same completions")
    head = get_lm_head(model)
    width = student.completion.shape[1]
    mask = student.mask
    tokens = int(mask.sum())
    norm = float(normalizer) if normalizer is not None else float(max(tokens, 1))

    with torch.no_grad():
        if teacher_ctx is None:
            t_w, t_b = None, None
            h_t = final_hidden_states(model, teacher.input_ids, teacher.attention_mask)
        else:
            with teacher_ctx(model) as (t_w, t_b):
                h_t = final_hidden_states(model, teacher.input_ids, teacher.attention_mask)
        h_t = gather_completion_states(h_t, teacher.starts, width)

    h_s = final_hidden_states(model, student.input_ids, student.attention_mask)
    h_s = gather_completion_states(h_s, student.starts, width)
    bias = head_bias(model)
    # The loss runs outside autocast, with hidden states in the lm_head's dtype.
    with torch.autocast(h_s.device.type, enabled=False):
        h_s = h_s.to(head.weight.dtype)
        h_t = h_t.to(head.weight.dtype if t_w is None else t_w.dtype)
        return _opsd_loss_tail(head, h_s, h_t, bias, t_w, t_b, mask, student, config, norm, tokens)


def _opsd_loss_tail(head, h_s, h_t, bias, t_w, t_b, mask, student, config, norm, tokens):
    if config.loss == "full":
        kw = {}
        if t_w is not None or t_b is not None:
            kw = dict(
                teacher_weight=head.weight.detach() if t_w is None else t_w,
                teacher_bias=t_b,
            )
        total = _fused_divergence()(
            h_s,
            h_t,
            head.weight,
            bias=bias,
            kind=config.kind,
            beta=config.beta,
            temperature=config.temperature,
            clip=config.clip,
            mask=mask,
            reduction="sum",
            impl=config.impl,
            chunk_size=config.chunk_size,
            **kw,
        )
        div_sum = total.detach().float()
    else:
        y = student.completion
        lp_s = token_logprobs(
            h_s, head.weight, y, bias=bias, temperature=config.temperature, mask=mask
        )
        with torch.no_grad():
            w_t = head.weight if t_w is None else t_w
            b_t = bias if t_w is None else t_b
            lp_t = token_logprobs(h_t, w_t, y, bias=b_t, temperature=config.temperature, mask=mask)
        adv = (lp_t - lp_s).detach()
        per_tok = torch.where(mask, -adv * lp_s, torch.zeros_like(lp_s))
        total = per_tok.sum()
        # log-ratio estimate of KL(pS||pT) along the student's own samples, for logging
        div_sum = torch.where(mask, -adv, torch.zeros_like(adv)).sum().detach()
    return total / norm, {"div_sum": float(div_sum), "tokens": tokens}


def sft_loss(model, batch: PackedBatch, normalizer: float | None = None):
    """Teacher-forced cross-entropy on the completion tokens (warm-up and control), with the
    same token normalisation as :func:`opsd_loss`. Returns ``(loss, stats)``."""
    head = get_lm_head(model)
    width = batch.completion.shape[1]
    h = final_hidden_states(model, batch.input_ids, batch.attention_mask)
    h = gather_completion_states(h, batch.starts, width)
    with torch.autocast(h.device.type, enabled=False):
        lp = token_logprobs(
            h.to(head.weight.dtype),
            head.weight,
            batch.completion,
            bias=head_bias(model),
            mask=batch.mask,
        )
    nll = torch.where(batch.mask, -lp, torch.zeros_like(lp)).sum()
    tokens = int(batch.mask.sum())
    norm = float(normalizer) if normalizer is not None else float(max(tokens, 1))
    return nll / norm, {"div_sum": float(nll.detach()), "tokens": tokens}


def grpo_step_loss(
    model,
    batch: PackedBatch,
    advantages: torch.Tensor,
    *,
    temperature: float = 1.0,
    clip_eps: float = 0.2,
    loss_type: str = "grpo",
    normalizer: float | None = None,
):
    """The GRPO loss of one micro-batch of rollouts (:func:`opsd_train.grpo.grpo_loss`,
    on-policy: ratio 1) from the completion hidden states and the lm_head, never forming
    full logits; log-probs in float32 at the sampling ``temperature``. ``advantages``:
    ``(B,)``. ``normalizer``: rollouts (``loss_type="grpo"``) or tokens (``"token"``) of
    the whole step, so micro-batch losses add up to the step's loss. Returns
    ``(loss, stats)`` with ``stats["div_sum"]`` the summed ``-log p`` of the completion
    tokens (for logging) and ``stats["tokens"]``."""
    from .grpo import grpo_loss

    head = get_lm_head(model)
    width = batch.completion.shape[1]
    h = final_hidden_states(model, batch.input_ids, batch.attention_mask)
    h = gather_completion_states(h, batch.starts, width)
    # the kernel path (K = 1 top-k kernel) on CUDA; the chunked float32 loop on CPU
    impl = "auto" if h.device.type == "cuda" else "chunked"
    with torch.autocast(h.device.type, enabled=False):
        loss = grpo_loss(
            h.to(head.weight.dtype),
            head.weight,
            batch.completion,
            advantages.to(h.device),
            batch.mask,
            bias=head_bias(model),
            temperature=temperature,
            clip_eps=clip_eps,
            loss_type=loss_type,
            normalizer=normalizer,
            impl=impl,
        )
    return loss, {"div_sum": 0.0, "tokens": int(batch.mask.sum())}
