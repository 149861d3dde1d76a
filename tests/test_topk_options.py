"""Top-k teachers with this round's options: the student's logit transform (``logit_scale``,
``softcap``; issue 23.1) on both tails, ``clip_mode="token"`` and the per-token statistics,
against the float64 reference; the options top-k does not offer are refused clearly."""

from __future__ import annotations

import pytest
import torch

from opsd_kernels import FusedLinearTopkDivergence
from opsd_kernels.reference import (
    fused_linear_topk_divergence_reference,
    topk_divergence_reference,
)
from opsd_kernels.topk import fused_linear_topk_divergence, topk_divergence
from tests.helpers import TRITON_RUNS, make_mask
from tests.option_helpers import assert_stats_close
from tests.test_topk import (
    DEVICE,
    KINDS,
    TAILS,
    check_linear_case,
    check_logits_case,
    linear_inputs,
    make_student,
    make_teacher,
)


def _topk_impl(impl: str):
    """``impl`` as a parameter, skipped only where Triton cannot run."""
    if impl == "torch":
        return impl
    marks = [pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1")]
    return pytest.param(impl, marks=marks)


IMPLS = [_topk_impl("torch"), _topk_impl("triton")]
TRANSFORMS = [dict(softcap=4.0), dict(logit_scale=0.6), dict(softcap=5.0, logit_scale=1.4)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("transform", range(len(TRANSFORMS)))
@pytest.mark.parametrize("clip", [None, 0.02])
def test_logits_transform(impl, tail, kind, transform, clip):
    check_logits_case(
        impl,
        tail=tail,
        kind=kind,
        clip=clip,
        masked=True,
        reduction="none",
        scale=6.0,
        **TRANSFORMS[transform],
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_transform(impl, tail, kind, reduction):
    check_linear_case(
        impl,
        tail=tail,
        kind=kind,
        reduction=reduction,
        masked=True,
        bias=True,
        peaked=True,
        clip=0.03,
        softcap=3.0,
        logit_scale=1.3,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("tail", TAILS)
def test_linear_transform_dtypes_torch(dtype, tail):
    check_linear_case("torch", dtype=dtype, tail=tail, bias=True, peaked=True, softcap=3.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("kind", KINDS)
def test_token_clip(impl, tail, kind):
    # the median token loss of these inputs: about half the tokens are capped
    clip = {"forward_kl": 0.3, "reverse_kl": 0.3, "jsd": 0.05}[kind]
    check_logits_case(
        impl, tail=tail, kind=kind, clip=clip, clip_mode="token", masked=True, reduction="none"
    )
    check_linear_case(
        impl, tail=tail, kind=kind, clip=clip, clip_mode="token", masked=True, reduction="none"
    )


def test_token_clip_caps_and_drops_gradients():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(8, 30, generator=g, dtype=torch.float64) * 3
    lp, ids = torch.log_softmax(torch.randn(8, 30, generator=g, dtype=torch.float64) * 3, -1).topk(
        4, dim=-1
    )
    x = s.clone().requires_grad_()
    plain = topk_divergence(x, ids, lp, reduction="none")
    (g_plain,) = torch.autograd.grad(plain.sum(), x)
    clip = plain.median().item()
    capped = topk_divergence(x, ids, lp, clip=clip, clip_mode="token", reduction="none")
    (g_capped,) = torch.autograd.grad(capped.sum(), x)
    over = ~(plain < clip)
    assert over.any() and (~over).any()
    assert torch.equal(capped.detach(), torch.clamp(plain.detach(), max=clip))
    assert (g_capped[over] == 0).all()
    assert torch.equal(g_capped[~over], g_plain[~over])


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(softcap=-1.0), ValueError, "softcap"),
        (dict(clip_mode="bogus"), ValueError, "clip_mode"),
    ],
)
def test_refused_options_are_named(kw, error, match):
    s = torch.randn(3, 20)
    lp, ids = torch.log_softmax(torch.randn(3, 20), -1).topk(4, dim=-1)
    with pytest.raises(error, match=match):
        topk_divergence(s, ids, lp, **kw)
    with pytest.raises(error, match=match):
        fused_linear_topk_divergence(torch.randn(3, 8), torch.randn(20, 8), ids, lp, **kw)


def test_module_takes_the_transform():
    h, w = torch.randn(5, 8, dtype=torch.float64), torch.randn(30, 8, dtype=torch.float64)
    lp, ids = torch.log_softmax(torch.randn(5, 30, dtype=torch.float64), -1).topk(4, dim=-1)
    got = FusedLinearTopkDivergence(softcap=2.0)(h, w, ids, lp)
    want = topk_divergence(2.0 * torch.tanh(h @ w.T / 2.0), ids, lp)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


STATS_CLIPS = [(None, "entry"), (0.02, "entry"), (0.3, "token")]


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("clip_case", range(len(STATS_CLIPS)))
def test_logits_stats(tail, kind, clip_case):
    clip, clip_mode = STATS_CLIPS[clip_case]
    if clip is not None and kind == "jsd":
        clip *= 0.2  # jsd's terms are smaller
    lead, V, K = (3, 5), 37, 5
    s = make_student(lead, V, seed=1, scale=4.0)
    ids, lp = make_teacher(lead, V, K, seed=1, scale=4.0, student=s)
    mask = make_mask(lead, 1, DEVICE)
    s[~mask] = float("nan")
    opts = dict(kind=kind, tail=tail, clip=clip, clip_mode=clip_mode, mask=mask, temperature=1.2)
    opts |= dict(softcap=5.0, beta=0.3)
    loss, stats = topk_divergence(s, ids, lp, return_stats=True, reduction="none", **opts)
    ref, ref_stats = topk_divergence_reference(
        s.double().cpu(), ids.cpu(), lp.cpu(), return_stats=True, reduction="none", **opts
    )
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=2e-5, atol=1e-6)
    assert_stats_close(stats, ref_stats, torch.float32, f"{tail} {kind} {clip_mode}")
    if clip is not None:
        assert (ref_stats.clipped_entries > 0).any()
    # the statistics do not depend on the gradient mode
    x = s.clone().requires_grad_()
    _, again = topk_divergence(x, ids, lp, return_stats=True, **opts)
    for a, b in zip(stats, again, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("clip_case", range(len(STATS_CLIPS)))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_stats(tail, clip_case, reduction):
    clip, clip_mode = STATS_CLIPS[clip_case]
    lead, H, V, K = (2, 5), 16, 41, 4
    x, ids, lp = linear_inputs(lead, H, V, K, torch.float32, seed=2, bias=True, peaked=True)
    mask = make_mask(lead, 2, DEVICE)
    x["student_hidden"][~mask] = float("nan")
    x["student_hidden"].requires_grad_()
    x["weight"].requires_grad_()
    opts = dict(tail=tail, clip=clip, clip_mode=clip_mode, reduction=reduction, softcap=4.0)
    loss, stats = fused_linear_topk_divergence(
        **x,
        teacher_ids=ids,
        teacher_logprobs=lp,
        mask=mask,
        chunk_size=3,
        return_stats=True,
        **opts,
    )
    loss.sum().backward()  # "none" with a trainable weight: the backward recomputes
    ref_in = {k: v.detach().double().cpu() for k, v in x.items()}
    ref_in["student_hidden"] = torch.where(mask.cpu()[..., None], ref_in["student_hidden"], 0.0)
    _, ref_stats = fused_linear_topk_divergence_reference(
        **ref_in,
        teacher_ids=ids.cpu(),
        teacher_logprobs=lp.cpu(),
        mask=mask.cpu(),
        return_stats=True,
        **opts,
    )
    assert_stats_close(stats, ref_stats, torch.float32, f"{tail} {clip_mode}")


def test_bucket_entropy_is_the_full_students():
    """With the bucket tail the entropy is of the student's whole distribution (what
    divergence reports for the same logits)."""
    from opsd_kernels import divergence

    s = make_student((4,), 30, seed=3)
    ids, lp = make_teacher((4,), 30, 3, seed=3, student=s, pad=False)
    _, stats = topk_divergence(s, ids, lp, return_stats=True, softcap=2.0)
    _, full = divergence(s, s, return_stats=True, softcap=2.0)
    torch.testing.assert_close(stats.student_entropy, full.student_entropy)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("kind", KINDS)
def test_entry_keep(impl, tail, kind):
    clip = 0.02 if kind != "jsd" else 0.005
    check_logits_case(
        impl,
        tail=tail,
        kind=kind,
        clip=clip,
        clip_mode="entry_keep",
        masked=True,
        reduction="none",
        softcap=6.0,
    )
    check_linear_case(
        impl, tail=tail, kind=kind, clip=clip, clip_mode="entry_keep", masked=True, bias=True
    )


@pytest.mark.parametrize("tail", TAILS)
def test_entry_keep_leaves_clipped_entries_unchanged(tail):
    """Bucket: over the whole vocabulary, each entry clipped with its outcome (an id, or
    the complement for a clipped rest) has gradient sum_v pS_v grad_v; renormalize: over
    the ids, with the renormalised u. The loss is "entry"'s."""
    g = torch.Generator().manual_seed(4)
    s = torch.randn(6, 30, generator=g, dtype=torch.float64) * 3
    t = 0.5 * s + torch.randn(6, 30, generator=g, dtype=torch.float64) * 3
    lp, ids = torch.log_softmax(t, -1).topk(5, dim=-1)
    x = s.clone().requires_grad_()
    opts = dict(tail=tail, clip=0.02, reduction="none")
    keep = topk_divergence(x, ids, lp, clip_mode="entry_keep", **opts)
    (grad,) = torch.autograd.grad(keep.sum(), x)
    entry = topk_divergence(s, ids, lp, **opts)
    _, stats = topk_divergence(s, ids, lp, return_stats=True, **opts)
    assert torch.equal(keep.detach(), entry)
    assert (stats.clipped_entries > 0).sum() >= 2
    pS = torch.softmax(s, -1)
    in_ids = torch.zeros_like(s, dtype=torch.bool).scatter_(1, ids, True)
    if tail == "renormalize":
        pS = torch.where(in_ids, pS, 0.0)
    # which entries are clipped: the reference's outcome terms
    from opsd_kernels.reference import topk_divergence_reference

    _, ref_stats = topk_divergence_reference(s, ids, lp, return_stats=True, **opts)
    assert torch.equal(stats.clipped_entries, ref_stats.clipped_entries)
    lS = torch.log_softmax(s, -1).gather(1, ids)
    if tail == "renormalize":
        lS = lS - lS.logsumexp(1, keepdim=True)
        lT = lp - lp.logsumexp(1, keepdim=True)
    else:
        lT = lp
    clipped_ids = ~(lT.exp() * (lT - lS) < 0.02)
    mean = (pS * grad).sum(1, keepdim=True) / pS.sum(1, keepdim=True)
    got = grad.gather(1, ids)[clipped_ids]
    want = mean.expand_as(ids)[clipped_ids]
    assert clipped_ids.any()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-15)


def test_entry_keep_clipped_rest_moves_the_whole_complement_together():
    """A flat teacher leaves much mass to the rest outcome; where that outcome is clipped,
    every complement entry gets the same gradient, the pS-weighted mean."""
    g = torch.Generator().manual_seed(4)
    s = torch.randn(6, 30, generator=g, dtype=torch.float64) * 3
    t = torch.randn(6, 30, generator=g, dtype=torch.float64) * 0.5
    lp, ids = torch.log_softmax(t, -1).topk(3, dim=-1)
    x = s.clone().requires_grad_()
    loss = topk_divergence(x, ids, lp, clip=0.02, clip_mode="entry_keep", reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    in_ids = torch.zeros_like(s, dtype=torch.bool).scatter_(1, ids, True)
    lS = torch.log_softmax(s, -1)
    r_s = torch.where(in_ids, -torch.inf, lS).logsumexp(1)
    r_t = 1 - lp.exp().sum(1)
    rest_clipped = ~(r_t * (r_t.log() - r_s) < 0.02)
    assert rest_clipped.any() and (~rest_clipped).any()
    mean = (lS.exp() * grad).sum(1)
    for row in rest_clipped.nonzero()[:, 0]:
        complement = grad[row][~in_ids[row]]
        torch.testing.assert_close(
            complement, mean[row].expand_as(complement), rtol=1e-10, atol=1e-15
        )
