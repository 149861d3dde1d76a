"""TRL's self-distillation trainers (SDFT, SDPO) with the fused loss: no (tokens x V) logits.

``FusedSDFTTrainer`` / ``FusedSDFTConfig`` subclass ``trl.experimental.sdft.SDFTTrainer`` /
``SDFTConfig`` (checked with TRL 1.16.0): the same constructor, and the same loss
(``distillation_mode``, ``distillation_alpha``, ``temperature``, ``num_loss_tokens_to_skip``,
``distillation_is_clip``, TRL's per-sequence-then-batch mean, its metrics), computed from
both roles' final hidden states and lm_heads with this project's kernels. Sampling,
teacher prompts, teacher kinds (``base`` / ``live`` / ``ema``), callbacks and logging
stay TRL's.

How each of TRL's modes is formed (``B x C`` completion tokens, ``V`` vocabulary):

- ``"full_logits"``: :func:`opsd_kernels.fused_linear_divergence` (alpha 0 forward KL,
  1 reverse KL, else JSD with ``beta = alpha``), ``reduction="none"``, then TRL's reduction.
- ``"topk_logits"`` (local teacher): the student's top-k ids by a chunked top-k over
  vocabulary slices of its lm_head (:func:`vocab_sweep`, no gradient), the teacher's
  log-probs at those ids from a chunked log-sum-exp, then
  :func:`opsd_kernels.fused_linear_topk_divergence` with ``tail="bucket"``
  (``distillation_add_tail=True``) or ``"renormalize"``. Direction: TRL's
  ``compute_divergence(student, teacher, alpha)`` is KL(teacher || student) at alpha 0,
  as our ``kind="forward_kl"`` with the teacher given as log-probs.
  TRL clamps the captured log-mass of both tails at ``-1e-7`` (a tail is never below
  ~1e-7); ours takes the teacher tail as ``max(0, 1 - sum pT)`` and the student tail
  exactly (``LSE(complement) - LSE(all)``). The two agree wherever the top-k holds less
  than ``1 - 1e-7`` of a side's mass; when it holds more, TRL's tail is 1e-7 where ours is
  the true (smaller) one, a difference of order 1e-7 * log(1e-7 / tail) per token (reverse
  KL with a teacher tail of exactly 0 is +inf here, finite in TRL).
- ``"sampled_token"``: the student's log-prob of each sampled token, with gradient, as
  ``-fused_linear_topk_divergence(K=1, teacher log-prob 0)``; the teacher's from a chunked
  log-sum-exp.
- Teacher server (``use_teacher_server``): the support is the TEACHER's top-k that vLLM
  returns (``_get_teacher_token_logprobs_from_server``, TRL's), fed to
  ``fused_linear_topk_divergence``.
- ``distillation_is_clip``: the student's log-probs of the sampled tokens at the sampling
  temperature come from a chunked log-sum-exp of the hidden states (no gradient: TRL's
  ratio is detached); TRL's own ``apply_importance_sampling_clipping`` applies them. The
  rollout log-probs (``_compute_rollout_logps``, when gradient accumulation is not a
  multiple of the generation period) come from hidden states too.

``FusedSDPOTrainer`` / ``FusedSDPOConfig`` do the same for ``trl.experimental.sdpo``'s
``SDPOTrainer``: its self-distillation term (under ``self_distillation_mask``, weighted by
``distillation_weight``) as above, its policy-gradient term TRL's formula on per-token
log-probs from the hidden states. ``IWOPDTrainer`` (its own JSD code) is not wrapped.

OPSD's options, on :class:`FusedSDFTConfig` / :class:`FusedSDPOConfig` (each default is
TRL's behaviour):

- ``distillation_clip`` (None): the method's per-vocabulary-entry clip tau
  (``min(phi_v, tau)``); ``distillation_clip_mode``: ``"entry"`` (the method's v3; a clipped
  entry passes no gradient but stays in the softmax, so for forward KL descent LOWERS
  the student's logit on the tokens the teacher most wants), ``"token"``
  (``min(sum_v phi_v, tau)`` per token) or ``"entry_keep"`` (the loss of ``"entry"``, but a
  clipped entry's student probability is left unchanged to first order); see
  :class:`opsd_kernels._validation.DivergenceOptions`.
- ``distillation_normalization``: ``"sequence"`` (TRL: per-sequence token mean, then the
  batch mean, then / gradient-accumulation steps), ``"token"`` (one token mean over the
  whole optimizer step, all accumulation micro-batches and processes: gradient-accumulation
  correct; needs ``steps_per_generation`` a multiple of ``gradient_accumulation_steps``, so
  that the step's tokens are known at its first micro-batch) or ``"microbatch"`` (each
  micro-batch's token mean, then / accumulation steps: the method's reference code).
- ``loss_temperature`` (None: TRL's ``temperature``): the temperature of the loss, apart
  from the sampling one (the importance-sampling ratio stays at the sampling temperature).
- ``teacher_chat_template_kwargs`` (None: ``chat_template_kwargs``): the teacher prompt's
  chat-template arguments (TRL renders both roles with ``chat_template_kwargs``; OPSD's
  reference renders the student non-thinking and the teacher thinking).
- ``teacher_topk`` (False): with ``distillation_mode="topk_logits"``, the support is the
  local TEACHER's top-``distillation_topk`` (this project's ``--teacher-topk`` convention,
  and what TRL's server mode does) instead of the student's.
- ``distillation_stats`` (True): log the kernels' per-token statistics (below).
- ``fused_loss_kwargs``: kernel settings (``impl``, ``chunk_size``; full_logits also
  ``fp32_weight_grad``, ``skip_threshold``).

Refused at construction: a negative or zero clip, a clip with ``"sampled_token"`` (one
token's log-ratio has no vocabulary entries to clip), a loss temperature apart from the
sampling one with the teacher server (vLLM scores at the sampling temperature), an lm_head
the kernels cannot read (no linear output layer). Scalar logit multipliers (Cohere,
Granite) are folded into the hidden states; Gemma 2's ``final_logit_softcapping`` is
applied by the kernels and the sweeps (the teacher's cap its own).

Sharded models, as the GKD/GOLD integrations: the loss runs inside the student's forward
(TRL's ``_ForwardRedirection`` through the wrapper, or the ``fully_shard`` model itself),
a separate teacher's body inside the teacher's, and every read of an lm_head goes through
:func:`lm_head_of`, which gathers it whole
(:func:`opsd_kernels.integrations._heads.gathered_lm_head`). FSDP2 and DeepSpeed ZeRO-3
are tested (2 processes against 1, ``tests/test_trl_sharded.py``).

Per step (``full_logits`` and ``topk_logits``), TRL's
metrics dict gets the kernels' per-token statistics (means over the loss tokens):
``<name>/student_entropy``, ``<name>/teacher_clipped_mass``, ``<name>/clipped_entries``,
``<name>/teacher_top1_clipped`` (the share of tokens whose teacher top-1 entry was
clipped). A warning, once per trainer, names the numbers when a per-entry clip
(``clip_mode`` ``"entry"`` or ``"entry_keep"``) clips the teacher's top-1 entry on more
than :data:`CLIP_WARNING_SHARE` (2%) of the loss tokens.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import config as _config
from ..api import fused_linear_divergence
from ..divergences import transform_logits
from ..gemm import compute_dtype, linear_logits
from ..hf import causal_lm_backbone, causal_lm_head
from ..topk import fused_linear_topk_divergence

try:
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer
    from trl.experimental.sdft.loss_utils import apply_importance_sampling_clipping
    from trl.experimental.sdpo import SDPOConfig, SDPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise ImportError(
        "opsd_kernels.integrations.trl_sdft needs TRL (>= 1.16): pip install trl"
    ) from e

from ._heads import LMHead, gathered_lm_head, route_through
from .trl import _FusedLossMixin

__all__ = [
    "CLIP_WARNING_SHARE",
    "FusedSDFTConfig",
    "FusedSDFTTrainer",
    "FusedSDPOConfig",
    "FusedSDPOTrainer",
    "lm_head_of",
    "vocab_sweep",
]

#: share of loss tokens whose teacher top-1 entry is clipped by a per-entry clip
#: (``clip_mode`` "entry" or "entry_keep") above which the trainer warns, once. Measured on
#: SmolLM2-135M-Instruct (bench/results/recipe-2026-12-05.md): 2-6% of the tokens, from
#: the first step, went with held-out pass@1 falling from 0.82 to 0.43 in 15 steps, in
#: both modes, where no clip kept 0.84.
CLIP_WARNING_SHARE = 0.02

#: what a clipped top-1 entry does to the student, per per-entry ``clip_mode``
_CLIP_EFFECT = {
    "entry": "a clipped entry passes no gradient of its own but stays in the softmax, so "
    "the loss lowers the student's logit on exactly those tokens",
    "entry_keep": "the clipped entry's probability is held (to first order) instead of "
    "pulled toward the teacher, while the unclipped entries move toward the teacher's "
    "distribution over the rest of the vocabulary (its second choices)",
}

CLIP_MODES = ("entry", "token", "entry_keep")
NORMALIZATIONS = ("sequence", "token", "microbatch")
_TOPK_LOSS_KWARGS = ("impl", "chunk_size")
_FULL_LOSS_KWARGS = ("impl", "chunk_size", "fp32_weight_grad", "skip_threshold")

# TRL 1.16 private names this module relies on (tests/test_trl_sdft.py checks each exists
# with these parameters, so a TRL change fails loudly there)
TRL_PRIVATE_METHODS = {
    "_get_teacher_token_logprobs_from_server": ("inputs", "logits_to_keep"),
    "_compute_rollout_logps": ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"),
    "_get_teacher_context_for_self_distillation": (),
    "_log_self_distillation_metric": ("mode", "value"),
    "_tokenize_prompts": ("prompts",),
}
#: SDPO's, beside those (its policy term, mirrored in FusedSDPOTrainer._policy_loss)
TRL_PRIVATE_SDPO = {
    "SDPOTrainer": ("importance_sampling_level", "epsilon_low", "epsilon_high", "loss_type")
}
TRL_PRIVATE_ATTRIBUTES = (
    "_metrics",
    "_step",
    "_buffered_inputs",
    "_last_loaded_step",
    "teacher_context_builder",
    "chat_template_kwargs",
    "num_loss_tokens_to_skip",
    "temperature",
    "use_teacher_server",
)


def lm_head_of(model) -> LMHead:
    """The lm_head ``(weight, bias, logit_scale, softcap)`` of an unwrapped (or PEFT) causal
    LM, whole for one step: the one place this module reads an lm_head. A sharded head
    (FSDP2 ``DTensor``, DeepSpeed ZeRO-3) is gathered by
    :func:`opsd_kernels.integrations._heads.gathered_lm_head`, its gradient flowing back to
    the shards; call it inside the model's forward (:func:`~._heads.route_through`).
    Under ``torch.no_grad`` (the teacher) nothing is recorded for autograd.
    ``softcap`` is Gemma 2's ``final_logit_softcapping`` (applied by the kernels).

    Raises ``ValueError`` for a head the kernels cannot read (no linear output layer)."""
    return gathered_lm_head(model)


def _check_lm_head(model) -> None:
    """At construction: the lm_head is one the kernels read (no gathering)."""
    causal_lm_head(model, with_softcap=True)


def _completion_states(model, input_ids, attention_mask, width: int, head=None):
    """Final hidden states of the positions that predict the last ``width`` tokens
    (TRL's ``logits[:, :-1][:, -width:]``), ``(B, width, H)``, with the lm_head's weight,
    bias and soft cap (``head``, ``lm_head_of(model)`` when None); scalar logit multipliers
    folded into the states and bias (as :mod:`opsd_kernels.hf`), so the logits are
    ``softcap * tanh((h W^T + b) / softcap)``."""
    weight, bias, scale, softcap = lm_head_of(model) if head is None else head
    body = causal_lm_backbone(model)
    out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    hidden = hidden[:, hidden.shape[1] - width - 1 : hidden.shape[1] - 1]
    if scale != 1.0:
        hidden = hidden * scale
        bias = None if bias is None else bias * scale
    return hidden, weight, bias, softcap


@torch.no_grad()
def vocab_sweep(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float = 1.0,
    *,
    k: int = 0,
    ids: torch.Tensor | None = None,
    vocab_slice: int = 32768,
    token_chunk: int | None = None,
    softcap: float | None = None,
):
    """One pass over vocabulary slices of ``z = (hidden @ weight.T + bias) / temperature``,
    never more than ``token_chunk x vocab_slice`` logits at a time (no gradient).

    Args:
        hidden: (N, H); weight: (V, H); bias: None or (V,).
        k: also return the top-``k`` of ``z`` per row (0: none).
        ids: None or (N, K) int64: also return ``z`` at these ids.
        vocab_slice, token_chunk: tile sizes (``token_chunk`` None: from
            ``opsd_kernels.config.chunk_memory_budget``).
        softcap: None, or Gemma 2's cap: ``z = softcap * tanh(logits / softcap) / T``.

    Returns:
        ``(lse, top_values, top_ids, gathered)``: ``lse`` (N,) the log-sum-exp of ``z``;
        ``top_values``/``top_ids`` (N, k) sorted decreasing (None when ``k`` is 0);
        ``gathered`` (N, K) (None without ``ids``). Float32 (float64 for float64 inputs).
        Log-probs are ``top_values - lse[:, None]`` and ``gathered - lse[:, None]``.

    >>> h, w = torch.randn(5, 4), torch.randn(9, 4)
    >>> lse, top, top_ids, g = vocab_sweep(h, w, None, 2.0, k=3, ids=torch.zeros(5, 1).long(),
    ...                                    vocab_slice=4, token_chunk=2)
    >>> ref = torch.log_softmax(h @ w.T / 2.0, -1)
    >>> torch.allclose(top - lse[:, None], ref.topk(3).values, atol=1e-6)
    True
    >>> torch.equal(top_ids, ref.topk(3).indices)
    True
    >>> torch.allclose(g - lse[:, None], ref[:, :1], atol=1e-6)
    True
    """
    N, _ = hidden.shape
    V = weight.shape[0]
    if not 0 <= k <= V:
        raise ValueError(f"k must lie in [0, V={V}], got {k}")
    cdt = compute_dtype(hidden.dtype, weight.dtype, *(() if bias is None else (bias.dtype,)))
    vs = max(1, min(V, vocab_slice))
    if token_chunk is None:
        token_chunk = max(1, _config.chunk_memory_budget // (4 * vs * cdt.itemsize))
    dev = hidden.device
    lse = torch.empty(N, dtype=cdt, device=dev)
    top_v = torch.empty(N, k, dtype=cdt, device=dev) if k else None
    top_i = torch.empty(N, k, dtype=torch.long, device=dev) if k else None
    gathered = None if ids is None else torch.empty(ids.shape, dtype=cdt, device=dev)
    for r0 in range(0, N, token_chunk):
        h = hidden[r0 : r0 + token_chunk]
        run_lse = torch.full((h.shape[0],), -math.inf, dtype=cdt, device=dev)
        run_v = run_i = None
        run_g = None
        if ids is not None:
            run_g = torch.zeros(ids[r0 : r0 + token_chunk].shape, dtype=cdt, device=dev)
        for v0 in range(0, V, vs):
            v1 = min(V, v0 + vs)
            z = linear_logits(h, weight[v0:v1], None if bias is None else bias[v0:v1])
            z = transform_logits(z, 1.0, softcap).div_(temperature)
            run_lse = torch.logaddexp(run_lse, torch.logsumexp(z, dim=-1))
            if k:
                sv, si = z.topk(min(k, v1 - v0), dim=-1)
                si = si + v0
                if run_v is not None:
                    sv, si = torch.cat([run_v, sv], -1), torch.cat([run_i, si], -1)
                keep = sv.topk(min(k, sv.shape[-1]), dim=-1)
                run_v, run_i = keep.values, si.gather(-1, keep.indices)
            if ids is not None:
                rid = ids[r0 : r0 + token_chunk]
                inside = (rid >= v0) & (rid < v1)
                local = z.gather(-1, (rid - v0).clamp(0, v1 - v0 - 1))
                run_g = torch.where(inside, local, run_g)
        lse[r0 : r0 + h.shape[0]] = run_lse
        if k:
            top_v[r0 : r0 + h.shape[0]] = run_v
            top_i[r0 : r0 + h.shape[0]] = run_i
        if ids is not None:
            gathered[r0 : r0 + h.shape[0]] = run_g
    return lse, top_v, top_i, gathered


def _kind(alpha: float) -> tuple[str, float]:
    """TRL's ``compute_divergence``: alpha 0 forward KL, 1 reverse KL, else JSD(beta=alpha)."""
    if alpha == 0.0:
        return "forward_kl", 0.5
    if alpha == 1.0:
        return "reverse_kl", 0.5
    return "jsd", float(alpha)


def _check_opsd_options(cfg) -> None:
    """The OPSD options of a (Fused) self-distillation config; ``ValueError`` naming the
    argument on a bad value or combination."""
    clip = cfg.distillation_clip
    if clip is not None:
        if isinstance(clip, bool) or not isinstance(clip, (int, float)):
            raise TypeError(f"distillation_clip must be None or a float > 0, got {clip!r}")
        if not (clip > 0 and math.isfinite(clip)):
            raise ValueError(f"distillation_clip must be None or a finite number > 0, got {clip!r}")
        if cfg.distillation_mode == "sampled_token":
            raise ValueError(
                "distillation_clip is a per-vocabulary-entry clip: distillation_mode="
                "'sampled_token' (one sampled token's log-ratio) has no entries to clip; use "
                "'full_logits' or 'topk_logits', or distillation_clip=None"
            )
    if cfg.distillation_clip_mode not in CLIP_MODES:
        raise ValueError(
            f"distillation_clip_mode must be one of {CLIP_MODES}, "
            f"got {cfg.distillation_clip_mode!r}"
        )
    if not isinstance(cfg.distillation_stats, bool):
        raise TypeError(f"distillation_stats must be a bool, got {cfg.distillation_stats!r}")
    if cfg.distillation_normalization not in NORMALIZATIONS:
        raise ValueError(
            f"distillation_normalization must be one of {NORMALIZATIONS}, "
            f"got {cfg.distillation_normalization!r}"
        )
    if cfg.distillation_normalization == "token" and (
        cfg.steps_per_generation % cfg.gradient_accumulation_steps != 0
    ):
        raise ValueError(
            "distillation_normalization='token' divides by the loss tokens of the whole "
            "optimizer step, known at its first micro-batch only when steps_per_generation "
            f"({cfg.steps_per_generation}) is a multiple of gradient_accumulation_steps "
            f"({cfg.gradient_accumulation_steps}); use 'sequence' or 'microbatch', or "
            "generate once per step"
        )
    lt = cfg.loss_temperature
    if lt is not None:
        if (
            isinstance(lt, bool)
            or not isinstance(lt, (int, float))
            or not (lt > 0 and math.isfinite(lt))
        ):
            raise ValueError(f"loss_temperature must be None or a finite number > 0, got {lt!r}")
        if cfg.use_teacher_server and lt != cfg.temperature:
            raise ValueError(
                f"loss_temperature={lt} with use_teacher_server=True: the vLLM server scores "
                f"the teacher at the sampling temperature ({cfg.temperature}); leave "
                "loss_temperature None"
            )
    if not isinstance(cfg.teacher_topk, bool):
        raise TypeError(f"teacher_topk must be a bool, got {cfg.teacher_topk!r}")
    if cfg.teacher_topk and cfg.distillation_mode != "topk_logits":
        raise ValueError(
            "teacher_topk=True takes the teacher's top-distillation_topk as the support of "
            f"distillation_mode='topk_logits', got distillation_mode={cfg.distillation_mode!r}"
        )
    if cfg.teacher_topk and cfg.use_teacher_server:
        raise ValueError(
            "teacher_topk=True is for a local teacher; with use_teacher_server=True the "
            "support is already the teacher's top-k (from the server)"
        )
    if cfg.distillation_mode == "topk_logits" and not (
        isinstance(cfg.distillation_topk, int) and cfg.distillation_topk >= 1
    ):
        raise ValueError(
            "distillation_mode='topk_logits' needs distillation_topk, an int >= 1, got "
            f"{cfg.distillation_topk!r}"
        )
    if cfg.teacher_chat_template_kwargs is not None:
        if not isinstance(cfg.teacher_chat_template_kwargs, dict):
            raise TypeError(
                "teacher_chat_template_kwargs must be None or a dict, got "
                f"{cfg.teacher_chat_template_kwargs!r}"
            )
        if getattr(cfg, "generate_from_teacher", False):
            raise ValueError(
                "teacher_chat_template_kwargs with generate_from_teacher=True: TRL tokenizes "
                "the generation prompts outside the teacher-context builder, with "
                "chat_template_kwargs; set one chat_template_kwargs for both roles"
            )
    kw = cfg.fused_loss_kwargs or {}
    if not isinstance(kw, dict):
        raise TypeError(f"fused_loss_kwargs must be None or a dict, got {kw!r}")
    allowed = _FULL_LOSS_KWARGS if cfg.distillation_mode == "full_logits" else _TOPK_LOSS_KWARGS
    unknown = set(kw) - set(allowed)
    if unknown:
        raise TypeError(
            f"fused_loss_kwargs: unexpected {sorted(unknown)} for distillation_mode="
            f"{cfg.distillation_mode!r}; allowed: {allowed}"
        )
    if cfg.distillation_mode != "full_logits" and kw.get("impl") == "fused":
        raise ValueError(
            "fused_loss_kwargs: impl='fused' has no top-k form (distillation_mode="
            f"{cfg.distillation_mode!r}); use 'auto', 'torch' or 'triton'"
        )


@dataclass
class _OPSDOptions:
    r"""OPSD's options of :class:`FusedSDFTConfig` and :class:`FusedSDPOConfig` (each
    default gives TRL's behaviour).

    Parameters:
        distillation_clip (`float` or `None`, defaults to `None`):
            The method's per-vocabulary-entry clip tau: each entry's term
            ``min(phi_v, tau)`` (full_logits; the K (+1) outcomes for topk_logits).
            Not for ``sampled_token``. Not TRL's ``distillation_is_clip`` (an
            importance-sampling ratio cap).
        distillation_clip_mode (`str`, defaults to `"entry"`):
            ``"entry"``, ``"token"`` or ``"entry_keep"`` (see the module docstring).
        distillation_normalization (`str`, defaults to `"sequence"`):
            ``"sequence"`` (TRL), ``"token"`` or ``"microbatch"``.
        loss_temperature (`float` or `None`, defaults to `None`):
            Temperature of the loss; None uses ``temperature`` (TRL).
        teacher_chat_template_kwargs (`dict` or `None`, defaults to `None`):
            Chat-template arguments of the teacher prompt; None uses
            ``chat_template_kwargs`` (TRL).
        teacher_topk (`bool`, defaults to `False`):
            ``topk_logits`` over the local teacher's top-k instead of the student's.
        distillation_stats (`bool`, defaults to `True`):
            Log the kernels' per-token statistics each step (full_logits and
            topk_logits); False skips them.
        fused_loss_kwargs (`dict` or `None`, defaults to `None`):
            Kernel settings: ``impl``, ``chunk_size`` (full_logits also
            ``fp32_weight_grad``, ``skip_threshold``).
    """

    distillation_clip: float | None = field(
        default=None,
        metadata={"help": "OPSD's per-vocabulary-entry clip tau (None: no clip, TRL)."},
    )
    distillation_clip_mode: str = field(
        default="entry",
        metadata={"help": "How the clip applies: 'entry', 'token' or 'entry_keep'."},
    )
    distillation_normalization: str = field(
        default="sequence",
        metadata={"help": "'sequence' (TRL), 'token' (over the optimizer step) or 'microbatch'."},
    )
    loss_temperature: float | None = field(
        default=None,
        metadata={"help": "Temperature of the loss (None: `temperature`, TRL)."},
    )
    teacher_chat_template_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Chat-template kwargs of the teacher prompt (None: chat_template_kwargs)."
        },
    )
    teacher_topk: bool = field(
        default=False,
        metadata={"help": "topk_logits over the local teacher's top-k (default: the student's)."},
    )
    distillation_stats: bool = field(
        default=True,
        metadata={
            "help": "Log the kernels' per-token statistics (entropy, clipped mass) per step."
        },
    )
    fused_loss_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Kernel settings: impl, chunk_size, fp32_weight_grad, skip_threshold."},
    )


