"""The method's protocol on the TRL trainers: --algo (OPSD on FusedSDFTTrainer, SFT on
SFTTrainer, GRPO on GRPOTrainer), the flag -> TRL field mapping, --preset, LR schedules
and horizon, per-role prompts reaching the trainer, the evaluation prompt and sampling,
clip statistics and the clip warning in the run log."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from opsd_train import recipes
from opsd_train.cli import build_parser, parse_options
from opsd_train.config import ConfigError
from opsd_train.data import Problem
from opsd_train.presets import PRESETS, apply_presets
from opsd_train.prompts import PromptBuilder
from opsd_train.recipes import TrainConfig, build_trainer, sft_rows
from tests.train_fixtures import small_config

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
        "--clip-mode",
        "--teacher-topk",
        "--loss-temperature",
        "--use-vllm",
        "--lora",
    ):
        assert flag in text, flag
    assert "{opsd,sft,grpo}" in text and "{entry,token,entry_keep}" in text


def test_flag_table_names_every_trl_field():
    table = recipes.trl_field_table()
    assert "| `--clip` | `distillation_clip` |" in table
    assert "| `--loss-normalization` | `distillation_normalization` |" in table
    assert "| `--clip-mode` | `distillation_clip_mode` |" in table
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert table in readme, "README's flag table is stale: paste trl_field_table()"
    # every named TRL field exists on the config the recipe builds
    from trl import GRPOConfig, SFTConfig

    fields = set()
    for cls in (recipes.OPSDConfig, GRPOConfig, SFTConfig):
        fields |= set(cls.__dataclass_fields__)
    for line in table.splitlines()[2:]:
        for part in line.split("`")[3].replace(" x ", ",").split(","):
            name = part.split("=")[0].split("(")[0].split(".")[0].strip()
            if name:  # "(ours: ...)" names none
                assert name in fields, name


def test_preset_values_and_explicit_flags_win():
    o = parse_options(
        ["--preset", "qwen3-8b", "--data", "x.jsonl", "--clip", "0.1", "--eval-k", "4"]
    )
    t = TrainConfig(**o.train)
    assert o.run.model == "Qwen/Qwen3-8B" and o.run.lora
    assert (o.run.lora_r, o.run.lora_alpha) == (64, 128)
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
    assert t.loss_normalization == "microbatch" and t.grad_accum == 8
    assert (
        t.eval_temperature,
        t.eval_top_p,
        t.eval_top_k,
        t.eval_max_new_tokens,
        t.eval_greedy,
    ) == (1.0, 0.95, 0, 38_912, False)
    assert o.sources["max_grad_norm"] == "preset qwen3-8b"
    assert TrainConfig(**parse_options(["--preset", "qwen3-4b"]).train).clip == 0.05
    with pytest.raises(ConfigError, match="--preset: must be one of"):
        parse_options(["--preset", "qwen3-70b"])
    assert set(PRESETS) == {"qwen3-1.7b", "qwen3-4b", "qwen3-8b"}
    # --algo grpo with a preset keeps the reference's group of 8
    g = TrainConfig(**parse_options(["--preset", "qwen3-1.7b", "--algo", "grpo"]).train)
    assert g.group_size == 8
    args = recipes._grpo_args(g, "/tmp/unused")
    assert args.num_generations == 8 and args.generation_batch_size == 32 * 8


def test_eval_preset_alone_and_nothing_to_evaluate():
    opts = apply_presets({"eval_preset": "paper", "eval_top_p": 0.9})
    assert opts["eval_k"] == 12 and opts["eval_top_p"] == 0.9
    with pytest.raises(ConfigError, match="eval_preset"):
        apply_presets({"eval_preset": "nope"})
    with pytest.raises(ConfigError, match="eval_k"):
        TrainConfig(eval_greedy=False, eval_k=0)


@pytest.mark.parametrize("kind, alpha", [("forward_kl", 0.0), ("reverse_kl", 1.0), ("jsd", 0.3)])
def test_opsd_config_maps_to_fused_sdft(kind, alpha, tmp_path):
    tc = TrainConfig(
        kind=kind,
        beta=0.3,
        clip=0.07,
        clip_mode="entry_keep",
        loss_temperature=0.9,
        teacher="current",
        batch_size=6,
        grad_accum=3,
        rollouts_per_prompt=2,
        max_new_tokens=17,
    )
    a = recipes._opsd_args(tc, tmp_path)
    assert isinstance(a, recipes.OPSDConfig)
    assert a.distillation_alpha == alpha and a.distillation_mode == "full_logits"
    assert (a.distillation_clip, a.distillation_clip_mode, a.loss_temperature) == (
        0.07,
        "entry_keep",
        0.9,
    )
    assert a.distillation_normalization == "token" and a.distillation_is_clip is None
    assert a.teacher_model_kind == "live" and a.num_generations == 2
    assert a.per_device_train_batch_size * a.gradient_accumulation_steps == 12
    assert a.max_completion_length == 17 and a.max_prompt_length is None
    k = recipes._opsd_args(TrainConfig(teacher_topk=5, teacher="ema", ema_decay=0.9), tmp_path)
    assert (k.distillation_mode, k.distillation_topk, k.teacher_topk) == ("topk_logits", 5, True)
    assert k.distillation_add_tail and k.teacher_model_kind == "ema"
    assert math.isclose(k.teacher_update_rate, 0.1)
    with pytest.raises(ConfigError, match="clip: --loss sampled_token"):
        TrainConfig(loss="sampled_token", kind="reverse_kl")
    with pytest.raises(ConfigError, match="kind: --loss sampled_token is a reverse-KL"):
        TrainConfig(loss="sampled_token", clip=None)


def test_grpo_and_sft_configs(tmp_path):
    g = recipes._grpo_args(TrainConfig(algo="grpo", batch_size=2, group_size=4), tmp_path)
    assert (g.loss_type, g.beta, g.num_generations, g.scale_rewards) == ("grpo", 0.0, 4, "group")
    assert g.per_device_train_batch_size == 8
    s = recipes._sft_args(TrainConfig(algo="sft", batch_size=4, grad_accum=2), tmp_path)
    assert s.completion_only_loss and s.per_device_train_batch_size == 2


def test_lr_schedule_and_horizon_on_the_trainer(tiny, problems, tmp_path):
    model, tok = tiny
    pb = PromptBuilder(tok)
    lrs = {}
    for horizon in (None, 1000):
        tc = small_config(algo="sft", steps=4, lr=1e-2, lr_schedule="linear", lr_horizon=horizon)
        t = build_trainer(copy.deepcopy(model), tok, problems[0], tc, tmp_path / str(horizon), pb)
        t.train()
        lrs[horizon] = [r["learning_rate"] for r in t.runlog.history if r["event"] == "step"]
    assert lrs[None] == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3])
    assert lrs[1000] == pytest.approx([1e-2 * (1 - s / 1000) for s in range(4)])
    with pytest.raises(ConfigError, match="min_lr_ratio: only the cosine"):
        TrainConfig(lr_schedule="linear", min_lr_ratio=0.1)


# ------------------------------------------------------------------ prompts reach TRL

QWEN3_LIKE_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


def test_per_role_prompts_reach_the_opsd_trainer(tiny, problems, tmp_path):
    """The student's rollout prompt and the teacher's context are exactly the
    PromptBuilder's (student non-thinking, teacher thinking)."""
    model, tok = tiny
    tok = copy.deepcopy(tok)
    tok.chat_template = QWEN3_LIKE_TEMPLATE
    pb = PromptBuilder(tok)
    p = problems[0][0]
    t = build_trainer(model, tok, [p], small_config(batch_size=1, steps=1), tmp_path, pb)
    row = t.train_dataset[0]
    batch = t.sample_rollouts([row])
    student = batch["prompt_ids"][0][batch["prompt_mask"][0].bool()].tolist()
    assert student == pb.student_ids(p) and pb.student_prompt(p).endswith("</think>\n\n")
    teacher = t.teacher_context_builder.build(
        [row["prompt"]],
        [row["privileged_context"]],
        batch["completion_ids"],
        batch["completion_mask"],
    )
    ids = teacher["teacher_input_ids"][0][teacher["teacher_attention_mask"][0].bool()].tolist()
    n = len(pb.teacher_ids(p))
    assert ids[:n] == pb.teacher_ids(p) and pb.teacher_prompt(p).endswith("assistant\n")
    assert ids[n:] == batch["completion_ids"][0][batch["completion_mask"][0].bool()].tolist()


