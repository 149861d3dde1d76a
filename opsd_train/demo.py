"""The embedded default run: synthetic arithmetic, a tiny Qwen3-architecture model, a short
supervised warm-up, then OPSD against a same-budget SFT continuation (the control).

Phases (all seeded by ``DemoConfig.seed``):

1. **warm-up**: teacher-forced SFT on (prompt -> worked solution) pairs. A share of the
   examples (``sft_teacher_fraction``) uses the teacher prompt (reference solution in
   context), so the tiny model also learns to *read* a reference solution, which large
   pretrained models can already do. A fifth of those teacher-format examples
   (``teacher_deviation_fraction``) show a completion that departs from the reference at one
   intermediate result (that number is masked out of the loss, so no wrong arithmetic is
   ever trained) and then continues consistently from it: without this the tiny teacher
   learns to copy the reference token by token, and on a student rollout that has already
   departed from the reference it then asks for the reference's numbers after the student's
   own (e.g. ``48 - 9 = 39`` after the student wrote ``49``), i.e. for wrong arithmetic.
   A large teacher follows the student's prefix on its own.
2. **evaluate** the warmed-up model: student pass@1 on held-out problems, and the teacher's
   accuracy with the solution in context.
3. **OPSD** from the warmed-up weights for ``steps`` steps.
4. **control** from the same warmed-up weights: SFT continuation with the same number of
   steps, batch size, learning-rate schedule and data order.
5. **evaluate** both, write ``summary.json``, ``metrics.jsonl`` and ``opsd_demo.png``.
"""

from __future__ import annotations

import functools
import json
import random
import re
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .config import ConfigError, check_fields, check_keys, option
from .data import Problem, save_jsonl, synthetic_split
from .prompts import PromptBuilder
from .recipes import TrainConfig, build_trainer, make_evaluator, seed_everything
from .tiny import TINY_MODEL_DEFAULTS, build_tiny_model, build_tokenizer

__all__ = [
    "DemoConfig",
    "run_demo",
    "plot_run",
    "deviated_solution",
    "token_table",
    "plot_accuracy_vs_tokens",
]

_EQ_RE = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def deviated_solution(problem: Problem, rng: random.Random) -> tuple[str, str, str] | None:
    """A worked solution that departs from the reference at one step and then stays
    consistent with itself: ``(before, wrong, after)`` where ``wrong`` is the replaced
    intermediate result (a nearby wrong number, with its leading space), and every later
    step is recomputed from it. ``None`` if the solution has no equation chain or the
    recomputation would go negative.

    >>> p = Problem("q", "2 + 3 = 5. 5 * 2 = 10. The answer is \\\\boxed{10}.", "10")
    >>> before, wrong, after = deviated_solution(p, random.Random(0))
    >>> before + wrong + after
    '2 + 3 = 5. 5 * 2 = 11. The answer is \\\\boxed{11}.'
    """
    eqs = [(int(a), op, int(b), int(r)) for a, op, b, r in _EQ_RE.findall(problem.solution)]
    if not eqs:
        return None
    k = rng.randrange(len(eqs))
    a, op, b, r = eqs[k]
    deltas = [d for d in (-3, -2, -1, 1, 2, 3) if r + d >= 0]
    value = r + rng.choice(deltas)
    head = ". ".join(f"{x} {o} {y} = {z}" for x, o, y, z in eqs[:k])
    before = (head + ". " if head else "") + f"{a} {op} {b} ="
    wrong = f" {value}"
    tail = []
    for x, o, y, _ in eqs[k + 1 :]:
        x = value  # the chain: each step starts from the previous result
        value = _OPS[o](x, y)
        if value < 0:
            return None
        tail.append(f"{x} {o} {y} = {value}")
    after = "".join(". " + t for t in tail) + f". The answer is \\boxed{{{value}}}."
    return before, wrong, after


def _warmup_defaults() -> dict:
    return dict(
        algo="sft", steps=400, batch_size=32, lr=3e-3, warmup_steps=20, min_lr_ratio=0.1,
        weight_decay=0.0, sft_teacher_fraction=0.3, max_grad_norm=1.0,
    )  # fmt: skip


