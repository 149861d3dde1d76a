"""TRL's ``DistillationTrainer`` with this project's kernel in place of TRL's.

``FusedDistillationTrainer`` is a subclass of ``trl.DistillationTrainer`` (checked with
TRL 1.16.0) whose loss comes from :func:`opsd_kernels.fused_linear_divergence` instead of
TRL's ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction``. Only the method that
calls TRL's kernel, ``_compute_loss``, is replaced; generation, tool calls, batching,
``compute_loss`` (its normalisation and its ``entropy`` metric), logging and evaluation
stay TRL's.

What changes:

- the cost: TRL's kernel recomputes both projections in its backward (12NHV by count for
  KL with a trainable head, 16NHV for JSD); ours forms the gradients in the forward
  (8NHV; 6NHV with a frozen head), with float32 logits of one token chunk at a time;
- the method's per-vocabulary-entry clip, which TRL lacks: ``distillation_clip`` and
  ``distillation_clip_mode`` of :class:`FusedDistillationConfig` (defaults: no clip,
  TRL's loss);
- the student entropy TRL logs is the kernel's own per-token statistic
  (``return_stats=True``'s ``student_entropy``), of the same distribution (after logit
  scale, soft cap and temperature).

Kept from TRL: ``beta`` (0 forward KL(p_T || p_S), 1 reverse KL(p_S || p_T), otherwise
the generalized JSD with mixture ``(1 - beta) p_S + beta p_T``), ``temperature``, the
completion (and tool) mask, the division by ``num_items_in_batch`` (else by the local
count of trained tokens), each model's logit scale (read by
:func:`opsd_kernels.hf.causal_lm_head`, which folds every multiplier the model's config
names, where TRL takes the first one it finds) and soft cap, teachers with another hidden
size, and sharded heads (FSDP2 and ZeRO-3, gathered once per step by
:func:`opsd_kernels.integrations._heads.gathered_lm_head`; TRL's ``compute_loss`` runs
``_compute_loss`` inside the student's forward).

Extra constructor argument: ``fused_loss_kwargs``, a dict passed to
``fused_linear_divergence`` (``impl``, ``chunk_size``, ``fp32_weight_grad``,
``skip_threshold``).

``trl`` is imported on first access of a class, so this module imports without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._validation import check_options
from ..api import fused_linear_divergence
from ._heads import lm_heads
from .trl import checked_loss_kwargs, trl_divergence_kind

# built on first access (module __getattr__), importing trl then
__all__ = ["FusedDistillationConfig", "FusedDistillationTrainer"]  # noqa: F822

# TRL's _compute_loss passes these forward inputs to both bodies when a batch holds them
_MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


def _build(name: str):
    from trl import DistillationConfig, DistillationTrainer

    @dataclass
    class FusedDistillationConfig(DistillationConfig):
        """``trl.DistillationConfig`` plus the method's per-entry clip.

        Args (beyond TRL's):
            distillation_clip: None (default: TRL's loss) or tau > 0, the per-entry clip.
            distillation_clip_mode: ``"entry"`` (default), ``"token"`` or ``"entry_keep"``;
                see :class:`opsd_kernels._validation.DivergenceOptions`.
        """

        distillation_clip: float | None = field(
            default=None,
            metadata={
                "help": "The method's per-vocabulary-entry clip tau (> 0): entries whose "
                "divergence term reaches tau pass no gradient (see distillation_clip_mode). "
                "None (default): no clip, TRL's loss."
            },
        )
        distillation_clip_mode: str = field(
            default="entry",
            metadata={
                "help": "How distillation_clip applies: 'entry' (each clipped entry passes no "
                "gradient), 'token' (a token with a clipped entry passes none), 'entry_keep' "
                "(see opsd_kernels' DivergenceOptions)."
            },
        )

    class FusedDistillationTrainer(DistillationTrainer):
        """``trl.DistillationTrainer`` with the loss from
        :func:`opsd_kernels.fused_linear_divergence` (see the module docstring).

        Same constructor as TRL's plus ``fused_loss_kwargs`` (dict for
        ``fused_linear_divergence``: ``impl``, ``chunk_size``, ``fp32_weight_grad``,
        ``skip_threshold``). ``args`` may be a ``FusedDistillationConfig`` (the clip) or
        TRL's ``DistillationConfig`` (no clip). Bad options (a clip <= 0, an unknown
        clip mode, a temperature <= 0) raise at construction.
        """

        def __init__(self, *args, fused_loss_kwargs: dict | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.fused_loss_kwargs = checked_loss_kwargs(fused_loss_kwargs, "fused_loss_kwargs")
            self.distillation_clip = getattr(self.args, "distillation_clip", None)
            self.distillation_clip_mode = getattr(self.args, "distillation_clip_mode", "entry")
            kind, beta = trl_divergence_kind(self.beta)
            check_options(
                kind,
                beta,
                self.temperature,
                self.distillation_clip,
                "sum",
                self.distillation_clip_mode,
            )

        def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
            """TRL's ``_compute_loss`` (same inputs, same returns: the loss, the sum of
            the trained tokens' student entropies, their count) with our kernel."""
            input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
            attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
            loss_mask = inputs["completion_mask"]
            if "tool_mask" in inputs:
                loss_mask = loss_mask * inputs["tool_mask"]
            logits_to_keep = inputs["completion_ids"].size(1)
            multimodal = {k: inputs[k] for k in _MULTIMODAL_KEYS if k in inputs}

            h_s = self._get_last_hidden_state(
                unwrapped_student, input_ids, attention_mask, logits_to_keep, **multimodal
            )
            self.teacher_model.eval()
            unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
            with torch.no_grad():  # through the teacher's wrapper, as TRL does
                h_t = self._forward_redirection(
                    self.teacher_model,
                    unwrapped_teacher,
                    self._get_last_hidden_state,
                    unwrapped_teacher,
                    input_ids,
                    attention_mask,
                    logits_to_keep,
                    **multimodal,
                )
            student, teacher = lm_heads(unwrapped_student, unwrapped_teacher)
            device = student.weight.device
            mask = loss_mask.to(device) != 0
            kind, beta = trl_divergence_kind(self.beta)
            total, stats = fused_linear_divergence(
                h_s.to(device),
                h_t.to(device),
                student.weight,
                kind=kind,
                beta=beta,
                temperature=self.temperature,
                clip=self.distillation_clip,
                clip_mode=self.distillation_clip_mode,
                mask=mask,
                reduction="sum",
                return_stats=True,
                **student.loss_kwargs("student"),
                **teacher.loss_kwargs("teacher"),
                **self.fused_loss_kwargs,
            )
            n_valid = mask.sum()
            if num_items_in_batch is None:
                # clamped: a fully masked rank gives a finite zero, as in TRL
                loss = total / n_valid.clamp(min=1)
            else:
                if isinstance(num_items_in_batch, torch.Tensor):
                    num_items_in_batch = num_items_in_batch.to(total.device)
                loss = total / num_items_in_batch
            # masked positions hold 0 in the statistics
            return loss, stats.student_entropy.sum().detach(), n_valid

    classes = {
        "FusedDistillationConfig": FusedDistillationConfig,
        "FusedDistillationTrainer": FusedDistillationTrainer,
    }
    globals().update(classes)
    return classes[name]


def __getattr__(name: str):
    if name in __all__:
        try:
            return _build(name)
        except ImportError as e:
            raise ImportError(f"{name} needs TRL (>= 1.16): pip install trl") from e
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
