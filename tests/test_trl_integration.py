"""opsd_kernels.integrations.trl against TRL's own GKD and GOLD trainers (CPU, tiny models).

Checked with trl 1.16.0; skipped when trl is not installed. Models are tiny Qwen3s built
from a config and the tokenizer is a small byte-level BPE trained in the test (GOLD needs
byte-level tokenizers): no downloads.
"""

import copy
import warnings

import pytest
import torch

pytest.importorskip("trl")
gkd = pytest.importorskip("trl.experimental.gkd")
gold = pytest.importorskip("trl.experimental.gold")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from opsd_kernels import generalized_jsd  # noqa: E402
from opsd_kernels.integrations.trl import (  # noqa: E402
    FusedGKDTrainer,
    FusedGOLDTrainer,
    fused_generalized_jsd,
)
from opsd_kernels.memory import PeakMemory  # noqa: E402

warnings.filterwarnings("ignore", message=".*experimental.*")

# float32 tolerance of the project (tests/helpers.py TOL; atol relative to the largest value):
# both trainers compute in float32, in different orders (TRL: full logits, log_softmax,
# F.kl_div; ours: chunked GEMMs and an analytic gradient)
F32 = dict(rtol=2e-4, atol=2e-5)

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _messages(n=8):
    return [
        [
            {"role": "user", "content": f"What is {i} plus {i + 3}?"},
            {"role": "assistant", "content": f"{i} plus {i + 3} is {2 * i + 3}."},
        ]
        for i in range(n)
    ]


