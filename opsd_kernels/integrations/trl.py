"""TRL's GKD and GOLD trainers with the fused distillation loss.

``FusedGKDTrainer`` and ``FusedGOLDTrainer`` are subclasses of TRL's
``trl.experimental.gkd.GKDTrainer`` and ``trl.experimental.gold.GOLDTrainer`` (checked
with TRL 1.16.0) that compute the same loss as TRL's ``generalized_jsd_loss`` from the
student's and teacher's final hidden states and lm_heads with
:func:`opsd_kernels.fused_linear_divergence`: the (tokens x V) logits of neither model
are formed. Everything else (data collation, on-policy generation with ``lmbda``,
``seq_kd``, logging, evaluation) is TRL's, unchanged.

Loss semantics kept from TRL (``compute_loss``): causal shift (hidden state i predicts
token i + 1), positions with label -100 excluded, ``beta`` (0 forward KL, 1 reverse KL,
otherwise the generalized JSD), divided by ``num_items_in_batch`` when the Trainer passes
it, else by the number of counted tokens. Temperature: GKD's loss uses 1.0 (TRL 1.16
passes ``args.temperature`` to sampling only), GOLD's uses ``args.temperature``; both
are kept. GKD has no SFT term to mix in (``seq_kd`` trains on teacher samples with the
same loss). GOLD's cross-tokenizer ULD loss (``use_uld_loss`` with a teacher tokenizer)
needs both models' full probabilities: ``FusedGOLDTrainer`` leaves it to TRL (logits
formed) and says so with a warning.

TRL's own ``DistillationTrainer``, with this project's kernel in place of TRL's:
:mod:`opsd_kernels.integrations.trl_distillation`.

Sharded lm_heads: the loss runs inside the student's forward (TRL's
``_ForwardRedirection`` through the DDP/DeepSpeed wrapper, or the FSDP2 ``fully_shard``
model itself) and the teacher's body inside the teacher's; each lm_head is gathered once
per step by :func:`opsd_kernels.integrations._heads.gathered_lm_head`: FSDP2 ``DTensor``
heads with ``full_tensor()`` (gradient averaged back to the shards), DeepSpeed ZeRO-3
heads with ``GatheredParameters`` (gradient to the partitioned parameter). Each model's
logit scale and Gemma 2's ``final_logit_softcapping`` are applied by the kernel
(``logit_scale``/``softcap`` and the teacher's own). A teacher with another hidden size
works (its own lm_head).

Extra constructor argument of both trainers: ``fused_loss_kwargs``, a dict passed to
``fused_linear_divergence`` (``impl``, ``chunk_size``, ``fp32_weight_grad``,
``skip_threshold``).

``trl`` is imported on first access of a trainer class, so this module imports (and
:func:`fused_generalized_jsd` works) without it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch

from ..api import fused_linear_divergence
from ..hf import causal_lm_last_hidden_state
from ._heads import lm_heads, route_through

# the trainer classes are built on first access (module __getattr__), importing trl then
__all__ = ["FusedGKDTrainer", "FusedGOLDTrainer", "fused_generalized_jsd"]  # noqa: F822

_LOSS_KWARGS = ("impl", "chunk_size", "fp32_weight_grad", "skip_threshold")


def fused_generalized_jsd(
    student_model,
    teacher_model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    num_items_in_batch: torch.Tensor | int | float | None = None,
    ignore_index: int = -100,
    forward_kwargs: dict[str, Any] | None = None,
    student_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    teacher_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    teacher_wrapper: torch.nn.Module | None = None,
    **loss_kwargs,
) -> torch.Tensor:
    """TRL's GKD/GOLD distillation loss from hidden states: no (tokens x V) logits.

    Equals ``generalized_jsd(student(ids).logits[:, :-1], teacher(ids).logits[:, :-1],
    labels[:, 1:], beta, temperature, num_items_in_batch=num_items_in_batch)``, TRL's
    ``compute_loss``, with the teacher under ``torch.no_grad``. Each model's logit scale
    and soft cap (Gemma 2) are applied by the kernel.

    Sharded models (FSDP2 ``fully_shard``, DeepSpeed ZeRO-3): call this inside the
    student's forward (the trainers route it through TRL's ``_ForwardRedirection``) and
    pass the teacher's wrapper (its engine, or the ``fully_shard`` teacher itself) as
    ``teacher_wrapper``; each lm_head is gathered once
    (:func:`~opsd_kernels.integrations._heads.gathered_lm_head`).

    Args:
        student_model, teacher_model: ``transformers`` causal LMs (or PEFT-wrapped),
            unwrapped from DDP/DeepSpeed; the teacher may be the student itself (then one
            shared lm_head GEMM serves both) or have another hidden size.
        input_ids, attention_mask: (B, T) the sequences both models score.
        labels: (B, T) the next-token targets, ``ignore_index`` where not trained.
        beta: 0 forward KL(p_T || p_S), 1 reverse KL(p_S || p_T), else generalized JSD.
        temperature: both logits are divided by it.
        num_items_in_batch: when given the sum is divided by it, else by the number of
            counted tokens (0 when none).
        forward_kwargs: extra inputs to both models' bodies (e.g. ``pixel_values``).
        student_context, teacher_context: factories of the context each body runs in
            (e.g. an autocast for mixed precision; default none).
        teacher_wrapper: the module whose forward the teacher's body is routed through
            (its DDP/DeepSpeed/FSDP2 wrapper, so that sharded parameters are gathered);
            None calls the body directly.
        **loss_kwargs: ``impl``, ``chunk_size``, ``fp32_weight_grad``, ``skip_threshold``
            of :func:`opsd_kernels.fused_linear_divergence`.

    Returns:
        float32 scalar (float64 for float64 models).

    Mixed precision: each body runs under the caller's autocast and its ``*_context``
    (the trainers pass accelerate's autocast for a model whose forward accelerate
    wrapped in one); the loss itself runs outside autocast, on hidden states cast to
    the lm_head's dtype, with float32 logits.

    >>> import torch
    >>> from transformers import Qwen3Config, Qwen3ForCausalLM
    >>> cfg = Qwen3Config(vocab_size=50, hidden_size=16, intermediate_size=32,
    ...                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    >>> _ = torch.manual_seed(0); student, teacher = Qwen3ForCausalLM(cfg), Qwen3ForCausalLM(cfg)
    >>> ids = torch.randint(0, 50, (2, 6)); labels = ids.clone(); labels[:, :3] = -100
    >>> loss = fused_generalized_jsd(student, teacher, ids, None, labels, beta=0.0)
    >>> loss.backward()
    >>> from opsd_kernels import generalized_jsd
    >>> ref = generalized_jsd(student(ids).logits[:, :-1], teacher(ids).logits[:, :-1],
    ...                       labels[:, 1:], beta=0.0)
    >>> torch.allclose(loss, ref, atol=1e-6)
    True
    """
    unknown = set(loss_kwargs) - set(_LOSS_KWARGS)
    if unknown:
        raise TypeError(f"unexpected loss arguments {sorted(unknown)}; allowed: {_LOSS_KWARGS}")
    kind, beta = trl_divergence_kind(beta)
    if labels.shape != input_ids.shape:
        raise ValueError(
            f"labels must have the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(labels.shape)}"
        )
    forward_kwargs = forward_kwargs or {}
    with student_context():
        h_s = causal_lm_last_hidden_state(
            student_model, input_ids, attention_mask, **forward_kwargs
        )
    with torch.no_grad(), teacher_context():
        h_t = route_through(
            teacher_wrapper,
            teacher_model,
            causal_lm_last_hidden_state,
            teacher_model,
            input_ids,
            attention_mask,
            **forward_kwargs,
        )
    mask = labels[:, 1:].to(h_s.device) != ignore_index
    s_head, t_head = lm_heads(student_model, teacher_model)
    t_dtype = (s_head if t_head.weight is None else t_head).weight.dtype
    # the bodies ran under the caller's autocast (mixed precision), if any; the loss reads
    # hidden states in the lm_head's dtype and computes float32 logits, outside autocast
    with torch.autocast(h_s.device.type, enabled=False):
        total = fused_linear_divergence(
            h_s[:, :-1].to(s_head.weight.dtype),
            h_t[:, :-1].to(h_s.device, t_dtype),
            s_head.weight,
            kind=kind,
            beta=beta,
            temperature=temperature,
            mask=mask,
            reduction="sum",
            **s_head.loss_kwargs("student"),
            **t_head.loss_kwargs("teacher"),
            **loss_kwargs,
        )
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / mask.sum().clamp_min(1)


def checked_loss_kwargs(loss_kwargs: dict | None, name: str) -> dict:
    """A copy of a trainer's ``fused_loss_kwargs``; ``TypeError`` naming ``name`` for a
    key ``fused_linear_divergence`` does not take from it."""
    loss_kwargs = dict(loss_kwargs or {})
    unknown = set(loss_kwargs) - set(_LOSS_KWARGS)
    if unknown:
        raise TypeError(f"{name}: unexpected {sorted(unknown)}; allowed: {_LOSS_KWARGS}")
    return loss_kwargs


def trl_divergence_kind(beta: float) -> tuple[str, float]:
    """TRL's ``beta`` (GKD, GOLD, DistillationTrainer) as ``(kind, beta)`` of the kernels:
    0 forward KL, 1 reverse KL, else the generalized JSD with this beta (the beta of
    ``reverse_kl``/``forward_kl`` is unused: 0.5).

    >>> trl_divergence_kind(0.0), trl_divergence_kind(0.3)
    (('forward_kl', 0.5), ('jsd', 0.3))
    """
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    if beta == 0:
        return "forward_kl", 0.5
    if beta == 1:
        return "reverse_kl", 0.5
    return "jsd", float(beta)


class _FusedLossMixin:
    """``compute_loss`` from hidden states, shared by the GKD and GOLD subclasses."""

    _loss_uses_temperature = False

    def _init_fused(self, fused_loss_kwargs):
        self.fused_loss_kwargs = checked_loss_kwargs(fused_loss_kwargs, "fused_loss_kwargs")

    def _fused_loss(self, model, inputs, num_items_in_batch, forward_kwargs=None):
        student = self.accelerator.unwrap_model(model)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        self.teacher_model.eval()
        args = (student, teacher, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
        kwargs = dict(
            beta=self.beta,
            temperature=self.temperature if self._loss_uses_temperature else 1.0,
            num_items_in_batch=num_items_in_batch,
            forward_kwargs=forward_kwargs,
            student_context=self._autocast_of(student),
            teacher_context=self._autocast_of(teacher),
            # a separate teacher through its own wrapper; the student as its own teacher
            # is already inside its forward
            teacher_wrapper=None if teacher is student else self.teacher_model,
            **self.fused_loss_kwargs,
        )
        # through the wrapper's forward (DDP: gradient sync prepared; DeepSpeed ZeRO-3 and
        # an FSDP2 root unit: parameters gathered), as TRL's DistillationTrainer does
        return route_through(model, student, fused_generalized_jsd, *args, **kwargs)

    def _autocast_of(self, model):
        """The bodies are called directly, not through the forward that accelerate wraps in
        autocast for mixed precision when it prepares a model (TRL's configs default to
        bf16=True; the teacher is prepared at construction, the student when training
        starts): run each body under that autocast exactly when its forward has it."""
        if getattr(model, "_original_forward", None) is not None:
            return self.accelerator.autocast
        return contextlib.nullcontext

    @staticmethod
    def _outputs(loss):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return CausalLMOutputWithPast(loss=loss)  # no logits: they are never formed


_GKD_DOC = """TRL's ``GKDTrainer`` with the distillation loss computed by
:func:`fused_generalized_jsd` (hidden states and lm_heads, no (tokens x V) logits).

Same constructor as ``trl.experimental.gkd.GKDTrainer`` plus ``fused_loss_kwargs``
(dict for ``fused_linear_divergence``: ``impl``, ``chunk_size``, ``fp32_weight_grad``,
``skip_threshold``). Same loss as TRL: ``beta`` from ``GKDConfig``, temperature 1.0 in the
loss (``args.temperature`` is the sampling temperature, as in TRL 1.16), labels mask,
``num_items_in_batch``. ``compute_loss(..., return_outputs=True)`` returns outputs without
logits.
"""

_GOLD_DOC = """TRL's ``GOLDTrainer`` with its same-tokenizer distillation loss computed by
:func:`fused_generalized_jsd` (hidden states and lm_heads, no (tokens x V) logits).

Same constructor as ``trl.experimental.gold.GOLDTrainer`` plus ``fused_loss_kwargs``.
Same loss as TRL: ``beta`` and ``temperature`` from ``GOLDConfig``, labels mask,
``num_items_in_batch``; multimodal forward inputs are passed to both bodies. The
cross-tokenizer ULD loss (``use_uld_loss`` with a teacher tokenizer) stays TRL's (it needs
both full probability tensors; a warning says so).
"""


def _build(name: str):
    if name == "FusedGKDTrainer":
        from trl.experimental.gkd import GKDTrainer

        class FusedGKDTrainer(_FusedLossMixin, GKDTrainer):
            __doc__ = _GKD_DOC

            def __init__(self, *args, fused_loss_kwargs: dict | None = None, **kwargs):
                super().__init__(*args, **kwargs)
                self._init_fused(fused_loss_kwargs)

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                loss = self._fused_loss(model, inputs, num_items_in_batch)
                return (loss, self._outputs(loss)) if return_outputs else loss

        return FusedGKDTrainer

    if name == "FusedGOLDTrainer":
        from trl.experimental.gold import GOLDTrainer

        class FusedGOLDTrainer(_FusedLossMixin, GOLDTrainer):
            __doc__ = _GOLD_DOC
            _loss_uses_temperature = True

            def __init__(self, *args, fused_loss_kwargs: dict | None = None, **kwargs):
                super().__init__(*args, **kwargs)
                self._init_fused(fused_loss_kwargs)
                if self._uses_uld():
                    warnings.warn(
                        "FusedGOLDTrainer: the cross-tokenizer ULD loss stays TRL's "
                        "(full logits of both models); only the same-tokenizer JSD is fused",
                        stacklevel=2,
                    )

            def _uses_uld(self):
                return bool(self.use_uld_loss and self.teacher_tokenizer is not None)

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                if self._uses_uld():
                    return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                loss = self._fused_loss(
                    model,
                    inputs,
                    num_items_in_batch,
                    forward_kwargs=self._get_model_forward_kwargs(inputs),
                )
                return (loss, self._outputs(loss)) if return_outputs else loss

        return FusedGOLDTrainer

    raise AttributeError(name)


_SELF_DISTILLATION = ("FusedSDFTConfig", "FusedSDFTTrainer", "FusedSDPOConfig", "FusedSDPOTrainer")


def __getattr__(name: str):
    if name in _SELF_DISTILLATION:  # TRL's SDFT/SDPO trainers: opsd_kernels.integrations.trl_sdft
        from . import trl_sdft

        return getattr(trl_sdft, name)
    if name in ("FusedGKDTrainer", "FusedGOLDTrainer"):
        try:
            cls = _build(name)
        except ImportError as e:
            raise ImportError(f"{name} needs TRL (>= 1.16): pip install trl") from e
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
