"""GRPO: advantages (against TRL's formula), log-probs from hidden states and the clipped
policy-gradient loss against a naive float64 version (full logits, log_softmax, gather)."""

from __future__ import annotations

import pytest
import torch

from opsd_train import grpo
from opsd_train.evaluate import answer_checker
from opsd_train.grpo import (
    binary_rewards,
    completion_logprobs,
    group_advantages,
    grpo_loss,
    policy_gradient_loss,
)

HAS_KERNEL = grpo._topk_kernel() is not None
IMPLS = [
    "chunked",
    pytest.param(
        "kernel", marks=pytest.mark.skipif(not HAS_KERNEL, reason="opsd_kernels.topk not available")
    ),
]


# ---------------------------------------------------------------------------------------
# rewards and advantages
# ---------------------------------------------------------------------------------------


def test_binary_rewards_use_the_answer_checker():
    comps = [r"so \boxed{\dfrac{1}{2}}", r"\boxed{0.25}", "12 without a box", r"\boxed{12}"]
    assert binary_rewards(comps, ["0.5", "0.5", "12", "12"]) == [1.0, 0.0, 0.0, 1.0]
    if answer_checker() == "math-verify":
        assert binary_rewards([r"\boxed{2\sqrt{3}}"], [r"\sqrt{12}"]) == [1.0]
    with pytest.raises(ValueError, match="differ in length"):
        binary_rewards(["a"], [])


def _advantages_float64(rewards: list[float], g: int) -> list[float]:
    out = []
    for s in range(0, len(rewards), g):
        grp = rewards[s : s + g]
        mean = sum(grp) / g
        std = (sum((r - mean) ** 2 for r in grp) / (g - 1)) ** 0.5
        out += [(r - mean) / (std + 1e-4) for r in grp]
    return out


@pytest.mark.parametrize("g", [2, 4, 8])
def test_group_advantages_match_float64_and_trl(g):
    gen = torch.Generator().manual_seed(g)
    r = (torch.rand(6 * g, generator=gen) < 0.4).to(torch.float64)
    r[:g] = 1.0  # one group all right: no signal
    got = group_advantages(r, g)
    want = torch.tensor(_advantages_float64(r.tolist(), g), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.all(got[:g] == 0)
    # each group is centred; groups with mixed rewards have unit sample std before the eps
    assert torch.allclose(got.view(-1, g).sum(1), torch.zeros(6, dtype=torch.float64), atol=1e-12)
    # TRL's own computation (GRPOTrainer, scale_rewards="group"), where it installs
    trl_utils = pytest.importorskip("trl.trainer.utils")
    mean = torch.nanmean(r.view(-1, g), dim=1).repeat_interleave(g)
    std = trl_utils.nanstd(r.view(-1, g), dim=1).repeat_interleave(g)
    # (TRL forms its Bessel factor count / (count - 1) in float32: agreement to ~1e-8)
    torch.testing.assert_close(got, (r - mean) / (std + 1e-4), rtol=1e-6, atol=1e-7)


def test_group_advantages_options_and_errors():
    r = torch.tensor([1, 0, 0, 0])  # integer rewards are fine
    assert group_advantages(r, 1).tolist() == [0.0] * 4  # a group of one carries no signal
    assert group_advantages(r, 2, scale="none").tolist() == [0.5, -0.5, 0.0, 0.0]
    batch = group_advantages(r.double(), 2, scale="batch")
    torch.testing.assert_close(batch, torch.tensor([0.5, -0.5, 0, 0]).double() / (0.5 + 1e-4))
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(r, 3)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(r, 0)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(r, 2, scale="std")
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(r.view(2, 2), 2)


# ---------------------------------------------------------------------------------------
# the naive float64 reference
# ---------------------------------------------------------------------------------------


def _naive_logprobs(h, w, b, y, temperature):
    logits = h.double() @ w.double().T
    if b is not None:
        logits = logits + b.double()
    return torch.log_softmax(logits / temperature, -1).gather(-1, y.unsqueeze(-1))[..., 0]


def _naive_loss(lp, adv, mask, old, eps_lo, eps_hi, loss_type, normalizer):
    old = lp.detach() if old is None else old.double()
    ratio = torch.exp(lp - old)
    a = adv.double()[:, None]
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1 - eps_lo, 1 + eps_hi) * a
    per_token = -torch.minimum(unclipped, clipped) * mask
    if loss_type == "grpo":
        per_seq = per_token.sum(1) / mask.sum(1).clamp(min=1)
        return per_seq.sum() / (lp.shape[0] if normalizer is None else normalizer)
    return per_token.sum() / (mask.sum() if normalizer is None else normalizer)


