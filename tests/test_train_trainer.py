"""Training loop: loss goes down, exact resume, bad inputs, LoRA (optional)."""

from __future__ import annotations

import json

import pytest
import torch

from opsd_train.modeling import ensure_pad_token, load_model_and_tokenizer
from opsd_train.prompts import PromptBuilder
from opsd_train.step import LossConfig, opsd_loss, pack_batch
from opsd_train.teacher import Teacher
from opsd_train.trainer import TrainConfig, Trainer
from tests.train_fixtures import TINY_TEST_MODEL, small_config


def _cfg(**kw):
    return small_config(**kw)


def test_few_steps_reduce_the_loss_on_a_fixed_batch(tiny, problems):
    model, tok = tiny
    train, _ = problems
    pb = PromptBuilder(tok)
    comps = [list(tok(p.solution)["input_ids"]) + [tok.eos_token_id] for p in train[:4]]
    sb = pack_batch([pb.student_ids(p) for p in train[:4]], comps, tok.pad_token_id)
    tb = pack_batch([pb.teacher_ids(p) for p in train[:4]], comps, tok.pad_token_id)
    teacher = Teacher(model, "fixed")
    with torch.no_grad():  # start the student away from the (fixed) teacher
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss, _ = opsd_loss(model, sb, tb, LossConfig(), teacher_ctx=teacher.weights)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[0] > 1e-3
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("mode", ["ema", "fixed", "lora-fixed"])
def test_checkpoint_resume_is_bit_identical(tiny_dir, problems, tmp_path, mode):
    train, _ = problems
    lora = mode.startswith("lora")
    if lora:
        pytest.importorskip("peft")
    cfg = dict(teacher=mode.removeprefix("lora-"), ema_decay=0.5, grad_accum=2, warmup_steps=1)

    def fresh():
        from opsd_train.modeling import prepare_model

        model, tok = load_model_and_tokenizer(str(tiny_dir))
        if lora:
            torch.manual_seed(5)  # the adapter init must match across the three runs
            model = prepare_model(model, lora=True, lora_r=4, lora_alpha=8)
        return model, tok

    torch.manual_seed(123)
    m_a, tok = fresh()
    ta = Trainer(m_a, tok, train, _cfg(**cfg))
    ta.train()

    torch.manual_seed(123)
    m_b, _ = fresh()
    tb = Trainer(m_b, tok, train, _cfg(**cfg))
    tb.train_step()
    tb.train_step()
    tb.save_checkpoint(tmp_path / "ck")
    torch.manual_seed(999)  # the resumed run must not depend on the ambient RNG
    m_c, _ = fresh()
    tc = Trainer(m_c, tok, train, _cfg(**cfg))
    tc.load_checkpoint(tmp_path / "ck")
    assert tc.step == 2
    tc.train()
    assert tc.step == 4
    for (n, pa), (_, pc) in zip(m_a.named_parameters(), m_c.named_parameters(), strict=True):
        assert torch.equal(pa, pc), n
    la = [r["loss"] for r in ta.history if r["event"] == "step"][2:]
    lc = [r["loss"] for r in tc.history if r["event"] == "step"]
    assert la == lc
    assert ta.history[-1]["rollout_len"] == tc.history[-1]["rollout_len"]
    if lora:
        assert not ta.teacher.shadow
    for n in ta.teacher.shadow:
        assert torch.equal(ta.teacher.shadow[n], tc.teacher.shadow[n]), n
    # the run actually trained (weights moved away from the saved initial model)
    m0, _ = fresh()
    assert not all(
        torch.equal(a, b) for a, b in zip(m0.parameters(), m_a.parameters(), strict=True)
    )


def test_trainer_logs_metrics_and_evaluates(tiny, problems, tmp_path):
    model, tok = tiny
    train, held = problems
    t = Trainer(
        model,
        tok,
        train,
        _cfg(
            steps=2,
            eval_every=1,
            eval_at_start=True,
            eval_at_end=True,
            eval_max_new_tokens=4,
            eval_k=2,
        ),
        eval_problems=held,
        output_dir=tmp_path,
    )
    evals = t.train()
    assert len(evals) == 3  # start, step 1, end
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2]
    for key in (
        "loss",
        "completion_tokens",
        "rollout_len",
        "tokens_per_s",
        "peak_mem_gb",
        "lr",
        "grad_norm",
    ):
        assert all(r[key] is not None for r in steps), key
    assert all(1 <= r["rollout_len"] <= 6 for r in steps)
    ev = [r for r in recs if r["event"] == "eval"]
    assert len(ev) == 3 and all(0 <= r["pass@1"] <= 1 and r["n"] == len(held) for r in ev)
    assert all(r["avg@2"] is not None for r in ev)
    # teacher evaluation runs with the teacher's weights and restores the student's
    before = [p.detach().clone() for p in model.parameters()]
    res = t.evaluate(role="teacher", k=0)
    assert 0 <= res.pass1 <= 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_sft_objective_lowers_cross_entropy(tiny, problems):
    model, tok = tiny
    train, _ = problems
    t = Trainer(
        model,
        tok,
        train[:8],
        _cfg(algo="sft", steps=12, batch_size=8, lr=1e-2, sft_teacher_fraction=0.5),
    )
    t.train()
    losses = [r["loss"] for r in t.history]
    assert losses[-1] < 0.7 * losses[0]


