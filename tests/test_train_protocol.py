"""The method's protocol in the trainer (issue 12): --algo (OPSD, SFT, GRPO), --preset,
loss normalisation, LR schedules, evaluation prompt and sampling, float32 log-probs."""

from __future__ import annotations

import json

import pytest
import torch

from opsd_train.cli import build_parser, parse_options
from opsd_train.config import ConfigError
from opsd_train.data import Problem
from opsd_train.presets import PRESETS, apply_presets
from opsd_train.prompts import PromptBuilder
from opsd_train.step import token_logprobs
from opsd_train.trainer import Row, TrainConfig, Trainer, lr_multiplier
from tests.train_fixtures import small_config


def _cfg(**kw):
    return small_config(**{"steps": 2, **kw})


class FixedEngine:
    """A rollout engine returning given completions and recording its calls."""

    def __init__(self, completions):
        self.completions = completions
        self.calls = []

    def generate(self, prompts, sampling, n):
        self.calls.append((list(prompts), sampling, n))
        out = []
        for j in range(len(prompts) * n):
            out.append(list(self.completions[j % len(self.completions)]))
        return out


# ------------------------------------------------------------------ CLI, presets, config


def test_help_shows_algo_preset_and_eval_flags():
    text = build_parser().format_help()
    for flag in (
        "--algo",
        "--preset",
        "--eval-preset",
        "--eval-temperature",
        "--eval-top-p",
        "--eval-top-k",
        "--eval-max-new-tokens",
        "--eval-k",
        "--eval-greedy",
        "--no-eval-greedy",
        "--group-size",
        "--loss-normalization",
        "--lr-schedule",
        "--lr-horizon",
        "--teacher-template",
        "--eval-template",
        "--student-thinking",
        "--teacher-thinking",
        "--eval-thinking",
    ):
        assert flag in text, flag
    assert "{opsd,sft,grpo}" in text


def test_preset_values_and_explicit_flags_win():
    o = parse_options(
        ["--preset", "qwen3-8b", "--data", "x.jsonl", "--clip", "0.1", "--eval-k", "4"]
    )
    t = TrainConfig(**o.train)
    assert (
        o.run.model == "Qwen/Qwen3-8B"
        and o.run.lora
        and (o.run.lora_r, o.run.lora_alpha) == (64, 128)
    )
    assert (o.run.student_thinking, o.run.teacher_thinking, o.run.eval_thinking) == (
        False,
        True,
        True,
    )
    assert t.clip == 0.1 and t.eval_k == 4  # explicit
    assert (t.max_grad_norm, t.steps, t.kind, t.temperature, t.lr_schedule) == (
        0.1,
        100,
        "forward_kl",
        1.1,
        "linear",
    )
    # the paper's evaluation: T 1.0, top-p 0.95, no top-k, 38,912 tokens, no greedy pass
    assert (
        t.eval_temperature,
        t.eval_top_p,
        t.eval_top_k,
        t.eval_max_new_tokens,
        t.eval_greedy,
    ) == (1.0, 0.95, 0, 38_912, False)
    assert o.sources["max_grad_norm"] == "preset qwen3-8b"
    assert TrainConfig(**parse_options(["--preset", "qwen3-4b"]).train).clip == 0.05
    assert TrainConfig(**parse_options(["--preset", "qwen3-1.7b"]).train).clip == 0.05
    # the reference's linear decay over ~28k steps: the LR is within 0.4 % of its peak
    assert lr_multiplier("linear", 99, t.lr_horizon, 0) > 0.996
    with pytest.raises(ConfigError, match="--preset: must be one of"):
        parse_options(["--preset", "qwen3-70b"])
    assert set(PRESETS) == {"qwen3-1.7b", "qwen3-4b", "qwen3-8b"}


def test_eval_preset_alone():
    opts = apply_presets({"eval_preset": "paper", "eval_top_p": 0.9})
    assert opts["eval_k"] == 12 and opts["eval_top_p"] == 0.9
    with pytest.raises(ConfigError, match="eval_preset"):
        apply_presets({"eval_preset": "nope"})


def test_objective_is_read_as_algo(tmp_path):
    assert parse_options(["--objective", "sft", "--model", "m"]).train["algo"] == "sft"
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"objective": "grpo"}))
    assert parse_options(["--config", str(cfg), "--model", "m"]).train["algo"] == "grpo"
    assert TrainConfig.from_dict({"objective": "sft"}).algo == "sft"
    assert TrainConfig(algo="sft").objective == "sft"
    with pytest.raises(ConfigError, match="contradicts"):
        TrainConfig.from_dict({"objective": "sft", "algo": "opsd"})


