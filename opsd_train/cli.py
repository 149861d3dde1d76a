"""``opsd-train``: the command line.

With no arguments it runs the embedded default (see :mod:`opsd_train.demo`) on CPU.
With ``--model`` it trains a real model on ``--data`` (JSONL) or ``--hf-dataset``::

    opsd-train --model Qwen/Qwen3-1.7B --data problems.jsonl --lora --steps 100 \\
        --batch-size 32 --grad-accum 8 --lr 5e-6 --max-new-tokens 1024 --out runs/qwen

The flags are generated from the fields of :class:`RunConfig` (model, data, run folder)
and :class:`~opsd_train.recipes.TrainConfig` (training): one field, one flag, its doc the
help text. ``--config FILE`` (JSON, TOML or YAML) supplies any of them by field name
(``batch_size: 16``); flags given on the command line win. For the default run the file
may hold a ``demo`` table of :class:`~opsd_train.demo.DemoConfig` fields.

Everything is checked before any file is read or any model is loaded, in this order:
every value (types, ranges, choices, unknown keys with a suggestion), the loss options
(the kernels' own checks), the paths (data, templates, ``--model``), the checkpoint to
resume, then the data and the prompt lengths against the
model's maximum positions (tokenizer and model config only), and only then the weights.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint as ckpt
from .config import (
    ConfigError,
    add_arguments,
    check_fields,
    check_keys,
    flag_name,
    option,
    option_fields,
    to_dict,
)
from .presets import EVAL_PRESET_OPTIONS, apply_presets, preset_names

_RUN, _DATA, _EVAL, _MEM = (
    functools.partial(option, group=g)
    for g in ("run", "model and data", "evaluation and checkpoints", "memory and speed")
)
__all__ = ["main", "build_parser", "load_config_file", "RunConfig", "parse_options"]


@dataclass
class RunConfig:
    """The run's model, data and folder (every field is one ``opsd-train`` flag; the
    training settings are :class:`~opsd_train.recipes.TrainConfig`'s)."""

    config: str | None = _RUN(None, "JSON/TOML/YAML file of options (keys: the flag names)")
    out: str | None = _RUN(None, "run folder (default runs/opsd-demo for the demo, runs/opsd)")
    resume: str | None = _RUN(
        None, "checkpoint folder to resume from, or 'latest': the newest complete checkpoint "
        "in --out (a fresh start if there is none)",
    )  # fmt: skip
    threads: int | None = _RUN(None, "torch CPU threads", low=1)
    preset: str | None = _RUN(
        None, "the paper's run in one flag (model, LoRA r64/alpha128, 100 steps, thinking "
        "flags, clip, grad norm 0.1, LR schedule, --eval-preset paper; opsd_train.presets); "
        "explicit flags override it", choices=preset_names(),
    )  # fmt: skip
    eval_preset: str | None = _EVAL(
        None, "evaluation protocol: paper (T 1.0, top-p 0.95, no top-k, 38,912 new tokens, "
        "avg@12, no greedy); explicit --eval-* flags override it",
        choices=tuple(EVAL_PRESET_OPTIONS),
    )  # fmt: skip
    model: str | None = _DATA(None, "folder, hub id or .gguf file of a causal LM (none: the demo)")
    data: str | None = _DATA(None, "training problems, JSONL")
    eval_data: str | None = _DATA(None, "held-out problems, JSONL (question and answer suffice)")
    hf_dataset: str | None = _DATA(None, "Hugging Face dataset name (needs `datasets`)")
    hf_split: str = _DATA("train", "split of --hf-dataset")
    hf_config: str | None = _DATA(None, "config name of --hf-dataset")
    question_key: str | None = _DATA(None, "question column (default question, or problem)")
    solution_key: str | None = _DATA(None, "solution column (default solution)")
    answer_key: str | None = _DATA(
        None, "answer column (default answer; else the solution's last \\boxed{})"
    )
    eval_n: int | None = _DATA(None, "use at most N held-out problems", low=1)
    eval_fraction: float = _DATA(
        0.05, "without --eval-data, hold out this share of --data", low=0, high=1, high_open=True
    )
    long_prompts: str = _DATA(
        "error", "prompts longer than the model's positions minus --max-new-tokens: error, "
        "or drop them (count reported)", choices=("error", "drop"),
    )  # fmt: skip
    student_template: str | None = _DATA(None, "student prompt template, or @file")
    teacher_template: str | None = _DATA(
        None, "teacher prompt template with {problem} and {solution}, or @file"
    )
    eval_template: str | None = _DATA(None, "evaluation template with {problem}, or @file")
    student_thinking: bool = _DATA(False, "student prompt with enable_thinking (reference: off)")
    teacher_thinking: bool = _DATA(True, "teacher prompt with enable_thinking (reference: on)")
    eval_thinking: bool = _DATA(True, "evaluation prompt with enable_thinking (reference: on)")
    chat_template: bool = _DATA(True, "wrap prompts in the tokenizer's chat template")
    lora: bool = _MEM(False, "train a LoRA adapter (needs peft)")
    lora_r: int = _MEM(64, "LoRA rank", low=1)
    lora_alpha: int = _MEM(128, "LoRA alpha", low=1)

    def __post_init__(self):
        check_fields(self)
        if self.data and self.hf_dataset:
            raise ConfigError("give --data or --hf-dataset, not both", "hf_dataset")


