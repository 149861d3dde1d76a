"""The lm_head of a (possibly sharded) causal LM, whole, for the fused losses.

The fused losses read the lm_head weight directly instead of calling the lm_head
module, so a sharding framework's hooks, which materialise a module's parameters only
around that module's own forward, never run for it. :func:`gathered_lm_head` gathers the
head once and hands out full, plain tensors whose gradients flow back to the model's own
parameters (or their shards) through autograd:

- FSDP2 (``fully_shard``): a ``DTensor`` weight (``Shard(0)`` or ``Replicate``; the
  head is its own FSDP unit, or is read outside the root unit's forward) is gathered
  with ``full_tensor()``. Its gradient is declared ``Partial("avg")``: each rank's
  gradient of the full weight is its own data's, and the redistribution back to the
  shards averages them across the mesh (a reduce-scatter), as FSDP does for every other
  parameter. Inside the root unit's forward (the head in the root unit) the weight is
  already FSDP's unsharded parameter: it is used as it is, and FSDP reduces its
  gradient.
- DeepSpeed ZeRO-3: partitioned parameters (``ds_status``) are gathered with
  ``deepspeed.zero.GatheredParameters(modifier_rank=None)`` and copied; the copy's
  gradient reaches the partitioned parameter, whose ZeRO-3 hooks reduce it. Run the loss
  inside the engine's forward (``trl.models.utils._ForwardRedirection``), as TRL does.
- Otherwise the model's parameters themselves.

Either gathered copy is one (V, H) tensor, alive through the loss's forward (and its
backward where the kernel recomputes there, ``impl="fused"``): the memory
``full_tensor()`` takes in TRL's own ``DistillationTrainer``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from ..hf import causal_lm_head

__all__ = ["LMHead", "gathered_lm_head", "lm_heads", "route_through"]


class LMHead(NamedTuple):
    """A whole lm_head, ready for :func:`opsd_kernels.fused_linear_divergence`:
    ``logits = softcap * tanh(logit_scale * (h @ weight.T + bias) / softcap)`` (no
    ``tanh`` when ``softcap`` is None)."""

    weight: torch.Tensor  # (V, H), full; gradients reach the model's parameter or its shards
    bias: torch.Tensor | None  # (V,) or None, full
    logit_scale: float  # multiplier after the lm_head (hf.causal_lm_head), 1.0 for most models
    softcap: float | None  # final_logit_softcapping (Gemma 2), or None

    def loss_kwargs(self, role: str = "student") -> dict:
        """Keyword arguments of ``fused_linear_divergence`` for this head as the
        ``"student"``'s (``bias``, ``logit_scale``, ``softcap``; ``weight`` is positional)
        or the ``"teacher"``'s (``teacher_weight``, ``teacher_bias``, ...).

        >>> import torch
        >>> head = LMHead(torch.zeros(5, 2), None, 1.0, 30.0)
        >>> sorted(head.loss_kwargs("teacher"))
        ['teacher_bias', 'teacher_logit_scale', 'teacher_softcap', 'teacher_weight']
        """
        if role == "student":
            return dict(bias=self.bias, logit_scale=self.logit_scale, softcap=self.softcap)
        if role == "teacher":
            return dict(
                teacher_weight=self.weight,
                teacher_bias=self.bias,
                teacher_logit_scale=self.logit_scale,
                teacher_softcap=self.softcap,
            )
        raise ValueError(f"role must be 'student' or 'teacher', got {role!r}")


def _full(param: torch.Tensor | None) -> torch.Tensor | None:
    """``param`` whole, differentiable back to it (see the module docstring)."""
    if param is None:
        return None
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor, Partial

        if isinstance(param, DTensor):
            grad_placements = [Partial("avg")] * param.device_mesh.ndim
            return param.full_tensor(grad_placements=grad_placements)
    return param


@contextlib.contextmanager
def _zero3_gathered(*params: torch.Tensor | None) -> Iterator[None]:
    """DeepSpeed ZeRO-3 partitioned ``params`` gathered for the block (nothing to do for
    others, or for parameters already available: with tied embeddings the embedding's own
    hooks hold the weight, and re-partitioning it here would undo theirs)."""
    partitioned = {id(p): p for p in params if p is not None and hasattr(p, "ds_status")}
    if partitioned:
        from deepspeed.runtime.zero.partition_parameters import (
            GatheredParameters,
            ZeroParamStatus,
        )

        todo = [p for p in partitioned.values() if p.ds_status != ZeroParamStatus.AVAILABLE]
        if todo:
            with GatheredParameters(todo, modifier_rank=None):
                yield
            return
    yield


def gathered_lm_head(model, *, constant: bool = False) -> LMHead:
    """The lm_head of ``model`` whole, for one step's loss (see the module docstring).

    Args:
        model: a ``transformers`` causal LM or a PEFT model wrapping one, not wrapped by
            DDP or DeepSpeed (``accelerator.unwrap_model``); an FSDP2 ``fully_shard``
            model is its own wrapper. Call this inside the model's forward (e.g. through
            :func:`route_through`) under FSDP2's root unit or ZeRO-3.
        constant: a teacher's head: gathered without autograd, tensors detached.

    Returns:
        :class:`LMHead` ``(weight (V, H), bias (V,) or None, logit_scale, softcap)``;
        ``softcap`` is the model's ``final_logit_softcapping`` (Gemma 2). Use the tensors
        within the step: their backward sends the gradient to the parameters.

    >>> import torch
    >>> from transformers import Qwen3Config, Qwen3ForCausalLM
    >>> cfg = Qwen3Config(vocab_size=50, hidden_size=16, intermediate_size=32,
    ...                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    >>> model = Qwen3ForCausalLM(cfg)
    >>> head = gathered_lm_head(model)
    >>> head.weight is model.lm_head.weight, head.logit_scale, head.softcap
    (True, 1.0, None)
    """
    head = causal_lm_head(model, with_softcap=True)
    weight, bias, logit_scale = head
    grad = torch.is_grad_enabled() and not constant
    with _zero3_gathered(weight, bias), torch.set_grad_enabled(grad):
        if hasattr(weight, "ds_status"):
            # the gathered storage is released on exit: a copy, whose backward feeds the
            # partitioned parameters' gradient hooks
            weight = weight.clone()
            bias = None if bias is None else bias.clone()
        weight, bias = _full(weight), _full(bias)
    if constant:
        weight, bias = weight.detach(), None if bias is None else bias.detach()
    return LMHead(weight, bias, logit_scale, head.softcap)


def lm_heads(student_model, teacher_model) -> tuple[LMHead, LMHead]:
    """The student's and the teacher's lm_heads whole, ``(student, teacher)``, for a
    ``fused_linear_divergence`` call: ``weight`` positional from the student's, then
    ``**student.loss_kwargs("student"), **teacher.loss_kwargs("teacher")``.

    The teacher's is constant (detached), on the student's head's device. When both
    models share one lm_head (the same weight and bias objects: the teacher is the
    student, or holds its head), it is gathered once and the teacher's ``weight`` and
    ``bias`` are None (the kernels' shared path: one GEMM per tile serves both roles).

    >>> import torch
    >>> from transformers import Qwen3Config, Qwen3ForCausalLM
    >>> cfg = Qwen3Config(vocab_size=50, hidden_size=16, intermediate_size=32,
    ...                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    >>> model = Qwen3ForCausalLM(cfg)
    >>> student, teacher = lm_heads(model, model)
    >>> student.weight is model.lm_head.weight, teacher.weight
    (True, None)
    """
    s_param = causal_lm_head(student_model, with_softcap=True)
    t_param = causal_lm_head(teacher_model, with_softcap=True)
    student = gathered_lm_head(student_model)
    if s_param.weight is t_param.weight and s_param.bias is t_param.bias:
        return student, LMHead(None, None, t_param.logit_scale, t_param.softcap)
    teacher = gathered_lm_head(teacher_model, constant=True)
    device = student.weight.device
    if teacher.weight.device != device:  # a teacher placed elsewhere: its head comes over
        bias = None if teacher.bias is None else teacher.bias.to(device)
        teacher = teacher._replace(weight=teacher.weight.to(device), bias=bias)
    return student, teacher


def route_through(wrapper, module, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` run inside ``wrapper``'s forward, whose module is
    ``module`` (TRL's ``_ForwardRedirection``): a DDP wrapper then prepares its gradient
    synchronisation, a DeepSpeed engine and an FSDP2 root unit gather their parameters.
    ``wrapper`` None (or TRL without it): ``fn`` is called directly."""
    if wrapper is None:
        return fn(*args, **kwargs)
    return _forward_redirection()(wrapper, module, fn, *args, **kwargs)


def _forward_redirection():
    # TRL's private helper (trl.models.utils, TRL 1.16.0): pinned here and in
    # tests/test_trl_sharded.py::test_trl_forward_redirection_is_where_we_expect_it
    from trl.models.utils import _ForwardRedirection

    return _ForwardRedirection()
