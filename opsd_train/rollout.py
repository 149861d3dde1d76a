"""Rollout engines: how the student samples completions.

An engine is anything with ``generate(prompts, params, num_return_sequences=1)`` returning
completion token lists (prompt-major order: all samples of prompt 0, then prompt 1, ...).
Each completion ends with its EOS token when one was produced, and holds no padding.
:class:`HFGenerateEngine` wraps Hugging Face ``generate``; a faster engine (vLLM, SGLang)
only has to implement the same method, plus :meth:`sync_weights` if it keeps its own copy
of the weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

import torch

__all__ = ["SamplingParams", "RolloutEngine", "HFGenerateEngine", "trim_completion"]


@dataclass
class SamplingParams:
    """Sampling settings (``top_k=0`` and ``top_p=1.0`` disable those filters)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    do_sample: bool = True

    def __post_init__(self):
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.max_new_tokens < 1:
            raise ValueError("top_k must be >= 0 and max_new_tokens >= 1")

    @classmethod
    def coerce(cls, params: SamplingParams | dict) -> SamplingParams:
        """Accept either an instance or a dict of its fields."""
        return params if isinstance(params, cls) else cls(**params)

    def to_dict(self) -> dict:
        """The fields as a dict."""
        return asdict(self)


@runtime_checkable
class RolloutEngine(Protocol):
    """The interface the trainer needs from a sampler."""

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | dict,
        num_return_sequences: int = 1,
    ) -> list[list[int]]:
        """Sample completions for token-id prompts."""
        ...


def trim_completion(tokens: Sequence[int], eos_ids: Sequence[int], pad_id: int | None) -> list[int]:
    """Cut a generated row after its first EOS (kept) and drop padding.

    >>> trim_completion([5, 6, 2, 0, 0], eos_ids=[2], pad_id=0)
    [5, 6, 2]
    >>> trim_completion([5, 6, 7], eos_ids=[2], pad_id=0)
    [5, 6, 7]
    """
    out: list[int] = []
    eos = set(eos_ids)
    for t in tokens:
        t = int(t)
        if t in eos:
            out.append(t)
            break
        if pad_id is not None and t == pad_id and pad_id not in eos:
            break
        out.append(t)
    return out


class HFGenerateEngine:
    """Sample with ``model.generate`` (left padding, KV cache, EOS stop).

    The model is put in eval mode while sampling and restored afterwards; randomness comes
    from torch's global generator, so a seeded run (and a resumed one) is reproducible.
    """

    def __init__(self, model, pad_token_id: int, eos_token_id: int | Sequence[int]):
        if pad_token_id is None:
            raise ValueError("HFGenerateEngine needs a pad token id")
        self.model = model
        self.pad_token_id = int(pad_token_id)
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        if not eos:
            raise ValueError("HFGenerateEngine needs at least one EOS token id")
        self.eos_token_ids = [int(e) for e in eos]

    def sync_weights(self, model) -> None:
        """Point the engine at ``model`` (shares weights; nothing is copied)."""
        self.model = model

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | dict,
        num_return_sequences: int = 1,
    ) -> list[list[int]]:
        """Sample ``num_return_sequences`` completions per prompt (prompt-major order)."""
        params = SamplingParams.coerce(params)
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt")
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            attn[i, width - len(p) :] = 1
        kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_ids,
            num_return_sequences=num_return_sequences,
            use_cache=True,
        )
        if params.do_sample:
            kwargs.update(
                do_sample=True,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
            )
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(
                input_ids=ids.to(device), attention_mask=attn.to(device), **kwargs
            )
        finally:
            self.model.train(was_training)
        gen = out[:, width:].tolist()
        return [trim_completion(row, self.eos_token_ids, self.pad_token_id) for row in gen]
