"""opsd_kernels.integrations.trl_sdft.FusedSDPOTrainer against TRL's own SDPOTrainer.

Checked with trl 1.16.0; skipped without trl. As tests/test_trl_sdft.py: one sampled batch,
the stock trainer's ``compute_loss`` + backward and ours in float64, loss and every
parameter gradient within 1e-7 relative. The batch's ``self_distillation_mask`` and
``advantages`` are set by hand (a mix of distilled and undistilled rows, non-zero
advantages), so that both of SDPO's terms are exercised whatever the rewards were.
"""

import copy
import warnings

import pytest
import torch

pytest.importorskip("trl")
sdpo = pytest.importorskip("trl.experimental.sdpo")

from trl.experimental.sdpo import loss_utils as sdpo_loss_utils  # noqa: E402

from opsd_kernels.integrations.trl_sdft import FusedSDPOConfig, FusedSDPOTrainer  # noqa: E402
from opsd_train.tiny import build_tiny_model  # noqa: E402
from tests.test_trl_sdft import (  # noqa: E402
    MODES,
    SMALL,
    _as_server,
    _assert_same,
    _clipped_divergence,
    _data,
    _loss_grads,
    _model,
    _pad_completions,
    _saved_student,
    _server_answer,
    tok,  # noqa: F401  (the module fixture)
)

warnings.filterwarnings("ignore", message=".*experimental.*")


def _reward(completions, **kwargs):
    return [float(len(str(c)) % 2) for c in completions]


def _config(cls, tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=6,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        bf16=False,
        seed=0,
        teacher_model_kind="live",
        logging_steps=1,
    )
    base.update(kw)
    return cls(**base)


def _pair(tok, tmp_path, model, opsd=None, **kw):  # noqa: F811
    copies = [copy.deepcopy(model), model]
    stock = sdpo.SDPOTrainer(
        model=copies[0],
        reward_funcs=_reward,
        args=_config(sdpo.SDPOConfig, tmp_path, **kw),
        train_dataset=_data(),
        processing_class=tok,
    )
    fused = FusedSDPOTrainer(
        model=copies[1],
        reward_funcs=_reward,
        args=_config(FusedSDPOConfig, tmp_path, **kw, **(opsd or {})),
        train_dataset=_data(),
        processing_class=tok,
    )
    return stock, fused


def _batch(trainer):
    """A sampled batch with padded completions, a mixed self-distillation mask, non-zero
    advantages and rollout log-probs that differ from the current ones."""
    torch.manual_seed(0)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    _pad_completions(batch, trainer.processing_class.pad_token_id)
    rows = batch["completion_ids"].shape[0]
    batch["self_distillation_mask"] = torch.tensor([1.0, 0.0, 1.0, 1.0][:rows], dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    batch["advantages"] = torch.randn(rows, generator=g, dtype=torch.float64)
    with torch.no_grad():
        logits = sdpo.SDPOTrainer._forward_logits(
            trainer,
            trainer.model,
            torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
            torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1),
            batch["completion_ids"].shape[1],
        )
        current = logits.log_softmax(-1).gather(-1, batch["completion_ids"][..., None])[..., 0]
    shift = 0.6 * torch.rand(current.shape, generator=g, dtype=current.dtype) - 0.3
    batch["old_per_token_logps"] = current + shift  # ratios both inside and outside 1 +- eps
    return batch


@pytest.mark.parametrize(
    "mode, weight, teacher",
    [
        ("full_fkl", 1.0, "live"),
        ("full_rkl_skip", 1.0, "base"),
        ("topk_tail_fkl", 1.0, "live"),
        ("topk_renorm", 0.3, "live"),
        ("sampled", 1.0, "live"),
        ("sampled", 0.5, "live"),  # one log-prob pass shared by both terms
        ("full_jsd_T", 0.7, "base"),
        ("full_fkl", 0.0, "live"),  # the policy term alone
    ],
)
def test_matches_stock_trainer(tok, tmp_path, mode, weight, teacher):  # noqa: F811
    opts = {k: v for k, v in MODES[mode].items() if k != "num_loss_tokens_to_skip"}
    opts.update(distillation_weight=weight, teacher_model_kind=teacher)
    model = _saved_student(tok, tmp_path) if teacher == "base" else _model(tok)
    stock, fused = _pair(tok, tmp_path, model, **opts)
    inputs = _batch(fused)
    ref = _loss_grads(stock, inputs, ga=2)
    assert abs(ref[0]) > 1e-5
    _assert_same(_loss_grads(fused, inputs, ga=2), ref)
    for key in ("self_distillation/policy_loss", "sdpo/distillation_loss"):
        torch.testing.assert_close(
            torch.tensor(fused._metrics["train"][key]),
            torch.tensor(stock._metrics["train"][key]),
            rtol=1e-9,
            atol=0,
        )


