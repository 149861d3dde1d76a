"""``--preset`` and ``--eval-preset``: the paper's runs and evaluation protocol as option
values.

A preset is a dict of option values (keys: :class:`~opsd_train.cli.RunConfig` and
:class:`~opsd_train.recipes.TrainConfig` field names). :func:`apply_presets` puts them
*under* the options given explicitly (flags or config-file keys), so any flag overrides a
preset value; the effective values are what the run folder's ``config.json`` records.

The ``qwen3-*`` presets follow the method's v3 training setup and the reference scripts
(see ``method.md``): LoRA r64/alpha 128, lr 5e-6, 32 prompts per step with one rollout
each, rollouts at T 1.1 / top-p 0.95 / top-k 20 up to 1,024 tokens, forward KL with the
per-entry clip tau 0.05 (0.06 for 8B) at the sampling temperature, the fixed initial
policy as teacher, max grad norm 0.1, a linear LR decay over 28,000 steps (the reference's
horizon: the LR stays within 0.4 % of its peak over the 100 steps), the loss as the mean of
micro-batch token means with 4 rollouts per micro-batch (``grad_accum`` 8 on one device),
100 steps, student prompt non-thinking and teacher/eval prompts thinking, and the ``paper``
evaluation (T 1.0, top-p 0.95, no top-k, 38,912 new tokens, avg@12, no greedy pass).

>>> apply_presets({"preset": "qwen3-8b", "clip": 0.1})["clip"]  # a flag wins
0.1
>>> apply_presets({"preset": "qwen3-8b"})["clip"]
0.06
>>> apply_presets({"eval_preset": "paper"})["eval_k"]
12
"""

from __future__ import annotations

from .config import ConfigError
from .evaluate import EVAL_PRESETS

__all__ = ["PRESETS", "EVAL_PRESET_OPTIONS", "apply_presets", "preset_names"]

_PAPER_RUN = dict(
    algo="opsd",
    lora=True,
    lora_r=64,
    lora_alpha=128,
    gradient_checkpointing=True,
    steps=100,
    batch_size=32,
    grad_accum=8,  # 4 rollouts per micro-batch, as the reference on each GPU
    rollouts_per_prompt=1,
    lr=5e-6,
    weight_decay=0.0,
    warmup_steps=0,
    lr_schedule="linear",
    lr_horizon=28_000,
    min_lr_ratio=0.0,
    max_grad_norm=0.1,
    loss_normalization="microbatch",
    temperature=1.1,
    top_p=0.95,
    top_k=20,
    max_new_tokens=1024,
    loss="full",
    kind="forward_kl",
    loss_temperature=None,  # = temperature (1.1), as the reference
    clip=0.05,
    teacher="fixed",
    student_thinking=False,
    teacher_thinking=True,
    eval_thinking=True,
    eval_prompt="eval",
    eval_preset="paper",
)

PRESETS: dict[str, dict] = {
    "qwen3-1.7b": {**_PAPER_RUN, "model": "Qwen/Qwen3-1.7B"},
    "qwen3-4b": {**_PAPER_RUN, "model": "Qwen/Qwen3-4B"},
    "qwen3-8b": {**_PAPER_RUN, "model": "Qwen/Qwen3-8B", "clip": 0.06},
}


# the evaluation presets of opsd_train.evaluate as options: temperature -> eval_temperature
EVAL_PRESET_OPTIONS = {
    name: {f"eval_{k}": v for k, v in s.as_kwargs().items()} for name, s in EVAL_PRESETS.items()
}


def preset_names() -> tuple[str, ...]:
    """The ``--preset`` choices."""
    return tuple(PRESETS)


def apply_presets(options: dict) -> dict:
    """``options`` (the explicitly given values) over the values of its ``preset`` and
    ``eval_preset`` (the run preset may name an evaluation preset; an explicit
    ``eval_preset`` wins). Unknown names raise :class:`~opsd_train.config.ConfigError`."""
    out = dict(options)
    name = options.get("preset")
    if name is not None:
        if name not in PRESETS:
            raise ConfigError(f"preset: must be one of {list(PRESETS)}, got {name!r}", "preset")
        out = {**PRESETS[name], **out}
    ev = out.get("eval_preset")
    if ev is not None:
        if ev not in EVAL_PRESET_OPTIONS:
            raise ConfigError(
                f"eval_preset: must be one of {list(EVAL_PRESET_OPTIONS)}, got {ev!r}",
                "eval_preset",
            )
        out = {**EVAL_PRESET_OPTIONS[ev], **out}
    return out
