"""Per-token statistics (``return_stats=True``): against float64, their definitions, and
their independence from the reduction, the gradient mode and the impl's path."""

from __future__ import annotations

import math

import pytest
import torch

from opsd_kernels import Divergence, DivergenceStats, divergence, fused_linear_divergence
from opsd_kernels.reference import divergence_reference
from tests.helpers import make_logits, make_mask
from tests.option_helpers import (
    assert_stats_close,
    check_divergence,
    check_fused_linear,
    options_impl,
)


@pytest.mark.parametrize("impl", [options_impl("torch"), options_impl("triton")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_divergence_stats_every_reduction_and_dtype(impl, dtype, reduction):
    # float16 forms its gradients in the backward: the forward's statistics still come out
    check_divergence(impl, dtype=dtype, reduction=reduction, clip=0.02, masked=True)


@pytest.mark.parametrize(
    "impl", [options_impl("torch"), options_impl("triton"), options_impl("fused")]
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("frozen", [False, True])
def test_fused_linear_stats_every_reduction(impl, reduction, frozen):
    """Including "none" with a trainable weight, whose gradients are formed by a second
    sweep in the backward (the chunked impls)."""
    check_fused_linear(
        impl, reduction=reduction, clip=0.02, masked=True, chunk_size=4, frozen=frozen
    )


def test_stats_without_clip():
    s, t = make_logits((2, 3, 40), scale=2.0)
    loss, stats = divergence(s, t, return_stats=True)
    assert isinstance(stats, DivergenceStats)
    assert stats.student_entropy.shape == (2, 3)
    assert (stats.teacher_clipped_mass == 0).all() and (stats.clipped_entries == 0).all()
    assert not stats.teacher_top1_clipped.any()
    lS = torch.log_softmax(s.double(), -1)
    torch.testing.assert_close(
        stats.student_entropy.double(), -(lS.exp() * lS).sum(-1), rtol=1e-5, atol=1e-6
    )


def test_uniform_student_entropy_is_log_v():
    s = torch.zeros(3, 50)
    _, stats = divergence(s, torch.randn(3, 50), return_stats=True)
    torch.testing.assert_close(stats.student_entropy, torch.full((3,), math.log(50)))


def test_token_mode_counts_a_clipped_token_whole():
    s, t = make_logits((6, 30), torch.float64, seed=2)
    per_token = divergence(s, t, reduction="none")
    clip = per_token.median().item()
    _, stats = divergence(s, t, clip=clip, clip_mode="token", return_stats=True)
    over = ~(per_token < clip)
    assert over.any() and (~over).any()
    assert torch.equal(stats.clipped_entries, torch.where(over, 30, 0).int())
    assert torch.equal(stats.teacher_clipped_mass, over.float())
    assert torch.equal(stats.teacher_top1_clipped, over)


def test_teacher_top1_clipped_and_mass_by_hand():
    """The issue's situation: forward KL, the teacher's top token much likelier under the
    teacher than under the student: its term is the largest and gets clipped."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(1, 50, generator=g, dtype=torch.float64)
    t = s.clone()
    t[0, 7] = s.max() + 2.0  # the teacher's top-1 entry, under-weighted by the student
    clip = 0.05
    _, stats = divergence(s, t, clip=clip, return_stats=True)
    lS, lT = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    phi = lT.exp() * (lT - lS)
    clipped = ~(phi < clip)
    assert lT.argmax().item() == 7 and clipped[0, 7]
    assert stats.teacher_top1_clipped.item()
    assert stats.clipped_entries.item() == clipped.sum().item()
    torch.testing.assert_close(
        stats.teacher_clipped_mass.double(), (lT.exp() * clipped).sum(-1), rtol=1e-6, atol=0
    )


def test_masked_rows_hold_zero_and_nan_padding_never_leaks():
    s, t = make_logits((4, 5, 33), seed=3)
    mask = make_mask((4, 5), seed=3)
    s[~mask] = math.nan
    t[~mask] = math.inf
    _, stats = divergence(s, t, clip=0.02, mask=mask, reduction="none", return_stats=True)
    for column in stats:
        assert (column[~mask] == 0).all()
        assert not column[mask].isnan().any() if column.is_floating_point() else True
    assert (stats.student_entropy[mask] > 0).all()


def test_stats_carry_no_gradient_and_work_under_no_grad():
    s, t = make_logits((3, 20))
    s.requires_grad_()
    loss, stats = divergence(s, t, clip=0.02, return_stats=True)
    assert loss.requires_grad and not any(c.requires_grad for c in stats)
    with torch.no_grad():
        loss_ng, stats_ng = divergence(s, t, clip=0.02, return_stats=True)
    for a, b in zip(stats, stats_ng, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(loss.detach(), loss_ng)


def test_one_dimensional_logits_give_scalar_stats():
    s, t = make_logits((40,))
    _, stats = divergence(s, t, return_stats=True)
    assert stats.student_entropy.shape == ()


def test_fused_linear_stats_equal_the_logits_level_ones():
    g = torch.Generator().manual_seed(4)
    hs, ht = torch.randn(9, 16, generator=g), torch.randn(9, 16, generator=g)
    w = torch.randn(70, 16, generator=g) * 0.6
    opts = dict(clip=0.02, clip_mode="entry_keep", softcap=3.0, return_stats=True)
    _, lin = fused_linear_divergence(hs, ht, w, chunk_size=4, impl="torch", **opts)
    _, log = divergence(hs @ w.T, ht @ w.T, impl="torch", **opts)
    assert_stats_close(lin, log, torch.float32)
    _, ref = divergence_reference(hs @ w.T, ht @ w.T, **opts)
    assert_stats_close(lin, ref, torch.float32)


def test_module_returns_stats():
    s, t = make_logits((2, 30))
    loss, stats = Divergence(clip=0.02, return_stats=True)(s, t)
    assert loss.shape == () and stats.clipped_entries.shape == (2,)
