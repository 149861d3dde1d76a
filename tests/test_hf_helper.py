"""opsd_kernels.hf: hidden states and lm_head of HF causal LMs, on tiny config-built models.

Each architecture is checked against its own ``model(...).logits`` (values) and against
autograd through those logits (gradients of every parameter).
"""

import pytest
import torch

from opsd_kernels import divergence, fused_linear_divergence
from opsd_kernels.hf import (
    causal_lm_backbone,
    causal_lm_head,
    causal_lm_hidden_states,
    check_causal_lm_hidden_states,
)

transformers = pytest.importorskip("transformers")

V, HID = 64, 16
SMALL = dict(
    vocab_size=V,
    hidden_size=HID,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
)


def _build(arch, **overrides):
    torch.manual_seed(0)
    kw = dict(SMALL, **overrides)
    if arch == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=8, **kw))
    elif arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    elif arch == "llama_tied":
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(tie_word_embeddings=True, **kw)
        )
    elif arch == "gemma":  # tied embeddings, embedding scaled by sqrt(H) inside the body
        model = transformers.GemmaForCausalLM(transformers.GemmaConfig(head_dim=8, **kw))
    elif arch == "gemma2":  # final_logit_softcapping (default 30; small here): tanh after lm_head
        cfg = transformers.Gemma2Config(head_dim=8, final_logit_softcapping=0.5, **kw)
        model = transformers.Gemma2ForCausalLM(cfg)
    elif arch == "gemma2_no_softcap":
        cfg = transformers.Gemma2Config(head_dim=8, final_logit_softcapping=None, **kw)
        model = transformers.Gemma2ForCausalLM(cfg)
    elif arch == "cohere":  # logit_scale multiplies the logits
        model = transformers.CohereForCausalLM(transformers.CohereConfig(logit_scale=0.37, **kw))
    elif arch == "granite":  # logits divided by logits_scaling
        model = transformers.GraniteForCausalLM(
            transformers.GraniteConfig(logits_scaling=3.0, **kw)
        )
    elif arch == "phi":  # lm_head with a bias
        kw.pop("num_key_value_heads")
        model = transformers.PhiForCausalLM(transformers.PhiConfig(**kw))
    else:
        raise AssertionError(arch)
    model.eval()
    for p in model.parameters():  # no zero-initialised parameter hides a bug
        with torch.no_grad():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    return ids, mask


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


ARCHS = [
    "qwen3",
    "llama",
    "llama_tied",
    "gemma",
    "gemma2",
    "gemma2_no_softcap",
    "cohere",
    "granite",
    "phi",
]