_OPSD_DICT_FIELDS = ["teacher_chat_template_kwargs", "fused_loss_kwargs"]
# OPSD options read from a plain SDFTConfig/SDPOConfig as well (TRL's behaviour)
_OPSD_DEFAULTS = {name: f.default for name, f in _OPSDOptions.__dataclass_fields__.items()}


@dataclass
class FusedSDFTConfig(_OPSDOptions, SDFTConfig):
    r"""``SDFTConfig`` plus OPSD's options (:class:`_OPSDOptions`, the module docstring);
    each default gives TRL's behaviour."""

    _VALID_DICT_FIELDS = SDFTConfig._VALID_DICT_FIELDS + _OPSD_DICT_FIELDS

    def __post_init__(self):
        super().__post_init__()
        _check_opsd_options(self)


class _TeacherTemplates:
    """A teacher-context builder (TRL's SDFT or SDPO one) whose ``build`` renders the
    teacher prompts under ``teacher_chat_template_kwargs``; everything else is the
    builder's."""

    def __init__(self, builder, teacher_kwargs: dict):
        self._builder = builder
        self._teacher_kwargs = teacher_kwargs

    def build(self, *args, **kwargs):
        trainer = self._builder.trainer
        saved = trainer.chat_template_kwargs
        trainer.chat_template_kwargs = {**saved, **self._teacher_kwargs}
        try:
            return self._builder.build(*args, **kwargs)
        finally:
            trainer.chat_template_kwargs = saved

    def __getattr__(self, name):
        if name.startswith("_"):  # not the builder's privates (and no recursion on copies)
            raise AttributeError(name)
        return getattr(self._builder, name)