def test_nothing_to_evaluate_is_a_config_error():
    with pytest.raises(ConfigError, match="eval_k"):
        TrainConfig(eval_greedy=False, eval_k=0)


def test_lr_schedules():
    assert [lr_multiplier("constant", s, 10, 0) for s in (0, 9, 50)] == [1.0, 1.0, 1.0]
    assert [lr_multiplier("linear", s, 10, 2, 0.5) for s in (0, 1, 2, 6, 10, 20)] == [
        0.5,
        1.0,
        1.0,
        0.75,
        0.5,
        0.5,
    ]
    assert lr_multiplier("cosine", 6, 10, 2) == pytest.approx(0.5)


def test_trainer_uses_lr_schedule_and_horizon(tiny, problems):
    model, tok = tiny
    train, _ = problems
    t = Trainer(
        model,
        tok,
        train,
        _cfg(algo="sft", lr=1e-3, lr_schedule="linear", lr_horizon=10, steps=2),
        engine=FixedEngine([[5]]),
    )
    lrs = [t.train_step()["lr"] for _ in range(2)]
    assert lrs == pytest.approx([1e-3, 0.9e-3])


# ------------------------------------------------------------------ loss normalisation


def test_loss_normalization_equals_hand_computed_values(tiny, problems):
    """global: sum of all token losses / all tokens; microbatch: the mean over
    micro-batches of each micro-batch's token mean (here 2 micro-batches, 3 and 7
    tokens)."""
    model, tok = tiny
    train, _ = problems
    pb = PromptBuilder(tok)
    targets = [[5, 6], [7], [8, 9, 10, 11], [12, 13, 14]]  # micro-batches: 3 and 7 tokens
    rows = [Row(pb.student_ids(p), t) for p, t in zip(train[:4], targets, strict=True)]
    # hand computation from the model's logits (float64)
    nll = []
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r.prompt + r.completion])
            logits = model(ids).logits[0].double()
            lp = torch.log_softmax(logits, -1)
            pos = torch.arange(len(r.prompt) - 1, len(r.prompt) - 1 + len(r.completion))
            nll.append(-lp[pos, torch.tensor(r.completion)])
    tokens = sum(len(t) for t in targets)
    global_ref = float(sum(x.sum() for x in nll) / tokens)
    mb1 = float(sum(x.sum() for x in nll[:2]) / 3)
    mb2 = float(sum(x.sum() for x in nll[2:]) / 7)
    micro_ref = (mb1 + mb2) / 2
    assert abs(global_ref - micro_ref) > 1e-3  # the two differ here
    for norm, ref in (("global", global_ref), ("microbatch", micro_ref)):
        t = Trainer(model, tok, train, _cfg(algo="sft", grad_accum=2, loss_normalization=norm))
        assert [n for _, n in t.loss_normalizers(rows, tokens)] == (
            [10.0, 10.0] if norm == "global" else [6.0, 14.0]
        )
        out = t.loss_backward(rows, tokens)
        model.zero_grad(set_to_none=True)
        assert out["loss"] == pytest.approx(ref, rel=1e-5)


# ------------------------------------------------------------------ GRPO


def test_grpo_step_matches_a_naive_float64_policy_gradient(tiny):
    """Rewards from the boxed answer, group advantages, and the gradient of the on-policy
    GRPO loss -1/N sum_i A_i/|y_i| sum_t log p(y_it) (logits / T, float64 reference)."""
    model, tok = tiny
    probs = [Problem("1 + 1?", "2", "2"), Problem("1 + 2?", "3", "3")]
    right = tok(r"\boxed{2}", add_special_tokens=False)["input_ids"]
    wrong = tok(r"so \boxed{3}", add_special_tokens=False)["input_ids"]
    engine = FixedEngine([right, wrong, wrong])  # the same 3 completions for each prompt
    T = 0.7
    cfg = _cfg(
        algo="grpo",
        batch_size=2,
        group_size=3,
        temperature=T,
        grad_accum=2,
        loss_normalization="microbatch",
        lr=0.0,
    )
    t = Trainer(model, tok, probs, cfg, engine=engine)
    idx = [0, 1]
    rows = t.collect_rows(idx)
    assert engine.calls[0][2] == 3  # group_size rollouts per prompt
    assert [r.reward for r in rows] == [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    rewards = torch.tensor([r.reward for r in rows], dtype=torch.float64)
    g = rewards.view(2, 3)
    adv_ref = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).view(-1)
    assert torch.allclose(
        torch.tensor([r.advantage for r in rows], dtype=torch.float64), adv_ref, atol=1e-6
    )
    # naive float64 loss on the lm_head weight
    head = model.get_output_embeddings().weight
    model.zero_grad(set_to_none=True)
    total = sum(r.trained_tokens for r in rows)
    t.loss_backward(rows, total)
    got = head.grad.detach().double().clone()
    model.zero_grad(set_to_none=True)
    loss = 0.0
    for r, a in zip(rows, adv_ref, strict=True):
        ids = torch.tensor([r.prompt + r.completion])
        h = model.model(ids).last_hidden_state[0].double()
        lp = torch.log_softmax(h @ head.double().T / T, -1)
        pos = torch.arange(len(r.prompt) - 1, len(r.prompt) - 1 + len(r.completion))
        loss = loss - a * lp[pos, torch.tensor(r.completion)].mean()
    (loss / len(rows)).backward()
    ref = head.grad.detach().double()
    model.zero_grad(set_to_none=True)
    assert ref.abs().max() > 0
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6)
    rec = Trainer(model, tok, probs, cfg, engine=FixedEngine([right, wrong, wrong])).train_step()
    assert (
        rec["generated_tokens"]
        == rec["generated_tokens_total"]
        == sum(len(r.completion) for r in rows)
    )
    assert 0 <= rec["reward_mean"] <= 1