def test_sft_rows_train_only_the_completion(tiny, problems):
    _, tok = tiny
    pb = PromptBuilder(tok)
    train = problems[0][:8]
    rows = sft_rows(train, pb, TrainConfig(algo="sft", sft_teacher_fraction=0.5, seed=2))
    n_teacher = 0
    for p, r in zip(train, rows, strict=True):
        prompt = next(
            b(p) for b in (pb.student_ids, pb.teacher_ids) if r["input_ids"][: len(b(p))] == b(p)
        )
        n_teacher += prompt == pb.teacher_ids(p)
        assert r["completion_mask"] == [0] * len(prompt) + [1] * (len(r["input_ids"]) - len(prompt))
        assert r["input_ids"][-1] == tok.eos_token_id
    assert 0 < n_teacher < len(train)
    masked = sft_rows(
        train[:1],
        pb,
        TrainConfig(algo="sft"),
        example_fn=lambda p, role, rng: ([5, 6, 7], [True, False, True]),
    )
    assert masked[0]["input_ids"][-3:] == [5, 6, 7]
    assert masked[0]["completion_mask"][-3:] == [1, 0, 1]


def test_grpo_reward_is_the_boxed_answer(tiny, problems, tmp_path, monkeypatch):
    model, tok = tiny
    seen, real = [], recipes.boxed_answer_reward

    def reward(completions, answer, **kw):
        seen.append((list(completions), list(answer)))
        return real(completions, answer)

    monkeypatch.setattr(recipes, "boxed_answer_reward", reward)
    tc = small_config(algo="grpo", batch_size=2, group_size=2, steps=1)
    t = build_trainer(model, tok, problems[0], tc, tmp_path, PromptBuilder(tok))
    t.train()
    ((comps, answers),) = seen
    assert len(comps) == 4 and set(answers) <= {p.answer for p in problems[0]}
    rec = t.runlog.history[-1]
    assert rec["reward"] == sum(real(comps, answers)) / 4
    assert rec["generated_tokens"] == round(rec["completions/mean_length"] * 4)


