"""The training loop: rollouts, the OPSD step (or teacher-forced SFT for warm-up and the
control), AdamW with warmup + cosine schedule, gradient clipping and accumulation, metrics
to JSONL, periodic evaluation, and checkpoints with exact resume.

Data order is a pure function of ``(seed, step)`` (a seeded permutation per epoch), and the
checkpoint stores weights (or the adapter), optimizer, scheduler, teacher state, step and
every RNG state, so a resumed run continues bit-identically on CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from .data import Problem
from .evaluate import EvalResult, evaluate_problems
from .modeling import ensure_pad_token
from .prompts import PromptBuilder
from .rollout import HFGenerateEngine, SamplingParams
from .step import LossConfig, get_body, get_lm_head, opsd_loss, pack_batch, sft_loss
from .teacher import TEACHER_MODES, Teacher, is_peft_model

__all__ = ["TrainConfig", "Trainer", "cosine_with_warmup"]

OBJECTIVES = ("opsd", "sft")


@dataclass
class TrainConfig:
    """Everything that defines a run (defaults follow the method's v3 setup where it
    applies; the embedded demo overrides them for a tiny model).

    ``batch_size`` prompts per optimizer step, each with ``rollouts_per_prompt`` sampled
    completions, processed in ``grad_accum`` micro-batches (``batch_size`` must be divisible
    by ``grad_accum``). ``loss_temperature=None`` uses the sampling ``temperature``.
    ``sft_teacher_fraction`` (objective ``sft`` only) is the share of examples formatted with
    the teacher prompt (reference solution in context) instead of the student prompt.
    ``autocast="bf16"`` runs the forward passes under ``torch.autocast`` in bfloat16 (mixed
    precision with float32 master weights; the loss itself runs outside autocast).
    """

    objective: str = "opsd"
    steps: int = 100
    batch_size: int = 32
    grad_accum: int = 1
    rollouts_per_prompt: int = 1
    lr: float = 5e-6
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    temperature: float = 1.1
    top_p: float = 0.95
    top_k: int = 20
    max_new_tokens: int = 1024
    loss: str = "full"
    kind: str = "forward_kl"
    beta: float = 0.5
    loss_temperature: float | None = None
    clip: float | None = 0.05
    impl: str = "auto"
    chunk_size: int | None = None
    teacher: str = "fixed"
    ema_decay: float = 0.999
    sft_teacher_fraction: float = 0.0
    eval_every: int = 0
    eval_at_start: bool = True
    eval_at_end: bool = True
    eval_k: int = 0
    eval_temperature: float | None = None
    eval_max_new_tokens: int | None = None
    eval_batch_size: int = 64
    save_every: int = 0
    autocast: str | None = None
    seed: int = 0
    progress: bool = True
    phase: str = "train"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.teacher not in TEACHER_MODES:
            raise ValueError(f"teacher must be one of {TEACHER_MODES}, got {self.teacher!r}")
        if self.steps < 0 or self.batch_size < 1 or self.rollouts_per_prompt < 1:
            raise ValueError("steps must be >= 0, batch_size and rollouts_per_prompt >= 1")
        if self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by grad_accum "
                f"({self.grad_accum})"
            )
        if self.autocast not in (None, "bf16", "fp16"):
            raise ValueError(f"autocast must be None, 'bf16' or 'fp16', got {self.autocast!r}")
        if not 0.0 <= self.sft_teacher_fraction <= 1.0:
            raise ValueError("sft_teacher_fraction must be in [0, 1]")
        self.adam_betas = tuple(self.adam_betas)
        self.loss_config()  # validates loss settings
        self.sampling()

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Build from a dict, rejecting unknown keys with a clear message."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training config keys: {unknown}")
        return cls(**d)

    def to_dict(self) -> dict:
        """The config as a JSON-serialisable dict."""
        return asdict(self)

    def loss_config(self) -> LossConfig:
        """The :class:`~opsd_train.step.LossConfig` this config implies."""
        t = self.temperature if self.loss_temperature is None else self.loss_temperature
        return LossConfig(loss=self.loss, kind=self.kind, beta=self.beta, temperature=t,
                          clip=self.clip, impl=self.impl, chunk_size=self.chunk_size)

    def sampling(self) -> SamplingParams:
        """Rollout sampling parameters."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, max_new_tokens=self.max_new_tokens)


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


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Trainer:
    """OPSD (or SFT) training of ``model`` on ``train_problems``.

    ``engine`` is any :class:`~opsd_train.rollout.RolloutEngine` (default: Hugging Face
    ``generate``). ``sft_example_fn(problem, role, rng)`` (objective ``sft`` only) may
    return ``(completion_ids, loss_mask)`` to replace the default target (the solution plus
    EOS, every token trained) for one example, or ``None`` to keep it; ``rng`` is a
    ``random.Random`` seeded from ``(seed, step)``. ``output_dir`` receives
    ``metrics.jsonl`` (appended, one JSON object per step or evaluation, tagged with
    ``phase``) and checkpoints under ``checkpoints/``.
    """

    def __init__(self, model, tokenizer, train_problems: Sequence[Problem], config: TrainConfig,
                 *, eval_problems: Sequence[Problem] | None = None,
                 prompt_builder: PromptBuilder | None = None, engine=None,
                 output_dir: str | Path | None = None, sft_example_fn=None):
        if not train_problems:
            raise ValueError("the training set is empty")
        ensure_pad_token(tokenizer)
        get_lm_head(model)
        get_body(model)
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.train_problems = list(train_problems)
        self.eval_problems = list(eval_problems or [])
        self.prompts = prompt_builder or PromptBuilder(tokenizer)
        self.device = next(model.parameters()).device
        self.pad_id = int(tokenizer.pad_token_id)
        self.eos_id = int(tokenizer.eos_token_id if tokenizer.eos_token_id is not None
                          else tokenizer.pad_token_id)
        self.engine = engine or HFGenerateEngine(model, self.pad_id, self.eos_id)
        self.sft_example_fn = sft_example_fn
        self.output_dir = Path(output_dir) if output_dir is not None else None
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self._cache: dict[tuple[str, int], list[int]] = {}
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.adam_betas,
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: cosine_with_warmup(s, config.steps, config.warmup_steps,
                                         config.min_lr_ratio),
        )
        self.teacher = (Teacher(model, config.teacher, config.ema_decay)
                        if config.objective == "opsd" else None)
        self.step = 0
        self._perm_cache: dict[int, list[int]] = {}
        self.history: list[dict] = []

    # ------------------------------------------------------------------ data
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
            self._cache[key] = ids
        return self._cache[key]

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            self._perm_cache = {epoch: torch.randperm(len(self.train_problems), generator=g)
                                .tolist()}
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

    def train_step(self) -> dict:
        """One optimizer step; returns its metrics (also appended to ``history``)."""
        cfg = self.config
        idx = self.batch_indices(self.step)
        self.model.train()
        t0 = time.perf_counter()
        t_roll = 0.0
        if cfg.objective == "opsd":
            s_prompts = [self._ids("student", i) for i in idx]
            comps = []
            per_micro = cfg.batch_size // cfg.grad_accum  # generate one micro-batch at a time
            with self._autocast():
                for s in range(0, len(s_prompts), per_micro):
                    comps += self.engine.generate(s_prompts[s : s + per_micro], cfg.sampling(),
                                                  cfg.rollouts_per_prompt)
            t_roll = time.perf_counter() - t0
            reps = cfg.rollouts_per_prompt
            rows = [(s_prompts[j // reps], self._ids("teacher", idx[j // reps]), comps[j], None)
                    for j in range(len(comps))]
        else:
            g = random.Random(cfg.seed * 7_919 + self.step)
            rows = []
            for i in idx:
                role = "teacher" if g.random() < cfg.sft_teacher_fraction else "student"
                target, keep = self._ids("solution", i), None
                if self.sft_example_fn is not None:
                    custom = self.sft_example_fn(self.train_problems[i], role, g)
                    if custom is not None:
                        target, keep = custom
                rows.append((self._ids(role, i), None, target, keep))
        total_tokens = sum(len(r[2]) if r[3] is None else sum(r[3]) for r in rows)
        loss_sum, div_sum, fwd_tokens = 0.0, 0.0, 0
        if total_tokens > 0:
            lcfg = cfg.loss_config()
            ctx = None
            if self.teacher is not None and self.teacher.mode != "current":
                ctx = self.teacher.weights
            for sl in self._micro_slices(len(rows)):
                part = [r for r in rows[sl] if len(r[2]) > 0]
                if not part:
                    continue
                sb = pack_batch([r[0] for r in part], [r[2] for r in part], self.pad_id)
                for j, r in enumerate(part):
                    if r[3] is not None:
                        sb.mask[j, : len(r[3])] &= torch.as_tensor(r[3], dtype=torch.bool)
                fwd_tokens += int(sb.attention_mask.sum())
                with self._autocast():
                    if cfg.objective == "opsd":
                        tb = pack_batch([r[1] for r in part], [r[2] for r in part],
                                        self.pad_id)
                        fwd_tokens += int(tb.attention_mask.sum())
                        loss, st = opsd_loss(self.model, sb.to(self.device),
                                             tb.to(self.device), lcfg, teacher_ctx=ctx,
                                             normalizer=total_tokens)
                    else:
                        loss, st = sft_loss(self.model, sb.to(self.device),
                                            normalizer=total_tokens)
                loss.backward()
                loss_sum += float(loss.detach())
                div_sum += st["div_sum"]
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
        if self.teacher is not None:
            self.teacher.update(self.model)
        self.step += 1
        dt = time.perf_counter() - t0
        rec = {
            "event": "step",
            "phase": cfg.phase,
            "step": self.step,
            "loss": loss_sum,
            "divergence": div_sum / max(total_tokens, 1),
            "completion_tokens": total_tokens,
            "rollout_len": total_tokens / max(len(rows), 1),
            "forward_tokens": fwd_tokens,
            "tokens_per_s": fwd_tokens / dt if dt > 0 else None,
            "time_s": dt,
            "rollout_time_s": t_roll,
            "lr": lr,
            "grad_norm": gn,
            "peak_mem_gb": _peak_memory_gb(self.device),
        }
        self._log(rec)
        return rec

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, problems: Sequence[Problem] | None = None, *, role: str = "student",
                 k: int | None = None) -> EvalResult:
        """Held-out accuracy (greedy pass@1, plus avg@k when ``k`` > 0).

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
        build = self.prompts.teacher_ids if role == "teacher" else self.prompts.student_ids
        prompts = [build(p) for p in problems]
        k = cfg.eval_k if k is None else k

        def gen(batch, sampling):
            return self.engine.generate(batch, sampling, 1)

        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.seed * 104_729 + self.step)
            run = lambda: evaluate_problems(
                gen, lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
                prompts, [p.answer for p in problems], k=k,
                temperature=cfg.eval_temperature or cfg.temperature, top_p=cfg.top_p,
                top_k=cfg.top_k, max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
                batch_size=cfg.eval_batch_size)
            if role == "teacher" and self.teacher is not None:
                with self.teacher.weights(self.model):
                    res = run()
            else:
                res = run()
        rec = {"event": "eval", "phase": cfg.phase, "step": self.step, "role": role,
               **res.to_dict()}
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
            if self.eval_problems and cfg.eval_every and self.step % cfg.eval_every == 0 \
                    and self.step < cfg.steps:
                evals.append(self.evaluate())
            if cfg.save_every and self.output_dir is not None and self.step % cfg.save_every == 0:
                self.save_checkpoint(self.output_dir / "checkpoints" / f"step_{self.step}")
        if bar is not None:
            bar.close()
        if self.eval_problems and cfg.eval_at_end:
            evals.append(self.evaluate())
        return evals

    # ------------------------------------------------------------------ logging
    def _log(self, rec: dict) -> None:
        self.history.append(rec)
        if self.output_dir is not None:
            with (self.output_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------ checkpoints
    def _model_state(self) -> dict:
        if is_peft_model(self.model):
            return {n: p.detach().clone() for n, p in self.model.named_parameters()
                    if p.requires_grad}
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def save_checkpoint(self, path: str | Path) -> Path:
        """Save everything needed for an exact resume into directory ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {
            "format": "opsd_train.checkpoint.v1",
            "step": self.step,
            "config": self.config.to_dict(),
            "model": self._model_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
            "rng": rng,
        }
        torch.save(state, path / "trainer_state.pt")
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore a :meth:`save_checkpoint` directory (weights or adapter, optimizer,
        scheduler, teacher, step and RNG states)."""
        f = Path(path) / "trainer_state.pt"
        if not f.is_file():
            raise FileNotFoundError(f"no checkpoint at {f}")
        state = torch.load(f, map_location="cpu", weights_only=False)
        if state.get("format") != "opsd_train.checkpoint.v1":
            raise ValueError(f"{f} is not an opsd_train checkpoint")
        with torch.no_grad():
            if is_peft_model(self.model):
                params = dict(self.model.named_parameters())
                for n, t in state["model"].items():
                    params[n].copy_(t)
            else:
                self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.teacher is not None and state["teacher"] is not None:
            self.teacher.load_state_dict(state["teacher"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
