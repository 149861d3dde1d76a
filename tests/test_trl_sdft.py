"""opsd_kernels.integrations.trl_sdft against TRL's own SDFTTrainer (CPU, tiny models).

Checked with trl 1.16.0; skipped without trl. One batch is sampled once; the stock
trainer's ``compute_loss`` + backward and the fused trainer's run on it in float64 and must
agree to 1e-7 relative (loss and every parameter gradient). The tokenizer and models are
built in code (no downloads).
"""

import copy
import inspect
import math
import warnings

import pytest
import torch

pytest.importorskip("trl")
sdft = pytest.importorskip("trl.experimental.sdft")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from trl.experimental.sdft import loss_utils  # noqa: E402

from opsd_kernels.integrations import trl_sdft  # noqa: E402
from opsd_kernels.integrations.trl_sdft import (  # noqa: E402
    FusedSDFTConfig,
    FusedSDFTTrainer,
    vocab_sweep,
)
from opsd_kernels.memory import PeakMemory  # noqa: E402
from opsd_kernels.reference import (  # noqa: E402
    divergence_reference,
    topk_divergence_reference,
)
from opsd_train.tiny import CHAT_TEMPLATE, build_tiny_model, build_tokenizer  # noqa: E402

warnings.filterwarnings("ignore", message=".*experimental.*")

REL = 1e-7  # float64 stock vs fused: loss and every gradient, relative to its largest value
SMALL = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _data(n=8):
    return datasets.Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": f"What is {i} plus {i}?"}] for i in range(n)],
            "privileged_context": [f"{i} plus {i} is {2 * i}." for i in range(n)],
        }
    )


def _model(tok, seed=0, tied=False, **kw):
    model = build_tiny_model(tok, seed, tie_word_embeddings=tied, **{**SMALL, **kw})
    with torch.no_grad():  # sharper distributions than the default init: a real loss
        model.get_output_embeddings().weight.mul_(40.0)
    return model.double()


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


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


def _pair(tok, tmp_path, model, peft_config=None, opsd=None, stock_cls=None, **kw):
    """(stock, fused) trainers on copies of ``model``, same options (plus ``opsd`` for ours).
    Copies first: a Trainer patches its model's forward, which a deepcopy would share."""
    copies = [copy.deepcopy(model), model]
    stock = (stock_cls or sdft.SDFTTrainer)(
        model=copies[0],
        args=_config(sdft.SDFTConfig, tmp_path, **kw),
        train_dataset=_data(),
        processing_class=tok,
        peft_config=peft_config,
    )
    fused = FusedSDFTTrainer(
        model=copies[1],
        args=_config(FusedSDFTConfig, tmp_path, **kw, **(opsd or {})),
        train_dataset=_data(),
        processing_class=tok,
        peft_config=peft_config,
    )
    return stock, fused


def _batch(trainer, old_logps=True):
    """A sampled batch (from ``trainer``), padded completions, and (``old_logps``) rollout
    log-probs that differ from the current ones so that TRL's ratio cap bites on some
    tokens and not on others."""
    torch.manual_seed(0)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    _pad_completions(batch, trainer.processing_class.pad_token_id)
    if old_logps:
        with torch.no_grad():
            logits = sdft.SDFTTrainer._forward_logits(
                trainer,
                trainer.model,
                torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
                torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1),
                batch["completion_ids"].shape[1],
            )
            current = logits.log_softmax(-1).gather(-1, batch["completion_ids"][..., None])[..., 0]
        g = torch.Generator().manual_seed(5)
        shift = 3.0 * torch.rand(current.shape, generator=g, dtype=current.dtype) - 1.5
        batch["old_per_token_logps"] = current + shift
        ratio = torch.exp(-shift)[batch["completion_mask"].bool()]
        assert (ratio > 2.0).any() and (ratio < 2.0).any() and (ratio != 1).all()
    return batch


def _pad_completions(batch, pad_id, lengths=(3, None, 5, None)):
    """Right-pad some completions (as shorter rollouts are), in the student and teacher
    inputs alike: the masks then hold padding."""
    width = batch["completion_ids"].shape[1]
    for row, n in zip(range(batch["completion_ids"].shape[0]), lengths, strict=False):
        if n is not None and n < width:
            batch["completion_mask"][row, n:] = 0
            batch["completion_ids"][row, n:] = pad_id
    batch["teacher_input_ids"][:, -width:] = batch["completion_ids"]
    batch["teacher_attention_mask"][:, -width:] = batch["completion_mask"]


def _loss_grads(trainer, inputs, ga=1):
    trainer.current_gradient_accumulation_steps = ga
    trainer.model.train()  # as trainer.train() sets it (a loaded model starts in eval mode)
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _assert_same(ours, ref, rel=REL):
    (loss, grads), (loss_ref, grads_ref) = ours, ref
    assert loss.dtype == torch.float64
    assert abs(loss - loss_ref) <= rel * abs(loss_ref), (loss, loss_ref)
    assert grads.keys() == grads_ref.keys() and grads_ref
    for name, g in grads_ref.items():
        err = (grads[name] - g).abs().max() / g.abs().max()
        assert err <= rel, f"{name}: {err}"


def _saved_student(tok, tmp_path, tied=False):
    """A tiny model saved to a folder and loaded back (its config names the folder, which
    teacher_model_kind='base' rebuilds the teacher from), then moved off the saved weights
    so that the teacher differs from the student."""
    path = tmp_path / "model"
    _model(tok, 7, tied=tied).save_pretrained(path)
    tok.save_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    return _perturb(model, 11)