# ------------------------------------------------------------------ evaluation


def test_evaluate_uses_eval_prompt_and_eval_sampling(tiny, problems, monkeypatch):
    model, tok = tiny
    held = problems[1][:2]
    pb = PromptBuilder(tok)
    calls = []

    def fake_generate(m, t):
        def gen(prompts, sampling):
            calls.append((list(prompts), sampling))
            return [[5, 6] for _ in prompts]

        return gen

    monkeypatch.setattr(recipes, "hf_generate", fake_generate)
    cfg = small_config(
        eval_k=2,
        eval_greedy=False,
        eval_temperature=0.8,
        eval_top_p=0.9,
        eval_top_k=7,
        eval_max_new_tokens=5,
        top_p=0.5,
        top_k=3,
    )
    res = recipes.make_evaluator(model, tok, pb, held, cfg)(0)
    assert res.pass1 is None and res.score_name == "avg@2"
    prompts, sampling = calls[-1]
    assert sampling == {
        "do_sample": True,
        "temperature": 0.8,
        "top_p": 0.9,
        "top_k": 7,
        "max_new_tokens": 5,
    }
    assert prompts[0] == pb.eval_ids(held[0]) != pb.student_ids(held[0])
    cfg.eval_prompt = "student"
    recipes.make_evaluator(model, tok, pb, held, cfg)(0)
    assert calls[-1][0][0] == pb.student_ids(held[0])
    recipes.make_evaluator(model, tok, pb, held, cfg, role="teacher")(0)
    assert calls[-1][0][0] == pb.teacher_ids(held[0])


