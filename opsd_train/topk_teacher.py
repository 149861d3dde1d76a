"""Top-k teachers: the teacher given as its top-k log-probabilities (``--teacher-topk K``).

A teacher engine returns, for every completion slot of a teacher batch, the K most likely
token ids and their log-probabilities under the teacher (at the loss temperature). The
loss is then :func:`opsd_kernels.fused_linear_topk_divergence` between those and the
student's full-vocabulary distribution from its hidden states and lm_head, so the
teacher never needs to be in the training process (vLLM/SGLang ``logprobs``, or an
offline cache): implement :class:`TopKTeacherEngine` and set ``Trainer.topk_engine``.

:class:`LocalTopKTeacher` is the engine that computes them from the local teacher (the
model under :class:`~opsd_train.teacher.Teacher` weights) under ``no_grad``, a chunk of
tokens at a time: ``log_softmax(linear_logits(h_t, W, b) / T).topk(K)``. Only one chunk's
``(chunk, V)`` float32 logits exist at a time, never the ``[tokens x V]`` logits.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .step import (
    LossConfig,
    PackedBatch,
    final_hidden_states,
    gather_completion_states,
    get_lm_head,
)

__all__ = [
    "TopKTeacherEngine",
    "LocalTopKTeacher",
    "topk_opsd_loss",
    "TOPK_TAILS",
    "local_topk",
    "check_topk_config",
    "topk_teacher_loss",
]

TOPK_TAILS = ("bucket", "renormalize")


@runtime_checkable
class TopKTeacherEngine(Protocol):
    """Anything that gives a teacher's top-k log-probs over a teacher batch's completions.

    ``topk(teacher, k, temperature)`` receives a :func:`~opsd_train.step.pack_batch`
    batch (teacher prompt + completion per row) and returns ``(ids, logprobs)``, each
    ``(B, C, K)`` with ``C = teacher.completion.shape[1]``: slot ``[i, j]`` is the
    teacher's distribution over completion token ``j`` of row ``i`` at ``temperature``
    (``log_softmax(logits / temperature)``). ``ids`` int64, distinct within a slot;
    ``logprobs`` float, ``-inf`` for padding entries; slots beyond a row's completion
    are ignored (masked).
    """

    def topk(
        self, teacher: PackedBatch, k: int, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@torch.no_grad()
def local_topk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    temperature: float = 1.0,
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of ``log_softmax(hidden @ weight.T + bias) / temperature)`` per row,
    ``chunk_size`` rows at a time (float32 logits of one chunk only).

    ``hidden`` (..., H), ``weight`` (V, H): returns ids (..., k) int64 and log-probs
    (..., k) float32 (float64 for float64 inputs), sorted by decreasing log-prob.

    >>> h, w = torch.randn(5, 4), torch.randn(9, 4)
    >>> ids, lp = local_topk(h, w, None, 3, temperature=2.0, chunk_size=2)
    >>> ref = torch.log_softmax(h @ w.T / 2.0, -1).topk(3)
    >>> torch.equal(ids, ref.indices), torch.allclose(lp, ref.values, atol=1e-6)
    (True, True)
    """
    from opsd_kernels.gemm import linear_logits

    v = weight.shape[0]
    if not 1 <= k <= v:
        raise ValueError(f"teacher_topk must lie in [1, V={v}], got {k}")
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    ids_out, lp_out = [], []
    for s in range(0, h.shape[0], chunk_size):
        logits = linear_logits(h[s : s + chunk_size], weight, bias)
        lp = torch.log_softmax(logits / temperature, dim=-1)
        top = lp.topk(k, dim=-1)
        ids_out.append(top.indices)
        lp_out.append(top.values)
    if not ids_out:
        dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        return (
            torch.empty(*lead, k, dtype=torch.long, device=hidden.device),
            torch.empty(*lead, k, dtype=dt, device=hidden.device),
        )
    return torch.cat(ids_out).view(*lead, k), torch.cat(lp_out).view(*lead, k)