class _FusedSelfDistillation(_FusedLossMixin):
    """The fused distillation term of TRL's self-distillation trainers (SDFT, SDPO)."""

    _config_cls = None  # the Fused config class of the trainer

    def __init__(self, *pos, **kwargs):
        # TRL's constructor, unchanged; its config (``args``) is checked first
        args = inspect.signature(super().__init__).bind(*pos, **kwargs).arguments.get("args")
        if args is not None and not isinstance(args, self._config_cls):
            _check_opsd_options(_WithDefaults(args))
        super().__init__(*pos, **kwargs)
        self._opsd = {k: getattr(self.args, k, v) for k, v in _OPSD_DEFAULTS.items()}
        self._init_fused(None)
        self.fused_loss_kwargs = dict(self._opsd["fused_loss_kwargs"] or {})
        # an lm_head the kernels cannot read fails here, not at the first step
        _check_lm_head(self.accelerator.unwrap_model(self.model))
        _check_lm_head(self.accelerator.unwrap_model(self.teacher_model))
        teacher_kwargs = self._opsd["teacher_chat_template_kwargs"]
        if teacher_kwargs is not None:
            self.teacher_context_builder = _TeacherTemplates(
                self.teacher_context_builder, teacher_kwargs
            )
        self._clip_warned = False

    # ------------------------------------------------------------------ options

    @property
    def loss_temperature(self) -> float:
        lt = self._opsd["loss_temperature"]
        return self.temperature if lt is None else lt

    def _loss_mask(self, inputs) -> torch.Tensor:
        """TRL's loss mask: the completion mask without the first
        ``num_loss_tokens_to_skip`` tokens."""
        completion_mask = inputs["completion_mask"]
        if self.num_loss_tokens_to_skip > 0:
            positions = torch.arange(completion_mask.size(1), device=completion_mask.device)
            return completion_mask * (positions >= self.num_loss_tokens_to_skip).long()
        return completion_mask

    def _kernel_kwargs(self, full: bool) -> dict:
        allowed = _FULL_LOSS_KWARGS if full else _TOPK_LOSS_KWARGS
        return {k: v for k, v in self.fused_loss_kwargs.items() if k in allowed}

    # ------------------------------------------------------------------ the loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError(f"The {type(self).__name__} does not support returning outputs")
        server = None
        if self.use_teacher_server:
            server = self._server_teacher(inputs)
        student = self.accelerator.unwrap_model(model)
        args = (student, inputs, server)
        # inside the wrapper's forward (DDP: gradient sync prepared; ZeRO-3 and an FSDP2
        # root unit: parameters gathered), as the GKD/GOLD integrations
        terms = route_through(model, student, self._per_token_terms, *args)
        return self._reduce(model, inputs, *terms[:3])

    def _server_teacher(self, inputs) -> dict:
        """TRL's weight sync and server request (``_get_teacher_token_logprobs_from_server``)."""
        if self.state.global_step != self._last_loaded_step:
            self.vllm_generation.sync_weights()
            self.accelerator.wait_for_everyone()
            self._last_loaded_step = self.state.global_step
        return self._get_teacher_token_logprobs_from_server(
            inputs, inputs["completion_ids"].size(1)
        )

    def _per_token_terms(self, student, inputs, server, distill=True, policy=False):
        """``(per_token_loss (B, C) or None, the student's sampled-token log-probs at the
        sampling temperature (detached, for the importance-sampling ratio) or None,
        DivergenceStats or None, the same log-probs with gradient (``policy``) or None)``.
        ``distill=False`` skips the distillation term (and the teacher)."""
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        width = completion_ids.size(1)
        loss_mask = self._loss_mask(inputs)
        mask = loss_mask.bool()
        mode = self.args.distillation_mode
        head = lm_head_of(student)  # gathered once (sharded), the teacher's too when shared
        with self._autocast_of(student)():
            h_s, w_s, b_s, c_s = _completion_states(
                student,
                torch.cat([prompt_ids, completion_ids], dim=1),
                torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
                width,
                head,
            )
        teacher_states, h_t, w_t, b_t, c_t = None, None, None, None, None
        if distill and server is None:
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            with (
                torch.no_grad(),
                self._get_teacher_context_for_self_distillation(),
                self._autocast_of(teacher)(),
            ):
                # a separate teacher's body inside its own wrapper's forward (ZeRO-3,
                # FSDP2 gather there); the live teacher is the student, already inside
                teacher_states = route_through(
                    None if teacher is student else self.teacher_model,
                    teacher,
                    _completion_states,
                    teacher,
                    inputs["teacher_input_ids"],
                    inputs["teacher_attention_mask"],
                    width,
                    head if teacher is student else None,
                )
        lt, ts = self.loss_temperature, self.temperature
        need_is = (
            distill
            and self.args.distillation_is_clip is not None
            and inputs.get("old_per_token_logps") is not None
        )
        per_token = stats = sampled = policy_logps = None
        with torch.autocast(h_s.device.type, enabled=False):
            h_s = h_s.to(w_s.dtype)
            if teacher_states is not None:
                h_t, w_t, b_t, c_t = teacher_states
                h_t = h_t.to(h_s.device, w_t.dtype)
            if not distill:
                pass
            elif mode == "sampled_token":
                # the student's log-prob of each sampled token at lt, with gradient
                shared = policy and lt == ts  # one pass serves the policy term too
                sampled = self._sampled_logprobs(
                    h_s, w_s, b_s, c_s, completion_ids, None if shared else mask, lt
                )
                if shared:
                    policy_logps = sampled
                if server is None:
                    ids = completion_ids.reshape(-1, 1)
                    lse, _, _, g = vocab_sweep(
                        _rows(h_t), w_t.detach(), _detach(b_t), lt, ids=ids, softcap=c_t
                    )
                    teacher_lp = (g[:, 0] - lse).view_as(sampled)
                else:
                    teacher_lp = self._server_actual(server, mask)
                per_token = (sampled - teacher_lp).detach() * sampled
            elif mode == "full_logits":
                per_token, stats = self._full_logits(
                    (h_s, w_s, b_s, c_s), (h_t, w_t, b_t, c_t), mask, lt
                )
            else:
                if server is not None:
                    ids, lp = server["topk_token_ids"], server["topk_logprobs"]
                else:
                    ids, lp = self._topk_support((h_s, w_s, b_s, c_s), (h_t, w_t, b_t, c_t), lt)
                per_token, stats = self._topk(h_s, w_s, b_s, c_s, ids, lp, mask, lt)
            if policy and policy_logps is None:
                # every completion position (TRL's policy term masks them itself)
                policy_logps = self._sampled_logprobs(h_s, w_s, b_s, c_s, completion_ids, None, ts)
            student_lp = None
            if need_is or server is not None:
                if policy_logps is not None:
                    student_lp = policy_logps.detach()
                elif sampled is not None and lt == ts:
                    student_lp = sampled.detach()
                else:
                    lse, _, _, g = vocab_sweep(
                        _rows(h_s.detach()),
                        w_s.detach(),
                        _detach(b_s),
                        ts,
                        ids=completion_ids.reshape(-1, 1),
                        softcap=c_s,
                    )
                    student_lp = (g[:, 0] - lse).view(completion_ids.shape)
            if server is not None:
                self._log_server_diff(student_lp, self._server_actual(server, mask), loss_mask)
        return per_token, student_lp, stats, policy_logps

    def _sampled_logprobs(self, h, w, b, softcap, ids, mask, temperature):
        """log p_S(sampled token), (B, C), with gradient: ``-fused_linear_topk_divergence``
        with K = 1 and teacher log-prob 0 is ``-log p_S`` exactly."""
        nll = fused_linear_topk_divergence(
            h,
            w,
            ids.unsqueeze(-1),
            torch.zeros(ids.shape + (1,), dtype=h.dtype, device=h.device),
            bias=b,
            tail="bucket",
            temperature=temperature,
            mask=mask,
            reduction="none",
            **_cap_kwargs(softcap),
            **self._kernel_kwargs(full=False),
        )
        return -nll

    def _server_actual(self, server, mask):
        """TRL's checks of the server's realized-token log-probs (``-inf`` at padding)."""
        actual = server["actual_logprobs"]
        if (mask & ~torch.isfinite(actual)).any():
            raise ValueError("Teacher server returned no logprob for a required completion token.")
        return torch.where(mask, actual, torch.zeros_like(actual))

    def _log_server_diff(self, student_lp, teacher_lp, loss_mask):
        mode = "train" if self.model.training else "eval"
        diff = ((student_lp - teacher_lp.to(student_lp.dtype)).abs() * loss_mask).sum() / (
            loss_mask.sum().clamp(min=1.0)
        )
        self._metrics[mode]["self_distillation/server_logprob_abs_diff"].append(
            self.accelerator.gather(diff).mean().item()
        )

    def _clip_kwargs(self) -> dict:
        clip = self._opsd["distillation_clip"]
        if clip is None:
            return {}
        kw = {"clip": clip}
        if self._opsd["distillation_clip_mode"] != "entry":
            kw["clip_mode"] = self._opsd["distillation_clip_mode"]
        return kw

    def _full_logits(self, student, teacher_states, mask, lt):
        (h_s, w_s, b_s, c_s), (h_t, w_t, b_t, c_t) = student, teacher_states
        kind, beta = _kind(self.args.distillation_alpha)
        teacher = {}
        if not (w_t is w_s and b_t is b_s):  # another lm_head (or a bias scaled anew)
            teacher = dict(teacher_weight=w_t.detach(), teacher_bias=_detach(b_t))
        if c_s is not None or c_t is not None:
            teacher.update(softcap=c_s, teacher_softcap=c_t)
        return self._with_stats(
            fused_linear_divergence,
            h_s,
            h_t,
            w_s,
            bias=b_s,
            kind=kind,
            beta=beta,
            temperature=lt,
            mask=mask,
            reduction="none",
            **teacher,
            **self._clip_kwargs(),
            **self._kernel_kwargs(full=True),
        )

    def _with_stats(self, kernel, *args, **kwargs):
        """``(per_token, DivergenceStats or None)`` from ``kernel``; the statistics are
        asked for when ``distillation_stats`` is on."""
        if not self._opsd["distillation_stats"]:
            return kernel(*args, **kwargs), None
        return kernel(*args, return_stats=True, **kwargs)

    def _topk_support(self, student, teacher_states, lt):
        """Local top-k support ``(ids, teacher log-probs)``, each (B, C, K): the student's
        top-k (TRL) or the teacher's (``teacher_topk``), from chunked vocabulary sweeps."""
        (h_s, w_s, b_s, c_s), (h_t, w_t, b_t, c_t) = student, teacher_states
        k = self.args.distillation_topk
        lead = h_s.shape[:-1]
        w_t, b_t = w_t.detach(), _detach(b_t)
        if self._opsd["teacher_topk"]:
            lse, top, ids, _ = vocab_sweep(_rows(h_t), w_t, b_t, lt, k=k, softcap=c_t)
            lp = top - lse[:, None]
        else:
            hs = _rows(h_s.detach())
            _, _, ids, _ = vocab_sweep(hs, w_s.detach(), _detach(b_s), lt, k=k, softcap=c_s)
            lse, _, _, g = vocab_sweep(_rows(h_t), w_t, b_t, lt, ids=ids, softcap=c_t)
            lp = g - lse[:, None]
        return ids.view(*lead, k), lp.view(*lead, k)

    def _topk(self, h_s, w_s, b_s, c_s, ids, lp, mask, lt):
        kind, beta = _kind(self.args.distillation_alpha)
        return self._with_stats(
            fused_linear_topk_divergence,
            h_s,
            w_s,
            ids,
            lp,
            bias=b_s,
            kind=kind,
            beta=beta,
            tail="bucket" if self.args.distillation_add_tail else "renormalize",
            temperature=lt,
            mask=mask,
            reduction="none",
            **_cap_kwargs(c_s),
            **self._clip_kwargs(),
            **self._kernel_kwargs(full=False),
        )

    def _reduce(self, model, inputs, per_token, student_lp, stats):
        """TRL's importance-sampling correction, the chosen normalisation, TRL's metric."""
        loss_mask = self._loss_mask(inputs).to(per_token.dtype)
        old = inputs.get("old_per_token_logps")
        if self.args.distillation_is_clip is not None and old is not None:
            per_token = apply_importance_sampling_clipping(
                per_token, student_lp, old, self.args.distillation_is_clip
            )
        masked = per_token * loss_mask
        norm = self._opsd["distillation_normalization"]
        training = self.model.training
        ga = self.current_gradient_accumulation_steps if training else 1.0
        if norm == "sequence":
            loss = (masked.sum(-1) / loss_mask.sum(-1).clamp(min=1.0)).mean() / ga
        elif norm == "microbatch":
            loss = masked.sum() / loss_mask.sum().clamp(min=1.0) / ga
        else:
            loss = masked.sum() / self._step_token_share(inputs, training).to(masked.dtype)
        mode = "train" if model.training else "eval"
        mean_distill_loss = masked.sum() / loss_mask.sum().clamp(min=1.0)
        self._log_self_distillation_metric(
            mode, self.accelerator.gather(mean_distill_loss.detach()).mean().item()
        )
        if stats is not None:
            self._log_stats(mode, stats, loss_mask)
        return loss

    def _step_token_share(self, inputs, training: bool) -> torch.Tensor:
        """This process's share of the loss tokens of the optimizer step (all its
        gradient-accumulation micro-batches, over all processes): the divisor of
        ``distillation_normalization="token"`` (DDP averages the gradients over processes)."""
        if training and self._buffered_inputs is not None:
            ga = self.args.gradient_accumulation_steps
            spg = self.args.steps_per_generation
            first = (self._step // ga) * ga
            slices = [self._buffered_inputs[s % spg] for s in range(first, first + ga)]
        else:
            slices = [inputs]
        count = sum(self._loss_mask(s).sum() for s in slices)
        count = self.accelerator.gather(count.reshape(1)).sum()
        return count.clamp(min=1) / self.accelerator.num_processes

    # ------------------------------------------------------------------ statistics

    def _log_stats(self, mode, stats, loss_mask):
        prefix = self._name.lower()
        n = loss_mask.sum().clamp(min=1.0)

        def mean(x):
            return (x.to(loss_mask.dtype) * loss_mask).sum() / n

        values = {
            "student_entropy": mean(stats.student_entropy),
            "teacher_clipped_mass": mean(stats.teacher_clipped_mass),
            "clipped_entries": mean(stats.clipped_entries),
            "teacher_top1_clipped": mean(stats.teacher_top1_clipped),
        }
        out = {}
        for name, v in values.items():
            out[name] = self.accelerator.gather(v.detach().reshape(1).float()).mean().item()
            self._metrics[mode][f"{prefix}/{name}"].append(out[name])
        self._maybe_warn_clip(out)

    def _maybe_warn_clip(self, means: dict) -> None:
        if (
            self._clip_warned
            or self._opsd["distillation_clip"] is None
            or self._opsd["distillation_clip_mode"] not in _CLIP_EFFECT
            or means["teacher_top1_clipped"] <= CLIP_WARNING_SHARE
        ):
            return
        self._clip_warned = True
        clip_mode = self._opsd["distillation_clip_mode"]
        warnings.warn(
            f"{type(self).__name__}: distillation_clip={self._opsd['distillation_clip']} "
            f"(clip_mode={clip_mode!r}) clipped the teacher's top-1 token on "
            f"{means['teacher_top1_clipped']:.1%} of the loss tokens (teacher mass on clipped "
            f"entries {means['teacher_clipped_mass']:.3f} per token, "
            f"{means['clipped_entries']:.1f} entries): {_CLIP_EFFECT[clip_mode]}. On "
            "SmolLM2-135M-Instruct 2-6% of such tokens went with held-out accuracy falling "
            "from 0.82 to 0.43 (bench/results/recipe-2026-12-05.md). Consider "
            "distillation_clip=None or distillation_clip_mode='token'.",
            stacklevel=2,
        )

    # ------------------------------------------------------------------ rollout log-probs

    def _compute_rollout_logps(self, prompt_ids, prompt_mask, completion_ids, completion_mask):
        """TRL's rollout log-probs (for ``distillation_is_clip``), from hidden states."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self.args.gradient_accumulation_steps % generate_every == 0:
            return None
        model = self.accelerator.unwrap_model(self.model)
        width = completion_ids.size(1)
        with torch.no_grad(), self._autocast_of(model)():
            h, w, b, cap = route_through(  # through the wrapper: sharded parameters gathered
                model if self.model_wrapped is None else self.model_wrapped,
                model,
                _completion_states,
                model,
                torch.cat([prompt_ids, completion_ids], dim=1),
                torch.cat([prompt_mask, completion_mask], dim=1),
                width,
            )
        with torch.autocast(h.device.type, enabled=False):
            ids = completion_ids.reshape(-1, 1)
            lse, _, _, g = vocab_sweep(
                _rows(h.to(w.dtype)), w, b, self.temperature, ids=ids, softcap=cap
            )
        return (g[:, 0] - lse).view(completion_ids.shape)


class FusedSDFTTrainer(_FusedSelfDistillation, SDFTTrainer):
    """TRL's ``SDFTTrainer`` with the distillation loss from hidden states and lm_heads
    (no (tokens x V) logits in any mode); see the module docstring.

    Same constructor as ``trl.experimental.sdft.SDFTTrainer``; pass a
    :class:`FusedSDFTConfig` for OPSD's options (a plain ``SDFTConfig`` gives TRL's loss).

    >>> import tempfile
    >>> from opsd_kernels.integrations.trl_sdft import FusedSDFTConfig
    >>> opsd = dict(output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False,
    ...             distillation_mode="full_logits", distillation_alpha=0.0)
    >>> FusedSDFTConfig(**opsd, distillation_clip=0.05).distillation_clip_mode
    'entry'
    >>> FusedSDFTConfig(**opsd, distillation_clip=-1.0)
    Traceback (most recent call last):
    ...
    ValueError: distillation_clip must be None or a finite number > 0, got -1.0
    """

    _config_cls = FusedSDFTConfig


@dataclass
class FusedSDPOConfig(_OPSDOptions, SDPOConfig):
    r"""``SDPOConfig`` plus OPSD's options (:class:`_OPSDOptions`) for its distillation
    term; each default gives TRL's behaviour."""

    _VALID_DICT_FIELDS = SDPOConfig._VALID_DICT_FIELDS + _OPSD_DICT_FIELDS

    def __post_init__(self):
        super().__post_init__()
        _check_opsd_options(self)


