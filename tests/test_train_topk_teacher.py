"""Trainer with a top-k teacher (--teacher-topk): K = V equals the full OPSD loss, small K
matches a naive float64 top-k loss (value and student gradients), the step trains, the CLI
flag runs end to end, and bad settings are clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from opsd_train.config import ConfigError
from opsd_train.data import save_jsonl, synthetic_split
from opsd_train.prompts import PromptBuilder
from opsd_train.step import (
    LossConfig,
    final_hidden_states,
    gather_completion_states,
    opsd_loss,
    pack_batch,
)
from opsd_train.teacher import Teacher
from opsd_train.topk_teacher import LocalTopKTeacher, topk_opsd_loss
from opsd_train.trainer import TrainConfig, Trainer


def _batches(model, tok, train, n=3):
    pb = PromptBuilder(tok)
    g = torch.Generator().manual_seed(4)
    v = model.get_output_embeddings().weight.shape[0]
    # completions of different lengths (padding and masked slots), random token ids
    comps = [torch.randint(3, v, (4 + 2 * i,), generator=g).tolist() for i in range(n)]
    sb = pack_batch([pb.student_ids(p) for p in train[:n]], comps, tok.pad_token_id)
    tb = pack_batch([pb.teacher_ids(p) for p in train[:n]], comps, tok.pad_token_id)
    return sb, tb


def _perturb(model, scale=0.05):
    torch.manual_seed(11)
    with torch.no_grad():  # the student away from the (fixed) teacher
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def _naive_topk_loss(hs, w, ids, lps, mask, tail, temperature, clip, kind):
    """Float64, straight from the formulas: full student log-softmax, gather at the ids."""
    ls = torch.log_softmax(hs.double() @ w.double().T / temperature, -1)
    ps_k = ls.gather(-1, ids).exp()
    pt_k = lps.double().exp()
    if tail == "bucket":
        keep = torch.ones_like(ls, dtype=torch.bool).scatter(-1, ids, False)
        rs = torch.where(keep, ls, -torch.inf).logsumexp(-1, keepdim=True).exp()
        rt = (1 - pt_k.sum(-1, keepdim=True)).clamp_min(0)
        p, q = torch.cat([pt_k, rt], -1), torch.cat([ps_k, rs], -1)
    else:
        p, q = pt_k / pt_k.sum(-1, keepdim=True), ps_k / ps_k.sum(-1, keepdim=True)
    if kind == "reverse_kl":
        p, q = q, p
    phi = torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p))
    if clip is not None:
        phi = phi.clamp(max=clip)
    return torch.where(mask, phi.sum(-1), torch.zeros(())).sum()


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_topk_teacher_with_k_equal_v_is_the_full_opsd_loss(tiny, problems, tail):
    model, tok = tiny
    sb, tb = _batches(model, tok, problems[0])
    teacher = Teacher(model, "fixed")
    _perturb(model)
    v = model.get_output_embeddings().weight.shape[0]
    cfg = LossConfig(kind="forward_kl", temperature=1.3, clip=None, impl="torch")
    full, _ = opsd_loss(model, sb, tb, cfg, teacher_ctx=teacher.weights)
    ids, lps = LocalTopKTeacher(model, teacher.weights, chunk_size=5).topk(tb, v, 1.3)
    topk, st = topk_opsd_loss(model, sb, ids, lps, cfg, tail=tail)
    assert st["tokens"] == int(sb.mask.sum())
    torch.testing.assert_close(topk, full, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "tail,kind,clip",
    [
        ("bucket", "forward_kl", None),
        ("bucket", "forward_kl", 0.02),
        ("renormalize", "reverse_kl", None),
    ],
)
def test_topk_teacher_small_k_matches_naive_float64(tiny, problems, tail, kind, clip):
    model, tok = tiny
    sb, tb = _batches(model, tok, problems[0])
    teacher = Teacher(model, "fixed")
    _perturb(model)
    k, temp = 5, 0.9
    head = model.get_output_embeddings()
    ids, lps = LocalTopKTeacher(model, teacher.weights, chunk_size=4).topk(tb, k, temp)
    assert ids.shape == (*sb.mask.shape, k) and not lps.requires_grad
    # the engine's top-k is the teacher's own log-softmax top-k (teacher weights swapped in)
    with torch.no_grad(), teacher.weights(model):
        h_t = gather_completion_states(
            final_hidden_states(model, tb.input_ids, tb.attention_mask),
            tb.starts,
            tb.completion.shape[1],
        )
        ref = torch.log_softmax(h_t.double() @ head.weight.double().T / temp, -1).topk(k)
    torch.testing.assert_close(lps.double(), ref.values, rtol=0, atol=1e-5)
    assert torch.equal(ids, ref.indices)

    cfg = LossConfig(kind=kind, temperature=temp, clip=clip, impl="torch")
    loss, _ = topk_opsd_loss(model, sb, ids, lps, cfg, tail=tail, normalizer=7.0)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    h_s = gather_completion_states(
        final_hidden_states(model, sb.input_ids, sb.attention_mask),
        sb.starts,
        sb.completion.shape[1],
    )
    naive = _naive_topk_loss(h_s, head.weight, ids, lps, sb.mask, tail, temp, clip, kind) / 7.0
    naive.backward()
    torch.testing.assert_close(loss.double(), naive, rtol=2e-4, atol=1e-7)  # float32 vs float64
    assert loss.item() > 1e-4
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-3, atol=1e-6, msg=n)
    assert any(g.abs().max() > 0 for g in got.values())
    # the teacher's copy (the fixed teacher's shadow weights) receives no gradient
    assert all(t.grad is None for t in teacher.shadow.values())


def test_trainer_steps_with_topk_teacher_and_custom_engine(tiny, problems):
    model, tok = tiny
    train, _ = problems
    cfg = TrainConfig(
        steps=2,
        batch_size=4,
        grad_accum=2,
        lr=1e-2,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=5,
        clip=0.05,
        progress=False,
        eval_at_start=False,
        eval_at_end=False,
        teacher="ema",
        ema_decay=0.5,
        teacher_topk=3,
        teacher_topk_tail="renormalize",
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = Trainer(model, tok, train, cfg)

    class Recording(LocalTopKTeacher):  # an external engine: the trainer only calls topk
        calls = []

        def topk(self, teacher, k, temperature):
            self.calls.append((k, temperature, tuple(teacher.completion.shape)))
            return super().topk(teacher, k, temperature)

    tr.topk_engine = Recording(model, tr.teacher.weights)
    recs = [tr.train_step() for _ in range(2)]
    assert all(r["loss"] > 0 and r["completion_tokens"] > 0 for r in recs)
    assert Recording.calls and all(c[0] == 3 and c[1] == 1.0 for c in Recording.calls)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_topk_teacher_config_errors():
    with pytest.raises(ConfigError, match="teacher_topk"):
        TrainConfig(teacher_topk=0)
    with pytest.raises(ConfigError, match="--loss full"):
        TrainConfig(teacher_topk=4, loss="sampled_token")
    with pytest.raises(ConfigError, match="impl fused"):
        TrainConfig(teacher_topk=4, impl="fused")
    with pytest.raises(ConfigError, match="teacher_topk_tail"):
        TrainConfig(teacher_topk=4, teacher_topk_tail="drop")


def test_cli_teacher_topk_end_to_end(tmp_path, tiny_dir):
    from opsd_train.cli import build_parser, main

    assert "--teacher-topk" in build_parser().format_help()
    train, held = synthetic_split(8, 2, seed=2)
    save_jsonl(train, tmp_path / "train.jsonl")
    save_jsonl(held, tmp_path / "held.jsonl")
    out = tmp_path / "run"
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
            "2",
            "--max-new-tokens",
            "4",
            "--teacher-topk",
            "8",
            "--teacher-topk-tail",
            "bucket",
            "--no-eval-at-start",
            "--no-eval-at-end",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["loss"] == r["loss"] and r["loss"] >= 0 for r in steps)  # finite
    stored = json.loads((out / "config.json").read_text())
    assert stored["teacher_topk"] == 8 and stored["teacher_topk_tail"] == "bucket"
    with pytest.raises(SystemExit, match="--teacher-topk"):
        main(
            [
                "--model",
                str(tiny_dir),
                "--data",
                str(tmp_path / "train.jsonl"),
                "--teacher-topk",
                "-1",
                "--out",
                str(tmp_path / "bad"),
            ]
        )
