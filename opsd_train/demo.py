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

import copy
import json
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .data import Problem, save_jsonl, synthetic_split
from .tiny import build_tiny_model, build_tokenizer
from .trainer import TrainConfig, Trainer

__all__ = ["DemoConfig", "run_demo", "plot_run", "deviated_solution"]

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


@dataclass
class DemoConfig:
    """Settings of the embedded default (sized for a 2-core CPU: a few minutes).

    ``warmup``/``opsd`` are :class:`~opsd_train.trainer.TrainConfig` fields for those phases;
    the control copies the OPSD phase's steps, batch size, learning-rate schedule and seed
    and uses the warm-up's data mixture (``control_sft_teacher_fraction`` overrides its
    teacher-format share). ``warmup_from`` loads a saved warm-up (``warmup_model/`` of an
    earlier run) instead of training one. ``eval_every`` adds held-out evaluations during
    the OPSD and control phases.
    """

    seed: int = 0
    n_train: int = 5000
    n_eval: int = 400
    threads: int | None = None
    model: dict = field(default_factory=dict)
    warmup: dict = field(default_factory=lambda: dict(
        objective="sft", steps=400, batch_size=32, lr=3e-3, warmup_steps=20,
        min_lr_ratio=0.1, weight_decay=0.0, sft_teacher_fraction=0.3, max_grad_norm=1.0))
    opsd: dict = field(default_factory=lambda: dict(
        objective="opsd", steps=50, batch_size=32, lr=2e-4, warmup_steps=0,
        min_lr_ratio=0.1, teacher="fixed", kind="forward_kl", clip=None,
        temperature=0.5, loss_temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=48,
        max_grad_norm=1.0))
    control_sft_teacher_fraction: float | None = None
    warmup_from: str | None = None
    teacher_deviation_fraction: float = 0.2
    eval_every: int = 25
    eval_k: int = 0
    eval_temperature: float = 1.0
    eval_max_new_tokens: int = 48

    @classmethod
    def from_dict(cls, d: dict) -> DemoConfig:
        """Build from a dict; nested phase dicts update the defaults."""
        base = cls()
        for k, v in d.items():
            if not hasattr(base, k):
                raise ValueError(f"unknown demo config key {k!r}")
            if isinstance(getattr(base, k), dict) and isinstance(v, dict):
                getattr(base, k).update(v)
            else:
                setattr(base, k, v)
        return base


def _phase_config(d: dict, cfg: DemoConfig, phase: str, **over) -> TrainConfig:
    x = dict(d)
    x.update(over)
    x.setdefault("seed", cfg.seed)
    x.update(phase=phase, eval_at_start=False, eval_at_end=False, eval_k=cfg.eval_k,
             eval_every=0 if phase == "warmup" else cfg.eval_every,
             eval_temperature=cfg.eval_temperature,
             eval_max_new_tokens=cfg.eval_max_new_tokens)
    x.setdefault("max_new_tokens", cfg.eval_max_new_tokens)
    return TrainConfig.from_dict(x)


