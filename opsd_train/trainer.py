"""The training loop: rollouts, the OPSD step (or teacher-forced SFT for warm-up and the
control), AdamW with warmup + cosine schedule, gradient clipping and accumulation, metrics
to JSONL, periodic evaluation, and crash-safe checkpoints with exact resume.

One optimizer step (:meth:`Trainer.train_step`) is five named parts: :meth:`~Trainer.
collect_rows` (rollouts or SFT targets, as :class:`Row` records) -> :meth:`~Trainer.
pack_rows` (padded batches) -> :meth:`~Trainer.loss_backward` (loss and gradients, per
micro-batch) -> :meth:`~Trainer.optimizer_step` (clipping, AdamW, schedule) ->
:meth:`~Trainer.update_teacher`.

Data order is a pure function of ``(seed, step)`` (a seeded permutation per epoch), and the
checkpoint stores weights (or the adapter), optimizer, scheduler, teacher state, step, every
RNG state and the effective configuration, so a resumed run continues bit-identically on
CPU. Checkpoints are written atomically (:mod:`opsd_train.checkpoint`).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import ConfigError, check_fields, from_mapping, option, option_fields, to_dict
from .data import Problem
from .evaluate import EvalResult, evaluate_problems
from .grpo import binary_rewards, group_advantages
from .modeling import ensure_pad_token
from .prompts import PromptBuilder
from .rollout import HFGenerateEngine, SamplingParams
from .step import (
    IMPLS,
    KINDS,
    LOSS_TYPES,
    LossConfig,
    PackedBatch,
    get_body,
    get_lm_head,
    grpo_step_loss,
    opsd_loss,
    pack_batch,
    sft_loss,
)
from .teacher import TEACHER_MODES, Teacher, is_peft_model
from .topk_teacher import topk_teacher_loss

__all__ = [
    "TrainConfig",
    "Trainer",
    "Row",
    "cosine_with_warmup",
    "lr_multiplier",
    "seed_everything",
    "max_positions",
    "upgrade_keys",
]

ALGOS = ("opsd", "sft", "grpo")
OBJECTIVES = ALGOS  # the former name of the --algo choices
LR_SCHEDULES = ("constant", "linear", "cosine")
LOSS_NORMALIZATIONS = ("global", "microbatch")
EVAL_PROMPTS = ("eval", "student")


def seed_everything(seed: int) -> None:
    """Seed every generator a run draws from: Python's ``random``, numpy's global
    generator, torch's CPU generator and every CUDA device's.

    >>> seed_everything(3); a = torch.rand(2); seed_everything(3)
    >>> torch.equal(a, torch.rand(2))
    True
    """
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)  # noqa: NPY002 - the global generator is what libraries use
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        pass
    torch.manual_seed(seed)  # also seeds every CUDA device
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def upgrade_keys(d: dict, where: str = "") -> dict:
    """``d`` with the former key ``objective`` renamed ``algo`` (an error if both are
    given with different values).

    >>> upgrade_keys({"objective": "sft"})
    {'algo': 'sft'}
    """
    if "objective" not in d:
        return d
    d = dict(d)
    value = d.pop("objective")
    if "algo" in d and d["algo"] != value:
        prefix = f"{where}: " if where else ""
        raise ConfigError(
            f"{prefix}objective (the former name of algo) = {value!r} "
            f"contradicts algo = {d['algo']!r}: give algo only",
            "algo",
        )
    d.setdefault("algo", value)
    return d


@dataclass
class TrainConfig:
    """Everything that defines a run's training (defaults follow the method's v3 setup
    where it applies; the embedded demo overrides them for a tiny model).

    Each field is one ``opsd-train`` flag (``batch_size`` -> ``--batch-size``) and one
    config-file key; its doc is the flag's help; :func:`opsd_train.config.check_fields`
    checks every value (types, ranges, choices) and :meth:`__post_init__` the relations
    between them, before any data or model is loaded. ``batch_size`` prompts per optimizer
    step, each with ``rollouts_per_prompt`` sampled completions, processed in
    ``grad_accum`` micro-batches.
    """

    algo: str = option(
        "opsd",
        "training algorithm: opsd; sft (teacher-forced "
        "cross-entropy on the reference solutions); grpo (the GRPO baseline: "
        "--group-size rollouts per prompt, binary boxed-answer reward)",
        choices=ALGOS,
        group="optimisation",
        resume="fixed",
    )
    steps: int = option(100, "optimizer steps of the run", low=0, group="optimisation")
    batch_size: int = option(32, "prompts per optimizer step", low=1, group="optimisation")
    grad_accum: int = option(
        1,
        "micro-batches per step (must divide --batch-size)",
        low=1,
        group="optimisation",
        resume="free",
    )
    rollouts_per_prompt: int = option(
        1, "sampled completions per prompt", low=1, group="optimisation"
    )
    lr: float = option(
        5e-6, "AdamW peak learning rate", low=0, group="optimisation", resume="fixed"
    )
    weight_decay: float = option(
        0.0, "AdamW weight decay", low=0, group="optimisation", resume="fixed"
    )
    adam_betas: tuple[float, float] = option(
        (0.9, 0.999),
        "AdamW betas, as b1,b2",
        low=0,
        high=1,
        high_open=True,
        group="optimisation",
        resume="fixed",
        metavar="B1,B2",
    )
    warmup_steps: int = option(0, "linear learning-rate warmup steps", low=0, group="optimisation")
    min_lr_ratio: float = option(
        0.0,
        "final learning rate of the cosine decay, as a fraction of --lr",
        low=0,
        high=1,
        group="optimisation",
    )
    lr_schedule: str = option(
        "cosine",
        "after warmup: constant, linear decay or cosine "
        "decay to --min-lr-ratio over --lr-horizon steps",
        choices=LR_SCHEDULES,
        group="optimisation",
    )
    lr_horizon: int | None = option(
        None,
        "steps of the linear/cosine decay (none = "
        "--steps); a long horizon keeps the LR nearly constant "
        "over the run, as the reference's ~28k",
        low=1,
        group="optimisation",
    )
    loss_normalization: str = option(
        "global",
        "global: one token mean over the whole step; "
        "microbatch: the mean over micro-batches of each "
        "micro-batch's token mean (the reference's)",
        choices=LOSS_NORMALIZATIONS,
        group="optimisation",
    )
    max_grad_norm: float | None = option(
        1.0, "gradient clipping norm (> 0), or none", low=0, low_open=True, group="optimisation"
    )
    temperature: float = option(
        1.1, "rollout sampling temperature", low=0, low_open=True, group="rollouts"
    )
    top_p: float = option(
        0.95, "rollout nucleus sampling (1 = off)", low=0, low_open=True, high=1, group="rollouts"
    )
    top_k: int = option(20, "rollout top-k sampling (0 = off)", low=0, group="rollouts")
    max_new_tokens: int = option(1024, "maximum rollout length in tokens", low=1, group="rollouts")
    loss: str = option(
        "full",
        "full: full-vocabulary divergence; sampled_token: the paper's Eq. 9 estimator",
        choices=LOSS_TYPES,
        group="loss and teacher",
    )
    kind: str = option(
        "forward_kl",
        "divergence: KL(pT||pS), KL(pS||pT) or JSD(beta)",
        choices=KINDS,
        group="loss and teacher",
    )
    beta: float = option(0.5, "JSD mixture weight (kind jsd), in (0, 1)", group="loss and teacher")
    # beta, loss_temperature and clip are range-checked by the kernels' own option checks
    # (LossConfig -> opsd_kernels._validation.check_options), called from __post_init__
    loss_temperature: float | None = option(
        None,
        "temperature of both distributions in the loss (none = --temperature)",
        group="loss and teacher",
    )
    clip: float | None = option(
        0.05, "per-vocabulary-entry clip tau (> 0), or none", group="loss and teacher"
    )
    impl: str = option(
        "auto",
        "opsd_kernels implementation",
        choices=IMPLS,
        group="loss and teacher",
        resume="free",
    )
    chunk_size: int | None = option(
        None,
        "tokens per loss chunk (none = automatic)",
        low=1,
        group="loss and teacher",
        resume="free",
    )
    teacher: str = option(
        "fixed",
        "teacher weights: fixed (initial policy), current (the student's), ema",
        choices=TEACHER_MODES,
        group="loss and teacher",
        resume="fixed",
    )
    ema_decay: float = option(
        0.999,
        "EMA decay of the ema teacher",
        low=0,
        high=1,
        group="loss and teacher",
        resume="fixed",
    )
    teacher_topk: int | None = option(
        None,
        "give the loss the teacher's top-K log-probs "
        "only (from Trainer.topk_engine; default: computed "
        "from the local teacher), or none for the full "
        "distribution",
        low=1,
        group="top-k teacher",
        resume="fixed",
    )
    teacher_topk_tail: str = option(
        "bucket",
        "top-k teacher: bucket (the rest of the "
        "vocabulary as one outcome) or renormalize (both "
        "distributions over the K ids)",
        choices=("bucket", "renormalize"),
        group="top-k teacher",
        resume="fixed",
    )
    sft_teacher_fraction: float = option(
        0.0,
        "algo sft: share of examples shown with the teacher prompt",
        low=0,
        high=1,
        group="optimisation",
    )
    group_size: int = option(8, "algo grpo: rollouts per prompt (the group)", low=2, group="grpo")
    grpo_clip_eps: float = option(
        0.2,
        "algo grpo: ratio clip epsilon (inactive on-policy: one update per batch of rollouts)",
        low=0,
        high=1,
        high_open=True,
        group="grpo",
    )
    grpo_loss_type: str = option(
        "grpo",
        "algo grpo: grpo (mean over rollouts of each "
        "rollout's token mean) or token (one token mean)",
        choices=("grpo", "token"),
        group="grpo",
    )
    grpo_scale_rewards: str = option(
        "group",
        "algo grpo: advantage scale: group std, batch std, or none",
        choices=("group", "batch", "none"),
        group="grpo",
    )
    eval_every: int = option(
        0,
        "evaluate every N steps (0 = only at start and end)",
        low=0,
        group="evaluation and checkpoints",
        resume="free",
    )
    eval_at_start: bool = option(
        True, "evaluate before the first step", group="evaluation and checkpoints", resume="free"
    )
    eval_at_end: bool = option(
        True, "evaluate after the last step", group="evaluation and checkpoints", resume="free"
    )
    eval_k: int = option(
        0,
        "avg@k samples per problem (0 = greedy pass@1 only)",
        low=0,
        group="evaluation and checkpoints",
        resume="free",
    )
    eval_greedy: bool = option(
        True, "greedy pass@1 in evaluations", group="evaluation and checkpoints", resume="free"
    )
    eval_top_p: float = option(
        1.0,
        "avg@k nucleus sampling (1 = off)",
        low=0,
        low_open=True,
        high=1,
        group="evaluation and checkpoints",
        resume="free",
    )
    eval_top_k: int = option(
        0,
        "avg@k top-k sampling (0 = off)",
        low=0,
        group="evaluation and checkpoints",
        resume="free",
    )
    eval_prompt: str = option(
        "eval",
        "prompt of student evaluations: eval (the evaluation "
        "template, the reference's) or student (the training prompt)",
        choices=EVAL_PROMPTS,
        group="evaluation and checkpoints",
        resume="free",
    )
    eval_temperature: float | None = option(
        None,
        "avg@k sampling temperature (none = --temperature)",
        low=0,
        low_open=True,
        group="evaluation and checkpoints",
        resume="free",
    )
    eval_max_new_tokens: int | None = option(
        None,
        "evaluation completion length (none = --max-new-tokens)",
        low=1,
        group="evaluation and checkpoints",
        resume="free",
    )
    eval_batch_size: int = option(
        64,
        "prompts per evaluation generate call",
        low=1,
        group="evaluation and checkpoints",
        resume="free",
    )
    save_every: int = option(
        0,
        "checkpoint every N steps (0 = only at the end of a CLI run)",
        low=0,
        group="evaluation and checkpoints",
        resume="free",
    )
    keep_last: int | None = option(
        None,
        "keep only the newest K complete checkpoints (none = keep all)",
        low=1,
        group="evaluation and checkpoints",
        resume="free",
    )
    seed: int = option(0, "seed of data order, sampling and every generator", low=0, group="run")
    progress: bool = option(True, "progress bar", group="run", resume="free")
    autocast: str | None = option(
        None,
        "set by --precision (bf16-mixed: bf16 autocast over float32 master weights)",
        choices=("bf16", "fp16"),
        cli=False,
    )
    phase: str = option("train", "tag of metrics records", cli=False, resume="free")
    extra: dict = option(
        default_factory=dict, doc="free-form notes kept with the config", cli=False, resume="free"
    )

    def __post_init__(self):
        check_fields(self)
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be divisible by grad_accum "
                f"({self.grad_accum})",
                "grad_accum",
            )
        if not self.eval_greedy and self.eval_k == 0:
            raise ConfigError(
                "eval_k: nothing to evaluate with --no-eval-greedy and "
                "--eval-k 0 (set --eval-k > 0)",
                "eval_k",
            )
        if self.teacher_topk is not None:
            from .topk_teacher import check_topk_config

            check_topk_config(self)
        self.loss_config()  # the kernels' own option checks, before anything is loaded
        self.sampling()

    @property
    def objective(self) -> str:
        """The former name of :attr:`algo` (read-only)."""
        return self.algo

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> TrainConfig:
        """Build from a dict, rejecting unknown keys (with the closest valid key).

        >>> TrainConfig.from_dict({"stpes": 3})
        Traceback (most recent call last):
        ...
        opsd_train.config.ConfigError: unknown training config key 'stpes' (did you mean 'steps'?)

        The former key ``objective`` is read as ``algo``.
        """
        d = upgrade_keys(d, where)
        return from_mapping(cls, d, where, "training config key")

    @classmethod
    def resume_policies(cls) -> dict[str, str]:
        """``{field: "free" | "override" | "fixed"}`` (see :mod:`opsd_train.config`)."""
        return {f.name: f.metadata["resume"] for f, _ in option_fields(cls)}

    def to_dict(self) -> dict:
        """The config as a JSON-serialisable dict."""
        return to_dict(self)

    def loss_config(self) -> LossConfig:
        """The :class:`~opsd_train.step.LossConfig` this config implies."""
        t = self.temperature if self.loss_temperature is None else self.loss_temperature
        try:
            return LossConfig(
                loss=self.loss,
                kind=self.kind,
                beta=self.beta,
                temperature=t,
                clip=self.clip,
                impl=self.impl,
                chunk_size=self.chunk_size,
            )
        except (TypeError, ValueError) as e:
            # the kernels name their argument first; map it back to this config's field
            word = str(e).split(" ", 1)[0]
            key = {
                "temperature": "temperature"
                if self.loss_temperature is None
                else "loss_temperature"
            }.get(word, word)
            key = key if key in self.__dataclass_fields__ else None
            msg = str(e) if key and str(e).startswith(key) else f"{key or 'loss'}: {e}"
            raise ConfigError(msg, key) from e

    def sampling(self) -> SamplingParams:
        """Rollout sampling parameters."""
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
        )


@dataclass
class Row:
    """One sequence of a step: the prompt it is trained under and its completion.

    ``teacher_prompt`` is the teacher's context (OPSD only); ``loss_mask`` (SFT only,
    optional) marks which completion tokens count (``None``: all of them); ``advantage``
    and ``reward`` (GRPO only) are the rollout's group-normalised advantage and reward.
    """

    prompt: list[int]
    completion: list[int]
    teacher_prompt: list[int] | None = None
    loss_mask: list[bool] | None = None
    advantage: float | None = None
    reward: float | None = None

    @property
    def trained_tokens(self) -> int:
        """Completion tokens that count in the loss."""
        return len(self.completion) if self.loss_mask is None else sum(self.loss_mask)


def max_positions(model) -> int | None:
    """The model's maximum sequence length (``config.max_position_embeddings``), if any."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def cosine_with_warmup(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine to ``min_ratio``.

    >>> [round(cosine_with_warmup(s, 10, 2), 3) for s in (0, 1, 2, 6, 10)]
    [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_multiplier(
    schedule: str, step: int, horizon: int, warmup: int, min_ratio: float = 0.0
) -> float:
    """LR multiplier of ``schedule`` at ``step``: linear warmup over ``warmup`` steps, then
    ``constant`` (1), ``linear`` decay or ``cosine`` decay to ``min_ratio`` at step
    ``horizon`` (held there after it).

    >>> [round(lr_multiplier("linear", s, 10, 0), 2) for s in (0, 5, 10, 12)]
    [1.0, 0.5, 0.0, 0.0]
    >>> round(lr_multiplier("linear", 99, 28_000, 0), 4)  # the reference: ~constant
    0.9965
    >>> lr_multiplier("constant", 7, 10, 2)
    1.0
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if schedule == "cosine":
        return cosine_with_warmup(step, horizon, warmup, min_ratio)
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, horizon - warmup))
    return min_ratio + (1 - min_ratio) * (1 - progress)


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Trainer:
    """OPSD (or SFT) training of ``model`` on ``train_problems``.

    ``engine`` is any :class:`~opsd_train.rollout.RolloutEngine` (default: Hugging Face
    ``generate``). ``sft_example_fn(problem, role, rng)`` (algo ``sft`` only) may
    return ``(completion_ids, loss_mask)`` to replace the default target (the solution plus
    EOS, every token trained) for one example, or ``None`` to keep it; ``rng`` is a
    ``random.Random`` seeded from ``(seed, step)``. ``output_dir`` receives
    ``metrics.jsonl`` (appended, one JSON object per step or evaluation, tagged with
    ``phase``) and checkpoints under ``checkpoints/``. ``run_options`` are stored with
    every checkpoint's configuration next to ``config`` (the CLI stores its model, data
    and LoRA settings there).

    Rollouts draw from torch's global generator: seed it (:func:`seed_everything`) before
    building the model for a reproducible run; ``config.seed`` fixes the data order.
    """

    def __init__(
        self,
        model,
        tokenizer,
        train_problems: Sequence[Problem],
        config: TrainConfig,
        *,
        eval_problems: Sequence[Problem] | None = None,
        prompt_builder: PromptBuilder | None = None,
        engine=None,
        output_dir: str | Path | None = None,
        sft_example_fn=None,
        run_options: dict | None = None,
    ):
        if not train_problems:
            raise ValueError("the training set is empty")
        ensure_pad_token(tokenizer)
        get_lm_head(model)
        get_body(model)
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.run_options = dict(run_options or {})
        self.train_problems = list(train_problems)
        self.eval_problems = list(eval_problems or [])
        self.prompts = prompt_builder or PromptBuilder(tokenizer)
        self.device = next(model.parameters()).device
        self.max_positions = max_positions(model)
        self.pad_id = int(tokenizer.pad_token_id)
        self.eos_id = int(
            tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
        )
        self.engine = engine or HFGenerateEngine(model, self.pad_id, self.eos_id)
        self.sft_example_fn = sft_example_fn
        self.output_dir = Path(output_dir) if output_dir is not None else None
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self._cache: dict[tuple[str, int], list[int]] = {}
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(
            params, lr=config.lr, betas=config.adam_betas, weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_multiplier(
                config.lr_schedule,
                s,
                config.lr_horizon or config.steps,
                config.warmup_steps,
                config.min_lr_ratio,
            ),
        )
        # --teacher-topk: the engine giving the teacher's top-k log-probs (None: the local
        # teacher, opsd_train.topk_teacher.LocalTopKTeacher)
        self.topk_engine = None
        self.teacher = (
            Teacher(model, config.teacher, config.ema_decay) if config.algo == "opsd" else None
        )
        self.step = 0
        self.last_saved_step: int | None = None  # step of the newest checkpoint written/read
        self._perm_cache: dict[int, list[int]] = {}
        self.history: list[dict] = []
        self.generated_tokens_total = 0  # rollout tokens sampled by training so far

    # ------------------------------------------------------------------ data
    def _check_length(self, ids: list[int], budget: int, what: str) -> None:
        if self.max_positions is not None and len(ids) + budget > self.max_positions:
            raise ValueError(
                f"{what}: {len(ids)} prompt tokens + {budget} new tokens exceed the model's "
                f"maximum of {self.max_positions} positions (max_position_embeddings); "
                "shorten the problem, lower --max-new-tokens, or let the CLI drop such "
                "problems (--long-prompts drop)"
            )

    def _ids(self, role: str, i: int, problems=None) -> list[int]:
        problems = self.train_problems if problems is None else problems
        key = (role + ("" if problems is self.train_problems else f"@{id(problems)}"), i)
        if key not in self._cache:
            p = problems[i]
            if role == "student":
                ids = self.prompts.student_ids(p)
            elif role == "teacher":
                ids = self.prompts.teacher_ids(p)
            else:
                ids = list(self.tokenizer(p.solution, add_special_tokens=False)["input_ids"])
                ids.append(self.eos_id)
            if role in ("student", "teacher") and self.config.algo in ("opsd", "grpo"):
                self._check_length(
                    ids, self.config.max_new_tokens, f"training problem {i}, {role} prompt"
                )
            self._cache[key] = ids
        return self._cache[key]

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            self._perm_cache = {
                epoch: torch.randperm(len(self.train_problems), generator=g).tolist()
            }
        return self._perm_cache[epoch]

    def batch_indices(self, step: int) -> list[int]:
        """Training-problem indices used at ``step`` (deterministic in seed and step)."""
        n, bs = len(self.train_problems), self.config.batch_size
        out = []
        for g in range(step * bs, (step + 1) * bs):
            out.append(self._perm(g // n)[g % n])
        return out

    # ------------------------------------------------------------------ one step
    def _micro_slices(self, n: int) -> list[slice]:
        k = self.config.grad_accum
        size = math.ceil(n / k)
        return [slice(s, min(n, s + size)) for s in range(0, n, size)]

    def _autocast(self):
        if self.config.autocast is None:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.autocast == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def collect_rows(self, idx: Sequence[int]) -> list[Row]:
        """The step's rows: student rollouts for OPSD and GRPO (one micro-batch of prompts
        per ``generate`` call; GRPO adds binary rewards and group advantages), or
        reference-solution targets for SFT."""
        cfg = self.config
        if cfg.algo in ("opsd", "grpo"):
            s_prompts = [self._ids("student", i) for i in idx]
            comps: list[list[int]] = []
            per_micro = cfg.batch_size // cfg.grad_accum
            reps = cfg.rollouts_per_prompt if cfg.algo == "opsd" else cfg.group_size
            with self._autocast():
                for s in range(0, len(s_prompts), per_micro):
                    comps += self.engine.generate(
                        s_prompts[s : s + per_micro], cfg.sampling(), reps
                    )
            if cfg.algo == "opsd":
                return [
                    Row(
                        s_prompts[j // reps],
                        comps[j],
                        teacher_prompt=self._ids("teacher", idx[j // reps]),
                    )
                    for j in range(len(comps))
                ]
            texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in comps]
            answers = [self.train_problems[idx[j // reps]].answer for j in range(len(comps))]
            rewards = torch.tensor(binary_rewards(texts, answers), dtype=torch.float32)
            adv = group_advantages(rewards, reps, scale=cfg.grpo_scale_rewards).tolist()
            return [
                Row(s_prompts[j // reps], comps[j], advantage=adv[j], reward=float(rewards[j]))
                for j in range(len(comps))
            ]
        g = random.Random(cfg.seed * 7_919 + self.step)
        rows = []
        for i in idx:
            role = "teacher" if g.random() < cfg.sft_teacher_fraction else "student"
            target, keep = self._ids("solution", i), None
            if self.sft_example_fn is not None:
                custom = self.sft_example_fn(self.train_problems[i], role, g)
                if custom is not None:
                    target, keep = custom
            prompt = self._ids(role, i)
            self._check_length(prompt, len(target), f"training problem {i}, {role} SFT example")
            rows.append(Row(prompt, target, loss_mask=keep))
        return rows

    def pack_rows(self, rows: Sequence[Row]) -> tuple[PackedBatch, PackedBatch | None]:
        """Right-padded student batch (with each row's loss mask applied) and, for OPSD,
        the teacher batch over the same completions."""
        comps = [r.completion for r in rows]
        student = pack_batch([r.prompt for r in rows], comps, self.pad_id)
        for j, r in enumerate(rows):
            if r.loss_mask is not None:
                student.mask[j, : len(r.loss_mask)] &= torch.as_tensor(
                    r.loss_mask, dtype=torch.bool
                )
        teacher = None
        if rows[0].teacher_prompt is not None:
            teacher = pack_batch([r.teacher_prompt for r in rows], comps, self.pad_id)
        return student, teacher

    def loss_normalizers(self, rows: Sequence[Row], total_tokens: int) -> list[tuple]:
        """``(slice, normalizer)`` of every micro-batch with at least one trained token:
        each micro-batch's summed loss is divided by its normalizer, and the divided losses
        are added (gradient accumulation).

        ``loss_normalization="global"``: the step's ``total_tokens`` for every
        micro-batch, i.e. one token mean over the whole step. ``"microbatch"``: the
        micro-batch's own token count times the number of micro-batches, i.e. the mean of
        the micro-batches' token means (the reference's, with 4 rollouts per GPU
        micro-batch); the two agree when every micro-batch holds the same number of
        tokens. GRPO with ``grpo_loss_type="grpo"`` counts rollouts instead of tokens (its
        loss is a mean over rollouts of per-rollout token means).
        """
        cfg = self.config
        per_rollout = cfg.algo == "grpo" and cfg.grpo_loss_type == "grpo"
        slices = [
            sl
            for sl in self._micro_slices(len(rows))
            if any(r.trained_tokens > 0 for r in rows[sl])
        ]
        out = []
        for sl in slices:
            if cfg.loss_normalization == "global":
                norm = len(rows) if per_rollout else total_tokens
            else:
                own = len(rows[sl]) if per_rollout else sum(r.trained_tokens for r in rows[sl])
                norm = own * len(slices)
            out.append((sl, float(norm)))
        return out

    def loss_backward(self, rows: Sequence[Row], total_tokens: int) -> dict:
        """Forward, loss and backward of every micro-batch (gradients accumulate; each
        micro-batch's loss is divided by its :meth:`loss_normalizers` value). Returns the
        summed ``loss``, ``div_sum`` and ``forward_tokens``."""
        cfg = self.config
        out = {"loss": 0.0, "div_sum": 0.0, "forward_tokens": 0}
        if total_tokens <= 0:
            return out
        lcfg = cfg.loss_config()
        ctx = None
        if self.teacher is not None and self.teacher.mode != "current":
            ctx = self.teacher.weights
        for sl, norm in self.loss_normalizers(rows, total_tokens):
            part = [r for r in rows[sl] if len(r.completion) > 0]
            sb, tb = self.pack_rows(part)
            out["forward_tokens"] += int(sb.attention_mask.sum())
            with self._autocast():
                if tb is not None:
                    out["forward_tokens"] += int(tb.attention_mask.sum())
                    if cfg.teacher_topk is not None:  # opsd_train.topk_teacher
                        loss, st = topk_teacher_loss(
                            self, sb.to(self.device), tb.to(self.device), lcfg, ctx, norm
                        )
                    else:
                        loss, st = opsd_loss(
                            self.model,
                            sb.to(self.device),
                            tb.to(self.device),
                            lcfg,
                            teacher_ctx=ctx,
                            normalizer=norm,
                        )
                elif cfg.algo == "grpo":
                    adv = torch.tensor([r.advantage for r in part], dtype=torch.float32)
                    loss, st = grpo_step_loss(
                        self.model,
                        sb.to(self.device),
                        adv,
                        temperature=cfg.temperature,
                        clip_eps=cfg.grpo_clip_eps,
                        loss_type=cfg.grpo_loss_type,
                        normalizer=norm,
                    )
                else:
                    loss, st = sft_loss(self.model, sb.to(self.device), normalizer=norm)
            loss.backward()
            out["loss"] += float(loss.detach())
            out["div_sum"] += st["div_sum"]
        return out

    def optimizer_step(self) -> tuple[float, float]:
        """Clip (``max_grad_norm``), step AdamW and the schedule, clear the gradients.
        Returns ``(gradient norm before clipping, learning rate used)``."""
        cfg = self.config
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if cfg.max_grad_norm is not None:
            gn = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        else:
            norms = [p.grad.norm() for p in params if p.grad is not None]
            # no gradient at all (e.g. every completion empty): the norm is 0
            gn = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return gn, lr

    def update_teacher(self) -> None:
        """After the optimizer step: the EMA teacher follows the student."""
        if self.teacher is not None:
            self.teacher.update(self.model)

    def train_step(self) -> dict:
        """One optimizer step; returns its metrics (also appended to ``history``)."""
        idx = self.batch_indices(self.step)
        self.model.train()
        t0 = time.perf_counter()
        rows = self.collect_rows(idx)
        sampled = self.config.algo in ("opsd", "grpo")
        t_roll = time.perf_counter() - t0 if sampled else 0.0
        generated = sum(len(r.completion) for r in rows) if sampled else 0
        self.generated_tokens_total += generated
        total_tokens = sum(r.trained_tokens for r in rows)
        res = self.loss_backward(rows, total_tokens)
        gn, lr = self.optimizer_step()
        self.update_teacher()
        self.step += 1
        dt = time.perf_counter() - t0
        rec = {
            "event": "step",
            "phase": self.config.phase,
            "step": self.step,
            "loss": res["loss"],
            "divergence": res["div_sum"] / max(total_tokens, 1),
            "completion_tokens": total_tokens,
            "rollout_len": total_tokens / max(len(rows), 1),
            "generated_tokens": generated,
            "generated_tokens_total": self.generated_tokens_total,
            "forward_tokens": res["forward_tokens"],
            "tokens_per_s": res["forward_tokens"] / dt if dt > 0 else None,
            "time_s": dt,
            "rollout_time_s": t_roll,
            "lr": lr,
            "grad_norm": gn,
            "peak_mem_gb": _peak_memory_gb(self.device),
        }
        if self.config.algo == "grpo":
            rec["reward_mean"] = sum(r.reward for r in rows) / max(len(rows), 1)
        self._log(rec)
        return rec

    # ------------------------------------------------------------------ evaluation
    def evaluate(
        self,
        problems: Sequence[Problem] | None = None,
        *,
        role: str = "student",
        k: int | None = None,
    ) -> EvalResult:
        """Held-out accuracy: greedy pass@1 (``eval_greedy``) and/or avg@k (``k`` > 0) with
        the evaluation sampling settings (``eval_temperature``, ``eval_top_p``,
        ``eval_top_k``, ``eval_max_new_tokens``), never the rollouts'.

        ``role="student"`` uses the evaluation prompt (``eval_prompt="eval"``: the
        reference's separate template) or the training prompt (``"student"``);
        ``role="teacher"`` scores the teacher prompt (reference solution in context) with the
        teacher's weights. Sampling uses a forked RNG seeded from ``(seed, step)``, so
        evaluation never perturbs the training randomness.
        """
        cfg = self.config
        problems = self.eval_problems if problems is None else list(problems)
        if not problems:
            raise ValueError("no evaluation problems")
        if role not in ("student", "teacher"):
            raise ValueError("role must be 'student' or 'teacher'")
        if role == "teacher":
            build = self.prompts.teacher_ids
        else:
            build = self.prompts.eval_ids if cfg.eval_prompt == "eval" else self.prompts.student_ids
        max_new = cfg.eval_max_new_tokens or cfg.max_new_tokens
        prompts = [build(p) for p in problems]
        for i, ids in enumerate(prompts):
            self._check_length(ids, max_new, f"evaluation problem {i}, {role} prompt")
        k = cfg.eval_k if k is None else k

        def gen(batch, sampling):
            return self.engine.generate(batch, sampling, 1)

        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.seed * 104_729 + self.step)
            run = lambda: evaluate_problems(
                gen,
                lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
                prompts,
                [p.answer for p in problems],
                k=k,
                temperature=cfg.eval_temperature or cfg.temperature,
                top_p=cfg.eval_top_p,
                top_k=cfg.eval_top_k,
                max_new_tokens=max_new,
                greedy=cfg.eval_greedy,
                batch_size=cfg.eval_batch_size,
            )
            if role == "teacher" and self.teacher is not None:
                with self.teacher.weights(self.model):
                    res = run()
            else:
                res = run()
        rec = {
            "event": "eval",
            "phase": cfg.phase,
            "step": self.step,
            "role": role,
            "train_generated_tokens": self.generated_tokens_total,
            "score": res.score,
            "score_name": res.score_name,
            **res.to_dict(),
        }
        self._log(rec)
        return res

    # ------------------------------------------------------------------ loop
    def train(self) -> list[dict]:
        """Run until ``config.steps``, evaluating and checkpointing as configured."""
        cfg = self.config
        evals = []
        if self.eval_problems and cfg.eval_at_start and self.step == 0:
            evals.append(self.evaluate())
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc=cfg.phase, leave=False)
        while self.step < cfg.steps:
            rec = self.train_step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", len=f"{rec['rollout_len']:.0f}")
            if (
                self.eval_problems
                and cfg.eval_every
                and self.step % cfg.eval_every == 0
                and self.step < cfg.steps
            ):
                evals.append(self.evaluate())
            if cfg.save_every and self.output_dir is not None and self.step % cfg.save_every == 0:
                self.save_checkpoint(self.checkpoint_dir / f"step_{self.step}")
        if bar is not None:
            bar.close()
        if self.eval_problems and cfg.eval_at_end:
            evals.append(self.evaluate())
        return evals

    # ------------------------------------------------------------------ logging
    def _log(self, rec: dict) -> None:
        self.history.append(rec)
        if self.output_dir is not None:
            path = self.output_dir / "metrics.jsonl"
            try:
                with path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
            except OSError as e:
                raise ckpt.CheckpointWriteError.wrap(e, f"cannot append to {path}") from e

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        """``output_dir / "checkpoints"`` (needs an ``output_dir``)."""
        if self.output_dir is None:
            raise ValueError("the trainer has no output_dir")
        return self.output_dir / "checkpoints"

    def effective_config(self) -> dict:
        """What a checkpoint stores as the run's configuration: ``run_options`` plus every
        :class:`TrainConfig` field."""
        return {**self.run_options, **self.config.to_dict()}

    def _model_state(self) -> dict:
        if is_peft_model(self.model):
            return {
                n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad
            }
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def save_checkpoint(self, path: str | Path) -> Path:
        """Save everything needed for an exact resume into folder ``path``, atomically
        (:func:`opsd_train.checkpoint.write_checkpoint`). With ``keep_last``, older
        complete checkpoints beside it are deleted afterwards."""
        path = Path(path)
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        try:
            import numpy as np

            rng["numpy"] = np.random.get_state()  # noqa: NPY002
        except ImportError:  # pragma: no cover
            pass
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {
            "format": "opsd_train.checkpoint.v2",
            "step": self.step,
            "peft": is_peft_model(self.model),
            "model": self._model_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
            "rng": rng,
            "counters": {"generated_tokens_total": self.generated_tokens_total},
        }
        ckpt.write_checkpoint(path, state, self.effective_config(), self.step)
        self.last_saved_step = self.step
        if self.config.keep_last:
            ckpt.prune_checkpoints(path.parent, self.config.keep_last)
        return path

    def load_checkpoint(self, path: str | Path, *, allow_changes: Iterable[str] = ()) -> None:
        """Restore a :meth:`save_checkpoint` folder (weights or adapter, optimizer,
        scheduler, teacher, step and RNG states).

        The stored configuration must match this trainer's (:class:`TrainConfig` fields
        whose resume policy is not ``"free"``); ``allow_changes`` names fields allowed to
        differ (policy ``"override"`` only), e.g. ``("steps",)`` to extend a run. A torn
        or corrupted checkpoint raises
        :class:`~opsd_train.checkpoint.IncompleteCheckpointError` naming the file. Records
        after the checkpoint's step are dropped from ``metrics.jsonl``, so the continued
        run logs no duplicates.
        """
        path = Path(path)
        stored = ckpt.read_checkpoint_config(path)
        ckpt.check_resume_config(
            stored,
            self.config.to_dict(),
            TrainConfig.resume_policies(),
            allow_changes,
            where=f"checkpoint {path}",
        )
        state = ckpt.load_checkpoint_state(path)
        peft = is_peft_model(self.model)
        if state.get("peft", peft) != peft:
            kinds = {True: "a LoRA adapter", False: "full-model weights"}
            raise ckpt.CheckpointError(
                f"checkpoint {path} holds {kinds[state['peft']]} but this run trains "
                f"{kinds[peft]}: resume with the same --lora setting"
            )
        with torch.no_grad():
            if peft:
                params = dict(self.model.named_parameters())
                missing = sorted(set(state["model"]) - set(params))
                if missing:
                    raise ckpt.CheckpointError(
                        f"checkpoint {path} has parameters this model lacks: {missing[:5]}"
                    )
                for n, t in state["model"].items():
                    params[n].copy_(t)
            else:
                self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.teacher is not None and state["teacher"] is not None:
            self.teacher.load_state_dict(state["teacher"])
        self.step = self.last_saved_step = int(state["step"])
        self.generated_tokens_total = int(
            state.get("counters", {}).get("generated_tokens_total", 0)
        )
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if "numpy" in state["rng"]:
            import numpy as np

            np.random.set_state(state["rng"]["numpy"])  # noqa: NPY002
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if self.output_dir is not None:
            dropped = ckpt.truncate_metrics(
                self.output_dir / "metrics.jsonl", self.config.phase, self.step
            )
            if dropped:
                warnings.warn(
                    f"dropped {dropped} metrics record(s) logged after step "
                    f"{self.step} from {self.output_dir / 'metrics.jsonl'}",
                    stacklevel=2,
                )
