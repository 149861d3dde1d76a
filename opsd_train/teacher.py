"""Teacher weights: ``fixed`` (initial policy), ``current`` (the student's own weights) or
``ema`` (an exponential moving average of the student).

The teacher is never a second module in the autograd graph; its forward always runs under
``torch.no_grad``. Memory costs:

* ``current``: none.
* ``fixed`` with LoRA: none (the adapter is disabled while the teacher runs).
* ``fixed`` without LoRA, and ``ema``: one copy of the *trainable* parameters (the whole
  model for full fine-tuning, only the adapter with LoRA), swapped into the model for the
  teacher forward and swapped back afterwards (pointer swaps, no extra copy).

EMA update after each optimizer step: ``ema <- decay * ema + (1 - decay) * param``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["TEACHER_MODES", "Teacher", "is_peft_model"]

TEACHER_MODES = ("fixed", "current", "ema")


def is_peft_model(model) -> bool:
    """Whether ``model`` is a ``peft`` model (has ``disable_adapter`` and ``peft_config``)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class Teacher:
    """Provides the teacher's weights for the teacher forward pass.

    Use :meth:`weights` as a context manager around the teacher forward; it yields the
    teacher's lm_head ``(weight, bias)`` to pass to the loss when they differ from the
    student's (``(None, None)`` when shared). Call :meth:`update` after each optimizer step.
    """

    def __init__(self, model, mode: str = "fixed", ema_decay: float = 0.999):
        if mode not in TEACHER_MODES:
            raise ValueError(f"teacher mode must be one of {TEACHER_MODES}, got {mode!r}")
        if mode == "ema" and not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {ema_decay}")
        self.mode = mode
        self.ema_decay = float(ema_decay)
        self.use_adapter_toggle = mode == "fixed" and is_peft_model(model)
        self.shadow: dict[str, torch.Tensor] = {}
        if mode == "ema" or (mode == "fixed" and not self.use_adapter_toggle):
            with torch.no_grad():
                self.shadow = {
                    n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
                }

    def _head_override(self, model) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.shadow:
            return None, None
        head = model.get_output_embeddings()
        w_name = b_name = None
        for n, p in model.named_parameters():
            if p is head.weight:
                w_name = n
            if getattr(head, "bias", None) is not None and p is head.bias:
                b_name = n
        if w_name not in self.shadow and b_name not in self.shadow:
            return None, None
        w = self.shadow.get(w_name, head.weight.detach())
        b = getattr(head, "bias", None)
        b = self.shadow.get(b_name, b.detach() if b is not None else None)
        return w, b

    @contextlib.contextmanager
    def weights(self, model) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Context in which ``model`` computes as the teacher; yields the lm_head override."""
        if self.mode == "current":
            yield None, None
            return
        if self.use_adapter_toggle:
            with model.disable_adapter():
                yield None, None
            return
        params = dict(model.named_parameters())
        # The shadow tensors of the lm_head (if trainable) are the teacher's head; they are
        # the same tensor objects before and after the swap, so they stay valid afterwards.
        head_w, head_b = self._head_override(model)
        swapped = []
        try:
            with torch.no_grad():
                for n, t in self.shadow.items():
                    p = params[n]
                    p.data, self.shadow[n] = t, p.data
                    swapped.append(n)
            yield head_w, head_b
        finally:
            with torch.no_grad():
                for n in swapped:
                    p = params[n]
                    p.data, self.shadow[n] = self.shadow[n], p.data

    @torch.no_grad()
    def update(self, model) -> None:
        """After an optimizer step: EMA update (``ema`` mode); no-op otherwise."""
        if self.mode != "ema":
            return
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach(), 1.0 - self.ema_decay)

    def state_dict(self) -> dict:
        """Teacher state for checkpoints (the shadow tensors, mode and decay)."""
        return {"mode": self.mode, "ema_decay": self.ema_decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` (mode must match)."""
        if state["mode"] != self.mode:
            raise ValueError(f"checkpoint teacher mode {state['mode']!r} != {self.mode!r}")
        self.ema_decay = state["ema_decay"]
        with torch.no_grad():
            for n, t in state["shadow"].items():
                if n not in self.shadow:
                    raise ValueError(f"checkpoint teacher has unknown parameter {n!r}")
                self.shadow[n].copy_(t)