def run_demo(cfg: DemoConfig | None = None, out_dir: str | Path = "runs/opsd-demo",
             progress: bool = True, log=print) -> dict:
    """Run the embedded default end to end; returns (and writes) the summary dict."""
    cfg = cfg or DemoConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    tok = build_tokenizer()
    model = build_tiny_model(tok, seed=cfg.seed, **cfg.model)
    train, held_out = synthetic_split(cfg.n_train, cfg.n_eval, seed=cfg.seed)
    save_jsonl(train, out / "train.jsonl")
    save_jsonl(held_out, out / "held_out.jsonl")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[opsd-demo] tiny Qwen3 ({n_params / 1e6:.2f}M params, vocab {len(tok)}), "
        f"{len(train)} train / {len(held_out)} held-out problems, seed {cfg.seed}")

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

    def trainer(tc: TrainConfig) -> Trainer:
        tc.progress = progress
        return Trainer(model, tok, train, tc, eval_problems=held_out, output_dir=out,
                       sft_example_fn=sft_example if tc.objective == "sft" else None)

    # 1. warm-up (or reuse a saved warm-up)
    t0 = time.perf_counter()
    warm_steps = 0
    if cfg.warmup_from:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(cfg.warmup_from, dtype=torch.float32)
        log(f"[opsd-demo] warm-up: loaded {cfg.warmup_from}")
    else:
        wt = trainer(_phase_config(cfg.warmup, cfg, "warmup"))
        wt.train()
        warm_steps = wt.step
        log(f"[opsd-demo] warm-up: {wt.step} SFT steps in {time.perf_counter() - t0:.0f}s, "
            f"final loss {wt.history[-1]['loss']:.3f}")
        model.save_pretrained(out / "warmup_model")
        tok.save_pretrained(out / "warmup_model")
    t_warm = time.perf_counter() - t0
    warm_state = copy.deepcopy(model.state_dict())

    # 2. evaluate the warmed-up student and the teacher (solution in context)
    ot = trainer(_phase_config(cfg.opsd, cfg, "opsd"))
    before = ot.evaluate()
    teacher = ot.evaluate(role="teacher")
    log(f"[opsd-demo] before: student pass@1 {before.pass1:.3f}, "
        f"teacher (solution in context) pass@1 {teacher.pass1:.3f}")

    # 3. OPSD
    t0 = time.perf_counter()
    ot.train()
    t_opsd = time.perf_counter() - t0
    after = ot.evaluate()

    # 4. control: same-budget SFT continuation from the same weights
    model.load_state_dict(warm_state)
    frac = cfg.control_sft_teacher_fraction
    if frac is None:
        frac = cfg.warmup.get("sft_teacher_fraction", 0.0)
    control_over = {k: v for k, v in cfg.opsd.items()
                    if k in ("steps", "batch_size", "lr", "warmup_steps", "min_lr_ratio",
                             "weight_decay", "max_grad_norm", "grad_accum", "seed")}
    ctl_cfg = _phase_config(dict(objective="sft", sft_teacher_fraction=frac, **control_over),
                            cfg, "control")
    ct = trainer(ctl_cfg)
    t0 = time.perf_counter()
    ct.train()
    t_ctl = time.perf_counter() - t0
    control = ct.evaluate()

    wall = time.perf_counter() - t_start
    opsd_steps = [r for r in ot.history if r["event"] == "step"]
    summary = {
        "seed": cfg.seed,
        "held_out_n": len(held_out),
        "student_before": before.to_dict(),
        "teacher_with_solution": teacher.to_dict(),
        "student_after_opsd": after.to_dict(),
        "student_after_control_sft": control.to_dict(),
        "opsd_steps": ot.step,
        "control_steps": ct.step,
        "warmup_steps": warm_steps,
        "divergence_first": opsd_steps[0]["divergence"] if opsd_steps else None,
        "divergence_last": opsd_steps[-1]["divergence"] if opsd_steps else None,
        "time_s": {"warmup": t_warm, "opsd": t_opsd, "control": t_ctl, "total": wall},
        "config": asdict(cfg),
        "samples_after_opsd": after.samples[:3],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    try:
        plot_run(out / "metrics.jsonl", out / "opsd_demo.png", summary)
    except ImportError:  # pragma: no cover - matplotlib missing
        log("[opsd-demo] matplotlib not installed: no plot written")
    log(f"[opsd-demo] held-out pass@1 (n={len(held_out)}): before {before.pass1:.3f} | "
        f"after OPSD {after.pass1:.3f} | after SFT control {control.pass1:.3f} | "
        f"teacher w/ solution {teacher.pass1:.3f}")
    log(f"[opsd-demo] divergence {summary['divergence_first']:.4f} -> "
        f"{summary['divergence_last']:.4f}; wall time {wall:.0f}s; results in {out}")
    return summary


def plot_run(metrics_path: str | Path, png_path: str | Path, summary: dict | None = None):
    """Plot the divergence curve and held-out accuracy from a run's ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    w = [r for r in recs if r["event"] == "step" and r["phase"] == "warmup"]
    if w:
        axes[0].plot([r["step"] for r in w], [r["loss"] for r in w])
    axes[0].set(title="warm-up SFT loss", xlabel="step", ylabel="cross-entropy / token")
    labels = {"opsd": "OPSD divergence (per token)", "control": "control SFT loss"}
    step_phases = sorted({r["phase"] for r in recs if r["event"] == "step"} - {"warmup"})
    for phase in step_phases:
        rs = [r for r in recs if r["event"] == "step" and r["phase"] == phase]
        axes[1].plot([r["step"] for r in rs], [r["loss"] for r in rs],
                     label=labels.get(phase, f"{phase} loss"))
    axes[1].set(title="training loss after warm-up", xlabel="step")
    eval_phases = sorted({r["phase"] for r in recs if r["event"] == "eval"})
    for phase in eval_phases:
        style = "s--" if phase == "control" else "o-"
        es = [r for r in recs if r["event"] == "eval" and r["phase"] == phase
              and r["role"] == "student"]
        start = [r for r in recs if r["event"] == "eval" and r["phase"] == "opsd"
                 and r["role"] == "student" and r["step"] == 0]
        if phase == "control" and start:  # the control starts from the same weights
            es = start[:1] + es
        if es:
            axes[2].plot([r["step"] for r in es], [r["pass@1"] for r in es], style,
                         label=f"student ({phase})")
    te = [r for r in recs if r["event"] == "eval" and r["role"] == "teacher"]
    if te:
        axes[2].axhline(te[0]["pass@1"], color="gray", ls=":", label="teacher w/ solution")
    axes[2].set(title="held-out pass@1", xlabel="step", ylim=(0, 1))
    for ax in axes[1:]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if summary:
        fig.suptitle(f"OPSD demo (seed {summary['seed']}): pass@1 "
                     f"{summary['student_before']['pass@1']:.3f} -> "
                     f"{summary['student_after_opsd']['pass@1']:.3f} (OPSD) vs "
                     f"{summary['student_after_control_sft']['pass@1']:.3f} (SFT control)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
