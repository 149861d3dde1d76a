"""FSDP2 data-parallel training under torchrun, on CPU with gloo (2 processes, 127.0.0.1).

Two ranks train the embedded tiny model for a few steps and are compared with one process
on the same global batch (losses, gradient norms and updated weights within float32
tolerance); a run resumed from a distributed checkpoint (torch.distributed.checkpoint in
the atomic checkpoint folder) ends where the uninterrupted one does.

The workers run this file as a module: ``torchrun ... -m tests.test_train_fsdp MODE ...``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


class FixedEngine:
    """Deterministic rollouts (a function of the prompt only), so a sharded run and a
    single process see the same completions."""

    def generate(self, prompts, params, num_return_sequences=1):
        out = []
        for p in prompts:
            for j in range(num_return_sequences):
                n = 2 + (sum(p) + j) % 4  # lengths 2..5
                out.append([(p[-1] * 7 + 3 * i + j) % 200 + 5 for i in range(n)])
        return out


def _config(**kw):
    from opsd_train.trainer import TrainConfig

    base = dict(
        steps=3,
        batch_size=4,
        grad_accum=2,
        lr=1e-2,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=6,
        clip=0.05,
        teacher="current",
        max_grad_norm=0.02,
        progress=False,
        eval_at_start=False,
        eval_at_end=False,
        seed=1,
        impl="torch",
    )
    base.update(kw)
    return TrainConfig(**base)


def _load(tiny_dir):
    from opsd_train.modeling import load_model_and_tokenizer

    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(str(tiny_dir), dtype=torch.float32, device="cpu")
    torch.manual_seed(7)
    with torch.no_grad():  # a student that differs from the data's argmax a little
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, tok


def _use_sgd(tr):
    """SGD with momentum instead of AdamW for the 1-vs-2-process comparison: AdamW's first
    steps move every weight by about lr * sign(gradient), so gradients at rounding level
    (different summation orders) would flip whole updates; SGD keeps the float32
    differences proportional."""
    params = [p for p in tr.model.parameters() if p.requires_grad]
    tr.optimizer = torch.optim.SGD(params, lr=1.0, momentum=0.9)
    tr.scheduler = torch.optim.lr_scheduler.LambdaLR(tr.optimizer, lambda s: 1.0)


def _problems(held_out=False):
    from opsd_train.data import synthetic_split

    return synthetic_split(n_train=16, n_eval=2, seed=3)[1 if held_out else 0]


def _lora_run(model, tok, trainer_cls, grad_accum, **kw):
    """LoRA with the fixed teacher (adapter disabled), rollouts and an evaluation sampled
    with ``generate`` from the model (top-k 1: the same completions in both setups), and
    the reference's per-micro-batch token means (``grad_accum`` 2 on one process and 1 on
    each of two give the same micro-batches)."""
    from opsd_train.modeling import prepare_model

    torch.manual_seed(5)  # the same adapter init everywhere
    model = prepare_model(model, lora=True, lora_r=4, lora_alpha=8)
    cfg = _config(
        teacher="fixed",
        top_k=1,
        steps=2,
        eval_at_end=True,
        eval_max_new_tokens=4,
        loss_normalization="microbatch",
        grad_accum=grad_accum,
    )
    tr = trainer_cls(model, tok, _problems(), cfg, eval_problems=_problems(True), **kw)
    _use_sgd(tr)
    evals = tr.train()
    return tr, evals


def _worker(mode: str, tiny_dir: str, out: str) -> None:
    """One rank. ``first``: train with SGD (written to ``out``), then train a fresh model
    with AdamW and a checkpoint at step 2 (written to ``out`` with suffix ``.adamw``);
    ``resume``: resume the AdamW run from that checkpoint. Rank 0 writes each run's
    history and full weights."""
    from opsd_train.distributed import DistributedTrainer, init_from_env

    torch.set_num_threads(1)
    info = init_from_env("cpu")
    assert info is not None and info.world_size == 2
    out = Path(out)
    runs = {
        "first": [
            ("sgd", out),
            ("sgd-mb", out.with_suffix(".mb")),
            ("save", out.with_suffix(".adamw")),
            ("lora", out.with_suffix(".lora")),
        ],
        "resume": [("resume", out)],
    }[mode]
    for kind, dest in runs:
        model, tok = _load(tiny_dir)
        if kind == "lora":
            tr, evals = _lora_run(model, tok, DistributedTrainer, 1, info=info)
            sd = {k: v for k, v in tr.full_state_dict().items() if "lora_" in k}
            if info.is_main:
                torch.save(
                    {"history": tr.history, "state": sd, "evals": [e.to_dict() for e in evals]},
                    dest,
                )
            continue
        run_dir = out.parent / {"sgd": "sgd-run", "sgd-mb": "mb-run"}.get(kind, "run")
        cfg = _config(save_every=2 if kind == "save" else 0)
        if kind == "sgd-mb":  # one micro-batch per rank: the 1-process run's two
            cfg = _config(loss_normalization="microbatch", grad_accum=1)
        tr = DistributedTrainer(
            model, tok, _problems(), cfg, info=info, engine=FixedEngine(), output_dir=run_dir
        )
        if kind.startswith("sgd"):
            _use_sgd(tr)
        if kind == "resume":
            tr.load_checkpoint(run_dir / "checkpoints" / "step_2")
        tr.train()
        sd = tr.full_state_dict()
        if info.is_main:
            torch.save({"history": tr.history, "state": sd}, dest)
    if mode == "resume":
        _cli_run(tiny_dir, out.parent / "cli", info)
    torch.distributed.destroy_process_group()


def _cli_run(tiny_dir, folder: Path, info) -> None:
    """``opsd-train`` under torchrun: full fine-tune with the current teacher, a top-k
    teacher, gradient checkpointing, evaluation at start and end, a final checkpoint and
    final weights."""
    from opsd_train.cli import main
    from opsd_train.data import save_jsonl, synthetic_split

    if info.is_main:
        folder.mkdir(parents=True)
        train, held = synthetic_split(8, 2, seed=2)
        save_jsonl(train, folder / "train.jsonl")
        save_jsonl(held, folder / "held.jsonl")
    torch.distributed.barrier()
    assert (
        main(
            [
                "--model",
                str(tiny_dir),
                "--data",
                str(folder / "train.jsonl"),
                "--eval-data",
                str(folder / "held.jsonl"),
                "--steps",
                "2",
                "--batch-size",
                "4",
                "--grad-accum",
                "2",
                "--max-new-tokens",
                "4",
                "--teacher",
                "current",
                "--teacher-topk",
                "8",
                "--gradient-checkpointing",
                "--out",
                str(folder / "run"),
                "--no-progress",
                "--device",
                "cpu",
            ]
        )
        == 0
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(mode: str, tiny_dir, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--nnodes",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "tests.test_train_fsdp",
        mode,
        str(tiny_dir),
        str(out),
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return torch.load(out, weights_only=False)


def _single_process(tiny_dir, normalization="global"):
    from opsd_train.trainer import Trainer

    torch.set_num_threads(1)
    model, tok = _load(tiny_dir)
    tr = Trainer(
        model, tok, _problems(), _config(loss_normalization=normalization), engine=FixedEngine()
    )
    _use_sgd(tr)
    tr.train()
    return tr.history, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(a: dict, b: dict, rtol=1e-4, atol=1e-6):
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


@pytest.fixture(scope="module")
def fsdp_runs(tiny_dir, tmp_path_factory):
    """The first torchrun launch (2 processes: SGD run, AdamW run with a checkpoint,
    LoRA run), shared by the fsdp tests: ``(folder, results)``."""
    if importlib.util.find_spec("peft") is None:
        pytest.skip("peft is not installed")
    tmp = tmp_path_factory.mktemp("fsdp")
    return tmp, _torchrun("first", tiny_dir, tmp / "out.pt")


def _single(fn):
    threads = torch.get_num_threads()
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("normalization", ["global", "microbatch"])
def test_fsdp_two_processes_match_one_process(tiny_dir, fsdp_runs, normalization):
    """Global token mean (grad_accum 2 everywhere: other micro-batches, the same mean),
    and the reference's mean of micro-batch token means (completions of 2 to 5 tokens,
    so it differs from the global mean; grad_accum 1 on each of two processes makes the
    1-process run's two micro-batches)."""
    tmp, first = fsdp_runs
    full = first if normalization == "global" else torch.load(tmp / "out.mb", weights_only=False)
    ref_hist, ref_state = _single(lambda: _single_process(tiny_dir, normalization))
    steps = [r for r in full["history"] if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for got, ref in zip(steps, ref_hist, strict=True):
        for key in ("loss", "divergence", "grad_norm"):
            assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-7), (key, got, ref)
        for key in ("completion_tokens", "rollout_len"):
            assert got[key] == ref[key], key
        assert got["world_size"] == 2
    assert steps[0]["grad_norm"] > _config().max_grad_norm  # the global-norm clip acted
    # the run moved the weights, and the two ranks' shards reassemble to the 1-process ones
    init = _load(tiny_dir)[0].state_dict()
    assert any(not torch.equal(init[k], ref_state[k]) for k in ref_state)
    _assert_same_weights(full["state"], ref_state)
    # metrics written once, by rank 0
    run = "sgd-run" if normalization == "global" else "mb-run"
    lines = (tmp / run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]