def _case(seed, dtype=torch.float64, B=5, T=7, H=12, V=37):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5).to(dtype)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([T, 3, 1, 0, T - 2])[:B]
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return h, w, b, y, mask, adv


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [1.0, 1.2])
def test_completion_logprobs_against_float64(impl, temperature):
    h, w, b, y, mask, _ = _case(1)
    h.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    got = completion_logprobs(h, w, y, mask=mask, bias=b, temperature=temperature, impl=impl)
    want = _naive_logprobs(h, w, b, y, temperature) * mask
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    up = torch.randn(got.shape, dtype=torch.float64)  # any per-token upstream gradient
    grads = torch.autograd.grad((got * up).sum(), (h, w, b))
    want_grads = torch.autograd.grad((want * up).sum(), (h, w, b))
    for gg, ww in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(gg, ww, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("impl", IMPLS)
def test_completion_logprobs_low_precision_and_masked_nan(impl):
    h, w, b, y, mask, _ = _case(2, dtype=torch.float32)
    wb = w.to(torch.bfloat16)
    got = completion_logprobs(h, wb, y, mask=mask, impl=impl)
    assert got.dtype == torch.float32
    # float32 logits from the same 16-bit weight values
    want = _naive_logprobs(h, wb.double(), None, y, 1.0) * mask
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # padding rows may hold anything: no NaN reaches the values or the gradients
    hn = h.clone()
    hn[~mask] = float("nan")
    hn.requires_grad_(True)
    wn = w.clone().requires_grad_(True)
    lp = completion_logprobs(hn, wn, y, mask=mask, impl=impl)
    lp.sum().backward()
    assert torch.isfinite(lp).all() and torch.isfinite(hn.grad).all()
    assert torch.isfinite(wn.grad).all() and torch.all(hn.grad[~mask] == 0)


def test_kernel_and_chunked_agree_when_both_exist():
    if not HAS_KERNEL:
        pytest.skip("opsd_kernels.topk not available")
    h, w, b, y, mask, _ = _case(3, dtype=torch.float32)
    a = completion_logprobs(h, w, y, mask=mask, bias=b, temperature=1.1, impl="kernel")
    c = completion_logprobs(h, w, y, mask=mask, bias=b, temperature=1.1, impl="chunked")
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", ["grpo", "token"])
@pytest.mark.parametrize("off_policy", [False, True])
def test_grpo_loss_against_float64(impl, loss_type, off_policy):
    h, w, b, y, mask, adv = _case(4)
    h.requires_grad_(True)
    w.requires_grad_(True)
    temperature, eps_lo, eps_hi = 1.2, 0.2, 0.28
    old = None
    if off_policy:
        with torch.no_grad():
            lp0 = _naive_logprobs(h, w, b, y, temperature)
        g = torch.Generator().manual_seed(9)
        old = lp0 + 0.6 * torch.randn(lp0.shape, generator=g, dtype=torch.float64)
        ratio = torch.exp(lp0 - old)[mask]
        # the clip must be active on both sides for this case to test it
        assert (ratio < 1 - eps_lo).any() and (ratio > 1 + eps_hi).any()
        old = torch.where(mask, old, torch.full_like(old, float("nan")))  # padding: anything
    got = grpo_loss(
        h,
        w,
        y,
        adv,
        mask,
        bias=b,
        temperature=temperature,
        old_logprobs=old,
        clip_eps=eps_lo,
        clip_eps_high=eps_hi,
        loss_type=loss_type,
        impl=impl,
    )
    old_ref = None if old is None else torch.nan_to_num(old)
    want = _naive_loss(
        _naive_logprobs(h, w, b, y, temperature),
        adv,
        mask,
        old_ref,
        eps_lo,
        eps_hi,
        loss_type,
        None,
    )
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    g_got = torch.autograd.grad(got, (h, w))
    g_want = torch.autograd.grad(want, (h, w))
    for a, c in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-12)


