"""The algorithms as TRL trainers: one :class:`TrainConfig` (one field, one ``opsd-train``
flag) is translated into the config of the TRL trainer that runs it.

* ``opsd`` -> :data:`OPSDTrainer`, this project's ``FusedSDFTTrainer`` (TRL's
  ``SDFTTrainer``, the loss from hidden states through the fused kernels): the student
  samples on-policy from the student prompt; the teacher is the same model given the
  reference solution. Both prompts are rendered by :class:`~opsd_train.prompts.
  PromptBuilder` (per-role thinking flags), the student's as ``prompt``, the teacher's as
  ``privileged_context``, which :class:`RenderedTeacherPrompt` uses as is.
* ``grpo`` -> ``trl.GRPOTrainer``: binary boxed-answer reward
  (:func:`boxed_answer_reward`), ``loss_type="grpo"``, ``beta=0`` (no KL term).
* ``sft`` -> ``trl.SFTTrainer`` on pre-tokenised (prompt + solution) rows with a
  ``completion_mask`` (only completion tokens are trained).

Every trainer is wrapped in :class:`RecipeMixin`: crash-safe checkpoints
(:mod:`opsd_train.checkpoint`), the ``--lr-horizon`` schedule, and the run folder's
``metrics.jsonl`` with ``step`` / ``eval`` records (:class:`RunLog`).
:func:`trl_field_table` prints which TRL field each flag sets.
"""

from __future__ import annotations

import functools
import json
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from . import checkpoint as ckpt
from .config import ConfigError, check_fields, from_mapping, option, option_fields, to_dict
from .data import Problem
from .evaluate import EvalResult, answers_match, evaluate_problems, extract_boxed, hf_generate
from .prompts import PromptBuilder

with warnings.catch_warnings():  # TRL's "experimental" notice
    warnings.simplefilter("ignore")
    from trl.experimental.sdft.sdft_trainer import DemonstrationTeacherContextBuilder

    from opsd_kernels.integrations.trl_sdft import FusedSDFTConfig as OPSDConfig
    from opsd_kernels.integrations.trl_sdft import FusedSDFTTrainer as OPSDTrainer
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

__all__ = [
    "TrainConfig",
    "build_trainer",
    "trl_field_table",
    "boxed_answer_reward",
    "seed_everything",
    "RunLog",
    "RecipeMixin",
    "OPSDTrainer",
    "OPSDConfig",
]

