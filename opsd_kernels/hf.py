"""Final hidden states and lm_head of a Hugging Face causal LM, without the logits.

The fused losses take ``(hidden states, lm_head weight, bias)`` instead of logits. This
module is the one place that knows how to get them from a ``transformers`` causal LM:
it unwraps PEFT models, runs the model's body (``model.base_model``, the module that
ends with the final norm), and reads the output embeddings (the input embedding
matrix itself when they are tied). Scalar logit multipliers applied after the lm_head
are folded into the returned hidden states and bias, so that

    hidden_states @ weight.T + bias == model(input_ids, attention_mask).logits

(up to rounding). Gemma 2's ``final_logit_softcapping`` (``c * tanh(logits / c)``,
after the scale) is not linear in the hidden states: a caller that applies it itself
(``fused_linear_divergence(..., softcap=c)``) asks for it with ``with_softcap=True`` and
reads it from the returned head's ``softcap``; without that a soft-capped model is
refused with a clear error, so that no caller computes uncapped logits by mistake.
``transformers`` is imported by the models passed in, never by this module.

Scalar multipliers recognised (from the model's text config, as ``transformers`` 5.x
models apply them): ``logit_scale`` (Cohere, x), ``output_multiplier`` (x),
``lm_head_multiplier`` (Falcon-H1, x), ``logits_scaling`` (Granite, MiniCPM3: /;
HyperCLOVA X: x). An architecture that transforms its logits in some other way after
the lm_head is not detected: check a new architecture once with
:func:`check_causal_lm_hidden_states`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "CausalLMHead",
    "LMHeadInputs",
    "causal_lm_backbone",
    "causal_lm_head",
    "causal_lm_hidden_states",
    "causal_lm_last_hidden_state",
    "check_causal_lm_hidden_states",
]


class _CausalLMHeadFields(NamedTuple):
    weight: torch.Tensor  # (V, H); the input embedding matrix itself when tied
    bias: torch.Tensor | None  # (V,) or None
    logit_scale: float  # scalar multiplier applied after the lm_head (1.0 for most models)


class CausalLMHead(_CausalLMHeadFields):
    """The output layer of a causal LM: ``y = logit_scale * (h @ weight.T + bias)``, then
    ``logits = softcap * tanh(y / softcap)`` when ``softcap`` is not None (Gemma 2).

    Unpacks as ``(weight, bias, logit_scale)``; ``softcap`` is an attribute (it is set
    only for callers that asked for it with ``with_softcap=True``)."""

    softcap: float | None

    def __new__(cls, weight, bias, logit_scale, softcap=None):
        head = super().__new__(cls, weight, bias, logit_scale)
        head.softcap = softcap
        return head


class _LMHeadInputsFields(NamedTuple):
    hidden_states: torch.Tensor  # (B, T, H) final hidden states, logit scale folded in
    weight: torch.Tensor  # (V, H) lm_head weight (a Parameter of the model: gradients reach it)
    bias: torch.Tensor | None  # (V,) lm_head bias times the logit scale, or None


class LMHeadInputs(_LMHeadInputsFields):
    """What the fused losses take: ``hidden_states @ weight.T + bias`` are the logits,
    soft-capped when ``softcap`` (an attribute; unpacks as ``(hidden_states, weight,
    bias)``) is not None: pass it on as ``fused_linear_divergence(..., softcap=softcap)``."""

    softcap: float | None

    def __new__(cls, hidden_states, weight, bias, softcap=None):
        inputs = super().__new__(cls, hidden_states, weight, bias)
        inputs.softcap = softcap
        return inputs


def _unwrap(model):
    """The ``transformers`` model inside a PEFT wrapper (LoRA layers stay injected)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) or (
        type(model).__name__ in ("FullyShardedDataParallel", "DeepSpeedEngine")
    ):
        raise ValueError(
            f"model is a {type(model).__name__} wrapper: pass the unwrapped model "
            "(e.g. accelerator.unwrap_model(model)) and call it through the wrapper's "
            "forward so that gradient synchronisation still happens"
        )
    if hasattr(model, "get_base_model") and callable(model.get_base_model):
        model = model.get_base_model()  # peft.PeftModel
    return model