class LocalTopKTeacher:
    """The :class:`TopKTeacherEngine` of the local teacher: ``model`` run under
    ``teacher_ctx`` (a :meth:`~opsd_train.teacher.Teacher.weights` factory, or ``None``
    for the current weights), top-k taken chunk by chunk (:func:`local_topk`)."""

    def __init__(self, model, teacher_ctx=None, chunk_size: int = 256):
        self.model = model
        self.teacher_ctx = teacher_ctx
        self.chunk_size = chunk_size

    @torch.no_grad()
    def topk(self, teacher: PackedBatch, k: int, temperature: float):
        model = self.model
        head = get_lm_head(model)
        width = teacher.completion.shape[1]
        t_w, t_b = None, None
        if self.teacher_ctx is None:
            h = final_hidden_states(model, teacher.input_ids, teacher.attention_mask)
        else:
            with self.teacher_ctx(model) as (t_w, t_b):
                h = final_hidden_states(model, teacher.input_ids, teacher.attention_mask)
        h = gather_completion_states(h, teacher.starts, width)
        w = head.weight if t_w is None else t_w
        b = getattr(head, "bias", None) if t_w is None else t_b
        with torch.autocast(h.device.type, enabled=False):
            return local_topk(
                h.to(w.dtype),
                w.detach(),
                None if b is None else b.detach(),
                k,
                temperature,
                self.chunk_size,
            )


def topk_opsd_loss(
    model,
    student: PackedBatch,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    config: LossConfig,
    *,
    tail: str = "bucket",
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """The OPSD loss of one micro-batch against a top-k teacher: the sum over completion
    tokens of :func:`opsd_kernels.fused_linear_topk_divergence` (student hidden states and
    lm_head; ``teacher_ids``/``teacher_logprobs`` ``(B, C, K)``), divided by
    ``normalizer`` (default: the micro-batch's token count). Only ``loss="full"``
    settings apply (kind, beta, temperature, clip, impl, chunk_size). Returns
    ``(loss, stats)`` like :func:`opsd_train.step.opsd_loss`."""
    from opsd_kernels import fused_linear_topk_divergence

    if config.loss != "full":
        raise ValueError(
            "a top-k teacher needs loss='full' (the sampled-token estimator "
            "uses the teacher's log-prob of the sampled token itself)"
        )
    head = get_lm_head(model)
    width = student.completion.shape[1]
    mask = student.mask
    if teacher_ids.shape[:2] != mask.shape or teacher_logprobs.shape != teacher_ids.shape:
        raise ValueError(
            f"teacher_ids/teacher_logprobs must be (B, C, K) with (B, C) = "
            f"{tuple(mask.shape)}, got {tuple(teacher_ids.shape)} and "
            f"{tuple(teacher_logprobs.shape)}"
        )
    tokens = int(mask.sum())
    norm = float(normalizer) if normalizer is not None else float(max(tokens, 1))
    h_s = final_hidden_states(model, student.input_ids, student.attention_mask)
    h_s = gather_completion_states(h_s, student.starts, width)
    with torch.autocast(h_s.device.type, enabled=False):
        total = fused_linear_topk_divergence(
            h_s.to(head.weight.dtype),
            head.weight,
            teacher_ids.to(h_s.device),
            teacher_logprobs.to(h_s.device),
            bias=getattr(head, "bias", None),
            kind=config.kind,
            beta=config.beta,
            tail=tail,
            temperature=config.temperature,
            clip=config.clip,
            mask=mask,
            reduction="sum",
            impl=config.impl,
            chunk_size=config.chunk_size,
        )
    return total / norm, {"div_sum": float(total.detach()), "tokens": tokens}


def check_topk_config(config) -> None:
    """The :class:`~opsd_train.trainer.TrainConfig` settings a top-k teacher cannot take
    (called from its ``__post_init__`` when ``teacher_topk`` is set)."""
    from .config import ConfigError

    if config.loss != "full":
        raise ConfigError(
            "teacher_topk: a top-k teacher needs --loss full (the sampled-token "
            f"estimator reads the teacher's full distribution), got "
            f"{config.loss!r}",
            "teacher_topk",
        )
    if config.impl == "fused":
        raise ConfigError(
            "teacher_topk: --impl fused has no top-k form; use auto, torch or triton", "impl"
        )


def topk_teacher_loss(
    trainer,
    student: PackedBatch,
    teacher: PackedBatch,
    config: LossConfig,
    teacher_ctx,
    normalizer: float,
) -> tuple[torch.Tensor, dict]:
    """The trainer's OPSD micro-batch loss with ``--teacher-topk``: top-k log-probs from
    ``trainer.topk_engine`` (default :class:`LocalTopKTeacher` over the trainer's model
    and teacher), then :func:`topk_opsd_loss`."""
    cfg = trainer.config
    engine = trainer.topk_engine
    if engine is None:
        engine = LocalTopKTeacher(trainer.model, teacher_ctx)
    ids, lps = engine.topk(teacher, cfg.teacher_topk, config.temperature)
    return topk_opsd_loss(
        trainer.model, student, ids, lps, config, tail=cfg.teacher_topk_tail, normalizer=normalizer
    )
