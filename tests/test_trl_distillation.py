"""opsd_kernels.integrations.trl_distillation against TRL's own DistillationTrainer and
against this project's float64 reference (CPU, tiny models built in code).

TRL's kernel computes in float32 whatever the input dtype: ours is checked against the
float64 reference (``divergence_reference`` of the models' own logits) within 1e-9 in
float64, and against TRL's trainer within float32 rounding: the loss, every gradient and
TRL's logged ``entropy`` metric (ours from the kernel's per-token ``student_entropy``).
Checked with trl 1.16.0; skipped without it.
"""

import copy
import warnings

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from trl import DistillationConfig, DistillationTrainer  # noqa: E402

from opsd_kernels.integrations.trl_distillation import (  # noqa: E402
    FusedDistillationConfig,
    FusedDistillationTrainer,
)
from opsd_kernels.reference import divergence_reference  # noqa: E402
from tests.test_trl_integration import build_tokenizer  # noqa: E402

warnings.filterwarnings("ignore", message=".*experimental.*")

PROMPT, COMPLETION = 5, 6


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _model(tok, seed, arch="qwen3", hidden=16, cap=None):
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    if arch == "gemma2":  # a final soft cap small enough to bend these logits
        model = transformers.Gemma2ForCausalLM(
            transformers.Gemma2Config(final_logit_softcapping=cap, **kw)
        )
    elif arch == "cohere":  # a logit scale (TRL reads it as well)
        kw.pop("head_dim")
        model = transformers.CohereForCausalLM(
            transformers.CohereConfig(logit_scale=0.37, tie_word_embeddings=False, **kw)
        )
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kw))
    with torch.no_grad():  # sharper distributions than the default init: a real loss
        model.get_output_embeddings().weight.mul_(40.0)
    return model


def _trainer(cls, tok, student, teacher, tmp_path, **kw):
    config_cls = FusedDistillationConfig if cls is FusedDistillationTrainer else DistillationConfig
    args = config_cls(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        max_completion_length=COMPLETION,
        seed=0,
        disable_dropout=True,
        bf16=False,
        **kw,
    )
    ds = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": "1 + 1"}]] * 4})
    extra = {}
    if cls is FusedDistillationTrainer:
        extra = dict(fused_loss_kwargs=dict(impl="torch", chunk_size=5))
    return cls(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        **extra,
    )