# Settings the embedded demo takes from the command line; everything else comes from the
# config file's "demo" table.
DEMO_KEYS = ("config", "out", "seed", "progress", "threads")


def _fields(cls) -> dict:
    return {f.name: f for f, _ in option_fields(cls)}


def _cli_names(cls) -> list[str]:
    return [n for n, f in _fields(cls).items() if f.metadata.get("cli")]


def load_config_file(path: str | Path) -> dict:
    """Read a JSON, TOML (``.toml``) or YAML (``.yaml``/``.yml``, needs PyYAML) file into a
    dict (``-`` in keys becomes ``_``); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}", "config")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text ({e.reason})", "config") from e
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except ImportError:
        raise
    except Exception as e:  # noqa: BLE001 - every parser has its own error type
        raise ConfigError(f"config file {path} cannot be parsed: {e}", "config") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping", "config")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, generated from :class:`RunConfig` and
    :class:`~opsd_train.recipes.TrainConfig`. Only flags given on the command line appear
    in the parsed namespace (unset ones fall back to the config file, then the defaults)."""
    from .recipes import TrainConfig

    p = argparse.ArgumentParser(
        prog="opsd-train",
        description="On-policy self-distillation. No arguments: the embedded CPU demo.",
        argument_default=argparse.SUPPRESS,
    )
    groups: dict = {}
    for title in (
        "run",
        "model and data",
        "optimisation",
        "rollouts",
        "loss and teacher",
        "grpo",
        "evaluation and checkpoints",
        "memory and speed",
    ):
        groups[title] = p.add_argument_group(title)
    add_arguments(p, RunConfig, groups)
    add_arguments(p, TrainConfig, groups)
    return p


@dataclass
class Options:
    """Parsed and checked options: the run part, the training keys given, the demo table
    (``None`` if absent) and where each key came from (for messages)."""

    run: RunConfig
    train: dict
    demo: dict | None
    given: dict
    sources: dict