MODES = {
    "full_fkl": dict(distillation_mode="full_logits", distillation_alpha=0.0),
    "full_rkl_skip": dict(
        distillation_mode="full_logits", distillation_alpha=1.0, num_loss_tokens_to_skip=2
    ),
    "full_jsd_T": dict(distillation_mode="full_logits", distillation_alpha=0.3, temperature=0.7),
    "topk_renorm": dict(
        distillation_mode="topk_logits", distillation_alpha=0.5, distillation_topk=5
    ),
    "topk_tail_fkl": dict(
        distillation_mode="topk_logits",
        distillation_alpha=0.0,
        distillation_topk=7,
        distillation_add_tail=True,
        num_loss_tokens_to_skip=1,
    ),
    "topk_tail_rkl": dict(
        distillation_mode="topk_logits",
        distillation_alpha=1.0,
        distillation_topk=4,
        distillation_add_tail=True,
        temperature=1.3,
    ),
    "sampled": dict(distillation_mode="sampled_token", distillation_alpha=1.0),
    "sampled_skip_T": dict(
        distillation_mode="sampled_token",
        distillation_alpha=1.0,
        num_loss_tokens_to_skip=3,
        temperature=0.8,
    ),
}


@pytest.mark.parametrize("teacher", ["live", "base"])
@pytest.mark.parametrize("mode", list(MODES))
def test_matches_stock_trainer(tok, tmp_path, mode, teacher):
    """Every mode, with TRL's importance-sampling cap biting (injected old log-probs), both
    teacher kinds (base: rebuilt from the model's folder, a separate lm_head), float64."""
    opts = dict(MODES[mode], teacher_model_kind=teacher)
    model = _saved_student(tok, tmp_path) if teacher == "base" else _model(tok)
    stock, fused = _pair(tok, tmp_path, model, **opts)
    assert (fused.teacher_model is fused.model) == (teacher == "live")
    inputs = _batch(fused)
    ref = _loss_grads(stock, inputs, ga=2)
    assert abs(ref[0]) > 1e-4  # a real loss
    _assert_same(_loss_grads(fused, inputs, ga=2), ref)
    assert fused._metrics["train"]["sdft/distillation_loss"]
    torch.testing.assert_close(
        torch.tensor(fused._metrics["train"]["sdft/distillation_loss"]),
        torch.tensor(stock._metrics["train"]["sdft/distillation_loss"]),
        rtol=1e-9,
        atol=0,
    )


def test_ema_teacher(tok, tmp_path):
    """teacher_model_kind='ema': TRL's separate EMA copy (rebuilt from the model's folder),
    read through its own lm_head."""
    stock, fused = _pair(
        tok, tmp_path, _saved_student(tok, tmp_path), teacher_model_kind="ema", **MODES["full_fkl"]
    )
    assert fused.teacher_model is not fused.model
    inputs = _batch(fused)
    _assert_same(_loss_grads(fused, inputs), _loss_grads(stock, inputs))


@pytest.mark.parametrize("mode", ["full_fkl", "topk_tail_fkl"])
def test_base_teacher_with_lora_and_tied_embeddings(tok, tmp_path, mode):
    """teacher_model_kind='base' with a LoRA student: the teacher is the model with its
    adapter disabled (the same, tied, embedding/lm_head)."""
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    stock, fused = _pair(
        tok,
        tmp_path,
        _model(tok, tied=True),
        peft_config=cfg,
        teacher_model_kind="base",
        **MODES[mode],
    )
    inputs = _batch(fused)
    ref = _loss_grads(stock, inputs)
    ours = _loss_grads(fused, inputs)
    assert all("lora" in n for n in ours[1])
    _assert_same(ours, ref)


def _gemma2(tok, cap=5.0):
    """A tiny Gemma 2 whose ``final_logit_softcapping`` bends these logits."""
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        final_logit_softcapping=cap,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = transformers.Gemma2ForCausalLM(cfg)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    return model.double()


@pytest.mark.parametrize("mode", ["full_jsd_T", "topk_tail_fkl", "sampled_skip_T"])
def test_gemma2_soft_cap_matches_stock(tok, tmp_path, mode):
    """Gemma 2's final_logit_softcapping: applied by the kernels and the chunked sweeps
    (top-k support, log-probs, importance-sampling ratio)."""
    stock, fused = _pair(tok, tmp_path, _gemma2(tok), **MODES[mode])
    assert fused.model.config.final_logit_softcapping == 5.0
    inputs = _batch(fused)
    ref = _loss_grads(stock, inputs)
    assert abs(ref[0]) > 1e-6
    _assert_same(_loss_grads(fused, inputs), ref)


def _server_answer(trainer, inputs, k):
    """What TRL's vLLM teacher server returns (``_get_teacher_token_logprobs_from_server``),
    computed here from the live teacher's full logits (float64, in the test only)."""
    width = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        logits = sdft.SDFTTrainer._forward_logits(
            trainer,
            trainer.model,
            inputs["teacher_input_ids"],
            inputs["teacher_attention_mask"],
            width,
        )
    lp = logits.log_softmax(-1)
    keep = inputs["completion_mask"].bool()
    actual = lp.gather(-1, inputs["completion_ids"][..., None])[..., 0]
    top = lp.topk(k, dim=-1)
    return {
        "actual_logprobs": torch.where(keep, actual, -torch.inf),
        "topk_logprobs": torch.where(keep[..., None], top.values, -torch.inf),
        "topk_token_ids": torch.where(keep[..., None], top.indices, 0),
    }


