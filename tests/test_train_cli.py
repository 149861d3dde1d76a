"""The ``opsd-train`` CLI end to end at a tiny budget (demo and --model paths)."""

from __future__ import annotations

import json

import pytest

from opsd_train.cli import main
from opsd_train.data import save_jsonl, synthetic_split
from tests.train_fixtures import TINY_TEST_MODEL


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """``--threads`` sets torch's global thread count: give it back after each test."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


TINY_DEMO = {
    "demo": {
        "n_train": 40,
        "n_eval": 6,
        "model": TINY_TEST_MODEL,
        "warmup": {"steps": 3, "batch_size": 8, "warmup_steps": 1},
        "opsd": {"steps": 2, "batch_size": 4, "max_new_tokens": 6},
        "eval_max_new_tokens": 6,
    }
}


def test_cli_demo_end_to_end(tmp_path, capsys):
    cfg = tmp_path / "demo.json"
    cfg.write_text(json.dumps(TINY_DEMO))
    out = tmp_path / "run"
    assert main(["--config", str(cfg), "--out", str(out), "--no-progress", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "after OPSD" in printed and "teacher w/ solution" in printed
    assert "after GRPO control" in printed and "| GRPO |" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == 3
    for key in (
        "student_before",
        "student_after_opsd",
        "student_after_control_sft",
        "teacher_with_solution",
        "student_after_grpo",
    ):
        assert 0.0 <= summary[key]["pass@1"] <= 1.0
    assert summary["steps"] == {"warmup": 3, "opsd": 2, "control": 2, "grpo": 2}
    assert summary["trainer"] == {
        "opsd": "FusedSDFTTrainer",
        "control": "SFTTrainer",
        "grpo": "GRPOTrainer",
    }
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    phases = {r["phase"] for r in recs if r["event"] == "step"}
    assert phases == {"warmup", "opsd", "control", "grpo"}
    assert (out / "opsd_demo.png").stat().st_size > 1000
    assert (out / "accuracy_vs_tokens.png").stat().st_size > 1000
    # generated tokens: rollouts of OPSD and GRPO (the same number of rollouts per step:
    # batch 4 x 1 and batch 1 x group 4), none for SFT; cumulative per phase
    steps = [r for r in recs if r["event"] == "step"]
    for phase in ("opsd", "grpo"):
        rs = [r for r in steps if r["phase"] == phase]
        assert all(r["generated_tokens"] > 0 for r in rs)
        assert rs[-1]["generated_tokens_total"] == sum(r["generated_tokens"] for r in rs)
        assert summary["generated_tokens"][phase] == rs[-1]["generated_tokens_total"]
    assert all(r["generated_tokens"] == 0 for r in steps if r["phase"] in ("warmup", "control"))
    table = (out / "accuracy_vs_tokens.md").read_text()
    assert table.count("| OPSD |") >= 2 and "| SFT |" in table and "| GRPO |" in table


def test_cli_real_model_path(tmp_path, tiny_dir):
    train, held = synthetic_split(12, 4, seed=1)
    save_jsonl(train, tmp_path / "train.jsonl")
    save_jsonl(held, tmp_path / "held.jsonl")
    out = tmp_path / "real"
    rc = main(
        [
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
            "--grad-accum",
            "2",
            "--max-new-tokens",
            "5",
            "--lora",
            "--lora-r",
            "2",
            "--lora-alpha",
            "4",
            "--clip",
            "0.05",
            "--out",
            str(out),
            "--no-progress",
            "--save-every",
            "1",
        ]
    )
    assert rc == 0
    assert (out / "checkpoints" / "step_1" / "trainer_state.json").is_file()
    assert (out / "final" / "adapter_config.json").is_file()  # the LoRA path saves the adapter
    config = json.loads((out / "config.json").read_text())
    assert config["lora"] and config["clip"] == 0.05 and config["grad_accum"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and len(summary["evals"]) == 2
    # resume from step 1 to a longer budget
    rc = main(
        [
            "--model",
            str(tiny_dir),
            "--data",
            str(tmp_path / "train.jsonl"),
            "--eval-data",
            str(tmp_path / "held.jsonl"),
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--max-new-tokens",
            "5",
            "--grad-accum",
            "2",
            "--lora",
            "--lora-r",
            "2",
            "--lora-alpha",
            "4",
            "--out",
            str(tmp_path / "resumed"),
            "--no-progress",
            "--resume",
            str(out / "checkpoints" / "step_1"),
        ]
    )
    assert rc == 0
    steps = [
        json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in steps if r["event"] == "step"] == [2, 3]


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit, match="need --model"):
        main(["--data", "x.jsonl"])
    with pytest.raises(SystemExit, match="apply to --model runs"):
        main(["--steps", "3"])
    with pytest.raises(SystemExit):
        main(["--model", "whatever"])  # no data
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        main(["--model", "unused", "--data", str(empty)])


def test_cli_demo_is_reproducible(tmp_path):
    """Two demo runs with the same seed (and thread count) give bit-identical records."""
    import torch

    small = json.loads(json.dumps(TINY_DEMO))
    small["demo"].update(n_train=24, n_eval=4, eval_every=0)
    small["demo"]["warmup"].update(steps=2)
    small["demo"]["opsd"].update(steps=1)
    cfg = tmp_path / "demo.json"
    cfg.write_text(json.dumps(small))
    runs = []
    for i, ambient in enumerate((1, 2)):
        torch.manual_seed(ambient)
        out = tmp_path / f"run{i}"
        main(["--config", str(cfg), "--out", str(out), "--no-progress", "--threads", "1"])
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs.append([(r["phase"], r["step"], r.get("loss"), r.get("pass@1")) for r in recs])
    assert runs[0] == runs[1]
    assert {p for p, *_ in runs[0]} == {"warmup", "opsd", "control", "grpo"}