def _text_config(model):
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no .config: expected a transformers model")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _softcap(model, with_softcap: bool) -> float | None:
    cap = getattr(_text_config(model), "final_logit_softcapping", None)
    if cap is None:
        return None
    if not with_softcap:
        raise ValueError(
            f"{type(model).__name__} applies final_logit_softcapping={cap} "
            "(logits -> c * tanh(logits / c)) after its lm_head; this caller reads the "
            "logits as hidden_states @ weight.T + bias. Pass with_softcap=True and hand "
            "the returned .softcap to the fused loss (fused_linear_divergence(..., "
            "softcap=...)), or compute the loss from the model's logits"
        )
    cap = float(cap)
    if not (math.isfinite(cap) and cap > 0):
        raise ValueError(
            f"{type(model).__name__}'s final_logit_softcapping must be a finite number > 0, "
            f"got {cap}"
        )
    return cap


def _logit_scale(model) -> float:
    config = _text_config(model)
    scale = 1.0
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, name, None)
        if value is not None:
            scale *= float(value)
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None:
        hyperclova = getattr(config, "model_type", "").startswith("hyperclovax")
        scale = scale * float(scaling) if hyperclova else scale / float(scaling)
    if not math.isfinite(scale):
        raise ValueError(f"{type(model).__name__}'s logit scale is not finite: {scale}")
    return scale


def causal_lm_head(model, *, with_softcap: bool = False) -> CausalLMHead:
    """The lm_head weight, bias, logit scale and soft cap of a causal LM (PEFT-wrapped or
    not).

    Args:
        model: a ``transformers`` causal LM, or a ``peft`` model wrapping one.
        with_softcap: the caller applies ``.softcap`` (Gemma 2's
            ``final_logit_softcapping``); when False a soft-capped model is refused.

    Raises ``ValueError`` for a model without a linear output layer, or with
    ``final_logit_softcapping`` unless ``with_softcap``.

    >>> import torch
    >>> from transformers import Gemma2Config, Gemma2ForCausalLM
    >>> cfg = Gemma2Config(vocab_size=50, hidden_size=16, intermediate_size=32, head_dim=8,
    ...                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    >>> head = causal_lm_head(Gemma2ForCausalLM(cfg), with_softcap=True)
    >>> head.weight.shape, head.logit_scale, head.softcap
    (torch.Size([50, 16]), 1.0, 30.0)
    """
    base = _unwrap(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    # DeepSpeed ZeRO-3 keeps a partitioned parameter's full shape in ds_shape
    shape = tuple(getattr(weight, "ds_shape", getattr(weight, "shape", ())))
    if not isinstance(weight, torch.Tensor) or len(shape) != 2:
        raise ValueError(
            f"{type(base).__name__} has no linear lm_head (get_output_embeddings() returned "
            f"{type(head).__name__}): load the model as a causal LM (AutoModelForCausalLM)"
        )
    bias = getattr(head, "bias", None)
    bias_shape = tuple(getattr(bias, "ds_shape", getattr(bias, "shape", ())))
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias_shape != shape[:1]):
        raise ValueError(f"the lm_head bias has shape {bias_shape}, expected ({shape[0]},)")
    return CausalLMHead(weight, bias, _logit_scale(base), _softcap(base, with_softcap))


def causal_lm_backbone(model) -> torch.nn.Module:
    """The body of a causal LM: the module whose ``last_hidden_state`` feeds the lm_head
    (after the final norm). Unwraps PEFT models; ``ValueError`` if there is no separate body.
    """
    base = _unwrap(model)
    prefix = getattr(base, "base_model_prefix", None)
    body = getattr(base, prefix, None) if prefix else None
    if not isinstance(body, torch.nn.Module) or body is base:
        raise ValueError(
            f"{type(base).__name__} has no separate body (attribute {prefix!r}): load the "
            "model as a causal LM (AutoModelForCausalLM), not as its bare body"
        )
    return body


