"""The GRPO baseline: binary rewards, group-normalised advantages and the policy-gradient
loss from hidden states, without forming full logits.

The objective (what this module computes). A prompt ``x`` gets a group of ``G`` rollouts
``y_1..y_G`` sampled from the current policy; ``r_i`` is 1 when the last ``\\boxed{}`` of
``y_i`` matches the reference answer, else 0 (:func:`binary_rewards`).

    A_i  = (r_i - mean_j r_j) / (std_j r_j + 1e-4)     std with Bessel's correction
    rho  = exp(log p(y_it) - log p_old(y_it))           per token
    l_it = -min(rho * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i)
    L    = 1/N * sum_i 1/|y_i| * sum_t l_it             (``loss_type="grpo"``)

with ``log p`` the log-softmax of ``logits / temperature`` (the sampling temperature), ``N``
the number of rollouts and no KL term. This is TRL's ``GRPOTrainer`` (checked against TRL
1.16.0's advantage code) as the OPSD reference's ``run_grpo.sh`` configures it:
``loss_type=grpo``, ``scale_rewards=group``, ``beta=0`` (no reference model, no KL), one
gradient step per batch of rollouts. In that on-policy case ``p_old`` is the current
policy detached, so ``rho = 1``, the clip is inactive and

    grad L = -1/N * sum_i A_i / |y_i| * sum_t grad log p(y_it)

(:func:`policy_gradient_loss` with ``old_logprobs=None``). Pass the sampler's log-probs
as ``old_logprobs`` for the clipped ratio when rollouts are reused. ``loss_type="token"``
divides by the number of tokens of the whole batch instead (TRL's ``bnpo``/DAPO-style).

Log-probabilities come from the final hidden states and the lm_head through
:func:`completion_logprobs`: the project's top-k kernel with ``K = 1`` (the sampled token,
teacher log-prob 0, so the per-token loss is exactly ``-log p(y)``) when available, else a
chunked float32 loop here; neither forms the ``(tokens x V)`` logits.

>>> import torch
>>> group_advantages(torch.tensor([1., 0., 0., 1., 1., 1.]), group_size=3)
tensor([ 1.1545, -0.5773, -0.5773,  0.0000,  0.0000,  0.0000])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .evaluate import is_correct

__all__ = [
    "ADVANTAGE_SCALES",
    "LOSS_TYPES",
    "binary_rewards",
    "group_advantages",
    "completion_logprobs",
    "policy_gradient_loss",
    "grpo_loss",
]

ADVANTAGE_SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "token")
LOGPROB_IMPLS = ("auto", "kernel", "chunked")
STD_EPS = 1e-4  # TRL's constant


def binary_rewards(completions: Sequence[str], answers: Sequence[str]) -> list[float]:
    """1.0 where the last ``\\boxed{}`` of a completion matches its answer, else 0.0.

    >>> binary_rewards([r"\\boxed{4}", "4", r"\\boxed{\\frac{8}{2}}"], ["4", "4", "4"])
    [1.0, 0.0, 1.0]
    """
    if len(completions) != len(answers):
        raise ValueError(
            f"completions and answers differ in length ({len(completions)} vs {len(answers)})"
        )
    return [1.0 if is_correct(c, a) else 0.0 for c, a in zip(completions, answers, strict=True)]


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = STD_EPS
) -> torch.Tensor:
    """Advantages ``(r - group mean) / (std + eps)`` of ``(N,)`` rewards laid out as
    ``N / group_size`` consecutive groups (the rollouts of one prompt are adjacent).

    ``scale="group"``: each group's standard deviation (Bessel-corrected, as TRL);
    ``"batch"``: the whole batch's; ``"none"``: no division (Dr. GRPO). A group whose
    rewards are all equal gets advantage 0 (no signal); so does a group of one.
    Returns a float tensor of the rewards' float dtype (float32 for integer rewards).
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError("rewards must be a 1-D tensor (N,) of per-rollout rewards")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")
    if rewards.numel() == 0 or rewards.numel() % group_size:
        raise ValueError(
            f"the number of rewards ({rewards.numel()}) must be a positive "
            f"multiple of group_size ({group_size})"
        )
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    r = rewards if rewards.is_floating_point() else rewards.float()
    groups = r.view(-1, group_size)
    centred = (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return centred
    if scale == "group":
        if group_size == 1:
            return torch.zeros_like(r)
        std = groups.std(dim=1, correction=1).repeat_interleave(group_size)
    else:
        if r.numel() == 1:
            return torch.zeros_like(r)
        std = r.std(correction=1).expand_as(r)
    return centred / (std + eps)


# ---------------------------------------------------------------------------------------
# log p(y_t) from hidden states
# ---------------------------------------------------------------------------------------


def _topk_kernel():
    try:
        from opsd_kernels.topk import fused_linear_topk_divergence
    except ImportError:
        return None
    return fused_linear_topk_divergence


def _chunk_logprobs(h, w, b, y, temperature):
    # float32 logits (float64 when an input is float64) for this chunk only
    dt = torch.float64 if torch.float64 in (h.dtype, w.dtype) else torch.float32
    logits = F.linear(h.to(dt), w.to(dt), None if b is None else b.to(dt)) / temperature
    return logits.gather(-1, y.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def completion_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    impl: str = "auto",
    chunk_size: int = 1024,
) -> torch.Tensor:
    """``log softmax(hidden @ weight.T + bias) / temperature)[token]`` per position, with
    gradients to ``hidden``, ``weight`` and ``bias``, never forming full logits.

    Shapes: ``hidden`` ``(..., H)``, ``weight`` ``(V, H)``, ``tokens`` and ``mask``
    ``(...)``. Masked positions (``mask`` False) return 0 and get no gradient; their hidden
    states are zeroed before any GEMM. The result is float32 (float64 for float64 inputs).

    ``impl``: ``"kernel"`` is :func:`opsd_kernels.topk.fused_linear_topk_divergence` with
    ``K = 1`` (the token, log-prob 0, forward KL, bucket tail: exactly ``-log p``);
    ``"chunked"`` recomputes ``chunk_size`` rows of float32 logits at a time in backward
    (16-bit weights are upcast per chunk); ``"auto"`` takes the kernel when it is importable.

    >>> h, w = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
    >>> y = torch.randint(0, 11, (2, 3))
    >>> ref = torch.log_softmax(h @ w.T, -1).gather(-1, y[..., None])[..., 0]
    >>> torch.allclose(completion_logprobs(h, w, y, impl="chunked", chunk_size=4), ref)
    True
    """
    if impl not in LOGPROB_IMPLS:
        raise ValueError(f"impl must be one of {LOGPROB_IMPLS}, got {impl!r}")
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden (..., H) and weight (V, H) do not fit: {tuple(hidden.shape)} "
            f"vs {tuple(weight.shape)}"
        )
    if tokens.shape != hidden.shape[:-1]:
        raise ValueError(
            f"tokens must have shape {tuple(hidden.shape[:-1])} (hidden without "
            f"its last dimension), got {tuple(tokens.shape)}"
        )
    if mask is not None and mask.shape != tokens.shape:
        raise ValueError(
            f"mask must have the shape of tokens {tuple(tokens.shape)}, got {tuple(mask.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    kernel = _topk_kernel() if impl in ("auto", "kernel") else None
    if impl == "kernel" and kernel is None:
        raise ImportError("impl='kernel' needs opsd_kernels.topk.fused_linear_topk_divergence")
    out_dtype = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    if kernel is not None:
        nll = kernel(
            hidden,
            weight,
            tokens.unsqueeze(-1),
            torch.zeros(*tokens.shape, 1, dtype=out_dtype, device=hidden.device),
            bias=bias,
            kind="forward_kl",
            tail="bucket",
            temperature=temperature,
            mask=mask,
            reduction="none",
        )
        lp = -nll.to(out_dtype)
        return lp if mask is None else torch.where(mask, lp, torch.zeros_like(lp))
    h = hidden.reshape(-1, hidden.shape[-1])
    y = tokens.reshape(-1)
    keep = None
    if mask is not None:
        keep = mask.reshape(-1)
        # masked rows never enter a GEMM with real values (0 * NaN = NaN)
        h = torch.where(keep.unsqueeze(-1), h, torch.zeros((), dtype=h.dtype, device=h.device))
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    outs = []
    for s in range(0, h.shape[0], chunk_size):
        args = (h[s : s + chunk_size], weight, bias, y[s : s + chunk_size], temperature)
        outs.append(
            checkpoint(_chunk_logprobs, *args, use_reentrant=False)
            if grad
            else _chunk_logprobs(*args)
        )
    lp = torch.cat(outs) if outs else h.new_zeros(0, dtype=out_dtype)
    if keep is not None:
        lp = torch.where(keep, lp, torch.zeros_like(lp))
    return lp.to(out_dtype).view(tokens.shape)


# ---------------------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------------------


def policy_gradient_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logprobs: torch.Tensor | None = None,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    loss_type: str = "grpo",
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """The clipped policy-gradient loss of the module docstring from per-token log-probs.

    ``logprobs``, ``mask``, ``old_logprobs``: ``(B, T)`` (rollout, position); ``advantages``:
    ``(B,)``. ``old_logprobs=None`` is the on-policy case (``p_old`` = ``logprobs``
    detached, ratio 1). ``clip_eps_high`` defaults to ``clip_eps``.

    ``loss_type="grpo"``: sum over rollouts of each rollout's token mean, divided by
    ``normalizer`` (default ``B``); ``"token"``: sum over all tokens divided by
    ``normalizer`` (default: this call's token count). Pass the whole batch's count as
    ``normalizer`` when accumulating micro-batches, so the sum of the micro-batch losses is
    the batch loss. An empty rollout counts in ``B`` and adds 0.

    >>> lp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    >>> m = torch.tensor([[True, True], [True, False]])
    >>> loss = policy_gradient_loss(lp, torch.tensor([1.0, -1.0]), m)
    >>> loss.backward(); lp.grad
    tensor([[-0.2500, -0.2500],
            [ 0.5000,  0.0000]])
    """
    if logprobs.dim() != 2 or mask.shape != logprobs.shape:
        raise ValueError(
            f"logprobs and mask must both be (B, T), got {tuple(logprobs.shape)} "
            f"and {tuple(mask.shape)}"
        )
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(
            f"advantages must be (B,) = ({logprobs.shape[0]},), got {tuple(advantages.shape)}"
        )
    if old_logprobs is not None and old_logprobs.shape != logprobs.shape:
        raise ValueError(
            f"old_logprobs must have the shape of logprobs "
            f"{tuple(logprobs.shape)}, got {tuple(old_logprobs.shape)}"
        )
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if not (0 <= clip_eps < 1 and eps_high >= 0):
        raise ValueError(
            f"clip_eps must be in [0, 1) and clip_eps_high >= 0, got {clip_eps}, {eps_high}"
        )
    mask = mask.bool()
    old = logprobs.detach() if old_logprobs is None else old_logprobs.to(logprobs.dtype)
    # masked entries may hold anything (padding): keep them out of exp()
    log_ratio = torch.where(mask, logprobs - old, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    adv = advantages.to(logprobs.dtype).unsqueeze(1)
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + eps_high) * adv)
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    if loss_type == "grpo":
        lengths = mask.sum(dim=1).clamp(min=1).to(per_token.dtype)
        total = (per_token.sum(dim=1) / lengths).sum()
        norm = logprobs.shape[0] if normalizer is None else normalizer
    else:
        total = per_token.sum()
        norm = mask.sum().clamp(min=1).to(per_token.dtype) if normalizer is None else normalizer
    return total / norm


def grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    old_logprobs: torch.Tensor | None = None,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    loss_type: str = "grpo",
    normalizer: float | torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """:func:`policy_gradient_loss` of :func:`completion_logprobs`: the GRPO loss of one
    micro-batch from the completion hidden states ``(B, T, H)`` (row ``t`` predicts
    ``tokens[:, t]``, as :func:`opsd_train.step.gather_completion_states` lays them out),
    the lm_head ``weight`` ``(V, H)``, ``tokens``/``mask`` ``(B, T)`` and ``advantages``
    ``(B,)``. ``temperature`` should be the sampling temperature.

    >>> h = torch.randn(2, 3, 8, requires_grad=True)
    >>> w = torch.randn(11, 8)
    >>> y, m = torch.randint(0, 11, (2, 3)), torch.ones(2, 3, dtype=torch.bool)
    >>> loss = grpo_loss(h, w, y, torch.tensor([1.0, -1.0]), m, impl="chunked")
    >>> loss.backward(); h.grad.shape
    torch.Size([2, 3, 8])
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, H), got {tuple(hidden.shape)}")
    lp = completion_logprobs(
        hidden, weight, tokens, mask=mask.bool(), bias=bias, temperature=temperature, impl=impl
    )
    return policy_gradient_loss(
        lp,
        advantages,
        mask,
        old_logprobs=old_logprobs,
        clip_eps=clip_eps,
        clip_eps_high=clip_eps_high,
        loss_type=loss_type,
        normalizer=normalizer,
    )
