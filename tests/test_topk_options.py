"""Top-k teachers with this round's options: the student's logit transform (``logit_scale``,
``softcap``; issue 23.1) on both tails and ``clip_mode="token"``, against the float64
reference; the options top-k does not offer are refused clearly."""

from __future__ import annotations

import pytest
import torch

from opsd_kernels import FusedLinearTopkDivergence
from opsd_kernels.topk import fused_linear_topk_divergence, topk_divergence
from tests.helpers import TRITON_RUNS
from tests.test_topk import KINDS, TAILS, check_linear_case, check_logits_case


def _topk_impl(impl: str):
    """``impl`` as a parameter, skipped where its row function predates the options."""
    if impl == "torch":
        return impl
    marks = [pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1")]
    if TRITON_RUNS:
        import inspect

        from opsd_kernels.triton.topk_rows import topk_rows_triton

        if "softcap" not in inspect.signature(topk_rows_triton).parameters:
            marks.append(pytest.mark.skip(reason="the Triton top-k rows predate the options"))
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
        (dict(clip=0.1, clip_mode="entry_keep"), NotImplementedError, "entry_keep"),
        (dict(return_stats=True), NotImplementedError, "return_stats"),
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