def test_fsdp_resume_from_a_distributed_checkpoint_and_cli(tiny_dir, fsdp_runs):
    """AdamW run with a checkpoint at step 2 (DCP shards inside the atomic checkpoint
    folder), resumed by fresh processes to step 3: the same step 3 and final weights.
    The same launch then runs the ``opsd-train`` command line."""
    from opsd_train.checkpoint import verify_checkpoint

    tmp, _ = fsdp_runs
    saved = torch.load(tmp / "out.adamw", weights_only=False)
    ck = tmp / "run" / "checkpoints" / "step_2"
    marker = json.loads((ck / "COMPLETE.json").read_text())
    assert any(name.startswith("dcp/") for name in marker["files"])
    assert not list(ck.parent.glob(".*"))  # no staging or partial folders left
    verify_checkpoint(ck, deep=True)
    s_steps = [r for r in saved["history"] if r["event"] == "step"]
    resumed = _torchrun("resume", tiny_dir, tmp / "resumed.pt")
    r_steps = [r for r in resumed["history"] if r["event"] == "step"]
    assert [r["step"] for r in r_steps] == [3]
    for key in ("loss", "grad_norm", "lr", "completion_tokens"):
        assert r_steps[0][key] == s_steps[2][key], key
    _assert_same_weights(resumed["state"], saved["state"], rtol=0, atol=0)
    lines = (tmp / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]  # no duplicates

    # the same launch ran `opsd-train` (the CLI) under torchrun afterwards
    run = tmp / "cli" / "run"
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["event"] == "step"] == [1, 2]
    assert [r["step"] for r in recs if r["event"] == "eval"] == [0, 2]
    assert all(r["world_size"] == 2 for r in recs if r["event"] == "step")
    verify_checkpoint(run / "checkpoints" / "step_2", deep=True)
    assert (run / "final" / "config.json").is_file()
    assert any((run / "final").glob("*.safetensors"))
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    assert json.loads((run / "config.json").read_text())["teacher_topk"] == 8