def _opsd_defaults() -> dict:
    return dict(
        algo="opsd", steps=50, batch_size=32, lr=2e-4, warmup_steps=0, min_lr_ratio=0.1,
        teacher="fixed", kind="forward_kl", clip=None, temperature=0.5, loss_temperature=1.0,
        top_p=1.0, top_k=0, max_new_tokens=48, max_grad_norm=1.0,
    )  # fmt: skip


def _grpo_defaults() -> dict:
    # steps, learning rate and schedule, rollout length and seed follow the OPSD phase;
    # batch_size (prompts) defaults to the OPSD batch size / group_size: the same number
    # of rollouts per step. Sampling at T 1.0: a group needs diverse answers to learn.
    return dict(algo="grpo", group_size=4, temperature=1.0, top_p=1.0, top_k=0)


# OPSD-phase settings the GRPO control and the SFT control copy (unless set in their table)
_SHARED_WITH_OPSD = (
    "steps", "lr", "warmup_steps", "min_lr_ratio", "weight_decay", "max_grad_norm",
    "grad_accum", "seed", "lr_schedule", "lr_horizon",
)  # fmt: skip
_DEMO = functools.partial(option, cli=False)


@dataclass
class DemoConfig:
    """Settings of the embedded default (sized for a 2-core CPU: a few minutes).

    ``warmup``/``opsd`` are :class:`~opsd_train.recipes.TrainConfig` fields for those phases;
    the control copies the OPSD phase's steps, batch size, learning-rate schedule and seed
    and uses the warm-up's data mixture (``control_sft_teacher_fraction`` overrides its
    teacher-format share). ``warmup_from`` loads a saved warm-up (``warmup_model/`` of an
    earlier run) instead of training one. ``eval_every`` adds held-out evaluations during
    the OPSD and control phases.

    Every value, including each phase's training settings and the model overrides, is
    checked at construction (:meth:`phase_configs`), before the warm-up starts.
    """

    seed: int = _DEMO(0, "seed of data, model and every phase", low=0)
    n_train: int = _DEMO(5000, "synthetic training problems", low=1)
    n_eval: int = _DEMO(400, "held-out problems", low=1)
    threads: int | None = _DEMO(None, "torch CPU threads", low=1)
    model: dict = _DEMO(default_factory=dict, doc="overrides of TINY_MODEL_DEFAULTS")
    warmup: dict = _DEMO(default_factory=_warmup_defaults, doc="warm-up TrainConfig")
    opsd: dict = _DEMO(default_factory=_opsd_defaults, doc="OPSD TrainConfig")
    grpo: dict = _DEMO(default_factory=_grpo_defaults, doc="GRPO TrainConfig (see above)")
    control_sft_teacher_fraction: float | None = _DEMO(
        None, "teacher-format share of the control (none = the warm-up's)", low=0, high=1
    )
    warmup_from: str | None = _DEMO(None, "load this warm-up instead of training one")
    teacher_deviation_fraction: float = _DEMO(0.2, "departing teacher examples", low=0, high=1)
    eval_every: int = _DEMO(25, "held-out evaluation every N steps", low=0)
    eval_k: int = _DEMO(0, "avg@k samples", low=0)
    eval_temperature: float = _DEMO(1.0, "avg@k temperature", low=0, low_open=True)
    eval_max_new_tokens: int = _DEMO(48, "evaluation completion length", low=1)

    def __post_init__(self):
        check_fields(self)
        from transformers import Qwen3Config

        valid = set(Qwen3Config().to_dict()) | set(TINY_MODEL_DEFAULTS)
        check_keys(self.model, sorted(valid), "demo.model")
        self.phase_configs()

    @classmethod
    def from_dict(cls, d: dict) -> DemoConfig:
        """Build from a dict (a config file's ``demo`` table); nested phase dicts update
        the defaults. Unknown keys and bad values raise
        :class:`~opsd_train.config.ConfigError` naming them."""
        if not isinstance(d, dict):
            raise ConfigError(f"demo: expected a table/mapping, got {type(d).__name__}")
        check_keys(d, [f.name for f in fields(cls)], "demo")
        kw = {}
        for k, v in d.items():
            default = cls.__dataclass_fields__[k].default_factory
            if k in ("warmup", "opsd", "grpo") and isinstance(v, dict):
                kw[k] = {**default(), **v}
            else:
                kw[k] = v
        return cls(**kw)

    def phase_configs(self) -> dict[str, TrainConfig]:
        """The :class:`~opsd_train.recipes.TrainConfig` of each phase (``warmup``,
        ``opsd``, ``control`` (SFT), ``grpo``), checked."""
        frac = self.control_sft_teacher_fraction
        if frac is None:
            frac = self.warmup.get("sft_teacher_fraction", 0.0)
        control_over = {
            k: v for k, v in self.opsd.items() if k in (*_SHARED_WITH_OPSD, "batch_size")
        }
        grpo = {k: v for k, v in self.opsd.items() if k in (*_SHARED_WITH_OPSD, "max_new_tokens")}
        grpo.update(self.grpo)
        if "batch_size" not in self.grpo:
            g = self.grpo.get("group_size", 8)
            grpo["batch_size"] = max(1, self.opsd.get("batch_size", 32) // g)
        return {
            "warmup": _phase_config(self.warmup, self, "warmup"),
            "opsd": _phase_config(self.opsd, self, "opsd"),
            "control": _phase_config(
                dict(algo="sft", sft_teacher_fraction=frac, **control_over), self, "control"
            ),
            "grpo": _phase_config(grpo, self, "grpo"),
        }


def _phase_config(d: dict, cfg: DemoConfig, phase: str) -> TrainConfig:
    x = dict(d)
    x.setdefault("seed", cfg.seed)
    x.update(
        phase=phase,
        eval_at_start=phase == "opsd",
        eval_at_end=phase != "warmup",
        eval_k=cfg.eval_k,
        eval_every=0 if phase == "warmup" else cfg.eval_every,
        eval_temperature=cfg.eval_temperature,
        eval_max_new_tokens=cfg.eval_max_new_tokens,
        save_every=0,
    )
    x.setdefault("max_new_tokens", cfg.eval_max_new_tokens)
    # the tiny model only ever saw the training prompt (no separate evaluation template)
    x.setdefault("eval_prompt", "student")
    where = f"demo.{phase}" if phase != "control" else "demo (control phase)"
    try:
        return TrainConfig.from_dict(x, where)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}", e.key) from e


