"""The OPSD step: position alignment, loss against the full-logit reference, gradients,
the sampled-token estimator, and teacher modes."""

from __future__ import annotations

import pytest
import torch

from opsd_kernels.reference import divergence_reference
from opsd_train.prompts import PromptBuilder
from opsd_train.step import (
    LossConfig,
    final_hidden_states,
    gather_completion_states,
    opsd_loss,
    pack_batch,
)
from opsd_train.teacher import Teacher


def _rows(tok, probs, n=4, seed=0):
    """Student/teacher prompts and completions of different lengths (random tokens plus
    EOS for some rows, so padding and the mask matter)."""
    pb = PromptBuilder(tok)
    g = torch.Generator().manual_seed(seed)
    sp, tp, comps = [], [], []
    for i, p in enumerate(probs[:n]):
        sp.append(pb.student_ids(p))
        tp.append(pb.teacher_ids(p))
        length = 3 + 2 * i
        c = torch.randint(10, len(tok) - 1, (length,), generator=g).tolist()
        if i % 2 == 0:
            c[-1] = tok.eos_token_id
        comps.append(c)
    return sp, tp, comps


def _direct_logits(model, prompt, comp):
    """Full logits for the completion positions of one unpadded sample (independent route:
    the whole CausalLM forward, nothing shared with the trainer's gathering)."""
    ids = torch.tensor([prompt + comp])
    logits = model(input_ids=ids).logits[0]
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(comp)]


def test_gathered_hidden_states_match_direct_computation(tiny, problems):
    model, tok = tiny
    train, _ = problems
    sp, tp, comps = _rows(tok, train)
    for prompts in (sp, tp):
        b = pack_batch(prompts, comps, tok.pad_token_id)
        with torch.no_grad():
            h = gather_completion_states(
                final_hidden_states(model, b.input_ids, b.attention_mask),
                b.starts,
                b.completion.shape[1],
            )
            for i, (p, c) in enumerate(zip(prompts, comps, strict=True)):
                ids = torch.tensor([p + c])
                direct = model.model(input_ids=ids).last_hidden_state[0]
                want = direct[len(p) - 1 : len(p) - 1 + len(c)]
                torch.testing.assert_close(h[i, : len(c)], want, atol=2e-5, rtol=1e-4)
                # applying the lm_head to the gathered states gives the model's own logits
                torch.testing.assert_close(
                    model.lm_head(h[i, : len(c)]), _direct_logits(model, p, c), atol=2e-5, rtol=1e-4
                )
        assert b.mask.sum().item() == sum(len(c) for c in comps)


@pytest.mark.parametrize(
    "cfg",
    [
        LossConfig(kind="forward_kl"),
        LossConfig(kind="reverse_kl", temperature=1.1),
        LossConfig(kind="jsd", beta=0.3, clip=0.05),
        LossConfig(kind="forward_kl", temperature=0.7, clip=0.02),
    ],
    ids=["fkl", "rkl-T1.1", "jsd-clip", "fkl-clip-T0.7"],
)
def test_loss_and_grad_equal_full_logit_reference(tiny, problems, cfg):
    model, tok = tiny
    train, _ = problems
    with torch.no_grad():  # make the student differ from the teacher so the loss is not 0
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    teacher = Teacher(model, "current")
    sp, tp, comps = _rows(tok, train)
    sb = pack_batch(sp, comps, tok.pad_token_id)
    tb = pack_batch(tp, comps, tok.pad_token_id)
    loss, stats = opsd_loss(model, sb, tb, cfg, teacher_ctx=teacher.weights)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    # Independent route: full logits of each context, per sample, then the reference.
    s_rows, t_rows = [], []
    for s, t, c in zip(sp, tp, comps, strict=True):
        s_rows.append(_direct_logits(model, s, c))
        with torch.no_grad():
            t_rows.append(_direct_logits(model, t, c))
    s_log = torch.cat(s_rows)
    t_log = torch.cat(t_rows)
    ref = divergence_reference(
        s_log,
        t_log,
        kind=cfg.kind,
        beta=cfg.beta,
        temperature=cfg.temperature,
        clip=cfg.clip,
        reduction="mean",
    )
    ref.backward()
    assert stats["tokens"] == s_log.shape[0]
    assert abs(ref.item()) > 1e-4
    torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-5, rtol=1e-4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=2e-3, msg=n)


