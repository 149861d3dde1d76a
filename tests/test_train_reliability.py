"""Reliability of ``opsd-train`` on the TRL trainers: strict configuration checked before
anything is loaded, crash-safe checkpoints (torn writes, full disk, ``--resume latest``,
no unpickling of arbitrary objects), reproducible seeded runs, early named errors."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from opsd_train import checkpoint as ckpt
from opsd_train.cli import RunConfig, build_parser, main, parse_options
from opsd_train.config import ConfigError, flag_name, option_fields
from opsd_train.data import Problem, load_jsonl, save_jsonl, synthetic_split
from opsd_train.recipes import TrainConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """``--threads`` sets torch's global thread count: give it back after each test."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _data(tmp_path, n_train=12, n_eval=4):
    train, held = synthetic_split(n_train, n_eval, seed=1)
    save_jsonl(train, tmp_path / "train.jsonl")
    save_jsonl(held, tmp_path / "held.jsonl")
    return tmp_path / "train.jsonl"


def _small_run(model_dir, data, out, *extra):
    return [
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--eval-fraction",
        "0",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--max-new-tokens",
        "5",
        "--lr",
        "1e-2",
        "--threads",
        "1",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


# ----------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--max-grad-norm", "-1"], "--max-grad-norm: must be > 0 or none, got -1.0"),
        (["--max-grad-norm", "0"], "--max-grad-norm: must be > 0 or none"),
        (["--min-lr-ratio", "5"], "--min-lr-ratio: must be <= 1, got 5.0"),
        (["--warmup-steps", "-5"], "--warmup-steps: must be >= 0, got -5"),
        (["--save-every", "-1"], "--save-every: must be >= 0"),
        (["--eval-fraction", "-0.1"], "--eval-fraction: must be >= 0"),
        (["--eval-n", "-3"], "--eval-n: must be >= 1 or none"),
        (["--clip", "0"], "--clip: must be > 0 or none"),
        (["--lr", "nan"], "--lr: must be a finite number"),
        (["--top-p", "1.5"], "--top-p: must be <= 1"),
        (["--kind", "jsd", "--beta", "1"], "--beta: must be < 1"),
        (["--loss-temperature", "-2"], "--loss-temperature: must be > 0 or none"),
        (["--batch-size", "6", "--grad-accum", "4"], "--grad-accum: 4 must divide"),
        (["--keep-last", "0"], "--keep-last: must be >= 1"),
    ],
)
def test_bad_values_are_rejected_before_anything_is_read(args, pattern, tmp_path):
    # the model and data do not exist: the value check must come first
    with pytest.raises(SystemExit, match=pattern) as e:
        main(["--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no.jsonl"), *args])
    assert "opsd-train: error" in str(e.value)


def test_none_disables_optional_settings():
    o = parse_options(["--model", "m", "--max-grad-norm", "none", "--clip", "none"])
    cfg = TrainConfig(**o.train)
    assert cfg.max_grad_norm is None and cfg.clip is None


@pytest.mark.parametrize(
    "suffix, text, pattern",
    [
        (".json", '{"stpes": 3}', r"unknown key 'stpes' \(did you mean 'steps'\?\)"),
        (".toml", 'lora = "false"', r"lora: expected true or false, got 'false' \(str\)"),
        (".json", '{"steps": 2.7}', r"steps: expected an integer, got 2.7"),
        (".json", '{"steps": "2"}', r"steps: expected an integer, got '2'"),
        (".json", '{"max_grad_norm": -1}', r"max_grad_norm: must be > 0 or none"),
        (".json", '{"config": "other.json"}', r"unknown key 'config'"),
        (".json", '{"steps": 3', r"cannot be parsed"),
        (".json", '{"clip_mode": "entri"}', r"clip_mode: must be one of \['entry', 'token'"),
    ],
)
def test_config_files_are_read_strictly(tmp_path, suffix, text, pattern):
    cfg = tmp_path / f"c{suffix}"
    cfg.write_text(text)
    with pytest.raises(SystemExit, match=pattern) as e:
        main(["--config", str(cfg), "--model", str(tmp_path / "none")])
    assert str(cfg) in str(e.value)  # the message names the file