def run_demo(
    cfg: DemoConfig | None = None,
    out_dir: str | Path = "runs/opsd-demo",
    progress: bool = True,
    log=print,
) -> dict:
    """Run the embedded default end to end; returns (and writes) the summary dict."""
    from transformers import AutoModelForCausalLM

    cfg = cfg or DemoConfig()
    phases = cfg.phase_configs()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    seed_everything(cfg.seed)
    tok = build_tokenizer()
    pb = PromptBuilder(tok)
    train, held_out = synthetic_split(cfg.n_train, cfg.n_eval, seed=cfg.seed)
    save_jsonl(train, out / "train.jsonl")
    save_jsonl(held_out, out / "held_out.jsonl")

    def sft_example(problem: Problem, role: str, rng: random.Random):
        # Teacher-format warm-up examples: with probability teacher_deviation_fraction the
        # completion departs from the reference at one step (that number is masked out of
        # the loss) and continues consistently, so the teacher learns to follow the
        # student's own prefix instead of copying the reference blindly.
        if role != "teacher" or rng.random() >= cfg.teacher_deviation_fraction:
            return None
        parts = deviated_solution(problem, rng)
        if parts is None:
            return None
        ids, keep = [], []
        for text, trained in zip(parts, (True, False, True), strict=True):
            piece = tok(text, add_special_tokens=False)["input_ids"]
            ids += piece
            keep += [trained] * len(piece)
        return ids + [tok.eos_token_id], keep + [True]

    def run_phase(name: str, model) -> tuple[float, object]:
        tc = phases[name]
        tc.progress = progress
        seed_everything(tc.seed)
        trainer = build_trainer(
            model,
            tok,
            train,
            tc,
            out / "phases" / name,
            pb,
            held_out=held_out if name != "warmup" else (),
            example_fn=sft_example if tc.algo == "sft" else None,
            metrics_path=out / "metrics.jsonl",
            log=log,
        )
        t0 = time.perf_counter()
        trainer.train()
        return time.perf_counter() - t0, trainer

    warm_dir = out / "warmup_model"
    if cfg.warmup_from:
        warm_dir = Path(cfg.warmup_from)
        t_warm, warm_steps = 0.0, 0
        log(f"[opsd-demo] warm-up: loaded {warm_dir}")
    else:
        model = build_tiny_model(tok, seed=cfg.seed, **cfg.model)
        n_params = sum(p.numel() for p in model.parameters())
        log(
            f"[opsd-demo] tiny Qwen3 ({n_params / 1e6:.2f}M params, vocab {len(tok)}), "
            f"{len(train)} train / {len(held_out)} held-out problems, seed {cfg.seed}"
        )
        t_warm, wt = run_phase("warmup", model)
        warm_steps = wt.state.global_step
        log(
            f"[opsd-demo] warm-up: {warm_steps} SFT steps in {t_warm:.0f}s, final loss "
            f"{wt.runlog.history[-1]['loss']:.3f}"
        )
        model.save_pretrained(warm_dir)
        tok.save_pretrained(warm_dir)

    def warm():  # a fresh copy of the warmed-up weights, read from its folder
        return AutoModelForCausalLM.from_pretrained(warm_dir, dtype=torch.float32)

    teacher = make_evaluator(warm(), tok, pb, held_out, phases["opsd"], role="teacher")(0)
    times, trainers = {}, {}
    for name in ("opsd", "control", "grpo"):
        times[name], trainers[name] = run_phase(name, warm())
    ev = {n: [r for r in t.runlog.history if r["event"] == "eval"] for n, t in trainers.items()}
    before, after, control, grpo = ev["opsd"][0], ev["opsd"][-1], ev["control"][-1], ev["grpo"][-1]
    ot = trainers["opsd"]
    wall = time.perf_counter() - t_start
    opsd_steps = [r for r in ot.runlog.history if r["event"] == "step"]
    summary = dict(
        seed=cfg.seed, held_out_n=len(held_out), student_before=before,
        teacher_with_solution=teacher.to_dict(), student_after_opsd=after,
        student_after_control_sft=control, student_after_grpo=grpo,
        steps={"warmup": warm_steps, **{n: t.state.global_step for n, t in trainers.items()}},
        generated_tokens={n: t.runlog.generated_total for n, t in trainers.items()},
        opsd_loss_first_last=[r["loss"] for r in opsd_steps[:1] + opsd_steps[-1:]],
        time_s={"warmup": t_warm, **times, "total": wall}, threads=torch.get_num_threads(),
        trainer={n: type(t).__mro__[2].__name__ for n, t in trainers.items()},
        versions={n: _version(n) for n in ("torch", "transformers", "trl")}, config=asdict(cfg),
    )  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    table = token_table(out / "metrics.jsonl")
    (out / "accuracy_vs_tokens.md").write_text(table)
    try:
        plot_run(out / "metrics.jsonl", out / "opsd_demo.png")
        plot_accuracy_vs_tokens(
            out / "metrics.jsonl", out / "accuracy_vs_tokens.png", seed=cfg.seed
        )
    except ImportError:  # pragma: no cover - matplotlib missing
        log("[opsd-demo] matplotlib not installed: no plots (accuracy_vs_tokens.md is written)")
    name = before["score_name"]
    log(
        f"[opsd-demo] held-out {name} (n={len(held_out)}): before {before['score']:.3f} | "
        f"after OPSD {after['score']:.3f} | after SFT control {control['score']:.3f} | "
        f"after GRPO control {grpo['score']:.3f} | teacher w/ solution {teacher.score:.3f}"
    )
    log("[opsd-demo] accuracy against training tokens generated (rollouts):\n" + table)
    log(f"[opsd-demo] wall time {wall:.0f}s; results in {out}")
    return summary


