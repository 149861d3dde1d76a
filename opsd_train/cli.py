"""``opsd-train``: the command line.

With no arguments it runs the embedded default (see :mod:`opsd_train.demo`) on CPU.
With ``--model`` it trains a real model on ``--data`` (JSONL) or ``--hf-dataset``::

    opsd-train --model Qwen/Qwen3-1.7B --data problems.jsonl --lora --steps 100 \\
        --batch-size 32 --grad-accum 8 --lr 5e-6 --max-new-tokens 1024 --out runs/qwen

``--config FILE`` (JSON, TOML or YAML) supplies any option by its long name with
underscores (``batch_size: 16``); flags given on the command line win. For the default
run the file may hold a ``demo`` table of :class:`~opsd_train.demo.DemoConfig` fields.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main", "build_parser", "load_config_file"]


def load_config_file(path: str | Path) -> dict:
    """Read a JSON, TOML (``.toml``) or YAML (``.yaml``/``.yml``, needs PyYAML) file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config must be a mapping")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _clip(v: str):
    return None if str(v).lower() in ("none", "off", "0") else float(v)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (every default is ``None``: unset flags fall back to the config
    file, then to :class:`~opsd_train.trainer.TrainConfig`)."""
    p = argparse.ArgumentParser(
        prog="opsd-train",
        description="On-policy self-distillation. No arguments: the embedded CPU demo.",
        argument_default=None,
    )
    g = p.add_argument_group("run")
    g.add_argument("--config", help="JSON/TOML/YAML file of options")
    g.add_argument("--out", help="run folder (default runs/opsd-demo or runs/opsd)")
    g.add_argument("--seed", type=int)
    g.add_argument("--resume", help="checkpoint folder to resume from")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g = p.add_argument_group("model and data (omit --model for the embedded demo)")
    g.add_argument("--model", help="path or hub id of a causal LM")
    g.add_argument("--data", help="training problems, JSONL")
    g.add_argument("--eval-data", help="held-out problems, JSONL")
    g.add_argument("--hf-dataset", help="Hugging Face dataset name (needs `datasets`)")
    g.add_argument("--hf-split")
    g.add_argument("--hf-config")
    g.add_argument("--question-key")
    g.add_argument("--solution-key")
    g.add_argument("--answer-key")
    g.add_argument("--eval-n", type=int, help="use at most N held-out problems")
    g.add_argument("--eval-fraction", type=float,
                   help="without --eval-data, hold out this share of --data (default 0.05)")
    g.add_argument("--student-template", help="student prompt template, or @file")
    g.add_argument("--teacher-template", help="teacher prompt template, or @file")
    g.add_argument("--no-chat-template", dest="chat_template", action="store_false")
    g.add_argument("--device")
    g.add_argument("--precision", choices=["auto", "bf16", "bf16-mixed", "fp32"],
                   help="auto: CUDA -> bf16 weights with --lora, else bf16-mixed (fp32 "
                   "weights, bf16 autocast); CPU -> fp32")
    g.add_argument("--lora", action="store_true")
    g.add_argument("--lora-r", type=int)
    g.add_argument("--lora-alpha", type=int)
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--liger", action="store_true", help="Liger kernels for norm/RoPE/MLP (CUDA)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int)
    g.add_argument("--batch-size", type=int, help="prompts per optimizer step")
    g.add_argument("--grad-accum", type=int)
    g.add_argument("--rollouts-per-prompt", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup-steps", type=int)
    g.add_argument("--min-lr-ratio", type=float)
    g.add_argument("--max-grad-norm", type=float)
    g = p.add_argument_group("rollouts")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--max-new-tokens", type=int)
    g = p.add_argument_group("loss and teacher")
    g.add_argument("--loss", choices=["full", "sampled_token"])
    g.add_argument("--kind", choices=["forward_kl", "reverse_kl", "jsd"])
    g.add_argument("--beta", type=float)
    g.add_argument("--loss-temperature", type=float)
    g.add_argument("--clip", type=_clip, help="per-entry clip tau, or 'none'")
    g.add_argument("--impl")
    g.add_argument("--chunk-size", type=int)
    g.add_argument("--teacher", choices=["fixed", "current", "ema"])
    g.add_argument("--ema-decay", type=float)
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int)
    g.add_argument("--eval-k", type=int)
    g.add_argument("--eval-max-new-tokens", type=int)
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument("--save-every", type=int)
    p.set_defaults(progress=None, chat_template=None, lora=None,
                   gradient_checkpointing=None, liger=None)
    return p


_TRAIN_KEYS = {
    "steps", "batch_size", "grad_accum", "rollouts_per_prompt", "lr", "weight_decay",
    "warmup_steps", "min_lr_ratio", "max_grad_norm", "temperature", "top_p", "top_k",
    "max_new_tokens", "loss", "kind", "beta", "loss_temperature", "clip", "impl",
    "chunk_size", "teacher", "ema_decay", "eval_every", "eval_k", "eval_max_new_tokens",
    "eval_batch_size", "save_every", "seed", "progress",
}


def _template(v: str | None) -> str | None:
    if v and v.startswith("@"):
        return Path(v[1:]).read_text()
    return v


def _merged(args: argparse.Namespace) -> dict:
    opts = load_config_file(args.config) if args.config else {}
    for k, v in vars(args).items():
        if v is not None and k != "config":
            opts[k] = v
    return opts


def _run_real(opts: dict) -> dict:
    import torch

    from .data import load_hf_dataset, load_jsonl
    from .modeling import load_model_and_tokenizer, prepare_model, resolve_dtype
    from .prompts import DEFAULT_STUDENT_TEMPLATE, DEFAULT_TEACHER_TEMPLATE, PromptBuilder
    from .trainer import TrainConfig, Trainer

    device = opts.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = opts.get("precision", "auto")
    if precision == "auto" and torch.device(device).type == "cuda":
        precision = "bf16" if opts.get("lora") else "bf16-mixed"
    autocast = None
    if precision == "bf16-mixed":
        precision, autocast = "fp32", "bf16"
    dtype = resolve_dtype(precision, device)
    keys = {k: opts[k] for k in ("question_key", "solution_key", "answer_key") if k in opts}
    if opts.get("data"):
        train = load_jsonl(opts["data"], **keys)
    elif opts.get("hf_dataset"):
        train = load_hf_dataset(opts["hf_dataset"], split=opts.get("hf_split", "train"),
                                config_name=opts.get("hf_config"), **keys)
    else:
        raise SystemExit("opsd-train: --model needs --data FILE.jsonl or --hf-dataset NAME")
    if opts.get("eval_data"):
        held_out = load_jsonl(opts["eval_data"], **keys)
    else:
        frac = float(opts.get("eval_fraction", 0.05))
        n_eval = int(len(train) * frac)
        held_out, train = train[:n_eval], train[n_eval:]
        if not train:
            raise ValueError("no training problems left after holding out the eval share")
    if opts.get("eval_n"):
        held_out = held_out[: opts["eval_n"]]
    model, tok = load_model_and_tokenizer(opts["model"], dtype=dtype, device=device)
    model = prepare_model(
        model, lora=bool(opts.get("lora")), lora_r=opts.get("lora_r", 64),
        lora_alpha=opts.get("lora_alpha", 128),
        gradient_checkpointing=bool(opts.get("gradient_checkpointing")),
        liger=bool(opts.get("liger")))
    pb = PromptBuilder(
        tok,
        _template(opts.get("student_template")) or DEFAULT_STUDENT_TEMPLATE,
        _template(opts.get("teacher_template")) or DEFAULT_TEACHER_TEMPLATE,
        use_chat_template=opts.get("chat_template", True) is not False,
    )
    tc = TrainConfig.from_dict({k: v for k, v in opts.items() if k in _TRAIN_KEYS})
    tc.phase = tc.objective
    tc.autocast = autocast
    out = Path(opts.get("out", "runs/opsd"))
    trainer = Trainer(model, tok, train, tc, eval_problems=held_out, prompt_builder=pb,
                      output_dir=out)
    if opts.get("resume"):
        trainer.load_checkpoint(opts["resume"])
    (out / "config.json").write_text(json.dumps({**opts, "train_config": tc.to_dict()},
                                                indent=2, default=str))
    evals = trainer.train()
    trainer.save_checkpoint(out / "checkpoints" / f"step_{trainer.step}")
    model.save_pretrained(out / "final")
    tok.save_pretrained(out / "final")
    summary = {"steps": trainer.step, "evals": [e.to_dict() for e in evals]}
    if evals:
        print(f"[opsd-train] held-out pass@1: start {evals[0].pass1:.3f} -> "
              f"end {evals[-1].pass1:.3f} (n={evals[-1].n})")
    try:
        from .demo import plot_run

        plot_run(out / "metrics.jsonl", out / "training.png")
    except Exception as e:  # noqa: BLE001 - the plot is a convenience
        print(f"[opsd-train] no plot: {e}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[opsd-train] done: {trainer.step} steps, results in {out}")
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``opsd-train`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    opts = _merged(args)
    if opts.get("threads"):
        import torch

        torch.set_num_threads(int(opts["threads"]))
    if opts.get("model"):
        _run_real(opts)
        return 0
    from .demo import DemoConfig, run_demo

    if opts.get("data") or opts.get("hf_dataset"):
        raise SystemExit("opsd-train: --data/--hf-dataset need --model (the demo uses "
                         "its own synthetic problems)")
    stray = sorted(k for k in opts if k in _TRAIN_KEYS - {"seed", "progress"}
                   or k in ("lora", "liger", "gradient_checkpointing", "resume", "device"))
    if stray:
        raise SystemExit(
            f"opsd-train: {', '.join('--' + k.replace('_', '-') for k in stray)} apply to "
            "--model runs; the embedded demo takes its settings from a config file's "
            "'demo' table (see opsd_train.demo.DemoConfig)")
    demo = DemoConfig.from_dict(opts.get("demo", {}))
    if "seed" in opts:
        demo.seed = int(opts["seed"])
    run_demo(demo, out_dir=opts.get("out", "runs/opsd-demo"),
             progress=opts.get("progress", True) is not False)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