class FusedSDPOTrainer(_FusedSelfDistillation, SDPOTrainer):
    """TRL's ``SDPOTrainer`` with its self-distillation term from hidden states and lm_heads
    (no (tokens x V) logits), as :class:`FusedSDFTTrainer`'s, under SDPO's loss mask
    (``completion_mask * self_distillation_mask``: only rollouts that got a successful
    demonstration are distilled) and weighting ``(1 - distillation_weight) * policy +
    distillation_weight * distillation``.

    The policy-gradient term is TRL's formula (``_compute_policy_loss``: clipped ratio,
    ``importance_sampling_level``, ``loss_type``), mirrored in :meth:`_policy_loss` and
    checked against TRL's in float64; its per-token log-probs of the sampled tokens come
    from the hidden states too (``-fused_linear_topk_divergence`` with K = 1: one more
    pass over the vocabulary, no (tokens x V) tensor; shared with the sampled-token
    distillation when the temperatures agree). Same constructor as
    ``trl.experimental.sdpo.SDPOTrainer``; a :class:`FusedSDPOConfig` adds OPSD's options.
    """

    _config_cls = FusedSDPOConfig

    def _loss_mask(self, inputs) -> torch.Tensor:
        """SDPO's distillation mask: the completion mask of the rows with a teacher
        demonstration (``self_distillation_mask``)."""
        mask = inputs.get("self_distillation_mask")
        if mask is None:
            return inputs["completion_mask"]
        return inputs["completion_mask"] * mask.unsqueeze(1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weight = self.args.distillation_weight
        if weight == 1.0:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if return_outputs:
            raise ValueError(f"The {type(self).__name__} does not support returning outputs")
        student = self.accelerator.unwrap_model(model)
        args = (student, inputs, None)
        kwargs = dict(distill=weight != 0.0, policy=True)
        terms = route_through(model, student, self._per_token_terms, *args, **kwargs)
        per_token, student_lp, stats, policy_logps = terms
        ga = self.current_gradient_accumulation_steps if self.model.training else 1.0
        loss = self._policy_loss(inputs, policy_logps) / ga
        if weight != 0.0:
            distill = self._reduce(model, inputs, per_token, student_lp, stats)
            loss = (1 - weight) * loss + weight * distill
        return loss

    def _policy_loss(self, inputs, per_token_logps: torch.Tensor) -> torch.Tensor:
        """TRL 1.16's ``SDPOTrainer._compute_policy_loss`` given the per-token log-probs
        (B, C) of the sampled tokens at the sampling temperature (with gradient)."""
        completion_mask = inputs["completion_mask"]
        old = inputs.get("old_per_token_logps")
        old = per_token_logps.detach() if old is None else old
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        log_ratio = per_token_logps - old
        if self.importance_sampling_level == "sequence":
            log_ratio = (log_ratio * completion_mask).sum(-1, keepdim=True) / completion_mask.sum(
                -1, keepdim=True
            ).clamp(min=1.0)
        coef_1 = torch.exp(log_ratio)
        coef_2 = torch.clamp(coef_1, 1 - self.epsilon_low, 1 + self.epsilon_high)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
        masked = per_token_loss * completion_mask
        if self.loss_type == "grpo":
            loss = (masked.sum(-1) / completion_mask.sum(-1).clamp(min=1.0)).mean()
        elif self.loss_type in ("bnpo", "dapo"):
            loss = masked.sum() / completion_mask.sum().clamp(min=1.0)
        elif self.loss_type == "dr_grpo":
            loss = masked.sum() / (per_token_loss.size(0) * self.max_completion_length)
        else:
            raise ValueError(f"Unsupported loss_type: {self.loss_type}")
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["self_distillation/policy_loss"].append(
            self.accelerator.gather(loss.detach()).mean().item()
        )
        return loss


class _WithDefaults:
    """A plain ``SDFTConfig`` seen with OPSD's options at their defaults."""

    def __init__(self, args):
        self._args = args

    def __getattr__(self, name):
        if name in _OPSD_DEFAULTS:
            return getattr(self._args, name, _OPSD_DEFAULTS[name])
        return getattr(self._args, name)


def _cap_kwargs(softcap: float | None) -> dict:
    """The student's soft cap for the top-k kernel (none passed when there is none)."""
    return {} if softcap is None else {"softcap": softcap}


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _detach(x):
    return None if x is None else x.detach()