def causal_lm_hidden_states(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    with_softcap: bool = False,
    **model_kwargs,
) -> LMHeadInputs:
    """Final hidden states and lm_head of a causal LM: the inputs of the fused losses.

    Runs the model's body only (no lm_head, no logits). Works for plain and PEFT-wrapped
    ``transformers`` causal LMs (Qwen3, Llama, Gemma, Mistral, ...), tied or untied
    embeddings; folds scalar logit multipliers (Cohere, Granite, ...) into the hidden
    states and bias; returns Gemma 2's ``final_logit_softcapping`` as ``.softcap`` when
    ``with_softcap`` (else refuses it with a ``ValueError``). Pass the unwrapped model
    (not a DDP wrapper).

    Args:
        model: a ``transformers`` causal LM, or a ``peft`` model wrapping one.
        input_ids: (B, T) token ids.
        attention_mask: None or (B, T).
        with_softcap: the caller applies ``.softcap`` (see :func:`causal_lm_head`).
        **model_kwargs: passed to the body (``use_cache`` defaults to False).

    Returns:
        ``LMHeadInputs(hidden_states (B, T, H), weight (V, H), bias (V,) or None)`` with
        ``hidden_states @ weight.T + bias`` equal to the model's logits before its soft
        cap, and ``.softcap`` (None, or the cap to apply after them). ``weight`` and
        ``bias`` are the model's parameters (gradients reach them, and the embedding
        through a tied weight); the hidden states carry the body's autograd graph.

    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
    ...                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    >>> model = LlamaForCausalLM(cfg).eval()
    >>> ids = torch.randint(0, 50, (2, 5))
    >>> h, w, b = causal_lm_hidden_states(model, ids)
    >>> h.shape, w.shape, b
    (torch.Size([2, 5, 16]), torch.Size([50, 16]), None)
    >>> torch.allclose(h @ w.T, model(ids).logits, atol=1e-5)
    True
    """
    head = causal_lm_head(model, with_softcap=with_softcap)
    weight, bias, scale = head
    hidden = causal_lm_last_hidden_state(model, input_ids, attention_mask, **model_kwargs)
    if scale != 1.0:
        hidden = hidden * scale
        bias = None if bias is None else bias * scale
    return LMHeadInputs(hidden, weight, bias, head.softcap)


def causal_lm_last_hidden_state(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **model_kwargs,
) -> torch.Tensor:
    """The body's final hidden states (B, T, H), after the final norm: what the lm_head
    reads, before any logit scale (:func:`causal_lm_head` describes the head). Runs
    the body only; ``use_cache`` defaults to False.

    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
    ...                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    >>> causal_lm_last_hidden_state(LlamaForCausalLM(cfg), torch.randint(0, 50, (2, 5))).shape
    torch.Size([2, 5, 16])
    """
    body = causal_lm_backbone(model)
    model_kwargs.setdefault("use_cache", False)
    out = body(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@torch.no_grad()
def check_causal_lm_hidden_states(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-4,
) -> None:
    """Check once, for an architecture not listed in the module docstring, that
    :func:`causal_lm_hidden_states` (with its soft cap applied) reproduces
    ``model(...).logits``. Forms the full
    logits of ``input_ids``: use a short input. Raises ``AssertionError`` on a mismatch.

    >>> import torch
    >>> from transformers import Qwen3Config, Qwen3ForCausalLM
    >>> cfg = Qwen3Config(vocab_size=40, hidden_size=16, intermediate_size=32,
    ...                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    >>> check_causal_lm_hidden_states(Qwen3ForCausalLM(cfg).eval(), torch.randint(0, 40, (1, 4)))
    """
    inputs = causal_lm_hidden_states(model, input_ids, attention_mask, with_softcap=True)
    hidden, weight, bias = inputs
    ours = torch.nn.functional.linear(
        hidden.float(), weight.float(), None if bias is None else bias.float()
    )
    if inputs.softcap is not None:
        ours = inputs.softcap * torch.tanh(ours / inputs.softcap)
    theirs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    torch.testing.assert_close(
        ours,
        theirs.float(),
        rtol=rtol,
        atol=atol,
        msg=lambda m: (
            f"{type(_unwrap(model)).__name__}: hidden states "
            f"@ lm_head do not reproduce the model's logits: {m}"
        ),
    )