@pytest.mark.parametrize(
    "loss_type, level",
    [("grpo", "sequence"), ("bnpo", "token"), ("dr_grpo", "token"), ("dapo", "sequence")],
)
def test_policy_term_matches_trl(tok, tmp_path, loss_type, level):  # noqa: F811
    """The policy term (TRL's formula, our per-token log-probs) for every loss type and
    importance-sampling level, beside the distillation term."""
    opts = dict(
        MODES["full_fkl"],
        distillation_weight=0.4,
        loss_type=loss_type,
        importance_sampling_level=level,
    )
    stock, fused = _pair(tok, tmp_path, _model(tok), **opts)
    inputs = _batch(fused)
    _assert_same(_loss_grads(fused, inputs), _loss_grads(stock, inputs))


@pytest.mark.parametrize("mode", ["sampled", "topk_tail_fkl"])
def test_teacher_server_mode_matches_stock(tok, tmp_path, mode):  # noqa: F811
    opts = {k: v for k, v in MODES[mode].items() if k != "num_loss_tokens_to_skip"}
    stock, fused = _pair(tok, tmp_path, _model(tok), **opts)
    inputs = _batch(fused)
    answer = _server_answer(fused, inputs, opts.get("distillation_topk", 1))
    _as_server(stock, answer)
    _as_server(fused, answer)
    _assert_same(_loss_grads(fused, inputs), _loss_grads(stock, inputs))


def test_clip_against_float64_formula(tok, tmp_path, monkeypatch):  # noqa: F811
    """OPSD's per-entry clip on SDPO's distillation term (TRL's pipeline with the clipped
    float64 divergence), beside the policy term."""
    opts = dict(MODES["full_fkl"], distillation_weight=0.6)
    stock, fused = _pair(tok, tmp_path, _model(tok), opsd=dict(distillation_clip=0.02), **opts)
    inputs = _batch(fused)
    unclipped = _loss_grads(stock, inputs)[0]
    monkeypatch.setattr(sdpo_loss_utils, "compute_divergence", _clipped_divergence(0.02))
    ref = _loss_grads(stock, inputs)
    assert abs(ref[0] - unclipped) > 1e-4 * abs(unclipped)
    _assert_same(_loss_grads(fused, inputs), ref)
    assert fused._metrics["train"]["sdpo/clipped_entries"][0] > 0


def test_teacher_chat_template_kwargs_wrap_sdpos_builder(tok, tmp_path):  # noqa: F811
    """teacher_chat_template_kwargs with SDPO's own teacher builder: the batch builds (the
    builder's other attributes reach TRL through the wrapper) and the student's kwargs
    are restored."""
    _, fused = _pair(
        tok,
        tmp_path,
        _model(tok),
        opsd=dict(teacher_chat_template_kwargs={"think": True}),
        chat_template_kwargs={"think": False},
        **MODES["full_fkl"],
    )
    batch = _batch(fused)
    assert "teacher_input_ids" in batch
    assert fused.chat_template_kwargs == {"think": False}
    assert fused._metrics["train"]["self_distillation/reprompt_sample_fraction"]


def test_train_runs(tok, tmp_path):  # noqa: F811
    """trainer.train() with TRL's default bf16 mixed precision and both terms."""
    model = build_tiny_model(tok, 0, **SMALL)
    before = copy.deepcopy(model.state_dict())
    trainer = FusedSDPOTrainer(
        model=model,
        reward_funcs=_reward,
        args=_config(
            FusedSDPOConfig,
            tmp_path,
            bf16=True,
            max_steps=2,
            learning_rate=1e-2,
            distillation_mode="full_logits",
            distillation_alpha=0.0,
            distillation_weight=0.5,
            distillation_normalization="microbatch",
        ),
        train_dataset=_data(),
        processing_class=tok,
    )
    result = trainer.train()
    assert result.global_step == 2
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="no entries to clip"):
        _config(
            FusedSDPOConfig,
            tmp_path,
            distillation_mode="sampled_token",
            distillation_alpha=1.0,
            distillation_clip=0.1,
        )
    with pytest.raises(ValueError, match="distillation_normalization"):
        _config(FusedSDPOConfig, tmp_path, distillation_normalization="batch")