def test_evaluation_never_changes_the_training_draws(tiny, problems, tmp_path):
    model, tok = tiny
    pb = PromptBuilder(tok)
    runs = []
    for every in (0, 1):
        tc = small_config(steps=2, eval_every=every, eval_max_new_tokens=3)
        t = build_trainer(
            copy.deepcopy(model),
            tok,
            problems[0],
            tc,
            tmp_path / str(every),
            pb,
            held_out=problems[1][:2],
        )
        t.train()
        runs.append(
            [(r["loss"], r["generated_tokens"]) for r in t.runlog.history if r["event"] == "step"]
        )
        assert sum(r["event"] == "eval" for r in t.runlog.history) == 2 * every
    assert runs[0] == runs[1]


def test_eval_data_may_be_answer_only(tmp_path, problems):
    from opsd_train.cli import RunConfig, _held_out_split

    train, _ = problems
    path = tmp_path / "eval.jsonl"
    path.write_text('{"problem": "What is 2+2?", "answer": "4"}\n')
    kept, held = _held_out_split(RunConfig(eval_data=str(path)), train)
    assert len(kept) == len(train) and held[0].answer == "4"
    assert held[0] == Problem("What is 2+2?", "", "4")


# ------------------------------------------------------------------ the clip in the run log


def test_clip_statistics_and_warning_reach_the_run_log(tiny, problems, tmp_path, capsys):
    """Per-step clip statistics (FusedSDFTTrainer's metrics) land in metrics.jsonl; its
    once-per-run warning about the clip turning against the teacher is printed and
    recorded. A tiny clip clips the teacher's top-1 entry on most tokens."""
    model, tok = tiny
    tc = small_config(steps=2, clip=1e-6)
    t = build_trainer(model, tok, problems[0], tc, tmp_path, PromptBuilder(tok))
    with pytest.warns(UserWarning, match="clipped the teacher's top-1 token"):
        t.train()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["event"] == "step"]
    for name in (
        "student_entropy",
        "teacher_clipped_mass",
        "clipped_entries",
        "teacher_top1_clipped",
    ):
        assert all(f"sdft/{name}" in r for r in steps), name
    assert steps[0]["sdft/teacher_top1_clipped"] > 0.1
    warned = [r for r in recs if r["event"] == "warning"]
    assert len(warned) == 1 and "clip" in warned[0]["message"]
    assert "[opsd-train] warning:" in capsys.readouterr().out


def test_masked_nan_never_reaches_a_gradient(tiny, problems, tmp_path):
    """Padding positions of the completion batch carry NaN hidden states (as a broken
    kernel or an overflow would): the step's loss and every gradient stay finite."""
    model, tok = tiny
    tc = small_config(steps=1, batch_size=4, max_new_tokens=8, lr=0.0)
    t = build_trainer(model, tok, problems[0], tc, tmp_path, PromptBuilder(tok))
    norm, poisoned = model.model.norm, []

    def poison(module, args, out):
        mask = getattr(t, "_nan_mask", None)
        if mask is not None and out.shape[:2] == mask.shape:
            out = out.masked_fill(~mask[..., None], float("nan"))
            poisoned.append(out.isnan().any().item())
        return out

    handle = norm.register_forward_hook(poison)
    inputs = t._prepare_inputs(t.train_dataset.select(range(4)).to_list())
    inputs["completion_mask"][0, -3:] = 0  # a completion that ended early: padding after it
    full = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1).bool()
    t._nan_mask = full
    loss = t.compute_loss(model, inputs)
    loss.backward()
    handle.remove()
    assert poisoned == [True]  # the student's forward saw NaN at the padded positions
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