def parse_options(argv: list[str] | None) -> Options:
    """Command line + config file -> checked :class:`Options`; raises :class:`ConfigError`
    naming the key and where it came from (nothing is loaded or read besides the file)."""
    from .recipes import TrainConfig

    args = vars(build_parser().parse_args(argv))
    sources = {k: flag_name(k) for k in args}
    opts: dict = {}
    demo = None
    if args.get("config"):
        where = f"config file {args['config']}"
        file_opts = load_config_file(args["config"])
        demo = file_opts.pop("demo", None)
        valid = [n for n in _cli_names(RunConfig) + _cli_names(TrainConfig) if n != "config"]
        check_keys(file_opts, valid + ["demo"], where)
        opts.update(file_opts)
        sources.update({k: where for k in file_opts if k not in args})
    opts.update(args)
    given = dict(opts)
    try:
        opts = apply_presets(opts)
    except ConfigError as e:
        raise ConfigError(_with_source(e, sources.get(e.key)), e.key) from e
    for k in opts:
        if k not in given:
            name = (
                opts.get("preset")
                if k != "eval_preset" and k in _preset_keys(opts)
                else opts.get("eval_preset")
            )
            sources[k] = f"preset {name}"
    run_keys = set(_fields(RunConfig))
    train_keys = set(_cli_names(TrainConfig))
    try:
        run = RunConfig(**{k: v for k, v in opts.items() if k in run_keys})
        train = {k: v for k, v in opts.items() if k in train_keys}
        if run.model:
            TrainConfig(**train)  # every training value checked now, before any loading
    except ConfigError as e:
        raise ConfigError(_with_source(e, sources.get(e.key) if e.key else None), e.key) from e
    return Options(run, train, demo, given, sources)


def _preset_keys(opts: dict) -> set:
    from .presets import PRESETS

    return set(PRESETS.get(opts.get("preset"), {}))


def _with_source(e: ConfigError, src: str | None) -> str:
    """``--max-grad-norm: must be > 0 ...`` or ``config file c.toml: lora: expected ...``."""
    msg = str(e)
    if not src:
        return msg
    if src.startswith("--"):
        return f"{src}: {msg.removeprefix(f'{e.key}: ')}"
    return f"{src}: {msg}"


# ---------------------------------------------------------------------------------------
# the --model path
# ---------------------------------------------------------------------------------------


def _resolve_resume(run: RunConfig, out: Path) -> str | None:
    """The checkpoint folder to resume (or ``None``), verified and named in errors."""
    if not run.resume:
        ckdir, metrics = out / "checkpoints", out / "metrics.jsonl"
        if (ckdir.is_dir() and any(ckdir.iterdir())) or (
            metrics.is_file() and metrics.stat().st_size
        ):
            raise ConfigError(
                f"--out {out} already holds a run: pass --resume latest to "
                "continue it, or choose another --out",
                "out",
            )
        return None
    if run.resume == "latest":
        found = ckpt.find_latest(out / "checkpoints")
        if found is None:
            print(
                f"[opsd-train] --resume latest: no complete checkpoint in "
                f"{out / 'checkpoints'}; starting from step 0"
            )
        return None if found is None else str(found)
    ckpt.verify_checkpoint(run.resume, deep=True)
    return run.resume


def _check_writable(out: Path) -> None:
    probe = out / f".write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ckpt.CheckpointWriteError.wrap(e, f"--out {out} is not writable") from e


def _held_out_split(run: RunConfig, train):
    from .data import split_held_out
    from .evaluate import load_eval_jsonl

    keys = _data_keys(run)
    if run.eval_data:  # answer-only rows are fine: evaluation needs question and answer
        held_out = load_eval_jsonl(run.eval_data, **keys)
        held_q = {p.question for p in held_out}
        kept = [p for p in train if p.question not in held_q]
        removed, train = len(train) - len(kept), kept
    else:
        train, held_out, removed = split_held_out(train, run.eval_fraction)
    if removed:
        print(
            f"[opsd-train] removed {removed} training problem(s) whose question is also "
            "in the held-out set"
        )
    if not train:
        raise ValueError("no training problems left after holding out the eval share")
    return train, held_out[: run.eval_n] if run.eval_n else held_out


def _data_keys(run: RunConfig) -> dict:
    return {
        k: getattr(run, k)
        for k in ("question_key", "solution_key", "answer_key")
        if getattr(run, k) is not None
    }