def test_fsdp_lora_fixed_teacher_with_generate_matches_one_process(tiny_dir, fsdp_runs):
    """LoRA adapters sharded with their layers, the fixed teacher as the adapter-disabled
    model, rollouts and evaluation from ``generate`` inside the root unit (ranks generate
    different lengths without a hang)."""
    from opsd_train.trainer import Trainer

    tmp, _ = fsdp_runs
    got = torch.load(tmp / "out.lora", weights_only=False)

    def one():
        torch.set_num_threads(1)
        tr, evals = _lora_run(*_load(tiny_dir), Trainer, 2)
        state = {k: v.detach().clone() for k, v in tr.model.state_dict().items() if "lora_" in k}
        return tr.history, state, [e.to_dict() for e in evals]

    ref_hist, ref_state, ref_evals = _single(one)
    steps = [r for r in got["history"] if r["event"] == "step"]
    refs = [r for r in ref_hist if r["event"] == "step"]
    assert len(steps) == len(refs) == 2
    for a, b in zip(steps, refs, strict=True):
        assert a["completion_tokens"] == b["completion_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4, abs=1e-7)
    assert steps[0]["loss"] > 0
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in got["state"].items())
    _assert_same_weights(got["state"], ref_state)
    assert got["evals"] == ref_evals


def test_fsdp_trainer_refuses_unsupported_settings(tiny):
    from opsd_train.distributed import DistInfo, DistributedTrainer

    model, tok = tiny
    info = DistInfo(0, 2, 0, torch.device("cpu"))
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        DistributedTrainer(model, tok, _problems(), _config(batch_size=3, grad_accum=1), info=info)
    with pytest.raises(ValueError, match="--lora"):
        DistributedTrainer(model, tok, _problems(), _config(teacher="fixed"), info=info)


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