def test_bf16_autocast_step(tiny, problems):
    model, tok = tiny
    train, _ = problems
    t = Trainer(model, tok, train, _cfg(steps=1, autocast="bf16"))
    before = [p.detach().clone() for p in model.parameters()]
    t.train()
    rec = t.history[-1]
    assert torch.isfinite(torch.tensor(rec["loss"])) and rec["loss"] > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_bad_inputs(tiny_dir, tiny, problems):
    model, tok = tiny
    train, _ = problems
    with pytest.raises(ValueError, match="empty"):
        Trainer(model, tok, [], _cfg())
    from transformers import AutoModel

    body_only = AutoModel.from_pretrained(str(tiny_dir))
    with pytest.raises(ValueError, match="lm_head"):
        Trainer(body_only, tok, train, _cfg())
    with pytest.raises(ValueError, match="divisible"):
        _cfg(batch_size=3, grad_accum=2)
    with pytest.raises(ValueError, match="kind"):
        _cfg(kind="tv")
    with pytest.raises(ValueError, match="unknown training config"):
        TrainConfig.from_dict({"stepz": 3})


def test_tokenizer_without_pad_token(tiny, problems):
    model, tok = tiny
    train, _ = problems
    tok.pad_token = None
    assert tok.pad_token_id is None
    with pytest.warns(UserWarning, match="no pad token"):
        t = Trainer(model, tok, train, _cfg(steps=1))
    assert tok.pad_token_id == tok.eos_token_id
    t.train()  # trains with EOS padding
    tok.pad_token = None
    tok.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an EOS"):
        ensure_pad_token(tok)


def test_lora_fixed_teacher_disables_adapter(tiny_dir, problems):
    pytest.importorskip("peft")
    from opsd_train.modeling import prepare_model

    train, _ = problems
    model, tok = load_model_and_tokenizer(str(tiny_dir))
    ref = [p.detach().clone() for p in model.parameters()]
    model = prepare_model(model, lora=True, lora_r=4, lora_alpha=8)
    t = Trainer(model, tok, train, _cfg(steps=2, lr=5e-2))
    assert t.teacher.use_adapter_toggle and not t.teacher.shadow
    t.train()
    ids = torch.tensor([PromptBuilder(tok).teacher_ids(train[0])])
    base, _ = load_model_and_tokenizer(str(tiny_dir))
    with torch.no_grad():
        want = base(input_ids=ids).logits
        with t.teacher.weights(model):
            got = model(input_ids=ids).logits
        student = model(input_ids=ids).logits
    torch.testing.assert_close(got, want)
    assert not torch.allclose(student, want)  # the adapter did learn something
    # base weights are frozen
    base_params = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert len(base_params) == len(ref)
    assert all(torch.equal(a, b) for a, b in zip(ref, base_params, strict=True))
    assert TINY_TEST_MODEL["hidden_size"] == model.config.hidden_size


def test_sft_example_fn_loss_mask(tiny, problems):
    """A custom SFT target whose mask keeps only the EOS token: the loss is exactly
    -mean log p(EOS | prompt + solution), computed here from the full logits."""
    model, tok = tiny
    train, _ = problems
    eos = tok.eos_token_id

    def only_eos(problem, role, rng):
        ids = list(tok(problem.solution, add_special_tokens=False)["input_ids"]) + [eos]
        return ids, [False] * (len(ids) - 1) + [True]

    t = Trainer(
        model, tok, train, _cfg(algo="sft", steps=1, batch_size=4, lr=0.0), sft_example_fn=only_eos
    )
    idx = t.batch_indices(0)
    pb = PromptBuilder(tok)
    want = []
    with torch.no_grad():
        for i in idx:
            prompt = pb.student_ids(train[i])
            comp = list(tok(train[i].solution, add_special_tokens=False)["input_ids"]) + [eos]
            logits = model(input_ids=torch.tensor([prompt + comp])).logits[0]
            want.append(-torch.log_softmax(logits[len(prompt) + len(comp) - 2], -1)[eos])
    rec = t.train_step()
    assert rec["completion_tokens"] == 4
    assert abs(rec["loss"] - torch.stack(want).mean().item()) < 1e-5


def test_train_step_parts(tiny, problems):
    """The named parts of a step compose to ``train_step``: rows (with the teacher context
    for OPSD), packed batches over the same completions, a loss, an optimizer step."""
    from opsd_train.trainer import Row

    model, tok = tiny
    train, _ = problems
    t = Trainer(model, tok, train, _cfg(steps=1, batch_size=4, grad_accum=2, rollouts_per_prompt=2))
    rows = t.collect_rows(t.batch_indices(0))
    assert len(rows) == 8 and all(isinstance(r, Row) for r in rows)
    pb = PromptBuilder(tok)
    idx = t.batch_indices(0)
    assert rows[0].prompt == rows[1].prompt == pb.student_ids(train[idx[0]])
    assert rows[2].teacher_prompt == pb.teacher_ids(train[idx[1]])
    assert all(1 <= len(r.completion) <= 6 and r.loss_mask is None for r in rows)
    sb, tb = t.pack_rows(rows)
    assert torch.equal(sb.completion, tb.completion) and torch.equal(sb.mask, tb.mask)
    total = sum(r.trained_tokens for r in rows)
    assert total == int(sb.mask.sum())
    res = t.loss_backward(rows, total)
    assert res["loss"] > 0 and res["forward_tokens"] == int(
        sb.attention_mask.sum() + tb.attention_mask.sum()
    )
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads
    gn, lr = t.optimizer_step()
    assert gn > 0 and lr == 1e-2
    assert all(p.grad is None for p in model.parameters())
    # SFT rows carry no teacher prompt; a loss mask counts only its kept tokens
    r = Row([1, 2], [3, 4, 5], loss_mask=[True, False, True])
    assert r.trained_tokens == 2 and r.teacher_prompt is None
