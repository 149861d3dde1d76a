"""Each algorithm end to end through ``opsd-train --model`` on the TRL trainers (OPSD with
the full loss, the teacher's top-k and the sampled-token estimator; SFT; GRPO), and the
tokenizer edge cases."""

from __future__ import annotations

import json

import pytest

from opsd_train.cli import main
from opsd_train.data import save_jsonl, synthetic_split


def _records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "extra",
    [
        ["--algo", "sft", "--sft-teacher-fraction", "0.5"],
        ["--algo", "grpo", "--batch-size", "2", "--group-size", "2"],
        ["--teacher-topk", "3", "--kind", "reverse_kl"],
        [
            "--loss",
            "sampled_token",
            "--kind",
            "reverse_kl",
            "--clip",
            "none",
            "--teacher",
            "current",
        ],
        [
            "--kind",
            "jsd",
            "--beta",
            "0.3",
            "--loss-temperature",
            "0.7",
            "--loss-normalization",
            "microbatch",
            "--grad-accum",
            "2",
        ],
        ["--clip-mode", "entry_keep"],
    ],
    ids=["sft", "grpo", "teacher-topk", "sampled-token", "jsd-microbatch", "clip-mode"],
)
def test_every_algorithm_runs_from_the_cli(extra, tmp_path, tiny_dir):
    train, held = synthetic_split(12, 2, seed=1)
    save_jsonl(train, tmp_path / "train.jsonl")
    save_jsonl(held, tmp_path / "held.jsonl")
    out = tmp_path / "run"
    args = [
        "--model",
        str(tiny_dir),
        "--data",
        str(tmp_path / "train.jsonl"),
        "--eval-data",
        str(tmp_path / "held.jsonl"),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--max-new-tokens",
        "4",
        "--eval-max-new-tokens",
        "3",
        "--lr",
        "1e-3",
        "--threads",
        "1",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]
    assert main(args) == 0
    recs = _records(out)
    steps = [r for r in recs if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["loss"] == r["loss"] for r in steps)  # not NaN
    rollouts = "sft" not in extra
    assert all((r["generated_tokens"] > 0) == rollouts for r in steps)
    assert [r["step"] for r in recs if r["event"] == "eval"] == [0, 2]
    config = json.loads((out / "config.json").read_text())
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        key = flag[2:].replace("-", "_")
        assert str(config[key]) in (value, str(float(value)) if value[0].isdigit() else "None"), key


def test_tokenizer_without_pad_token_pads_with_eos(tiny, problems, tmp_path):
    from opsd_train.prompts import PromptBuilder
    from opsd_train.recipes import build_trainer
    from tests.train_fixtures import small_config

    model, tok = tiny
    tok.pad_token = None
    t = build_trainer(model, tok, problems[0], small_config(steps=1), tmp_path, PromptBuilder(tok))
    assert tok.pad_token == tok.eos_token
    t.train()
    assert t.state.global_step == 1


def test_no_progress_bar_floods_a_log(tiny, problems, tmp_path, capfd):
    """stdout is not a terminal here: no carriage-return progress bars, one line per step."""
    from opsd_train.prompts import PromptBuilder
    from opsd_train.recipes import build_trainer
    from tests.train_fixtures import small_config

    model, tok = tiny
    capfd.readouterr()
    tc = small_config(algo="sft", steps=3, progress=True)
    t = build_trainer(model, tok, problems[0], tc, tmp_path, PromptBuilder(tok))
    assert t.args.disable_tqdm
    t.train()
    out, err = capfd.readouterr()
    assert "\r" not in out + err
    assert sum("'loss'" in line for line in out.splitlines()) == 3


def test_soft_capped_gemma2_trains_from_the_cli(tmp_path):
    """A Gemma 2 model (final_logit_softcapping) trains through ``opsd-train --model``: the
    OPSD loss applies its cap (FusedSDFTTrainer, checked against TRL's stock trainer on
    Gemma 2 in float64 in tests/test_trl_sdft.py); here the whole CLI path runs."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from opsd_train.tiny import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        final_logit_softcapping=2.0,  # small enough that the cap bends these logits
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    model_dir = tmp_path / "gemma2"
    Gemma2ForCausalLM(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    train, held = synthetic_split(8, 2, seed=1)
    save_jsonl(train, tmp_path / "train.jsonl")
    save_jsonl(held, tmp_path / "held.jsonl")
    out = tmp_path / "run"
    args = ["--model", str(model_dir), "--data", str(tmp_path / "train.jsonl"),
            "--eval-data", str(tmp_path / "held.jsonl"), "--steps", "2", "--batch-size", "2",
            "--max-new-tokens", "4", "--eval-max-new-tokens", "3", "--lr", "1e-3",
            "--clip", "0.05", "--threads", "1", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    steps = [r for r in _records(out) if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert all(r["generated_tokens"] > 0 for r in steps)