def test_sampled_token_loss_matches_eq9(tiny, problems):
    model, tok = tiny
    train, _ = problems
    fixed = Teacher(model, "fixed")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    sp, tp, comps = _rows(tok, train, n=3)
    cfg = LossConfig(loss="sampled_token", temperature=1.3)
    loss, _ = opsd_loss(
        model,
        pack_batch(sp, comps, tok.pad_token_id),
        pack_batch(tp, comps, tok.pad_token_id),
        cfg,
        teacher_ctx=fixed.weights,
    )
    terms = []
    for s, t, c in zip(sp, tp, comps, strict=True):
        y = torch.tensor(c)
        ls = torch.log_softmax(_direct_logits(model, s, c).double() / 1.3, -1)[range(len(c)), y]
        with torch.no_grad(), fixed.weights(model):
            lt = torch.log_softmax(_direct_logits(model, t, c).double() / 1.3, -1)
            lt = lt[range(len(c)), y]
        terms.append(-(lt - ls).detach() * ls)
    want = torch.cat(terms).mean()
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-4)


def test_fixed_teacher_equals_initial_model_after_training(tiny, problems):
    model, tok = tiny
    train, _ = problems
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    teacher = Teacher(model, "fixed")
    sp, tp, comps = _rows(tok, train, n=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        sb = pack_batch(sp, comps, tok.pad_token_id)
        tb = pack_batch(tp, comps, tok.pad_token_id)
        loss, _ = opsd_loss(model, sb, tb, LossConfig(), teacher_ctx=teacher.weights)
        (loss + 0.1 * sum(p.square().sum() for p in model.parameters())).backward()
        opt.step()
        opt.zero_grad()
    ids = torch.tensor([tp[0] + comps[0]])
    with torch.no_grad():
        with teacher.weights(model) as (head_w, _):
            t_out = model(input_ids=ids).logits
        trained = model(input_ids=ids).logits
        model_init = type(model)(model.config)
        model_init.load_state_dict(initial)
        want = model_init(input_ids=ids).logits
    torch.testing.assert_close(t_out, want, atol=0, rtol=0)
    assert not torch.allclose(trained, want)  # the student did move
    # the tied lm_head is trainable, so the teacher's head is the initial one
    torch.testing.assert_close(head_w, initial["lm_head.weight"], atol=0, rtol=0)
    # and the student's weights are restored after the teacher context
    assert not torch.equal(model.lm_head.weight, initial["lm_head.weight"])


def test_ema_teacher_update_math(tiny):
    model, _ = tiny
    decay = 0.9
    teacher = Teacher(model, "ema", ema_decay=decay)
    e0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    p1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    teacher.update(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    p2 = {n: p.detach().clone() for n, p in model.named_parameters()}
    teacher.update(model)
    for n in e0:
        e1 = decay * e0[n] + (1 - decay) * p1[n]
        e2 = decay * e1 + (1 - decay) * p2[n]
        torch.testing.assert_close(teacher.shadow[n], e2, atol=1e-6, rtol=1e-6)
    # inside the context the model computes with the EMA weights, outside with its own
    with teacher.weights(model):
        for n, p in model.named_parameters():
            assert torch.equal(p, teacher_val := p.detach()) and teacher_val is not None
            torch.testing.assert_close(
                p.detach(), e0[n] * decay**2 + (1 - decay) * decay * p1[n] + (1 - decay) * p2[n]
            )
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), p2[n])


def test_current_teacher_is_the_student(tiny):
    model, _ = tiny
    t = Teacher(model, "current")
    with t.weights(model) as (w, b):
        assert w is None and b is None
    with pytest.raises(ValueError, match="teacher mode"):
        Teacher(model, "frozen")


def test_completions_must_match(tiny, problems):
    model, tok = tiny
    train, _ = problems
    sp, tp, comps = _rows(tok, train, n=2)
    other = [c[:-1] + [5] for c in comps]
    with pytest.raises(ValueError, match="same completions"):
        opsd_loss(
            model,
            pack_batch(sp, comps, tok.pad_token_id),
            pack_batch(tp, other, tok.pad_token_id),
            LossConfig(),
        )