def _check_prompt_lengths(run: RunConfig, tc, pb, train, held_out, limit: int | None):
    """Reject (or drop, with a count) problems whose prompt + new tokens exceed ``limit``."""
    if not isinstance(limit, int):
        return train, held_out
    eval_new = tc.eval_max_new_tokens or tc.max_new_tokens
    build = pb.eval_ids if tc.eval_prompt == "eval" else pb.student_ids
    bad_train = [
        i
        for i, p in enumerate(train)
        if max(len(pb.student_ids(p)), len(pb.teacher_ids(p))) + tc.max_new_tokens > limit
    ]
    bad_eval = [i for i, p in enumerate(held_out) if len(build(p)) + eval_new > limit]
    if not bad_train and not bad_eval:
        return train, held_out
    what = (
        f"{len(bad_train)} training and {len(bad_eval)} held-out problem(s) have a prompt "
        f"longer than the model's {limit} positions minus the new tokens "
        f"({tc.max_new_tokens} training, {eval_new} evaluation)"
    )
    if run.long_prompts == "error":
        first = bad_train[:5] if bad_train else bad_eval[:5]
        raise ValueError(
            f"{what}; first {'training' if bad_train else 'held-out'} indices "
            f"{first}. Pass --long-prompts drop to skip them, or lower "
            "--max-new-tokens"
        )
    print(f"[opsd-train] dropped {what}")
    bt, be = set(bad_train), set(bad_eval)
    train = [p for i, p in enumerate(train) if i not in bt]
    held_out = [p for i, p in enumerate(held_out) if i not in be]
    if not train:
        raise ValueError("no training problems left after dropping the long ones")
    return train, held_out


def _run_real(o: Options) -> dict:
    from . import modeling
    from . import prompts as P
    from .data import load_hf_dataset, load_jsonl
    from .recipes import TrainConfig, build_trainer, seed_everything

    run = o.run
    tc = TrainConfig(**o.train)
    # 1. paths, before anything is read
    if not run.data and not run.hf_dataset:
        raise SystemExit("opsd-train: --model needs --data FILE.jsonl or --hf-dataset NAME")
    for flag, value in (("--data", run.data), ("--eval-data", run.eval_data)):
        if value and not Path(value).is_file():
            raise FileNotFoundError(f"{flag}: data file not found: {value}")
    defaults = (P.DEFAULT_STUDENT_TEMPLATE, P.DEFAULT_TEACHER_TEMPLATE, P.DEFAULT_EVAL_TEMPLATE)
    given = (run.student_template, run.teacher_template, run.eval_template)
    student_t, teacher_t, eval_t = (
        P.load_template(t) or d for t, d in zip(given, defaults, strict=True)
    )
    modeling.resolve_model_source(run.model)
    out = Path(run.out or "runs/opsd")
    # 2. the checkpoint to resume
    resume_from = _resolve_resume(run, out)
    _check_writable(out)
    # 3. data, tokenizer and model config (no weights yet): prompt lengths
    keys = _data_keys(run)
    if run.data:
        train = load_jsonl(run.data, **keys)
    else:
        train = load_hf_dataset(
            run.hf_dataset, split=run.hf_split, config_name=run.hf_config, **keys
        )
    train, held_out = _held_out_split(run, train)
    tok = modeling.load_tokenizer(run.model)
    pb = P.PromptBuilder(
        tok, student_t, teacher_t, use_chat_template=run.chat_template, eval_template=eval_t,
        student_thinking=run.student_thinking, teacher_thinking=run.teacher_thinking,
        eval_thinking=run.eval_thinking,
    )  # fmt: skip
    limit = getattr(modeling.load_model_config(run.model), "max_position_embeddings", None)
    train, held_out = _check_prompt_lengths(run, tc, pb, train, held_out, limit)
    # 4. the weights, after seeding every generator (LoRA init and rollouts draw from them)
    model_path = run.model
    if model_path.endswith(".gguf"):
        model_path = modeling.materialize_gguf(model_path, out / "base_model")
    seed_everything(tc.seed)
    model = modeling.load_model(model_path)
    peft = modeling.lora_config(run.lora_r, run.lora_alpha) if run.lora else None
    effective = {**to_dict(run), **tc.to_dict()}
    (out / "config.json").write_text(json.dumps(effective, indent=2, default=str))
    if resume_from:
        dropped = ckpt.truncate_metrics(out / "metrics.jsonl", int(resume_from.split("_")[-1]))
        print(f"[opsd-train] resuming from {resume_from} ({dropped} later record(s) dropped)")
    trainer = build_trainer(model, tok, train, tc, out, pb, held_out=held_out, peft_config=peft)
    trainer.train(resume_from_checkpoint=resume_from)
    if tc.save_every == 0 or trainer.state.global_step % tc.save_every:
        trainer._save_checkpoint(trainer.model, None)
    try:
        trainer.save_model(str(out / "final"))
        tok.save_pretrained(out / "final")
    except OSError as e:
        raise ckpt.CheckpointWriteError.wrap(e, f"cannot write {out / 'final'}") from e
    evals = [r for r in trainer.runlog.history if r["event"] == "eval"]
    summary = dict(steps=trainer.state.global_step, evals=evals,
                   generated_tokens=trainer.runlog.generated_total)  # fmt: skip
    if evals:
        print(
            f"[opsd-train] held-out {evals[-1]['score_name']}: start {evals[0]['score']:.3f}"
            f" -> end {evals[-1]['score']:.3f} (n={evals[-1]['n']})"
        )
    try:
        from .demo import plot_run

        plot_run(out / "metrics.jsonl", out / "training.png")
    except Exception as e:  # noqa: BLE001 - the plot is a convenience
        print(f"[opsd-train] no plot: {e}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[opsd-train] done: {trainer.state.global_step} steps, results in {out}")
    return summary