def _as_server(trainer, answer):
    trainer.use_teacher_server = True
    trainer._last_loaded_step = trainer.state.global_step
    trainer._get_teacher_token_logprobs_from_server = lambda inputs, logits_to_keep: answer


@pytest.mark.parametrize(
    "opts",
    [
        dict(distillation_mode="sampled_token", distillation_alpha=1.0, num_loss_tokens_to_skip=1),
        dict(distillation_mode="topk_logits", distillation_alpha=0.0, distillation_topk=6),
        dict(
            distillation_mode="topk_logits",
            distillation_alpha=0.4,
            distillation_topk=5,
            distillation_add_tail=True,
        ),
    ],
)
def test_teacher_server_mode_matches_stock(tok, tmp_path, opts):
    """Server mode (vLLM cannot run here): the server's answer is fed in place of the
    server to both trainers; the support is the teacher's top-k."""
    stock, fused = _pair(tok, tmp_path, _model(tok), **opts)
    inputs = _batch(fused)
    answer = _server_answer(fused, inputs, opts.get("distillation_topk", 1))
    _as_server(stock, answer)
    _as_server(fused, answer)
    ref = _loss_grads(stock, inputs)
    _assert_same(_loss_grads(fused, inputs), ref)
    key = "self_distillation/server_logprob_abs_diff"
    torch.testing.assert_close(
        torch.tensor(fused._metrics["train"][key]), torch.tensor(stock._metrics["train"][key])
    )


@pytest.mark.parametrize("tail", [False, True])
def test_teacher_topk_is_the_local_form_of_the_server_support(tok, tmp_path, tail):
    """teacher_topk=True (local teacher's top-k support) equals TRL's server mode fed with
    the same teacher's top-k."""
    opts = dict(
        distillation_mode="topk_logits",
        distillation_alpha=0.0,
        distillation_topk=5,
        distillation_add_tail=tail,
    )
    stock, fused = _pair(tok, tmp_path, _model(tok), opsd=dict(teacher_topk=True), **opts)
    inputs = _batch(fused)
    _as_server(stock, _server_answer(stock, inputs, 5))
    _assert_same(_loss_grads(fused, inputs), _loss_grads(stock, inputs))


def _clipped_divergence(clip):
    """TRL's ``compute_divergence`` with OPSD's per-entry clip ``min(phi_v, tau)`` summed;
    float64 autograd (for the top-k outcomes)."""

    def compute(student_log_probs, teacher_log_probs, alpha):
        s, t = student_log_probs, teacher_log_probs
        if alpha == 0.0:
            phi = t.exp() * (t - s)
        elif alpha == 1.0:
            phi = s.exp() * (s - t)
        else:
            m = torch.logsumexp(torch.stack([s + math.log(1 - alpha), t + math.log(alpha)]), 0)
            phi = alpha * t.exp() * (t - m) + (1 - alpha) * s.exp() * (s - m)
        return phi.clamp(max=clip).sum(-1)

    return compute


@pytest.mark.parametrize(
    "opts, clip",
    [(MODES["topk_tail_fkl"], 0.02), (MODES["topk_renorm"], 0.001)],
)
def test_topk_clip_against_float64_formula(tok, tmp_path, monkeypatch, opts, clip):
    """distillation_clip in topk_logits: each of the K (+1 tail) outcomes clipped; TRL's
    pipeline with its divergence replaced by the clipped float64 formula."""
    stock, fused = _pair(tok, tmp_path, _model(tok), opsd=dict(distillation_clip=clip), **opts)
    inputs = _batch(fused)
    unclipped = _loss_grads(stock, inputs)[0]
    monkeypatch.setattr(loss_utils, "compute_divergence", _clipped_divergence(clip))
    ref = _loss_grads(stock, inputs)
    assert abs(ref[0] - unclipped) > 1e-3 * abs(unclipped)  # the clip bites
    _assert_same(_loss_grads(fused, inputs), ref)


def _reference_full_loss(clip, clip_mode, seen):
    """TRL's full-logit loss replaced by :func:`opsd_kernels.reference.divergence_reference`
    with OPSD's clip (TRL's logits are already divided by the temperature); the reference's
    per-token statistics go to ``seen``."""

    def compute(student_logits, teacher_logits, *, distillation_alpha):
        kind = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(distillation_alpha, "jsd")
        loss, stats = divergence_reference(
            student_logits,
            teacher_logits,
            kind=kind,
            beta=distillation_alpha if kind == "jsd" else 0.5,
            clip=clip,
            clip_mode=clip_mode,
            reduction="none",
            return_stats=True,
        )
        seen.append(stats)
        return loss

    return compute