def plot_run(metrics_path: str | Path, png_path: str | Path) -> None:
    """Plot each phase's training loss and held-out accuracy from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = _records(metrics_path)
    fig, (ax_l, ax_e) = plt.subplots(1, 2, figsize=(11, 4))
    for phase in dict.fromkeys(r["phase"] for r in recs):
        steps = [r for r in recs if r["event"] == "step" and r["phase"] == phase]
        if steps:
            ax_l.plot([r["step"] for r in steps], [r["loss"] for r in steps], label=phase)
        es = [r for r in recs if r["event"] == "eval" and r["phase"] == phase]
        if es:
            ax_e.plot([r["step"] for r in es], [r["score"] for r in es], "o-", label=phase)
    ax_l.set(title="training loss", xlabel="step")
    ax_e.set(title="held-out accuracy", xlabel="step", ylim=(0, 1))
    for ax in (ax_l, ax_e):
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:  # pragma: no cover
        return None


_METHODS = (("opsd", "OPSD"), ("control", "SFT"), ("grpo", "GRPO"))


def _student_evals(recs: list[dict], phase: str) -> list[dict]:
    """The evaluations of ``phase``, starting from the shared warmed-up point (OPSD's
    step-0 evaluation)."""
    start = [r for r in recs if r["event"] == "eval" and r["phase"] == "opsd"][:1]
    es = [r for r in recs if r["event"] == "eval" and r["phase"] == phase and r not in start]
    return start + es if es or phase == "opsd" else []


def _records(metrics_path) -> list[dict]:
    return [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]


def token_table(metrics_path: str | Path) -> str:
    """A Markdown table of held-out accuracy against the training tokens generated so far
    (rollouts; SFT generates none), per method and evaluation step, from a demo's
    ``metrics.jsonl``.

    >>> import tempfile, os
    >>> recs = [dict(event="eval", phase="opsd", step=0, score=0.5, score_name="pass@1",
    ...              train_generated_tokens=0),
    ...         dict(event="eval", phase="opsd", step=2, score=0.75, score_name="pass@1",
    ...              train_generated_tokens=96)]
    >>> path = os.path.join(tempfile.mkdtemp(), "m.jsonl")
    >>> _ = open(path, "w").write("\\n".join(json.dumps(r) for r in recs))
    >>> print(token_table(path))
    | method | step | generated tokens | held-out pass@1 |
    |---|---:|---:|---:|
    | OPSD | 0 | 0 | 0.500 |
    | OPSD | 2 | 96 | 0.750 |
    """
    recs, rows, name = _records(metrics_path), [], "accuracy"
    for phase, label in _METHODS:
        for r in _student_evals(recs, phase):
            name = r.get("score_name", name)
            rows.append(f"| {label} | {r['step']} | {r['train_generated_tokens']} | "
                        f"{r['score']:.3f} |")  # fmt: skip
    return "\n".join([f"| method | step | generated tokens | held-out {name} |",
                      "|---|---:|---:|---:|", *rows])  # fmt: skip


def plot_accuracy_vs_tokens(metrics_path: str | Path, png_path: str | Path, seed=None) -> None:
    """The paper's token-efficiency view of a demo run: held-out accuracy against the
    training tokens generated (left; SFT generates none: a line at its final accuracy) and
    against optimizer steps (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = _records(metrics_path)
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (phase, label) in enumerate(_METHODS):
        es = _student_evals(recs, phase)
        if not es:
            continue
        y = [r["score"] for r in es]
        if phase == "control":
            ax_t.axhline(y[-1], color=f"C{i}", ls="--", label=f"{label} (0 tokens generated)")
        else:
            ax_t.plot([r["train_generated_tokens"] for r in es], y, "o-", color=f"C{i}",
                      label=label)  # fmt: skip
        ax_s.plot([r["step"] for r in es], y, "o-", color=f"C{i}", label=label)
    name = recs[-1].get("score_name", "accuracy") if recs else "accuracy"
    ax_t.set(title="held-out accuracy vs rollout tokens generated", xlabel="tokens", ylabel=name)
    ax_s.set(title="held-out accuracy vs optimizer steps", xlabel="step", ylabel=name)
    for ax in (ax_t, ax_s):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if seed is not None:
        fig.suptitle(f"embedded demo (seed {seed}): OPSD, SFT and GRPO from the same warm-up")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