def _run_demo(o: Options) -> None:
    from .demo import DemoConfig, run_demo

    if o.run.data or o.run.hf_dataset:
        raise SystemExit(
            "opsd-train: --data/--hf-dataset need --model (the demo uses its own "
            "synthetic problems)"
        )
    stray = sorted(k for k in o.given if k not in DEMO_KEYS)
    if stray:
        raise SystemExit(
            f"opsd-train: {', '.join(flag_name(k) for k in stray)} apply to --model runs; the "
            "embedded demo takes its settings from a config file's 'demo' table (see "
            "opsd_train.demo.DemoConfig)"
        )
    table = dict(o.demo or {})
    if "seed" in o.given:
        table["seed"] = o.given["seed"]
    try:
        demo = DemoConfig.from_dict(table)  # checks every phase's settings now
    except ConfigError as e:
        src = (
            o.sources.get("seed")
            if e.key == "seed" and "seed" in o.sources
            else (f"config file {o.run.config}" if o.run.config else None)
        )
        raise ConfigError(_with_source(e, src), e.key) from e
    run_demo(
        demo,
        out_dir=o.run.out or "runs/opsd-demo",
        progress=o.given.get("progress", True) is not False,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``opsd-train`` console script; returns the exit code.

    Configuration errors (bad values, unknown keys, a torn checkpoint, an unwritable run
    folder) end the program with ``SystemExit`` and a one-line message before anything is
    loaded; so do write errors later in the run (disk full), naming the path.
    """
    try:
        o = parse_options(argv)
        if o.run.threads:
            import torch

            torch.set_num_threads(o.run.threads)
        if o.run.model:
            _run_real(o)
        else:
            _run_demo(o)
    except (ConfigError, ckpt.CheckpointError, ckpt.CheckpointWriteError) as e:
        raise SystemExit(f"opsd-train: error: {e}") from e
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