def test_on_policy_gradient_is_the_advantage_weighted_score():
    # ratio = 1: grad L = -1/N sum_i A_i/|y_i| sum_t grad log p(y_it)
    h, w, b, y, mask, adv = _case(5)
    h.requires_grad_(True)
    loss = grpo_loss(h, w, y, adv, mask, impl="chunked")
    (g_loss,) = torch.autograd.grad(loss, h)
    lp = _naive_logprobs(h, w, None, y, 1.0)
    lengths = mask.sum(1).clamp(min=1)
    surrogate = -((adv / lengths)[:, None] * lp * mask).sum() / h.shape[0]
    (g_want,) = torch.autograd.grad(surrogate, h)
    torch.testing.assert_close(g_loss, g_want, rtol=1e-10, atol=1e-12)
    # the loss value itself is -1/N sum_i A_i * mean_t(ratio = 1) = -mean(A) over rollouts
    # with tokens; the empty rollout adds nothing
    has = mask.any(1)
    torch.testing.assert_close(loss.detach(), -(adv * has).sum() / h.shape[0])


def test_normalizer_makes_micro_batches_add_up():
    h, w, b, y, mask, adv = _case(6)
    lp = _naive_logprobs(h, w, None, y, 1.0)
    old = lp + 0.1
    for loss_type, norm in (("grpo", h.shape[0]), ("token", mask.sum())):
        whole = policy_gradient_loss(lp, adv, mask, old_logprobs=old, loss_type=loss_type)
        parts = sum(
            policy_gradient_loss(
                lp[s], adv[s], mask[s], old_logprobs=old[s], loss_type=loss_type, normalizer=norm
            )
            for s in (slice(0, 2), slice(2, 5))
        )
        torch.testing.assert_close(parts, whole)


def test_bad_arguments():
    h, w, b, y, mask, adv = _case(7)
    lp = _naive_logprobs(h, w, None, y, 1.0)
    with pytest.raises(ValueError, match="advantages"):
        policy_gradient_loss(lp, adv[:2], mask)
    with pytest.raises(ValueError, match="mask"):
        policy_gradient_loss(lp, adv, mask[:, :3])
    with pytest.raises(ValueError, match="old_logprobs"):
        policy_gradient_loss(lp, adv, mask, old_logprobs=lp[:2])
    with pytest.raises(ValueError, match="loss_type"):
        policy_gradient_loss(lp, adv, mask, loss_type="dapo")
    with pytest.raises(ValueError, match="clip_eps"):
        policy_gradient_loss(lp, adv, mask, clip_eps=1.5)
    with pytest.raises(ValueError, match="tokens must have shape"):
        completion_logprobs(h, w, y[:, :3])
    with pytest.raises(ValueError, match="do not fit"):
        completion_logprobs(h, w[:, :3], y)
    with pytest.raises(ValueError, match="temperature"):
        completion_logprobs(h, w, y, temperature=0.0)
    with pytest.raises(ValueError, match="impl"):
        completion_logprobs(h, w, y, impl="naive")
    with pytest.raises(ValueError, match=r"\(B, T, H\)"):
        grpo_loss(h[0], w, y[0], adv, mask[0])