def build_tokenizer():
    """A small byte-level BPE with a chat template, trained here (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    texts = [m["content"] for conv in _messages(40) for m in conv] + ["user assistant"]
    tk.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _model(tok, seed, hidden=16, vocab=None, tied=False, layers=1):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(
        vocab_size=vocab or len(tok),
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        tie_word_embeddings=tied,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = transformers.Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # sharper distributions than the default init: a real loss
        model.get_output_embeddings().weight.mul_(40.0)
    return model


def _args(cls, tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        lmbda=0.0,
        report_to="none",
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        max_length=64,
        seed=0,
        disable_dropout=True,
        bf16=False,
    )  # TRL's configs default to bf16 autocast; float32 unless asked
    base.update(kw)
    return cls(**base)


def _trainer(kind, tok, student, teacher, tmp_path, fused, fused_loss_kwargs=None, **kw):
    ds = datasets.Dataset.from_dict({"messages": _messages()})
    if kind == "gkd":
        cls = FusedGKDTrainer if fused else gkd.GKDTrainer
        args = _args(gkd.GKDConfig, tmp_path, max_new_tokens=4, **kw)
    else:
        cls = FusedGOLDTrainer if fused else gold.GOLDTrainer
        args = _args(gold.GOLDConfig, tmp_path, max_completion_length=4, **kw)
    extra = dict(fused_loss_kwargs=fused_loss_kwargs) if fused else {}
    return cls(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        **extra,
    )


def _step(trainer, inputs, num_items_in_batch):
    trainer.current_gradient_accumulation_steps = 1  # set by the train loop otherwise
    trainer.model.zero_grad()
    loss = trainer.training_step(trainer.model, dict(inputs), num_items_in_batch)
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def _shared_head_teacher(tok, student):
    teacher = _model(tok, 3)
    teacher.lm_head = student.lm_head  # the same Parameter: the shared-weight fast path
    return teacher


TEACHERS = {
    "separate": lambda tok, s: _model(tok, 1),
    "wider": lambda tok, s: _model(tok, 2, hidden=24),  # another hidden size, own lm_head
    "shared_head": _shared_head_teacher,
}


def _max_rel_err(loss, grads, loss_ref, grads_ref):
    errs = [abs(loss.double() - loss_ref.double()) / loss_ref.abs().double()]
    errs += [
        (grads[n].double() - g.double()).abs().max() / g.abs().max().double()
        for n, g in grads_ref.items()
    ]
    return max(errs).item()


@pytest.mark.parametrize(
    "kind, beta, temperature, teacher, num_items",
    [
        ("gkd", 0.5, 0.9, "separate", None),
        ("gkd", 0.0, 1.0, "wider", 13),
        ("gkd", 1.0, 1.0, "shared_head", "tensor"),
        ("gold", 0.3, 1.4, "separate", None),  # GOLD applies the temperature in its loss
        ("gold", 1.0, 0.8, "wider", "tensor"),
    ],
)
def test_one_step_matches_stock_trainer(
    tokenizer, tmp_path, kind, beta, temperature, teacher, num_items
):
    """One training_step (forward, backward, TRL's scaling) of our trainer in float32 against
    TRL's stock trainer in float64 on the same batch and weights (float32 tolerance); TRL's
    stock trainer in float32 is as close (both measured at ~1e-6 relative)."""
    student = _model(tokenizer, 0)
    teacher_model = TEACHERS[teacher](tokenizer, student)
    opts = dict(beta=beta, temperature=temperature)
    # copies first: a Trainer patches its model's forward, which a deepcopy would share
    copies = {}
    for dtype in (torch.float64, torch.float32):
        s = copy.deepcopy(student).to(dtype)
        t = copy.deepcopy(teacher_model).to(dtype)
        if teacher == "shared_head":
            t.lm_head = s.lm_head
        copies[dtype] = (s, t)
    runs = {
        dtype: _trainer(kind, tokenizer, s, t, tmp_path, fused=False, **opts)
        for dtype, (s, t) in copies.items()
    }
    ours = _trainer(
        kind,
        tokenizer,
        student,
        teacher_model,
        tmp_path,
        fused=True,
        fused_loss_kwargs=dict(impl="torch", chunk_size=5),
        **opts,
    )
    inputs = _first_batch(ours)
    assert (inputs["labels"] == -100).any() and (inputs["labels"] != -100).any()
    n = torch.tensor(21) if num_items == "tensor" else num_items
    loss64, grads64 = _step(runs[torch.float64], inputs, n)
    loss32, grads32 = _step(runs[torch.float32], inputs, n)
    loss, grads = _step(ours, inputs, n)
    assert loss64 > 1e-2  # a real divergence, not a near-zero one
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), loss64, **F32)
    assert grads.keys() == grads64.keys() and "lm_head.weight" in grads
    for name, g in grads64.items():
        torch.testing.assert_close(
            grads[name].double(),
            g,
            rtol=F32["rtol"],
            atol=F32["atol"] * g.abs().max(),
            msg=lambda m, name=name: f"{name}: {m}",
        )
    # largest error relative to each tensor's largest value, ours and the stock float32 one
    assert _max_rel_err(loss32, grads32, loss64, grads64) < 1e-4
    assert _max_rel_err(loss, grads, loss64, grads64) < 1e-4


def test_one_step_matches_with_lora_student(tokenizer, tmp_path):
    """A PEFT LoRA student (frozen lm_head): gradients reach the adapters only."""
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )  # non-zero adapters
    student = peft.get_peft_model(_model(tokenizer, 0), cfg)
    teacher = _model(tokenizer, 1)
    student64, teacher64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    stock = _trainer("gkd", tokenizer, student64, teacher64, tmp_path, fused=False, beta=0.5)
    ours = _trainer("gkd", tokenizer, student, teacher, tmp_path, fused=True, beta=0.5)
    inputs = _first_batch(ours)
    loss_ref, grads_ref = _step(stock, inputs, None)
    loss, grads = _step(ours, inputs, None)
    torch.testing.assert_close(loss.double(), loss_ref, **F32)
    assert grads.keys() == grads_ref.keys() and all("lora" in n for n in grads)
    for name, g in grads_ref.items():
        torch.testing.assert_close(
            grads[name].double(), g, rtol=F32["rtol"], atol=F32["atol"] * g.abs().max()
        )


def _record_dtypes(model, seen):
    layer = model.model.layers[0].mlp.down_proj
    return layer.register_forward_hook(lambda m, i, o: seen.append(o.dtype))


def test_mixed_precision_runs_the_bodies_under_the_same_autocast(tokenizer, tmp_path):
    """With bf16=True (TRL's default) accelerate wraps a prepared model's forward in
    autocast (the teacher at construction, the student when training starts). Ours calls
    the bodies directly, so it must apply the same autocast to the same models: the body
    layers compute in the same dtypes as TRL's, and the losses agree to bf16 accuracy."""
    student, teacher = _model(tokenizer, 0), _model(tokenizer, 1)
    student_copy, teacher_copy = copy.deepcopy(student), copy.deepcopy(teacher)
    stock = _trainer("gkd", tokenizer, student_copy, teacher_copy, tmp_path, fused=False, bf16=True)
    ours = _trainer("gkd", tokenizer, student, teacher, tmp_path, fused=True, bf16=True)
    inputs = _first_batch(ours)
    seen, losses = {}, {}
    for name, trainer in (("stock", stock), ("ours", ours)):
        seen[name] = []
        handles = [
            _record_dtypes(trainer.model, seen[name]),
            _record_dtypes(trainer.teacher_model, seen[name]),
        ]
        losses[name] = _step(trainer, inputs, None)[0]
        for h in handles:
            h.remove()
    assert seen["stock"] == seen["ours"] == [torch.float32, torch.bfloat16], seen
    assert losses["ours"].dtype == torch.float32
    torch.testing.assert_close(losses["ours"], losses["stock"], rtol=3e-2, atol=0)


def test_gold_uld_falls_back_to_trl_with_a_warning(tokenizer, tmp_path):
    """GOLD's cross-tokenizer ULD loss needs both full probability tensors: TRL computes it."""
    tokenizer.save_pretrained(tmp_path / "teacher_tok")
    opts = dict(
        beta=0.5, use_uld_loss=True, teacher_tokenizer_name_or_path=str(tmp_path / "teacher_tok")
    )
    student, teacher = _model(tokenizer, 0), _model(tokenizer, 1)
    student_copy, teacher_copy = copy.deepcopy(student), copy.deepcopy(teacher)
    stock = _trainer("gold", tokenizer, student_copy, teacher_copy, tmp_path, fused=False, **opts)
    with pytest.warns(UserWarning, match="ULD loss stays TRL's"):
        ours = _trainer("gold", tokenizer, student, teacher, tmp_path, fused=True, **opts)
    inputs = _first_batch(ours)
    torch.testing.assert_close(_step(ours, inputs, None)[0], _step(stock, inputs, None)[0])


def test_generalized_jsd_patched_into_stock_trainer(tokenizer, tmp_path):
    """The one-line switch: TRL's trainer with our generalized_jsd as its loss."""

    class Patched(gkd.GKDTrainer):
        generalized_jsd_loss = staticmethod(generalized_jsd)

    student, teacher = _model(tokenizer, 0), _model(tokenizer, 1)
    student_copy = copy.deepcopy(student)
    stock = _trainer("gkd", tokenizer, student_copy, teacher, tmp_path, fused=False)
    patched = Patched(
        model=student,
        teacher_model=teacher,
        args=stock.args,
        train_dataset=stock.train_dataset,
        processing_class=tokenizer,
    )
    inputs = _first_batch(stock)
    torch.testing.assert_close(_step(patched, inputs, 9)[0], _step(stock, inputs, 9)[0], **F32)


def _batch(seq_len, vocab):
    g = torch.Generator().manual_seed(seq_len)
    ids = torch.randint(0, vocab, (2, seq_len), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


def _peak_step(trainer, inputs):
    trainer.model.zero_grad(set_to_none=False)  # gradient buffers exist before the block
    with PeakMemory() as pm:
        trainer.training_step(trainer.model, dict(inputs), None)
    return pm.peak_bytes


def test_step_peak_memory_does_not_grow_with_vocab_times_tokens(tokenizer, tmp_path):
    """Peak bytes of one training step at two sequence lengths, V = 16384: the fused
    step's growth stays far below one (extra tokens x V) float32 tensor; the stock
    step's growth is several of them (the check can fail)."""
    vocab, short, long = 16384, 16, 48
    growth_per_tensor = 2 * (long - short) * vocab * 4  # one float32 (extra tokens, V)
    growth = {}
    for fused in (False, True):
        student, teacher = _model(tokenizer, 0, vocab=vocab), _model(tokenizer, 1, vocab=vocab)
        trainer = _trainer(
            "gkd",
            tokenizer,
            student,
            teacher,
            tmp_path,
            fused=fused,
            **(dict(fused_loss_kwargs=dict(impl="torch", chunk_size=16)) if fused else {}),
        )
        _step(trainer, _batch(short, vocab), None)  # warm-up: lazily created state
        growth[fused] = _peak_step(trainer, _batch(long, vocab)) - _peak_step(
            trainer, _batch(short, vocab)
        )
    assert growth[False] > 3 * growth_per_tensor, growth
    assert growth[True] < 0.1 * growth_per_tensor, growth


@pytest.mark.parametrize("kind", ["gkd", "gold"])
def test_short_training_run(tokenizer, tmp_path, kind):
    """trainer.train() with on-policy generation (lmbda=0.5), TRL's default bf16 mixed
    precision, and an evaluation."""
    student, teacher = _model(tokenizer, 0), _model(tokenizer, 1)
    before = copy.deepcopy(student.state_dict())
    trainer = _trainer(
        kind,
        tokenizer,
        student,
        teacher,
        tmp_path,
        fused=True,
        lmbda=0.5,
        max_steps=3,
        learning_rate=1e-2,
        beta=0.5,
        bf16=True,
    )
    seen = []
    handle = _record_dtypes(student, seen)
    result = trainer.train()
    handle.remove()
    assert torch.bfloat16 in seen  # the prepared student's body ran under TRL's autocast
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert result.global_step == 3
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    metrics = trainer.evaluate(eval_dataset=trainer.train_dataset)
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))


def test_fused_generalized_jsd_errors(tokenizer, tmp_path):
    student, teacher = _model(tokenizer, 0), _model(tokenizer, 1)
    ids = torch.randint(0, len(tokenizer), (2, 5))
    with pytest.raises(TypeError, match="unexpected loss arguments"):
        fused_generalized_jsd(student, teacher, ids, None, ids, clip=0.1)
    with pytest.raises(ValueError, match="labels must have the shape"):
        fused_generalized_jsd(student, teacher, ids, None, ids[:, :3])
    with pytest.raises(ValueError, match="beta"):
        fused_generalized_jsd(student, teacher, ids, None, ids, beta=1.5)
    with pytest.raises(TypeError, match="fused_loss_kwargs"):
        _trainer(
            "gkd",
            tokenizer,
            student,
            teacher,
            tmp_path,
            fused=True,
            fused_loss_kwargs=dict(kind="jsd"),
        )


def _capped_or_scaled(tok, arch, seed, cap=None):
    """A tiny Gemma 2 (``final_logit_softcapping`` ``cap``, small enough to bend these
    logits) or Cohere (``logit_scale``) causal LM."""
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    if arch == "gemma2":
        cfg = transformers.Gemma2Config(head_dim=8, final_logit_softcapping=cap, **kw)
        model = transformers.Gemma2ForCausalLM(cfg)
    else:
        cfg = transformers.CohereConfig(logit_scale=0.37, tie_word_embeddings=False, **kw)
        model = transformers.CohereForCausalLM(cfg)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    return model.double()


@pytest.mark.parametrize("arch", ["gemma2", "cohere"])
def test_softcapped_and_scaled_heads_match_stock_trainer_in_float64(tokenizer, tmp_path, arch):
    """Gemma 2's final soft cap (student 2.0, teacher 3.0: each role its own) and Cohere's
    logit scale, applied by the kernel: one GKD training step in float64 against TRL's
    stock trainer in float64 (loss and every gradient within 1e-7 relative)."""
    student = _capped_or_scaled(tokenizer, arch, 0, cap=2.0)
    teacher = _capped_or_scaled(tokenizer, arch, 1, cap=3.0)
    stock = _trainer(
        "gkd", tokenizer, copy.deepcopy(student), copy.deepcopy(teacher), tmp_path, fused=False
    )
    ours = _trainer(
        "gkd",
        tokenizer,
        student,
        teacher,
        tmp_path,
        fused=True,
        fused_loss_kwargs=dict(impl="torch", chunk_size=5),
    )
    inputs = _batch(12, len(tokenizer))  # no padding: Gemma 2's eager attention gives
    # fully masked (left-padded) query rows NaN gradients, in TRL's trainer as in ours
    with torch.no_grad():  # the cap bends these logits
        logits = stock.model(input_ids=inputs["input_ids"]).logits
    if arch == "gemma2":
        assert logits.abs().max() > 1.5
    loss_ref, grads_ref = _step(stock, inputs, 17)
    loss, grads = _step(ours, inputs, 17)
    assert loss.dtype == torch.float64 and loss_ref > 1e-2
    assert grads.keys() == grads_ref.keys()
    assert all(torch.isfinite(g).all() for g in grads_ref.values())
    assert _max_rel_err(loss, grads, loss_ref, grads_ref) < 1e-7