ALGOS = ("opsd", "sft", "grpo")
KINDS = ("forward_kl", "reverse_kl", "jsd")
NORMALIZATIONS = ("token", "microbatch", "sequence")
CLIP_MODES = ("entry", "token", "entry_keep")
SCHEDULES = ("constant", "linear", "cosine")
EVAL_PROMPTS = ("eval", "student")
_OPT, _ROLL, _LOSS, _GRPO, _EVAL, _RUN, _MEM = (
    functools.partial(option, group=g)
    for g in ("optimisation", "rollouts", "loss and teacher", "grpo",
              "evaluation and checkpoints", "run", "memory and speed")
)  # fmt: skip


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy and torch (every device), as transformers'
    ``set_seed`` does.

    >>> seed_everything(3); a = torch.rand(2); seed_everything(3)
    >>> torch.equal(a, torch.rand(2))
    True
    """
    from transformers import set_seed

    set_seed(seed)


@dataclass
class TrainConfig:
    """Everything that defines a run's training. Each field is one ``opsd-train`` flag
    (``batch_size`` -> ``--batch-size``) and one config-file key; ``trl`` in its metadata
    names the TRL field it sets. Values are checked at construction, before anything is
    loaded. ``batch_size`` prompts per optimizer step, each with ``rollouts_per_prompt``
    (GRPO: ``group_size``) completions, in ``grad_accum`` micro-batches."""

    algo: str = _OPT("opsd", "training algorithm: opsd, sft or grpo", choices=ALGOS)
    steps: int = _OPT(100, "optimizer steps", low=1, trl="max_steps")
    batch_size: int = _OPT(
        32,
        "prompts per step",
        low=1,
        trl="per_device_train_batch_size x gradient_accumulation_steps",
    )
    grad_accum: int = _OPT(1, "micro-batches per step", low=1, trl="gradient_accumulation_steps")
    rollouts_per_prompt: int = _OPT(1, "opsd: completions per prompt", low=1, trl="num_generations")
    lr: float = _OPT(5e-6, "AdamW peak learning rate", low=0, trl="learning_rate")
    weight_decay: float = _OPT(0.0, "AdamW weight decay", low=0, trl="weight_decay")
    adam_betas: tuple[float, float] = _OPT(
        (0.9, 0.999),
        "AdamW betas b1,b2",
        low=0,
        high=1,
        high_open=True,
        trl="adam_beta1, adam_beta2",
    )
    warmup_steps: int = _OPT(0, "linear learning-rate warmup steps", low=0, trl="warmup_steps")
    lr_schedule: str = _OPT("cosine", "after warmup", choices=SCHEDULES, trl="lr_scheduler_type")
    min_lr_ratio: float = _OPT(
        0.0, "cosine: final LR / --lr", low=0, high=1, trl="lr_scheduler_kwargs.min_lr_rate"
    )
    lr_horizon: int | None = _OPT(
        None, "decay steps (none: --steps; the reference's ~28k keeps the LR near its peak)",
        low=1, trl="(ours: create_scheduler)",
    )  # fmt: skip
    max_grad_norm: float | None = _OPT(
        1.0, "gradient clipping norm, or none", low=0, low_open=True, trl="max_grad_norm"
    )
    temperature: float = _ROLL(1.1, "sampling temperature", low=0, low_open=True, trl="temperature")
    top_p: float = _ROLL(
        0.95, "nucleus sampling (1 = off)", low=0, low_open=True, high=1, trl="top_p"
    )
    top_k: int = _ROLL(20, "top-k sampling (0 = off)", low=0, trl="top_k")
    max_new_tokens: int = _ROLL(1024, "rollout length", low=1, trl="max_completion_length")
    use_vllm: bool = _ROLL(False, "vLLM rollouts (untested here)", trl="use_vllm, vllm_mode")
    loss: str = _LOSS(
        "full", "opsd: full (full-vocabulary divergence) or sampled_token (the paper's per-token "
        "reverse-KL estimator)", choices=("full", "sampled_token"),
        trl="distillation_mode (full_logits / sampled_token)",
    )  # fmt: skip
    kind: str = _LOSS(
        "forward_kl", "divergence", choices=KINDS, trl="distillation_alpha (0 / 1 / --beta)"
    )
    beta: float = _LOSS(
        0.5, "jsd mixture weight", low=0, high=1, low_open=True, high_open=True,
        trl="distillation_alpha",
    )  # fmt: skip
    loss_temperature: float | None = _LOSS(
        None, "loss temperature (none: --temperature)", low=0, low_open=True, trl="loss_temperature"
    )
    clip: float | None = _LOSS(
        0.05,
        "per-vocabulary-entry clip tau, or none",
        low=0,
        low_open=True,
        trl="distillation_clip",
    )
    clip_mode: str = _LOSS(
        "entry", "entry (the method's), token or entry_keep", choices=CLIP_MODES,
        trl="distillation_clip_mode",
    )  # fmt: skip
    loss_normalization: str = _LOSS(
        "token", "token (one token mean over the step, exact under gradient accumulation), "
        "microbatch (each micro-batch's token mean: the reference's) or sequence (TRL's)",
        choices=NORMALIZATIONS, trl="distillation_normalization",
    )  # fmt: skip
    teacher: str = _LOSS(
        "fixed", "teacher weights: the initial policy, the student's or an EMA",
        choices=("fixed", "current", "ema"), trl="teacher_model_kind (base / live / ema)",
    )  # fmt: skip
    ema_decay: float = _LOSS(
        0.999, "ema teacher decay", low=0, high=1, trl="teacher_update_rate = 1 - decay"
    )
    teacher_topk: int | None = _LOSS(
        None, "the loss sees the teacher's top-K tokens only (none: all)", low=1,
        trl="distillation_mode=topk_logits, distillation_topk, teacher_topk, distillation_add_tail",
    )  # fmt: skip
    sft_teacher_fraction: float = _OPT(0.0, "sft: share of teacher-prompt rows", low=0, high=1)
    group_size: int = _GRPO(8, "grpo: rollouts per prompt", low=2, trl="num_generations")
    grpo_clip_eps: float = _GRPO(
        0.2, "grpo: ratio clip", low=0, high=1, high_open=True, trl="epsilon"
    )
    grpo_scale_rewards: str = _GRPO(
        "group", "grpo: advantage scale", choices=("group", "batch", "none"), trl="scale_rewards"
    )
    eval_every: int = _EVAL(0, "evaluate every N steps (0: start and end only)", low=0)
    eval_at_start: bool = _EVAL(True, "evaluate before the first step")
    eval_at_end: bool = _EVAL(True, "evaluate after the last step")
    eval_k: int = _EVAL(0, "avg@k samples per problem (0: greedy pass@1 only)", low=0)
    eval_greedy: bool = _EVAL(True, "greedy pass@1 in evaluations")
    eval_temperature: float | None = _EVAL(
        None, "avg@k temperature (none: --temperature)", low=0, low_open=True
    )
    eval_top_p: float = _EVAL(1.0, "avg@k nucleus sampling", low=0, low_open=True, high=1)
    eval_top_k: int = _EVAL(0, "avg@k top-k sampling (0 = off)", low=0)
    eval_max_new_tokens: int | None = _EVAL(None, "length (none: --max-new-tokens)", low=1)
    eval_prompt: str = _EVAL("eval", "eval template or training prompt", choices=EVAL_PROMPTS)
    eval_batch_size: int = _EVAL(64, "prompts per evaluation generate call", low=1)
    save_every: int = _EVAL(0, "checkpoint every N steps (0: at the end)", low=0, trl="save_steps")
    keep_last: int | None = _EVAL(None, "keep the newest K checkpoints (none: all)", low=1)
    seed: int = _RUN(0, "seed of data order, sampling and every generator", low=0, trl="seed")
    progress: bool = _RUN(True, "progress bar (on a terminal only)", trl="disable_tqdm")
    gradient_checkpointing: bool = _MEM(
        False, "recompute activations in the backward", trl="activation_checkpointing"
    )
    bf16: bool = _MEM(False, "bf16 autocast (CUDA)", trl="bf16")
    phase: str = option("train", "tag of metrics records", cli=False)

    def __post_init__(self):
        check_fields(self)
        per_step = self.batch_size * self.completions_per_prompt
        sampled = self.loss == "sampled_token"
        for bad, key, msg in (
            (per_step % self.grad_accum, "grad_accum",
             f"{self.grad_accum} must divide the completions per step ({per_step})"),
            (not self.eval_greedy and not self.eval_k, "eval_k",
             "nothing to evaluate with --no-eval-greedy and eval_k 0"),
            (self.lr_schedule != "cosine" and self.min_lr_ratio, "min_lr_ratio",
             "only the cosine schedule has one"),
            (self.teacher_topk and self.loss != "full", "teacher_topk", "needs --loss full"),
            (sampled and self.kind != "reverse_kl", "kind",
             "--loss sampled_token is a reverse-KL estimator (TRL's): pass --kind reverse_kl"),
            (sampled and self.clip is not None, "clip",
             "--loss sampled_token has no vocabulary entries to clip: pass --clip none"),
        ):  # fmt: skip
            if bad:
                raise ConfigError(f"{key}: {msg}", key)

    @property
    def completions_per_prompt(self) -> int:
        return {"grpo": self.group_size, "opsd": self.rollouts_per_prompt}.get(self.algo, 1)

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> TrainConfig:
        """Build from a dict, naming unknown keys (with a suggestion)."""
        return from_mapping(cls, d, where)

    def to_dict(self) -> dict:
        return to_dict(self)


def trl_field_table() -> str:
    """The Markdown table of every flag and the TRL field it sets (the README's).

    >>> "| `--steps` | `max_steps` |" in trl_field_table()
    True
    """
    rows = ["| flag | TRL / transformers field |", "|---|---|"]
    for f, _ in option_fields(TrainConfig):
        if f.metadata.get("cli") and f.metadata.get("trl"):
            rows.append(f"| `--{f.name.replace('_', '-')}` | `{f.metadata['trl']}` |")
    return "\n".join(rows)


def boxed_answer_reward(completions, answer, **_) -> list[float]:
    """GRPO's reward: 1.0 when the completion's last ``\\boxed{}`` matches the answer.

    >>> boxed_answer_reward(["so \\\\boxed{4}", "\\\\boxed{5}", "4"], ["4", "4", "4"])
    [1.0, 0.0, 0.0]
    """
    out = []
    for text, ref in zip(completions, answer, strict=True):
        if not isinstance(text, str):  # conversational completions
            text = text[-1]["content"]
        pred = extract_boxed(text)
        out.append(float(pred is not None and answers_match(pred, ref)))
    return out


# ---------------------------------------------------------------------------------------
# the run log and evaluation
# ---------------------------------------------------------------------------------------


class RunLog(TrainerCallback):
    """Writes the run folder's ``metrics.jsonl``: one ``step`` record per optimizer step
    (``loss``, ``lr``, ``grad_norm``, ``generated_tokens`` and their running total, and every
    trainer metric, e.g. the fused trainer's clip statistics) and one ``eval`` record per
    held-out evaluation (warnings about the clip are written as ``warning`` records by
    :meth:`RecipeMixin.train`). Evaluations run at step 0 (``eval_at_start``), every
    ``eval_every`` steps and at the end."""

    def __init__(self, path: Path, tc: TrainConfig, evaluate, log=print):
        self.path, self.tc, self.evaluate, self.log = Path(path), tc, evaluate, log
        self.generated_total = 0  # a resumed run continues the total of its records
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("event") == "step" and rec.get("phase") == tc.phase:
                    self.generated_total = rec["generated_tokens_total"]
        self.last_eval_step = None
        self.history: list[dict] = []
        self._t0 = time.perf_counter()

    def write(self, rec: dict) -> None:
        rec = {"event": rec.pop("event"), "phase": self.tc.phase, **rec}
        self.history.append(rec)
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    def _eval(self, step: int) -> None:
        if self.last_eval_step == step or self.evaluate is None:  # no held-out problems
            return
        self.last_eval_step = step
        res: EvalResult = self.evaluate(step)
        self.write(
            dict(
                event="eval",
                role="student",
                step=step,
                score=res.score,
                score_name=res.score_name,
                train_generated_tokens=self.generated_total,
                **res.to_dict(),
            )
        )
        self.log(
            f"[opsd-train] {self.tc.phase} step {step}: held-out {res.score_name} "
            f"{res.score:.3f} (n={res.n})"
        )

    def on_train_begin(self, args, state, control, **kw):
        if self.tc.eval_at_start and state.global_step == 0:
            self._eval(0)

    def on_log(self, args, state, control, logs=None, **kw):
        logs = dict(logs or {})
        if "loss" not in logs:
            return
        mean_len = logs.get("completions/mean_length")
        tokens = 0
        if mean_len is not None:
            tokens = round(mean_len * self.tc.batch_size * self.tc.completions_per_prompt)
        self.generated_total += tokens
        rec = dict(
            event="step",
            step=state.global_step,
            generated_tokens=tokens,
            generated_tokens_total=self.generated_total,
            time_s=round(time.perf_counter() - self._t0, 3),
        )
        rec.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
        self.write(rec)

    def on_step_end(self, args, state, control, **kw):
        every = self.tc.eval_every
        if every and state.global_step % every == 0:
            self._eval(state.global_step)

    def on_train_end(self, args, state, control, **kw):
        if self.tc.eval_at_end:
            self._eval(state.global_step)


def make_evaluator(model, tokenizer, prompts: PromptBuilder, problems: Sequence[Problem],
                   tc: TrainConfig, role: str = "student"):  # fmt: skip
    """``evaluate(step) -> EvalResult`` on ``problems``: the evaluation prompt (or the
    student's, ``eval_prompt="student"``; the teacher's for ``role="teacher"``) and the
    ``eval_*`` sampling settings, in a forked RNG seeded from ``(seed, step)`` so that
    evaluating never changes the training's random draws."""
    if role == "teacher":
        build = prompts.teacher_ids
    else:
        build = prompts.eval_ids if tc.eval_prompt == "eval" else prompts.student_ids
    ids = [build(p) for p in problems]
    answers = [p.answer for p in problems]

    def evaluate(step: int) -> EvalResult:
        m = model() if callable(model) and not isinstance(model, torch.nn.Module) else model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(tc.seed * 104_729 + step)
            return evaluate_problems(
                hf_generate(m, tokenizer),
                lambda c: tokenizer.decode(c, skip_special_tokens=True),
                ids,
                answers,
                k=tc.eval_k,
                temperature=tc.eval_temperature or tc.temperature,
                top_p=tc.eval_top_p,
                top_k=tc.eval_top_k,
                max_new_tokens=tc.eval_max_new_tokens or tc.max_new_tokens,
                greedy=tc.eval_greedy,
                batch_size=tc.eval_batch_size,
            )

    return evaluate


# ---------------------------------------------------------------------------------------
# the trainers
# ---------------------------------------------------------------------------------------


class RenderedTeacherPrompt(DemonstrationTeacherContextBuilder):
    """The teacher prompt is the row's ``privileged_context`` as is: the full prompt
    :class:`~opsd_train.prompts.PromptBuilder` rendered with the teacher's template and
    thinking flag (TRL's builder formats one ``teacher_prompt_template`` around the
    student prompt, with one set of chat-template arguments for both roles). Overrides the
    private ``_compose_teacher_prompt`` (pinned in :data:`PRIVATE_TRL_API`, tested)."""

    def _compose_teacher_prompt(self, prompt, privileged_context):
        return privileged_context


# TRL private names the recipe relies on (class, method, parameters); a test checks them
PRIVATE_TRL_API = [
    (
        DemonstrationTeacherContextBuilder,
        "_compose_teacher_prompt",
        ("self", "prompt", "privileged_context"),
    )
]


class RecipeMixin:
    """What the recipe adds to every TRL trainer: crash-safe checkpoints (written to a
    temporary folder with a completion marker, then renamed to ``checkpoints/step_N``),
    ``keep_last`` rotation and the ``lr_horizon`` schedule."""

    recipe_horizon: int | None = None
    recipe_keep_last: int | None = None
    recipe_checkpoints: Path | None = None

    def train(self, *args, **kwargs):
        """``Trainer.train``; warnings about the clip (the fused trainer's, once per run)
        also go to the run log: printed and written to ``metrics.jsonl`` as ``warning``
        records."""
        runlog, show = getattr(self, "runlog", None), warnings.showwarning

        def forward(message, category, filename, lineno, file=None, line=None):
            if runlog is not None and "clip" in str(message):
                runlog.write(
                    dict(event="warning", step=self.state.global_step, message=str(message))
                )
                runlog.log(f"[opsd-train] warning: {message}")
            show(message, category, filename, lineno, file, line)

        warnings.showwarning = forward
        try:
            return super().train(*args, **kwargs)
        finally:
            warnings.showwarning = show

    def create_scheduler(self, num_training_steps, optimizer=None):
        return super().create_scheduler(self.recipe_horizon or num_training_steps, optimizer)

    def _save_checkpoint(self, model, trial):  # pinned in checkpoint.PRIVATE_TRAINER_API
        root = self.recipe_checkpoints or Path(self.args.output_dir) / "checkpoints"
        step = self.state.global_step
        with ckpt.atomic_checkpoint(root, step, self.args.should_save) as tmp:
            real = self.args.output_dir
            self.args.output_dir = str(tmp)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir = real
        if self.recipe_keep_last and self.args.should_save:
            ckpt.prune_checkpoints(root, self.recipe_keep_last)


def _common_args(tc: TrainConfig, out: Path, per_device: int) -> dict:
    schedule = dict(constant="constant_with_warmup", linear="linear", cosine="cosine_with_min_lr")
    return dict(
        output_dir=str(out), max_steps=tc.steps, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=tc.grad_accum, learning_rate=tc.lr,
        weight_decay=tc.weight_decay, adam_beta1=tc.adam_betas[0], adam_beta2=tc.adam_betas[1],
        warmup_steps=tc.warmup_steps, lr_scheduler_type=schedule[tc.lr_schedule],
        lr_scheduler_kwargs={"min_lr_rate": tc.min_lr_ratio} if tc.lr_schedule == "cosine" else {},
        max_grad_norm=tc.max_grad_norm or 0.0, seed=tc.seed, data_seed=tc.seed, logging_steps=1,
        report_to="none", save_strategy="steps" if tc.save_every else "no",
        save_steps=tc.save_every or 1, disable_tqdm=not (tc.progress and sys.stdout.isatty()),
        activation_checkpointing=tc.gradient_checkpointing, bf16=tc.bf16,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
    )  # fmt: skip


def _opsd_args(tc: TrainConfig, out: Path):
    per_step = tc.batch_size * tc.rollouts_per_prompt
    alpha = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": tc.beta}[tc.kind]
    kw = _common_args(tc, out, per_step // tc.grad_accum)
    mode = "full_logits" if tc.loss == "full" else "sampled_token"
    kw.update(
        num_generations=tc.rollouts_per_prompt, max_completion_length=tc.max_new_tokens,
        max_prompt_length=None, temperature=tc.temperature, top_p=tc.top_p, top_k=tc.top_k,
        distillation_mode="topk_logits" if tc.teacher_topk else mode,
        distillation_topk=tc.teacher_topk, teacher_topk=tc.teacher_topk is not None,
        distillation_add_tail=True, distillation_clip=tc.clip,
        distillation_clip_mode=tc.clip_mode, distillation_normalization=tc.loss_normalization,
        loss_temperature=tc.loss_temperature, distillation_alpha=alpha,
        distillation_is_clip=None,  # on-policy, one update per batch of rollouts
        teacher_model_kind={"fixed": "base", "current": "live", "ema": "ema"}[tc.teacher],
        teacher_update_rate=1.0 - tc.ema_decay, use_vllm=tc.use_vllm, vllm_mode="colocate",
    )  # fmt: skip
    return OPSDConfig(**kw)


def _grpo_args(tc: TrainConfig, out: Path):
    kw = _common_args(tc, out, tc.batch_size * tc.group_size // tc.grad_accum)
    kw.update(
        num_generations=tc.group_size, max_completion_length=tc.max_new_tokens,
        temperature=tc.temperature, top_p=tc.top_p, top_k=tc.top_k, loss_type="grpo", beta=0.0,
        epsilon=tc.grpo_clip_eps, scale_rewards=tc.grpo_scale_rewards, use_vllm=tc.use_vllm,
        vllm_mode="colocate", log_completions=False,
    )  # fmt: skip
    return GRPOConfig(**kw)


def _sft_args(tc: TrainConfig, out: Path):
    kw = _common_args(tc, out, tc.batch_size // tc.grad_accum)
    kw.update(max_length=None, completion_only_loss=True, packing=False)
    return SFTConfig(**kw)


def sft_rows(
    problems: Sequence[Problem], prompts: PromptBuilder, tc: TrainConfig, example_fn=None
) -> list[dict]:
    """Pre-tokenised SFT rows ``{input_ids, completion_mask}``: the student prompt (the
    teacher prompt for a seeded ``sft_teacher_fraction`` of them), then the reference
    solution and EOS. ``example_fn(problem, role, rng)`` may return ``(completion_ids,
    keep_mask)`` instead (the demo's departing teacher examples)."""
    import random

    rng = random.Random(tc.seed)
    tok = prompts.tokenizer
    rows = []
    for p in problems:
        role = "teacher" if rng.random() < tc.sft_teacher_fraction else "student"
        prompt = prompts.teacher_ids(p) if role == "teacher" else prompts.student_ids(p)
        custom = example_fn(p, role, rng) if example_fn else None
        if custom is None:
            comp = tok(p.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            keep = [1] * len(comp)
        else:
            comp, keep = custom[0], [int(k) for k in custom[1]]
        rows.append({"input_ids": prompt + comp, "completion_mask": [0] * len(prompt) + keep})
    return rows


def build_trainer(
    model, tokenizer, train: Sequence[Problem], tc: TrainConfig, out: str | Path,
    prompts: PromptBuilder, *, held_out: Sequence[Problem] = (), peft_config=None,
    example_fn=None, log=print, metrics_path=None,
):  # fmt: skip
    """The TRL trainer of ``tc.algo`` for ``model`` on ``train``, with the run log
    (``metrics_path``, default ``out/metrics.jsonl``) and held-out evaluation attached.

    Returns the trainer; ``trainer.runlog`` is its :class:`RunLog`. Example (the tiny
    model, two SFT steps)::

        trainer = build_trainer(model, tok, problems, TrainConfig(algo="sft", steps=2), "run", pb)
        trainer.train()
    """
    from datasets import Dataset

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not (tc.progress and sys.stdout.isatty()):  # no carriage-return bars in a log file
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    extra = {}
    if tc.algo == "sft":
        base, args, rows = SFTTrainer, _sft_args(tc, out), sft_rows(train, prompts, tc, example_fn)
    elif tc.algo == "grpo":
        base, args, extra["reward_funcs"] = GRPOTrainer, _grpo_args(tc, out), boxed_answer_reward
        rows = [{"prompt": prompts.student_prompt(p), "answer": p.answer} for p in train]
    else:
        base, args = OPSDTrainer, _opsd_args(tc, out)
        rows = [dict(prompt=prompts.student_prompt(p), privileged_context=prompts.teacher_prompt(p))
                for p in train]  # fmt: skip
    runlog = RunLog(Path(metrics_path or out / "metrics.jsonl"), tc, evaluate=None, log=log)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(padding_side|loss_type|is_clip).*")
        trainer = type(f"Recipe{base.__name__}", (RecipeMixin, base), {})(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[runlog],
            **extra,
        )
    if tc.algo == "opsd":
        trainer.teacher_context_builder = RenderedTeacherPrompt(trainer)
    trainer.recipe_horizon = tc.lr_horizon
    trainer.recipe_keep_last = tc.keep_last
    trainer.recipe_checkpoints = out / "checkpoints"
    if held_out:
        runlog.evaluate = make_evaluator(lambda: trainer.model, tokenizer, prompts, held_out, tc)
    trainer.runlog = runlog
    return trainer