# ------------------------------------------------------------------ evaluation


def test_evaluate_uses_eval_prompt_and_eval_sampling(tiny, problems):
    model, tok = tiny
    train, held = problems
    engine = FixedEngine([[5, 6]])
    pb = PromptBuilder(tok)
    cfg = _cfg(
        eval_k=2,
        eval_greedy=False,
        eval_temperature=0.8,
        eval_top_p=0.9,
        eval_top_k=7,
        eval_max_new_tokens=5,
        top_p=0.5,
        top_k=3,
    )
    t = Trainer(model, tok, train, cfg, eval_problems=held[:2], engine=engine, prompt_builder=pb)
    res = t.evaluate()
    assert res.pass1 is None and res.score_name == "avg@2"
    prompts, sampling, _ = engine.calls[-1]
    assert sampling == {
        "do_sample": True,
        "temperature": 0.8,
        "top_p": 0.9,
        "top_k": 7,
        "max_new_tokens": 5,
    }
    assert prompts[0] == pb.eval_ids(held[0]) != pb.student_ids(held[0])
    t.config.eval_prompt = "student"
    t.evaluate()
    assert engine.calls[-1][0][0] == pb.student_ids(held[0])
    rec = t.history[-1]
    assert rec["score_name"] == "avg@2" and "train_generated_tokens" in rec


def test_eval_data_may_be_answer_only(tmp_path, problems):
    from opsd_train.cli import RunConfig, _held_out_split

    train, _ = problems
    path = tmp_path / "eval.jsonl"
    path.write_text('{"problem": "What is 2+2?", "answer": "4"}\n')
    kept, held = _held_out_split(RunConfig(eval_data=str(path)), train)
    assert len(kept) == len(train) and held[0].answer == "4"


# ------------------------------------------------------------------ precision


def test_token_logprobs_are_float32_on_a_bf16_head():
    """The project's precision rule: the logits a loss reads are float32, whatever the
    weight's dtype (bf16 logits would round log-probs to ~3 significant digits)."""
    torch.manual_seed(0)
    h = torch.randn(6, 16).bfloat16()
    w = torch.randn(50, 16).bfloat16()
    y = torch.randint(0, 50, (6,))
    lp = token_logprobs(h, w, y)
    ref = torch.log_softmax(h.double() @ w.double().T, -1)[torch.arange(6), y]
    assert lp.dtype == torch.float32
    assert torch.allclose(lp.double(), ref, atol=1e-5)


def test_generated_token_total_survives_a_resume(tiny, problems, tmp_path):
    model, tok = tiny
    train, _ = problems
    cfg = _cfg(steps=1, batch_size=2, lr=0.0)
    t = Trainer(model, tok, train, cfg, engine=FixedEngine([[5, 6, 7]]), output_dir=tmp_path)
    rec = t.train_step()
    assert rec["generated_tokens"] == rec["generated_tokens_total"] == 6
    path = t.save_checkpoint(tmp_path / "checkpoints" / "step_1")
    t2 = Trainer(
        model,
        tok,
        train,
        _cfg(steps=2, batch_size=2, lr=0.0),
        engine=FixedEngine([[5]]),
        output_dir=tmp_path,
    )
    t2.load_checkpoint(path, allow_changes=("steps",))
    assert t2.generated_tokens_total == 6
    assert t2.train_step()["generated_tokens_total"] == 8