def _inputs(vocab, tool_mask=False, num_items=False):
    """A batch as TRL's ``_generate_and_score_completions`` hands it over: left-padded
    prompts, right-padded completions (a completion cut at EOS and one empty)."""
    g = torch.Generator().manual_seed(3)
    prompt_ids = torch.randint(3, vocab, (4, PROMPT), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[1, :2] = 0
    completion_ids = torch.randint(3, vocab, (4, COMPLETION), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[0, 4:] = 0
    completion_mask[2, 2:] = 0
    out = dict(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
    )
    if tool_mask:  # tool output tokens inside a completion are not trained
        out["tool_mask"] = torch.ones_like(completion_ids)
        out["tool_mask"][3, 1:3] = 0
    if num_items:
        out["num_items_in_batch"] = torch.tensor(29.0)
    return out


def _step(trainer, inputs):
    """compute_loss + backward as training_step runs them: (loss, gradients, entropy)."""
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, trainer._metrics["train"]["entropy"][-1]


def _reference(student, teacher, inputs, beta, temperature, clip=None, clip_mode="entry"):
    """The float64 reference from the models' own logits (scale and soft cap applied by
    the models): (loss, gradients, mean student entropy)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    mask = inputs["completion_mask"].bool()
    if "tool_mask" in inputs:
        mask &= inputs["tool_mask"].bool()
    student.zero_grad()
    s = student(input_ids=ids, attention_mask=attn).logits[:, PROMPT - 1 : -1]
    with torch.no_grad():
        t = teacher(input_ids=ids, attention_mask=attn).logits[:, PROMPT - 1 : -1]
    kind = "forward_kl" if beta == 0 else "reverse_kl" if beta == 1 else "jsd"
    total = divergence_reference(
        s,
        t,
        kind=kind,
        beta=beta if kind == "jsd" else 0.5,
        temperature=temperature,
        clip=clip,
        clip_mode=clip_mode,
        mask=mask,
        reduction="sum",
    )
    n = inputs.get("num_items_in_batch", mask.sum())
    loss = total / n
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    logp = torch.log_softmax(s.detach().double() / temperature, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)[mask].mean()
    return loss.detach(), grads, entropy.item()


def _rel_errs(a, b):
    """Largest relative error of the loss and gradients (each relative to its tensor's
    largest value), and of the entropy metric (float32 statistics in every dtype)."""
    (loss, grads, ent), (loss_ref, grads_ref, ent_ref) = a, b
    assert grads.keys() == grads_ref.keys()
    errs = [abs(loss.double() - loss_ref.double()) / loss_ref.abs().double()]
    errs += [
        (grads[n].double() - g.double()).abs().max() / g.abs().max().double()
        for n, g in grads_ref.items()
    ]
    return max(float(e) for e in errs), abs(ent - ent_ref) / abs(ent_ref)


CASES = [  # arch, teacher hidden, beta, temperature, tool_mask, num_items
    ("qwen3", 16, 1.0, 1.0, False, False),  # TRL's default: reverse KL
    ("qwen3", 24, 0.0, 0.7, True, True),  # forward KL, a wider teacher, tool mask
    ("qwen3", 16, 0.4, 1.3, False, True),  # generalized JSD
    ("gemma2", 16, 0.0, 1.0, False, False),  # soft caps 2.0 (student) and 3.0 (teacher)
    ("cohere", 16, 0.5, 1.0, True, False),  # logit scale
]


def _pair(tok, arch, hidden):
    student = _model(tok, 0, arch, cap=2.0)
    teacher = _model(tok, 1, arch, hidden=hidden, cap=3.0)
    return student, teacher


@pytest.mark.parametrize("arch, hidden, beta, temperature, tool_mask, num_items", CASES)
def test_matches_float64_reference_and_trl_trainer(
    tokenizer, tmp_path, arch, hidden, beta, temperature, tool_mask, num_items
):
    student, teacher = _pair(tokenizer, arch, hidden)
    inputs = _inputs(len(tokenizer), tool_mask, num_items)
    opts = dict(beta=beta, temperature=temperature)
    ref = _reference(copy.deepcopy(student).double(), teacher.double(), inputs, **opts)
    assert ref[0] > 1e-2  # a real divergence
    # ours in float64 against the float64 reference
    s64, t64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    fused64 = _trainer(FusedDistillationTrainer, tokenizer, s64, t64, tmp_path, **opts)
    ours64 = _step(fused64, inputs)
    assert ours64[0].dtype == torch.float64
    loss_err, entropy_err = _rel_errs(ours64, ref)
    assert loss_err < 1e-9 and entropy_err < 1e-6
    # ours and TRL's in float32, against each other and the reference
    s32, t32 = copy.deepcopy(student).float(), copy.deepcopy(teacher).float()
    stock = _step(_trainer(DistillationTrainer, tokenizer, s32, t32, tmp_path, **opts), inputs)
    s32, t32 = copy.deepcopy(student).float(), copy.deepcopy(teacher).float()
    ours = _step(_trainer(FusedDistillationTrainer, tokenizer, s32, t32, tmp_path, **opts), inputs)
    for a, b in ((ours, stock), (stock, ref), (ours, ref)):
        assert max(_rel_errs(a, b)) < 5e-6, _rel_errs(a, b)  # measured: up to 2e-6


@pytest.mark.parametrize("beta, clip_mode", [(1.0, "entry"), (0.0, "token"), (0.4, "entry_keep")])
def test_per_entry_clip_against_float64_reference(tokenizer, tmp_path, beta, clip_mode):
    """The clip TRL lacks: ``distillation_clip`` and its modes against the reference's
    clipped loss (it bites: the loss differs from the unclipped one)."""
    student, teacher = _pair(tokenizer, "qwen3", 16)
    student, teacher = student.double(), teacher.double()
    inputs = _inputs(len(tokenizer))
    opts = dict(beta=beta, temperature=1.0)
    ref = _reference(
        copy.deepcopy(student), teacher, inputs, **opts, clip=0.02, clip_mode=clip_mode
    )
    unclipped = _reference(copy.deepcopy(student), teacher, inputs, **opts)
    assert abs(ref[0] - unclipped[0]) > 1e-3 * unclipped[0]
    trainer = _trainer(
        FusedDistillationTrainer,
        tokenizer,
        student,
        teacher,
        tmp_path,
        beta=beta,
        distillation_clip=0.02,
        distillation_clip_mode=clip_mode,
    )
    loss_err, entropy_err = _rel_errs(_step(trainer, inputs), ref)
    assert loss_err < 1e-9 and entropy_err < 1e-6


def test_bad_options_are_refused_at_construction(tokenizer, tmp_path):
    student, teacher = _pair(tokenizer, "qwen3", 16)
    for kw, match in [
        (dict(distillation_clip=-0.1), "clip must be None or a number > 0"),
        (dict(distillation_clip=0.1, distillation_clip_mode="row"), "clip_mode must be one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            _trainer(FusedDistillationTrainer, tokenizer, student, teacher, tmp_path, **kw)
    with pytest.raises(TypeError, match="fused_loss_kwargs"):
        FusedDistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=FusedDistillationConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False),
            train_dataset=datasets.Dataset.from_dict({"prompt": ["a"]}),
            processing_class=tokenizer,
            fused_loss_kwargs=dict(kind="jsd"),
        )


def test_train_runs_and_logs_entropy(tokenizer, tmp_path):
    """``train()`` with on-policy generation and TRL's metrics."""
    student, teacher = _pair(tokenizer, "qwen3", 16)
    before = copy.deepcopy(student.state_dict())
    trainer = _trainer(
        FusedDistillationTrainer,
        tokenizer,
        student,
        teacher,
        tmp_path,
        max_steps=2,
        logging_steps=1,
        learning_rate=1e-2,
        distillation_clip=0.5,
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(h["entropy"] > 0 for h in logged)
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