def test_config_file_values_and_precedence(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('steps = 7\nlora = true\nclip = "none"\nbatch_size = 8\nresume = "latest"\n')
    o = parse_options(["--config", str(cfg), "--model", "m", "--batch-size", "4"])
    assert o.run.lora is True and o.run.resume == "latest"
    tc = TrainConfig(**o.train)
    assert (tc.steps, tc.clip, tc.batch_size) == (7, None, 4)  # the command line wins


def test_demo_config_is_checked_before_the_warmup(tmp_path):
    for table, pattern in [
        (
            {"demo": {"opsd": {"stpes": 3}}},
            r"demo.opsd: unknown key 'stpes' \(did you mean 'steps'\?\)",
        ),
        ({"demo": {"warmup": {"lr": -1}}}, r"demo.warmup: lr: must be >= 0"),
        ({"demo": {"opsd": {"kind": "jsd", "beta": 0}}}, r"beta: must be > 0"),
        ({"demo": {"n_trian": 5}}, r"unknown key 'n_trian' \(did you mean 'n_train'\?\)"),
        ({"demo": {"model": {"hiden_size": 8}}}, r"did you mean 'hidden_size'"),
        ({"stpes": 3}, r"unknown key 'stpes'"),
    ]:
        cfg = tmp_path / "demo.json"
        cfg.write_text(json.dumps(table))
        with pytest.raises(SystemExit, match=pattern):
            main(["--config", str(cfg), "--out", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()
    # (run_demo creates the folder first thing: nothing ran)


def test_every_config_field_is_a_flag_with_its_doc():
    """The CLI is generated from the dataclasses: a new field cannot be forgotten."""
    parser = build_parser()
    actions = {a.dest: a for a in parser._actions}
    internal = {"phase"}  # set by code, documented as such
    for cls in (RunConfig, TrainConfig):
        for f, _ in option_fields(cls):
            if not f.metadata["cli"]:
                assert f.name in internal, f"{f.name}: add it to the CLI or to `internal`"
                continue
            a = actions[f.name]
            assert flag_name(f.name) in a.option_strings
            assert f.metadata["doc"] and f.metadata["doc"] in (a.help or "")
    names = [f.name for cls in (RunConfig, TrainConfig) for f, _ in option_fields(cls)]
    assert len(names) == len(set(names)), "a key is defined twice"
    # defaults round-trip through the parser: `--flag <default>` gives the default back
    for f, _ in option_fields(TrainConfig):
        if (
            f.metadata["cli"]
            and isinstance(f.default, (int, float, str))
            and not isinstance(f.default, bool)
        ):
            o = parse_options(["--model", "m", flag_name(f.name), str(f.default)])
            assert getattr(TrainConfig(**o.train), f.name) == f.default, f.name


# ----------------------------------------------------------------------- early named errors


def test_missing_model_folder_fails_at_once_without_the_hub(tmp_path, monkeypatch):
    data = _data(tmp_path)
    import huggingface_hub

    def no_hub(*a, **k):
        raise AssertionError("the hub was contacted")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    (tmp_path / "runs").mkdir()
    for name in (str(tmp_path / "missing"), "./missing-model", f"{tmp_path}/runs/a/b"):
        t0 = time.perf_counter()
        with pytest.raises(FileNotFoundError, match="no such folder"):
            main(["--model", name, "--data", str(data), "--out", str(tmp_path / "o")])
        assert time.perf_counter() - t0 < 5
    not_a_model = tmp_path / "empty_dir"
    not_a_model.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        main(["--model", str(not_a_model), "--data", str(data)])


def test_unwritable_run_folder_fails_before_the_model_loads(tmp_path, tiny_dir):
    data = _data(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match=f"--out {blocker} is not writable"):
        main(_small_run(tiny_dir, data, blocker))


def test_non_utf8_data_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    good = json.dumps({"question": "q", "solution": "s \\boxed{1}"}).encode()
    f.write_bytes(good + b"\n" + b'{"question": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not UTF-8 text \(byte 0xe9"):
        load_jsonl(f)


def test_duplicate_questions_never_overlap_the_held_out_set(tmp_path, tiny_dir, capsys):
    train, _ = synthetic_split(10, 0, seed=2)
    rows = train + train[:3]  # the first three questions appear twice
    save_jsonl(rows, tmp_path / "dup.jsonl")
    from opsd_train.cli import _held_out_split

    o = parse_options(
        ["--model", "m", "--data", str(tmp_path / "dup.jsonl"), "--eval-fraction", "0.25"]
    )
    tr, held = _held_out_split(o.run, load_jsonl(tmp_path / "dup.jsonl"))
    assert len(held) == 3
    assert not {p.question for p in tr} & {p.question for p in held}
    assert "removed 3 training problem(s)" in capsys.readouterr().out


def test_long_prompts_rejected_or_dropped(tmp_path, tiny_dir, problems):
    train, _ = synthetic_split(8, 0, seed=4)
    long_q = Problem("Ann has " + "very " * 400 + "many pens.", "1 + 1 = 2. \\boxed{2}", "2")
    save_jsonl([long_q] + train, tmp_path / "long.jsonl")
    args = [
        "--model",
        str(tiny_dir),
        "--data",
        str(tmp_path / "long.jsonl"),
        "--eval-fraction",
        "0",
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--max-new-tokens",
        "4",
        "--no-progress",
        "--threads",
        "1",
    ]
    with pytest.raises(
        ValueError,
        match=r"1 training and 0 held-out problem\(s\) have a "
        r"prompt longer than the model's 256 positions",
    ):
        main([*args, "--out", str(tmp_path / "a")])
    assert not (tmp_path / "a" / "metrics.jsonl").exists()  # nothing ran
    assert main([*args, "--out", str(tmp_path / "b"), "--long-prompts", "drop"]) == 0


# ----------------------------------------------------------------------- reproducibility


def _final_weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


def _step_losses(out):
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in recs if r["event"] == "step"]


def test_seeded_cli_runs_are_bit_identical(tmp_path, tiny_dir):
    data = _data(tmp_path)
    runs = []
    for i, ambient in enumerate((11, 22)):
        torch.manual_seed(ambient)  # whatever the process did before must not matter
        random.seed(ambient)
        out = tmp_path / f"run{i}"
        assert main(_small_run(tiny_dir, data, out, "--steps", "2", "--seed", "5")) == 0
        runs.append(out)
    a, b = (_final_weights(o) for o in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _step_losses(runs[0]) == _step_losses(runs[1])
    # and the seed matters
    out = tmp_path / "other"
    main(_small_run(tiny_dir, data, out, "--steps", "2", "--seed", "6"))
    assert _step_losses(out) != _step_losses(runs[0])


# ----------------------------------------------------------------------- checkpoints


def _train(tmp_path, tiny_dir, problems, **kw):
    from opsd_train.modeling import load_model, load_tokenizer
    from opsd_train.prompts import PromptBuilder
    from opsd_train.recipes import build_trainer
    from tests.train_fixtures import small_config

    tok = load_tokenizer(str(tiny_dir))
    t = build_trainer(
        load_model(str(tiny_dir)),
        tok,
        problems[0],
        small_config(**kw),
        tmp_path,
        PromptBuilder(tok),
    )
    t.train()
    return t


def test_private_trainer_api_is_pinned():
    """The Trainer and TRL methods the recipe overrides: fails loudly when they change."""
    import inspect

    from transformers import Trainer

    from opsd_train.recipes import PRIVATE_TRL_API

    for name, params in ckpt.PRIVATE_TRAINER_API.items():
        assert tuple(inspect.signature(getattr(Trainer, name)).parameters) == params, name
    for cls, name, params in PRIVATE_TRL_API:
        assert tuple(inspect.signature(getattr(cls, name)).parameters) == params, name


def test_checkpoints_are_atomic_verified_and_rotated(tmp_path, tiny_dir, problems):
    t = _train(tmp_path, tiny_dir, problems, algo="sft", steps=3, save_every=1, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_2", "step_3"]  # no temporary left
    p = root / "step_3"
    marker = ckpt.verify_checkpoint(p, deep=True)
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= set(marker["files"])
    assert json.loads((p / "trainer_state.json").read_text())["global_step"] == 3
    state = p / "optimizer.pt"
    raw = bytearray(state.read_bytes())
    raw[-30] ^= 0xFF  # same size, different bytes: the hash catches it
    state.write_bytes(bytes(raw))
    ckpt.verify_checkpoint(p)
    with pytest.raises(ckpt.IncompleteCheckpointError, match="SHA-256"):
        ckpt.verify_checkpoint(p, deep=True)
    state.write_bytes(bytes(raw[:100]))
    with pytest.raises(ckpt.IncompleteCheckpointError, match=f"{state}.*truncated"):
        ckpt.verify_checkpoint(p)
    (p / ckpt.MARKER_FILE).unlink()
    with pytest.raises(ckpt.IncompleteCheckpointError, match="no completion marker"):
        ckpt.verify_checkpoint(p)
    assert t.state.global_step == 3


def test_latest_skips_torn_checkpoints_with_a_warning(tmp_path, tiny_dir, problems):
    _train(tmp_path, tiny_dir, problems, algo="sft", steps=2, save_every=1)
    root = tmp_path / "checkpoints"
    (root / "step_2" / "optimizer.pt").write_bytes(b"")  # torn
    (root / ".step_3.partial-123").mkdir()  # killed during the write of step 3
    with pytest.warns(UserWarning, match=r"step_3.partial-123.*step_2"):
        assert ckpt.find_latest(root) == root / "step_1"
    assert ckpt.find_latest(tmp_path / "nothing", warn=False) is None


def test_full_disk_names_the_path_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    with ckpt.atomic_checkpoint(root, 1) as tmp:
        (tmp / "checkpoint-1").mkdir()
        (tmp / "checkpoint-1" / "w.bin").write_bytes(b"x" * 100)
    ckpt.verify_checkpoint(root / "step_1", deep=True)

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_fsync", full)
    for step in (2, 1):  # a new one, and an overwrite of the old one
        with (
            pytest.raises(ckpt.CheckpointWriteError, match=f"step_{step}.*No space left"),
            ckpt.atomic_checkpoint(root, step) as tmp,
        ):
            (tmp / f"checkpoint-{step}").mkdir()
            (tmp / f"checkpoint-{step}" / "w.bin").write_bytes(b"y" * 100)
        assert sorted(p.name for p in root.iterdir()) == ["step_1"]  # partial folder removed
    monkeypatch.undo()
    ckpt.verify_checkpoint(root / "step_1", deep=True)  # the old one survives


def test_cli_fresh_start_into_a_used_folder_and_torn_resume(tmp_path, tiny_dir):
    data = _data(tmp_path)
    out = tmp_path / "run"
    assert main(_small_run(tiny_dir, data, out, "--steps", "1")) == 0
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "checkpoints",
        "final",
        "training.png",
    }
    assert (out / "checkpoints" / "step_1").is_dir()
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["event"] for r in recs} == {"step"}
    assert recs[0]["generated_tokens"] > 0 and "loss" in recs[0]
    with pytest.raises(SystemExit, match="already holds a run.*--resume latest"):
        main(_small_run(tiny_dir, data, out, "--steps", "1"))
    torn = out / "checkpoints" / "step_1" / "optimizer.pt"
    torn.write_bytes(torn.read_bytes()[:10])
    with pytest.raises(SystemExit, match=f"{torn}.*truncated"):
        main(_small_run(tiny_dir, data, out, "--resume", str(torn.parent)))


def test_resume_never_unpickles_arbitrary_objects(tmp_path, tiny_dir):
    """A crafted RNG-state file (with a consistent marker: an attacker can write both)
    is refused by ``torch.load(weights_only=True)``; its code never runs."""
    import hashlib
    import pickle

    data = _data(tmp_path)
    out = tmp_path / "run"
    assert main(_small_run(tiny_dir, data, out, "--steps", "1")) == 0
    ck = out / "checkpoints" / "step_1"
    rng = next(ck.glob("rng_state*.pth"))
    pwned = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {pwned}",))

    rng.write_bytes(pickle.dumps(Evil()))
    marker = json.loads((ck / ckpt.MARKER_FILE).read_text())
    marker["files"][rng.name] = {
        "bytes": rng.stat().st_size,
        "sha256": hashlib.sha256(rng.read_bytes()).hexdigest(),
    }
    (ck / ckpt.MARKER_FILE).write_text(json.dumps(marker))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        main(_small_run(tiny_dir, data, out, "--steps", "2", "--resume", str(ck)))
    assert not pwned.exists()


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from opsd_train import checkpoint as ck

    real_sha = ck._sha256

    def sha_then_die(path):
        if ".step_2." in str(path):  # the Trainer's files are on disk, the marker is not
            os.kill(os.getpid(), signal.SIGKILL)
        return real_sha(path)

    ck._sha256 = sha_then_die
    from opsd_train.cli import main
    main(sys.argv[1:])
""")


def test_sigkill_during_checkpoint_write_then_resume_latest(tmp_path, tiny_dir):
    data = _data(tmp_path)
    ref = tmp_path / "ref"  # the same run without interruption
    assert main(_small_run(tiny_dir, data, ref, "--save-every", "1")) == 0
    out = tmp_path / "killed"
    script = tmp_path / "kill.py"
    script.write_text(_KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(script), *_small_run(tiny_dir, data, out, "--save-every", "1")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckdir = out / "checkpoints"
    assert (ckdir / "step_1").is_dir() and not (ckdir / "step_2").exists()
    partial = list(ckdir.glob(".step_2.partial-*"))
    assert partial and any(p.is_file() for p in partial[0].rglob("*"))  # really torn
    assert [s for s, *_ in _step_losses(out)] == [1, 2]  # written before the kill
    with pytest.warns(UserWarning, match="skipped torn"):
        assert main(_small_run(tiny_dir, data, out, "--save-every", "1", "--resume", "latest")) == 0
    # no duplicate records, and the continuation is bit-identical to the reference
    assert _step_losses(out) == _step_losses(ref)
    a, b = _final_weights(ref), _final_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for s in (1, 2, 3):
        ckpt.verify_checkpoint(ckdir / f"step_{s}", deep=True)


def test_resume_latest_without_checkpoint_starts_fresh(tmp_path, tiny_dir, capsys):
    data = _data(tmp_path)
    out = tmp_path / "run"
    assert main(_small_run(tiny_dir, data, out, "--steps", "1", "--resume", "latest")) == 0
    assert "no complete checkpoint" in capsys.readouterr().out
    assert [s for s, *_ in _step_losses(out)] == [1]


def test_config_error_type():
    with pytest.raises(ConfigError) as e:
        TrainConfig(top_k=-1)
    assert e.value.key == "top_k"
