"""``generalized_jsd`` against TRL's own ``generalized_jsd_loss`` (GKD and GOLD).

Skipped when ``trl`` is not installed. Checked with trl 1.16.0. Inputs are float64 so that
both sides compute in float64 and agree to rounding; one float32 case checks the float32
path at the float32 tolerance.
"""

import inspect

import pytest
import torch

from opsd_kernels import generalized_jsd
from opsd_kernels.trl_compat import generalized_jsd_loss

pytest.importorskip("trl")
gkd = pytest.importorskip("trl.experimental.gkd")
gold = pytest.importorskip("trl.experimental.gold")

TRL_GKD = gkd.GKDTrainer.generalized_jsd_loss
TRL_GOLD = gold.GOLDTrainer.generalized_jsd_loss
F64 = dict(rtol=1e-10, atol=1e-12)


def _inputs(shape, seed=0, dtype=torch.float64, probs=False):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    t = 0.7 * s + 1.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    if probs:
        s, t = s.softmax(-1), t.softmax(-1)
        s[..., 0] = 0.0  # below GOLD's 1e-8 floor
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    labels.view(-1)[::3] = -100
    return s.to(dtype), t.to(dtype), labels


def _run(fn, s, t, upstream=None, **kw):
    """Value and gradients (student, teacher) of ``fn``; a non-scalar result is reduced
    with a random upstream gradient (so every entry's gradient is checked)."""
    s = s.clone().requires_grad_()
    t = t.clone().requires_grad_()
    out = fn(s, t, **kw)
    if out.dim() == 0:
        out.backward()
    else:
        out.backward(upstream if upstream is not None else torch.ones_like(out))
    return out.detach(), s.grad, t.grad


def _compare(s, t, tol=F64, trl=TRL_GKD, **kw):
    ref, gs_ref, gt_ref = _run(trl, s, t, **kw)
    upstream = None
    if ref.dim() > 0:
        upstream = torch.randn(
            ref.shape, generator=torch.Generator().manual_seed(1), dtype=ref.dtype
        )
        ref, gs_ref, gt_ref = _run(trl, s, t, upstream=upstream, **kw)
    out, gs, gt = _run(
        generalized_jsd,
        s,
        t,
        upstream=None
        if upstream is None
        else upstream.to(torch.promote_types(s.dtype, torch.float32)),
        **kw,
    )
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref.double(), **tol)
    torch.testing.assert_close(gs.double(), gs_ref.double(), **tol)
    torch.testing.assert_close(gt.double(), gt_ref.double(), **tol)


def test_signature_matches_trl():
    """Same parameter names, order and defaults as GOLD's (GKD's minus logits_are_probs,
    which TRL's trainers pass by keyword)."""
    ours = list(inspect.signature(generalized_jsd).parameters.values())
    for trl in (TRL_GKD, TRL_GOLD):
        theirs = inspect.signature(trl).parameters
        for p in theirs.values():
            q = next(q for q in ours if q.name == p.name)
            assert q.default == p.default, p.name
    names = [p.name for p in ours]
    assert names[:8] == list(inspect.signature(TRL_GOLD).parameters)
    assert generalized_jsd_loss is generalized_jsd


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("shape", [(2, 5, 11), (7, 13)])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_matches_trl_gkd(reduction, with_labels, shape, beta, temperature):
    s, t, labels = _inputs(shape, seed=len(shape) + int(10 * beta) + len(reduction))
    _compare(
        s,
        t,
        labels=labels if with_labels else None,
        beta=beta,
        temperature=temperature,
        reduction=reduction,
    )


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("num_items", [5, 3.5, "tensor"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_num_items_in_batch_overrides_reduction(reduction, num_items, beta):
    s, t, labels = _inputs((2, 4, 9), seed=3)
    if num_items == "tensor":
        num_items = torch.tensor(17)
    _compare(
        s,
        t,
        labels=labels,
        beta=beta,
        reduction=reduction,
        temperature=1.3,
        num_items_in_batch=num_items,
    )


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_logits_are_probs_matches_trl_gold(reduction, with_labels, beta):
    s, t, labels = _inputs((3, 4, 10), seed=5, probs=True)
    _compare(
        s,
        t,
        trl=TRL_GOLD,
        labels=labels if with_labels else None,
        beta=beta,
        temperature=2.0,
        reduction=reduction,
        logits_are_probs=True,
    )
    _compare(
        s,
        t,
        trl=TRL_GOLD,
        labels=labels,
        beta=beta,
        reduction=reduction,
        logits_are_probs=True,
        num_items_in_batch=6,
    )


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gold_logits_path(beta):
    s, t, labels = _inputs((2, 6, 12), seed=8)
    _compare(s, t, trl=TRL_GOLD, labels=labels, beta=beta, temperature=0.9)


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "none"])
def test_float32_inputs(reduction):
    """float32 logits: ours computes in float32, TRL in float32; both near float64."""
    s, t, labels = _inputs((3, 8, 40), seed=11, dtype=torch.float32)
    _compare(
        s,
        t,
        tol=dict(rtol=2e-4, atol=2e-6),
        labels=labels,
        beta=0.4,
        temperature=1.1,
        reduction=reduction,
    )
    out = generalized_jsd(s, t, labels, beta=0.4)
    assert out.dtype == torch.float32