@pytest.mark.parametrize("arch", ARCHS)
def test_hidden_states_reproduce_logits_and_gradients(arch):
    model = _build(arch)
    ids, mask = _batch()
    check_causal_lm_hidden_states(model, ids, mask, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(2, 7, V, generator=torch.Generator().manual_seed(2))

    model.zero_grad()
    (model(input_ids=ids, attention_mask=mask).logits * upstream).sum().backward()
    expected = _grads(model)
    model.zero_grad()
    inputs = causal_lm_hidden_states(model, ids, mask, with_softcap=True)
    h, w, b = inputs
    logits = torch.nn.functional.linear(h, w, b)
    if arch == "gemma2":  # a cap small enough to bend these logits
        assert inputs.softcap == 0.5 and logits.abs().max() > 0.5
        logits = 0.5 * torch.tanh(logits / 0.5)
    else:
        assert inputs.softcap is None
    (logits * upstream).sum().backward()
    got = _grads(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(
            got[name],
            expected[name],
            rtol=1e-4,
            atol=1e-6,
            msg=lambda m, name=name: f"{arch} {name}: {m}",
        )


def test_scale_and_bias_are_folded():
    cohere = causal_lm_head(_build("cohere"))
    assert cohere.logit_scale == pytest.approx(0.37)
    assert causal_lm_head(_build("granite")).logit_scale == pytest.approx(1 / 3)
    phi = _build("phi")
    head = causal_lm_head(phi)
    assert head.bias is phi.lm_head.bias and head.logit_scale == 1.0


@pytest.mark.parametrize("arch", ["llama_tied", "gemma"])
def test_tied_weight_is_the_embedding(arch):
    model = _build(arch)
    assert causal_lm_head(model).weight is model.get_input_embeddings().weight


def test_untied_weight_is_the_lm_head():
    model = _build("llama")
    assert causal_lm_head(model).weight is model.lm_head.weight
    assert causal_lm_head(model).weight is not model.get_input_embeddings().weight


def test_gemma2_softcapping_is_returned_only_to_callers_that_apply_it():
    """A caller that unpacks ``(weight, bias, logit_scale)`` and ignores ``.softcap`` would
    compute uncapped logits: without ``with_softcap=True`` the model is refused."""
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(head_dim=8, **SMALL))
    assert model.config.final_logit_softcapping == 30.0  # Gemma-2's default
    ids, mask = _batch()
    for fn in (causal_lm_head, lambda m: causal_lm_hidden_states(m, ids, mask)):
        with pytest.raises(ValueError, match="final_logit_softcapping=30.0.*with_softcap=True"):
            fn(model)
    head = causal_lm_head(model, with_softcap=True)
    weight, bias, scale = head  # unpacks as before
    assert (weight is model.lm_head.weight, bias, scale, head.softcap) == (True, None, 1.0, 30.0)
    assert causal_lm_hidden_states(model, ids, mask, with_softcap=True).softcap == 30.0
    assert causal_lm_head(_build("llama"), with_softcap=True).softcap is None
    model.config.final_logit_softcapping = -1.0
    with pytest.raises(ValueError, match="final_logit_softcapping must be a finite number > 0"):
        causal_lm_head(model, with_softcap=True)


@pytest.mark.parametrize("tied", [False, True])
def test_peft_lora_model(tied):
    peft = pytest.importorskip("peft")
    model = _build("llama_tied" if tied else "llama")
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )  # non-zero B: the adapter changes the output
    wrapped = peft.get_peft_model(model, cfg)
    ids, mask = _batch()
    check_causal_lm_hidden_states(wrapped, ids, mask, rtol=1e-5, atol=1e-5)
    with wrapped.disable_adapter():
        off = causal_lm_hidden_states(wrapped, ids, mask).hidden_states
    assert not torch.allclose(off, causal_lm_hidden_states(wrapped, ids, mask).hidden_states)
    head = causal_lm_head(wrapped)
    assert not head.weight.requires_grad  # peft freezes the base model, lm_head included
    assert causal_lm_backbone(wrapped) is model.model

    # the fused loss from the helper equals the logits loss, gradients to the LoRA weights
    teacher_ids = ids.roll(1, dims=1)
    upstream_params = [p for p in wrapped.parameters() if p.requires_grad]
    assert upstream_params
    wrapped.zero_grad()
    s_logits = wrapped(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        t_logits = wrapped(input_ids=teacher_ids, attention_mask=mask).logits
    ref = divergence(
        s_logits, t_logits, kind="jsd", beta=0.3, temperature=1.2, mask=mask.bool(), impl="torch"
    )
    ref.backward()
    expected = [p.grad.clone() for p in upstream_params]
    wrapped.zero_grad()
    h_s, w, b = causal_lm_hidden_states(wrapped, ids, mask)
    with torch.no_grad():
        h_t = causal_lm_hidden_states(wrapped, teacher_ids, mask).hidden_states
    loss = fused_linear_divergence(
        h_s,
        h_t,
        w,
        bias=b,
        kind="jsd",
        beta=0.3,
        temperature=1.2,
        mask=mask.bool(),
        impl="torch",
        chunk_size=3,
    )
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    for p, e in zip(upstream_params, expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-7)


def test_models_without_a_head_or_body_are_refused():
    body = transformers.LlamaModel(transformers.LlamaConfig(**SMALL))
    with pytest.raises(ValueError, match="no linear lm_head"):
        causal_lm_head(body)
    with pytest.raises(ValueError, match="no separate body"):
        causal_lm_backbone(body)
    with pytest.raises(ValueError, match="no linear lm_head"):
        causal_lm_head(torch.nn.Linear(3, 4))
