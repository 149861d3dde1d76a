"""``clip_mode`` ("entry", "token", "entry_keep") against the float64 reference, and the
properties each mode promises (see ``DivergenceOptions``)."""

from __future__ import annotations

import math

import pytest
import torch

from opsd_kernels import divergence, fused_linear_divergence
from opsd_kernels.divergences import KINDS
from opsd_kernels.reference import divergence_reference
from tests.helpers import make_logits
from tests.option_helpers import check_divergence, check_fused_linear, options_impl

MODES = ["entry", "token", "entry_keep"]
# per-entry clips touch a share of the entries; the token clip a share of the tokens
CLIPS = {"entry": 0.02, "entry_keep": 0.02, "token": 0.8}
TOKEN_CLIP_JSD = 0.15  # jsd's token losses are smaller


def clip_for(kind: str, clip_mode: str) -> float:
    return TOKEN_CLIP_JSD if (kind, clip_mode) == ("jsd", "token") else CLIPS[clip_mode]


@pytest.mark.parametrize("impl", [options_impl("torch"), options_impl("triton")])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("clip_mode", MODES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_divergence_grid(impl, kind, clip_mode, reduction, masked, temperature):
    _, stats = check_divergence(
        impl,
        kind=kind,
        clip=clip_for(kind, clip_mode),
        clip_mode=clip_mode,
        reduction=reduction,
        masked=masked,
        temperature=temperature,
    )
    assert (stats.clipped_entries > 0).any(), "the case must clip something"
    assert not (stats.clipped_entries == 61).all(), "... and not everything"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("clip_mode", MODES)
@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_divergence_dtypes_torch(dtype, clip_mode, kind):
    check_divergence(
        "torch",
        dtype=dtype,
        kind=kind,
        clip=clip_for(kind, clip_mode),
        clip_mode=clip_mode,
        masked=True,
    )


@pytest.mark.parametrize(
    "impl", [options_impl("torch"), options_impl("triton"), options_impl("fused")]
)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("clip_mode", MODES)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_fused_linear_clip_modes(impl, kind, clip_mode, reduction):
    check_fused_linear(
        impl,
        kind=kind,
        clip=clip_for(kind, clip_mode),
        clip_mode=clip_mode,
        reduction=reduction,
        masked=True,
        std=2.0,
    )


@pytest.mark.parametrize("clip_mode", MODES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_clip_mode_without_clip_is_no_clip(clip_mode, kind):
    s, t = make_logits((4, 33))
    base = divergence(s, t, kind=kind, reduction="none")
    assert torch.equal(divergence(s, t, kind=kind, clip_mode=clip_mode, reduction="none"), base)


def _unit_grads(s, t, **kw):
    """Per-row losses and the unit-upstream gradients (float64, torch impl)."""
    s, t = s.clone().requires_grad_(), t.clone().requires_grad_()
    loss = divergence(s, t, reduction="none", impl="torch", **kw)
    loss.sum().backward()
    return loss.detach(), s.grad, t.grad


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_entry_keep_leaves_clipped_probabilities_unchanged(kind, temperature):
    """For every clipped j: sum_v pS_v grad_v == grad_j, so a descent step changes
    log pS_j by -eta (grad_j - sum_v pS_v grad_v) = 0 to first order; the loss, the
    teacher gradient and the unclipped entries' student gradient are "entry"'s."""
    s, t = make_logits((6, 47), torch.float64, seed=3)
    opts = dict(kind=kind, clip=0.02, temperature=temperature, beta=0.4)
    loss_e, gs_e, gt_e = _unit_grads(s, t, clip_mode="entry", **opts)
    loss_k, gs_k, gt_k = _unit_grads(s, t, clip_mode="entry_keep", **opts)
    _, stats = divergence(s, t, clip_mode="entry_keep", return_stats=True, **opts)
    assert (stats.clipped_entries > 0).sum() >= 3 and (stats.clipped_entries < 47).all()
    torch.testing.assert_close(loss_k, loss_e, rtol=0, atol=0)
    torch.testing.assert_close(gt_k, gt_e, rtol=0, atol=0)
    pS = torch.softmax(s / temperature, -1)
    lS, lT = torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1)
    phi = KINDS[kind].terms(lT, lS, lT.exp(), lS.exp(), 0.4)[0]
    clipped = ~(phi < 0.02)
    assert torch.equal(gs_k[~clipped], gs_e[~clipped])
    mean = (pS * gs_k).sum(-1, keepdim=True).expand_as(gs_k)
    torch.testing.assert_close(gs_k[clipped], mean[clipped], rtol=1e-12, atol=1e-15)
    # first order, measured: a small descent step moves clipped log-probabilities O(eta^2)
    eta = 1e-4
    step = torch.log_softmax((s - eta * gs_k) / temperature, -1) - lS
    moved_unclipped = step[~clipped].abs().max()
    assert step[clipped].abs().max() < 1e-3 * moved_unclipped
    if kind == "forward_kl":
        # the reason for the mode: "entry" raises the loss-gradient of clipped entries
        # (pushes their student logit down); the teacher-favoured entries are clipped
        assert (gs_e[clipped] > 0).all()


def test_entry_keep_with_softcap_applies_the_chain_rule_last():
    """With a transform, the replacement is on the gradient w.r.t. the transformed
    logits z; the raw-logit gradient is that times dz/dx."""
    s, t = make_logits((5, 41), torch.float64, seed=4, scale=6.0)
    opts = dict(clip=0.02, clip_mode="entry_keep", softcap=4.0, logit_scale=1.3)
    _, gs, _ = _unit_grads(s, t, **opts)
    z = 4.0 * torch.tanh(1.3 * s / 4.0)
    gz = gs / (1.3 * (1 - (z / 4.0) ** 2))
    _, stats = divergence(s, t, return_stats=True, **opts)
    lS = torch.log_softmax(z, -1)
    zt = 4.0 * torch.tanh(1.3 * t / 4.0)
    lT = torch.log_softmax(zt, -1)
    clipped = ~(lT.exp() * (lT - lS) < 0.02)
    assert clipped.sum(-1).tolist() == stats.clipped_entries.tolist()
    mean = (lS.exp() * gz).sum(-1, keepdim=True).expand_as(gz)
    torch.testing.assert_close(gz[clipped], mean[clipped], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", list(KINDS))
def test_token_mode_caps_each_token(kind):
    """min(L, clip) per token: clipped tokens hold exactly clip and pass no gradient;
    the others are the unclipped loss and gradient, bit for bit."""
    s, t = make_logits((8, 53), torch.float64, seed=5)
    loss_n, gs_n, gt_n = _unit_grads(s, t, kind=kind)
    clip = loss_n.median().item()
    loss_c, gs_c, gt_c = _unit_grads(s, t, kind=kind, clip=clip, clip_mode="token")
    over = ~(loss_n < clip)
    assert over.any() and (~over).any()
    assert (loss_c <= clip).all()
    assert torch.equal(loss_c[over], torch.full_like(loss_c[over], clip))
    assert torch.equal(loss_c[~over], loss_n[~over])
    for g_c, g_n in ((gs_c, gs_n), (gt_c, gt_n)):
        assert torch.equal(g_c[over], torch.zeros_like(g_c[over]))
        assert torch.equal(g_c[~over], g_n[~over])


def test_token_mode_infinite_kl_is_clipped_to_a_finite_loss():
    s, t = make_logits((3, 20), torch.float64, seed=6)
    s[0, 4] = -math.inf  # the teacher puts mass where the student bans: KL = +inf
    loss, gs, gt = _unit_grads(s, t, clip=0.5, clip_mode="token")
    assert loss[0].item() == 0.5
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert divergence(s, t, reduction="none")[0].item() == math.inf


@pytest.mark.parametrize("clip_mode", MODES)
def test_nan_propagates_to_the_loss(clip_mode):
    s, t = make_logits((4, 30), torch.float32, seed=7)
    s[1, 3] = math.nan
    loss = divergence(s, t, clip=CLIPS[clip_mode], clip_mode=clip_mode, reduction="none")
    ref = divergence_reference(s, t, clip=CLIPS[clip_mode], clip_mode=clip_mode, reduction="none")
    assert math.isnan(loss[1].item()) and math.isnan(ref[1].item())
    keep = torch.tensor([True, False, True, True])
    torch.testing.assert_close(loss[keep].double(), ref[keep], rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(clip_mode="tokens"), "clip_mode must be one of"),
        (dict(softcap=0.0), "softcap must be None or a finite number > 0"),
        (dict(logit_scale=-1.0), "logit_scale must be a finite number > 0"),
        (dict(teacher_softcap="none"), "teacher_softcap must be"),
        (dict(return_stats=1), "return_stats must be a bool"),
    ],
)
def test_bad_options_are_named(kw, match):
    s, t = make_logits((2, 9))
    with pytest.raises((ValueError, TypeError), match=match):
        divergence(s, t, **kw)
    with pytest.raises((ValueError, TypeError), match=match):
        fused_linear_divergence(s, t, torch.randn(5, 9), **kw)