def test_reductions_are_the_documented_ones():
    """The TRL semantics spelled out, independently of TRL: mean is over tokens AND
    vocabulary; batchmean without labels divides by the batch size B."""
    s, t, labels = _inputs((2, 5, 11), seed=2)
    per_entry = generalized_jsd(s, t, reduction="none", beta=0.0)
    assert per_entry.shape == (2, 5, 11)
    total = per_entry.sum()
    torch.testing.assert_close(generalized_jsd(s, t, reduction="sum", beta=0.0), total)
    torch.testing.assert_close(generalized_jsd(s, t, reduction="batchmean", beta=0.0), total / 2)
    torch.testing.assert_close(
        generalized_jsd(s, t, reduction="mean", beta=0.0), total / (2 * 5 * 11)
    )
    m = labels != -100
    torch.testing.assert_close(
        generalized_jsd(s, t, labels, beta=0.0), per_entry[m].sum() / m.sum()
    )
    assert generalized_jsd(s, t, labels, reduction="none").shape == (int(m.sum()), 11)


def test_no_counted_position():
    """batchmean and sum give 0 as TRL does; mean gives 0 where TRL's empty mean is NaN."""
    s, t, _ = _inputs((2, 3, 7), seed=4)
    labels = torch.full((2, 3), -100)
    for reduction in ("batchmean", "sum", "mean"):
        s_ = s.clone().requires_grad_()
        out = generalized_jsd(s_, t, labels, reduction=reduction)
        out.backward()
        assert out.item() == 0.0 and torch.count_nonzero(s_.grad) == 0
    assert TRL_GKD(s, t, labels, reduction="batchmean").item() == 0.0
    assert TRL_GKD(s, t, labels, reduction="mean").isnan()  # TRL's behaviour, not ours
    assert generalized_jsd(s, t, labels, reduction="none").shape == (0, 7)


def test_banned_tokens_are_finite_where_trl_gives_nan():
    """A token both sides ban (-inf logit) contributes 0 log 0 = 0 here; TRL's F.kl_div
    gives NaN. Every other entry agrees."""
    s, t, _ = _inputs((4, 9), seed=6)
    s[:, 3] = t[:, 3] = float("-inf")
    for beta in (0.0, 0.5, 1.0):
        ours = generalized_jsd(s, t, beta=beta, reduction="none")
        theirs = TRL_GKD(s, t, beta=beta, reduction="none")
        assert torch.isfinite(ours).all() and (ours[:, 3] == 0).all()
        assert theirs[:, 3].isnan().all()
        torch.testing.assert_close(
            ours[:, [0, 1, 2, 4, 5, 6, 7, 8]], theirs[:, [0, 1, 2, 4, 5, 6, 7, 8]], **F64
        )
        assert torch.isfinite(generalized_jsd(s, t, beta=beta))