@pytest.mark.parametrize(
    "mode, clip_mode, clip",
    [
        ("full_fkl", "entry", 0.02),
        ("full_fkl", "token", "median"),
        ("full_fkl", "entry_keep", 0.02),
        ("full_jsd_T", "entry", 0.005),
        ("full_rkl_skip", "entry_keep", 0.01),
        ("full_rkl_skip", "token", "median"),
    ],
)
def test_full_logits_clip_modes_and_stats(tok, tmp_path, monkeypatch, mode, clip_mode, clip):
    """distillation_clip / distillation_clip_mode in full_logits against the float64
    reference (through TRL's own pipeline: loss mask, IS cap, normalisation), and the
    logged per-token statistics against the reference's (means over the loss tokens)."""
    model = _model(tok)
    if clip == "median":  # a token clip that bites on about half of the tokens
        probe, _ = _pair(tok, tmp_path, copy.deepcopy(model), **MODES[mode])
        per_token, mask = _reference_terms(probe, _batch(probe), MODES[mode]["distillation_alpha"])
        values = per_token[mask.bool()].detach().sort().values
        mid = len(values) // 2  # between two losses: no token sits exactly at the clip
        clip = float(values[mid - 1 : mid + 1].mean())
    stock, fused = _pair(
        tok,
        tmp_path,
        model,
        opsd=dict(distillation_clip=clip, distillation_clip_mode=clip_mode),
        **MODES[mode],
    )
    inputs = _batch(fused)
    unclipped = _loss_grads(stock, inputs)
    seen = []
    monkeypatch.setattr(
        sdft.sdft_trainer,
        "compute_full_logit_self_distillation_loss",
        _reference_full_loss(clip, clip_mode, seen),
    )
    ref = _loss_grads(stock, inputs)
    if clip_mode == "entry_keep":  # the loss of "entry", another gradient
        g, g0 = ref[1]["lm_head.weight"], unclipped[1]["lm_head.weight"]
        assert (g - g0).abs().max() > 1e-3 * g0.abs().max()
    else:
        assert abs(ref[0] - unclipped[0]) > 1e-3 * abs(unclipped[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the clip warning: its own test
        ours = _loss_grads(fused, inputs)
    _assert_same(ours, ref)
    (stats,) = seen
    mask = fused._loss_mask(inputs).double()
    for name in ("student_entropy", "teacher_clipped_mass", "clipped_entries"):
        want = (getattr(stats, name).double() * mask).sum() / mask.sum()
        got = fused._metrics["train"][f"sdft/{name}"]
        assert got == pytest.approx([float(want)], rel=1e-6), name
    share = (stats.teacher_top1_clipped.double() * mask).sum() / mask.sum()
    assert fused._metrics["train"]["sdft/teacher_top1_clipped"] == pytest.approx([float(share)])
    assert float((stats.clipped_entries.double() * mask).sum()) > 0


@pytest.mark.parametrize(
    "clip_mode, warns", [("entry", True), ("entry_keep", True), ("token", False)]
)
def test_clip_against_the_teacher_warns_once(tok, tmp_path, clip_mode, warns):
    """A clip that removes the teacher's top-1 entry on more than CLIP_WARNING_SHARE of the
    tokens warns, once, naming the share and the mode, under the per-entry modes ('entry'
    pushes the student away from those entries; 'entry_keep' holds them while the rest
    moves: both collapsed accuracy on a real model); 'token' (a clipped token passes no
    gradient at all) does not warn, although it clips every token here."""
    _, fused = _pair(
        tok,
        tmp_path,
        _model(tok),
        opsd=dict(distillation_clip=1e-4, distillation_clip_mode=clip_mode),
        **MODES["full_fkl"],
    )
    inputs = _batch(fused)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _loss_grads(fused, inputs)
        _loss_grads(fused, inputs)
    ours = [w for w in caught if "clipped the teacher's top-1 token" in str(w.message)]
    share = fused._metrics["train"]["sdft/teacher_top1_clipped"]
    assert len(share) == 2 and share[0] > trl_sdft.CLIP_WARNING_SHARE
    assert len(ours) == (1 if warns else 0)
    if warns:
        assert f"{share[0]:.1%}" in str(ours[0].message)
        assert f"clip_mode={clip_mode!r}" in str(ours[0].message)


def test_topk_token_clip_against_float64_formula(tok, tmp_path, monkeypatch):
    """clip_mode='token' in topk_logits: the clip of each token's sum over its K + 1
    outcomes."""
    opts = MODES["topk_tail_fkl"]
    stock, fused = _pair(
        tok,
        tmp_path,
        _model(tok),
        opsd=dict(distillation_clip=0.02, distillation_clip_mode="token"),
        **opts,
    )
    inputs = _batch(fused)
    compute = _clipped_divergence(math.inf)

    def token_clip(s, t, alpha):
        return compute(s, t, alpha).clamp(max=0.02)

    monkeypatch.setattr(loss_utils, "compute_divergence", token_clip)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _assert_same(_loss_grads(fused, inputs), _loss_grads(stock, inputs))


def _reference_topk_loss(clip, clip_mode, seen):
    """TRL's student-top-k loss replaced by
    :func:`opsd_kernels.reference.topk_divergence_reference` with OPSD's clip, on TRL's
    support (the student's top-k, the teacher's log-probs there; TRL's logits are already
    divided by the temperature); the reference's statistics go to ``seen``."""

    def compute(student_logits, teacher_logits, *, distillation_topk, distillation_alpha,
                distillation_add_tail):  # fmt: skip
        kind = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(distillation_alpha, "jsd")
        ids = student_logits.detach().topk(distillation_topk, dim=-1).indices
        lt = teacher_logits.log_softmax(-1).gather(-1, ids)
        loss, stats = topk_divergence_reference(
            student_logits,
            ids,
            lt,
            kind=kind,
            beta=distillation_alpha if kind == "jsd" else 0.5,
            tail="bucket" if distillation_add_tail else "renormalize",
            clip=clip,
            clip_mode=clip_mode,
            reduction="none",
            return_stats=True,
        )
        seen.append(stats)
        return loss

    return compute


@pytest.mark.parametrize(
    "mode, clip_mode, clip",
    [
        ("topk_tail_fkl", "entry", 0.02),
        ("topk_tail_fkl", "entry_keep", 0.02),
        ("topk_renorm", "token", 0.004),
        ("topk_renorm", "entry_keep", 0.001),
    ],
)
def test_topk_clip_modes_and_stats(tok, tmp_path, monkeypatch, mode, clip_mode, clip):
    """Every clip mode, through TRL's pipeline against the float64 reference; the logged
    statistics against the reference's."""
    stock, fused = _pair(
        tok,
        tmp_path,
        _model(tok),
        opsd=dict(distillation_clip=clip, distillation_clip_mode=clip_mode),
        **MODES[mode],
    )
    inputs = _batch(fused)
    unclipped = _loss_grads(stock, inputs)
    seen = []
    monkeypatch.setattr(
        sdft.sdft_trainer,
        "compute_topk_self_distillation_loss",
        _reference_topk_loss(clip, clip_mode, seen),
    )
    ref = _loss_grads(stock, inputs)
    g, g0 = ref[1]["lm_head.weight"], unclipped[1]["lm_head.weight"]
    assert (g - g0).abs().max() > 1e-3 * g0.abs().max()  # the clip bites
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _assert_same(_loss_grads(fused, inputs), ref)
    (stats,) = seen
    mask = fused._loss_mask(inputs).double()
    for name in ("student_entropy", "teacher_clipped_mass", "clipped_entries"):
        want = (getattr(stats, name).double() * mask).sum() / mask.sum()
        got = fused._metrics["train"][f"sdft/{name}"]
        assert got == pytest.approx([float(want)], rel=1e-6), name


def test_stats_can_be_switched_off(tok, tmp_path):
    _, fused = _pair(
        tok, tmp_path, _model(tok), opsd=dict(distillation_stats=False), **MODES["full_fkl"]
    )
    _loss_grads(fused, _batch(fused))
    assert "sdft/student_entropy" not in fused._metrics["train"]


def _reference_terms(trainer, inputs, alpha=0.0):
    """TRL's per-token loss (full logits, float64) and loss mask."""
    logits = trainer._compute_teacher_student_logits(trainer.model, trainer.teacher_model, inputs)
    per_token = loss_utils.compute_full_logit_self_distillation_loss(
        logits.student_logits, logits.teacher_logits, distillation_alpha=alpha
    )
    return per_token, logits.loss_mask.double()


def test_token_normalisation_over_the_optimizer_step(tok, tmp_path):
    """'token': each micro-batch's masked sum / the tokens of the whole step (both
    gradient-accumulation micro-batches); the step's gradient is the gradient of one token
    mean over the step (float64 formula). Evaluation: the batch's own tokens."""
    opts = dict(
        MODES["full_fkl"],
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        num_loss_tokens_to_skip=1,
        distillation_is_clip=None,
    )
    stock, fused = _pair(
        tok, tmp_path, _model(tok), opsd=dict(distillation_normalization="token"), **opts
    )
    torch.manual_seed(0)
    fused._prepare_inputs(next(iter(fused.get_train_dataloader())))
    slices = fused._buffered_inputs
    assert len(slices) == 2
    _pad_completions(slices[0], tok.pad_token_id, lengths=(2, 4))
    terms = [_reference_terms(stock, s) for s in slices]
    total = sum(m.sum() for _, m in terms)
    assert terms[0][1].sum() != terms[1][1].sum()  # unequal micro-batches: the norms differ
    stock.model.zero_grad(set_to_none=True)
    ref_loss = sum((p * m).sum() for p, m in terms) / total
    ref_loss.backward()
    ref = {n: p.grad.clone() for n, p in stock.model.named_parameters() if p.grad is not None}
    fused.model.zero_grad(set_to_none=True)
    losses = []
    for step, inputs in enumerate(slices):
        fused._step = step
        fused.current_gradient_accumulation_steps = 2
        loss = fused.compute_loss(fused.model, dict(inputs))
        loss.backward()
        losses.append(loss.detach())
    grads = {n: p.grad.clone() for n, p in fused.model.named_parameters() if p.grad is not None}
    for (p, m), loss in zip(terms, losses, strict=True):
        torch.testing.assert_close(loss, (p * m).sum().detach() / total, rtol=1e-10, atol=0)
    _assert_same((sum(losses), grads), (ref_loss.detach(), ref))
    fused.model.eval()
    p, m = terms[0]
    torch.testing.assert_close(
        fused.compute_loss(fused.model, dict(slices[0])).detach(),
        (p * m).sum().detach() / m.sum(),
        rtol=1e-10,
        atol=0,
    )


def test_microbatch_normalisation(tok, tmp_path):
    """'microbatch': the micro-batch's token mean, then / accumulation steps."""
    opts = dict(MODES["full_fkl"], distillation_is_clip=None)
    stock, fused = _pair(
        tok, tmp_path, _model(tok), opsd=dict(distillation_normalization="microbatch"), **opts
    )
    inputs = _batch(fused, old_logps=False)
    stock.model.zero_grad(set_to_none=True)
    p, m = _reference_terms(stock, inputs)
    ref_loss = (p * m).sum() / m.sum() / 3
    ref_loss.backward()
    ref = {n: q.grad.clone() for n, q in stock.model.named_parameters() if q.grad is not None}
    sequence = _loss_grads(stock, inputs, ga=3)[0]
    assert abs(sequence - ref_loss) > 1e-6 * abs(ref_loss)  # the two normalisations differ
    _assert_same(_loss_grads(fused, inputs, ga=3), (ref_loss.detach(), ref))


def test_loss_temperature_apart_from_sampling(tok, tmp_path):
    """loss_temperature: the divergence at it, the importance-sampling ratio still at the
    sampling temperature (TRL's rollout log-probs): equals TRL at temperature=loss_T with
    the old log-probs shifted by the difference of the two student log-probs."""
    opts = dict(MODES["full_fkl"])
    stock, fused = _pair(tok, tmp_path, _model(tok), opsd=dict(loss_temperature=0.6), **opts)
    inputs = _batch(fused)
    # the same ratio for TRL at temperature 0.6: old' = old + lp_0.6 - lp_1.0
    lp = {}
    for t in (0.6, 1.0):
        stock.temperature = t
        with torch.no_grad():
            logits = stock._forward_logits(
                stock.model,
                torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
                torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
                inputs["completion_ids"].shape[1],
            )
        lp[t] = logits.log_softmax(-1).gather(-1, inputs["completion_ids"][..., None])[..., 0]
    shifted = dict(inputs, old_per_token_logps=inputs["old_per_token_logps"] + lp[0.6] - lp[1.0])
    stock.temperature = 0.6
    _assert_same(_loss_grads(fused, inputs), _loss_grads(stock, shifted))


def test_rollout_logps_from_hidden_states(tok, tmp_path):
    """_compute_rollout_logps (gradient accumulation not a multiple of the generation
    period) equals TRL's, from hidden states."""
    opts = dict(MODES["full_fkl"], steps_per_generation=2, gradient_accumulation_steps=1)
    stock, fused = _pair(tok, tmp_path, _model(tok), **opts)
    inputs = _batch(fused, old_logps=False)
    args = [inputs[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")]
    ours, ref = fused._compute_rollout_logps(*args), stock._compute_rollout_logps(*args)
    assert ref is not None
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_teacher_chat_template_kwargs(tok, tmp_path):
    """Per-role chat-template arguments: the teacher prompt rendered with its own (a
    'thinking' teacher beside a non-thinking student), the student prompt with TRL's."""
    tok = copy.deepcopy(tok)
    tok.chat_template = CHAT_TEMPLATE.replace(
        "<|im_start|>assistant\n{% endif %}",
        "<|im_start|>assistant\n{% if think %}<|im_start|>{% endif %}{% endif %}",
    )
    marker = tok.convert_tokens_to_ids("<|im_start|>")
    fused = FusedSDFTTrainer(
        model=_model(tok),
        args=_config(
            FusedSDFTConfig,
            tmp_path,
            chat_template_kwargs={"think": False},
            teacher_chat_template_kwargs={"think": True},
        ),
        train_dataset=_data(),
        processing_class=tok,
    )
    batch = _batch(fused, old_logps=False)
    n_student = (batch["prompt_ids"] == marker).sum(-1)
    n_teacher = (batch["teacher_input_ids"] == marker).sum(-1)
    assert (n_teacher == n_student + 1).all()
    assert fused.chat_template_kwargs == {"think": False}  # restored after the build


def test_plain_sdft_config_is_trls_loss(tok, tmp_path):
    """A plain SDFTConfig (no OPSD options) gives TRL's loss."""
    model = _model(tok)
    stock, _ = _pair(tok, tmp_path, copy.deepcopy(model), **MODES["full_fkl"])
    fused = FusedSDFTTrainer(
        model=model,
        args=_config(sdft.SDFTConfig, tmp_path, **MODES["full_fkl"]),
        train_dataset=_data(),
        processing_class=tok,
    )
    inputs = _batch(fused)
    _assert_same(_loss_grads(fused, inputs), _loss_grads(stock, inputs))


def test_train_runs(tok, tmp_path):
    """trainer.train() with TRL's default bf16 mixed precision, gradient accumulation and
    OPSD's options (clip, token normalisation): finite losses, weights move, evaluation."""
    model = build_tiny_model(tok, 0, **SMALL)
    before = copy.deepcopy(model.state_dict())
    trainer = FusedSDFTTrainer(
        model=model,
        args=_config(
            FusedSDFTConfig,
            tmp_path,
            bf16=True,
            max_steps=2,
            learning_rate=1e-2,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            distillation_mode="full_logits",
            distillation_alpha=0.0,
            distillation_clip=0.05,
            distillation_normalization="token",
        ),
        train_dataset=_data(),
        processing_class=tok,
    )
    result = trainer.train()
    assert result.global_step == 2
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any("sdft/distillation_loss" in h for h in trainer.state.log_history)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    metrics = trainer.evaluate(eval_dataset=_data(4))
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))


@pytest.mark.parametrize(
    "opts, error, match",
    [
        (dict(distillation_clip=-0.1), ValueError, "distillation_clip must be None or a finite"),
        (dict(distillation_clip=0.0), ValueError, "distillation_clip"),
        (dict(distillation_clip=True), TypeError, "distillation_clip"),
        (
            dict(distillation_clip=0.05, distillation_mode="sampled_token", distillation_alpha=1.0),
            ValueError,
            "no entries to clip",
        ),
        (dict(distillation_clip_mode="row"), ValueError, "distillation_clip_mode"),
        (dict(distillation_normalization="batch"), ValueError, "distillation_normalization"),
        (
            dict(
                distillation_normalization="token",
                gradient_accumulation_steps=2,
                steps_per_generation=1,
            ),
            ValueError,
            "multiple of gradient_accumulation_steps",
        ),
        (dict(loss_temperature=0.0), ValueError, "loss_temperature"),
        (dict(teacher_topk=True, distillation_mode="full_logits"), ValueError, "teacher_topk"),
        (dict(teacher_chat_template_kwargs="x"), TypeError, "teacher_chat_template_kwargs"),
        (dict(fused_loss_kwargs=dict(kind="jsd")), TypeError, "fused_loss_kwargs"),
        (
            dict(distillation_mode="topk_logits", fused_loss_kwargs=dict(impl="fused")),
            ValueError,
            "no top-k form",
        ),
    ],
)
def test_config_errors(tmp_path, opts, error, match):
    with pytest.raises(error, match=match):
        _config(FusedSDFTConfig, tmp_path, **opts)


def test_trainer_errors(tok, tmp_path):
    """An lm_head the kernels cannot read fails at construction; so do OPSD options set on
    a plain SDFTConfig by hand."""
    model = _model(tok)
    model.lm_head = torch.nn.Identity()
    with pytest.raises(ValueError, match="no linear lm_head"):
        FusedSDFTTrainer(
            model=model,
            args=_config(FusedSDFTConfig, tmp_path),
            train_dataset=_data(),
            processing_class=tok,
        )
    args = _config(
        sdft.SDFTConfig, tmp_path, distillation_mode="sampled_token", distillation_alpha=1.0
    )
    args.distillation_clip = 0.1
    with pytest.raises(ValueError, match="no entries to clip"):
        FusedSDFTTrainer(model=_model(tok), args=args, train_dataset=_data(), processing_class=tok)
    with pytest.raises(ValueError, match="does not support returning outputs"):
        trainer = FusedSDFTTrainer(
            model=_model(tok),
            args=_config(FusedSDFTConfig, tmp_path),
            train_dataset=_data(),
            processing_class=tok,
        )
        trainer.compute_loss(trainer.model, {}, return_outputs=True)


@pytest.mark.parametrize("cls_name", ["SDFTTrainer", "SDPOTrainer"])
def test_trl_private_names_are_pinned(cls_name):
    """The private TRL names the integration uses exist with the parameters it passes: a
    TRL release that renames or reshapes one fails here, loudly."""
    sdpo = pytest.importorskip("trl.experimental.sdpo")
    cls = {"SDFTTrainer": sdft.SDFTTrainer, "SDPOTrainer": sdpo.SDPOTrainer}[cls_name]
    for name, params in trl_sdft.TRL_PRIVATE_METHODS.items():
        method = getattr(cls, name, None)
        assert callable(method), f"{cls_name}.{name} is gone (TRL changed)"
        got = tuple(inspect.signature(method).parameters)[1:]
        assert got == params, f"{cls_name}.{name}{got}: expected {params}"
    source = inspect.getsource(cls)
    for attr in trl_sdft.TRL_PRIVATE_ATTRIBUTES + trl_sdft.TRL_PRIVATE_SDPO.get(cls_name, ()):
        if attr != "num_loss_tokens_to_skip" or cls_name == "SDFTTrainer":
            assert f"self.{attr}" in source, f"{cls_name} no longer sets self.{attr}"
    # teacher_chat_template_kwargs: the builders tokenize through the trainer, which
    # reads chat_template_kwargs at that moment
    assert "self.teacher_context_builder = " in source
    module = inspect.getmodule(cls)
    builder = next(
        v for k, v in vars(module).items() if k.endswith("TeacherContextBuilder") and k != "_"
    )
    assert "self.trainer._tokenize_prompts" in inspect.getsource(builder)
    tokenize = inspect.getsource(
        getattr(cls, "_tokenize_prompts_untruncated", cls._tokenize_prompts)
    )
    assert "**self.chat_template_kwargs" in tokenize


def test_reexported_from_the_trl_integration():
    from opsd_kernels.integrations import trl as trl_integration

    assert trl_integration.FusedSDFTTrainer is FusedSDFTTrainer
    assert trl_integration.FusedSDFTConfig is FusedSDFTConfig
    assert tuple(inspect.signature(loss_utils.apply_importance_sampling_clipping).parameters) == (
        "per_token_loss",
        "student_log_probs",
        "old_log_probs",
        "clip_coeff",
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vocab_sweep_against_full_logits(dtype):
    """Chunked log-sum-exp, top-k and gather over odd vocabulary slices and token chunks."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(13, 8, generator=g).to(dtype)
    w = (3 * torch.randn(37, 8, generator=g)).to(dtype)
    b = torch.randn(37, generator=g).to(dtype)
    ids = torch.randint(0, 37, (13, 3), generator=g)
    lse, top, top_ids, gathered = vocab_sweep(
        h, w, b, 0.7, k=5, ids=ids, vocab_slice=6, token_chunk=4
    )
    z = (h @ w.T + b) / 0.7
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(z, -1), **tol)
    ref = z.topk(5, dim=-1)
    assert torch.equal(top_ids, ref.indices)
    torch.testing.assert_close(top, ref.values, **tol)
    torch.testing.assert_close(gathered, z.gather(-1, ids), **tol)
    assert vocab_sweep(h, w, None, k=0)[1] is None
    with pytest.raises(ValueError, match="k must lie"):
        vocab_sweep(h, w, None, k=38)


def _hand_batch(vocab, batch=2, prompt=8, width=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, 400, (batch, n), generator=g)  # noqa: E731
    completion_mask = torch.ones(batch, width, dtype=torch.long)
    return {
        "prompt_ids": ids(prompt),
        "prompt_mask": torch.ones(batch, prompt, dtype=torch.long),
        "completion_ids": ids(width),
        "completion_mask": completion_mask,
        "teacher_input_ids": torch.cat([ids(prompt + 6), ids(width)], 1),
        "teacher_attention_mask": torch.ones(batch, prompt + 6 + width, dtype=torch.long),
    }


def _peak(trainer, inputs):
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.zero_grad(set_to_none=False)  # gradient buffers exist before the block
    with PeakMemory() as pm:
        trainer.compute_loss(trainer.model, dict(inputs)).backward()
    return pm.peak_bytes


def test_peak_memory_at_qwen3_vocabulary(tok, tmp_path):
    """One compute_loss + backward at V = 151,936 (float32, full_logits, live teacher), at
    two completion lengths: the stock step's peak grows by several (extra tokens x V)
    float32 tensors, the fused step's by a small fraction of one (the README's figure comes
    from the same measurement at 4 x 128 tokens)."""
    vocab, short, long = 151_936, 8, 24
    per_tensor = 2 * (long - short) * vocab * 4  # one float32 (extra tokens x V) tensor
    growth = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = transformers.Qwen3ForCausalLM(
            transformers.Qwen3Config(vocab_size=vocab, tie_word_embeddings=False, **SMALL)
        )
        cls, cfg = (
            (FusedSDFTTrainer, FusedSDFTConfig) if fused else (sdft.SDFTTrainer, sdft.SDFTConfig)
        )
        trainer = cls(
            model=model,
            args=_config(
                cfg,
                tmp_path,
                distillation_mode="full_logits",
                distillation_alpha=0.0,
                **(dict(fused_loss_kwargs=dict(chunk_size=8)) if fused else {}),
            ),
            train_dataset=_data(),
            processing_class=tok,
        )
        _peak(trainer, _hand_batch(vocab, width=short))  # warm-up: lazily created state
        growth[fused] = _peak(trainer, _hand_batch(vocab, width=long)) - _peak(
            trainer, _hand_batch(vocab, width=short)
        )
    assert growth[False] > 3 * per_tensor, growth
    assert growth[True] < 0.1 * per_tensor, growth


# ------------------------------------------------------------------ DDP, 2 processes

DDP_WORLD, DDP_ROWS = 2, 4


def _ddp_grads(world: int, rank: int, norm: str) -> dict:
    """One compute_loss + backward of FusedSDFTTrainer on this rank's rows of a fixed
    4-row batch with unequal completion lengths, through accelerate's DDP wrapper when
    ``world`` is 2 (the loss then runs inside DDP's forward: gradients averaged)."""
    tok = build_tokenizer()
    vocab = len(tok)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(vocab_size=vocab, tie_word_embeddings=False, **SMALL)
    ).double()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    import tempfile

    trainer = FusedSDFTTrainer(
        model=model,
        args=_config(
            FusedSDFTConfig,
            tempfile.mkdtemp(),
            distillation_mode="full_logits",
            distillation_alpha=0.0,
            distillation_normalization=norm,
            per_device_train_batch_size=DDP_ROWS // world,
            num_generations=1,
        ),
        train_dataset=_data(),
        processing_class=tok,
    )
    batch = _hand_batch(vocab, batch=DDP_ROWS, width=8, seed=1)
    batch["completion_mask"][0, 3:] = 0
    batch["completion_mask"][3, 5:] = 0
    batch["teacher_attention_mask"][:, -8:] = batch["completion_mask"]
    rows = slice(rank * DDP_ROWS // world, (rank + 1) * DDP_ROWS // world)
    wrapped = trainer.accelerator.prepare_model(trainer.model) if world > 1 else trainer.model
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.compute_loss(wrapped, {k: v[rows] for k, v in batch.items()})
    loss.backward()
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    """2 gloo processes (DDP through accelerate) against 1 on the same global batch: the
    same gradients for 'token' (the step's token count gathered over processes: the ranks
    hold 11 and 13 loss tokens) and 'sequence' normalisation."""
    import os
    import socket
    import subprocess
    import sys

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {  # as tests/test_trl_sharded.py
        **os.environ,
        "PYTHONPATH": str(root),
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(DDP_WORLD)]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    cmd += ["-m", "tests.test_trl_sdft", str(tmp_path)]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    for norm in ("token", "sequence"):
        ddp = torch.load(tmp_path / f"{norm}.pt")
        single = _ddp_grads(1, 0, norm)
        assert ddp.keys() == single.keys()
        for name, g in single.items():
            err = (ddp[name] - g).abs().max() / g.abs().max()
            assert err < 1e-12, f"{norm} {name}: {err}"


if __name__ == "__main__":  # the DDP workers: python -m torch.distributed.run ... FOLDER
    import os
    import pathlib
    import sys

    _rank = int(os.environ["RANK"])
    for _norm in ("token", "sequence"):
        _grads = _ddp_grads(int(os.environ["WORLD_SIZE"]), _rank, _norm)
        if _rank == 0:
            torch.save(_grads, pathlib.Path(sys.argv[1]) / f"{_norm}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # about one launch in five aborted at interpreter exit, after the results were saved
    # ("terminate called without an active exception": a native thread destroyed while
    # joinable during shutdown, no Python frame); the work is done, so skip the shutdown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
