"""Property tests (hypothesis) on the torch path: facts that hold for any input."""

import math

import pytest
import torch

pytest.importorskip("hypothesis")  # the GPU machine's image may lack it

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from opsd_kernels import divergence

rows = st.integers(1, 4)
vocab = st.integers(1, 40)
scales = st.floats(0.1, 20.0)
seeds = st.integers(0, 2**31 - 1)
temps = st.floats(0.5, 2.0)


def _logits(n, v, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, v, generator=g, dtype=torch.float64) * scale,
        torch.randn(n, v, generator=g, dtype=torch.float64) * scale,
    )


@settings(max_examples=60, deadline=None)
@given(rows, vocab, scales, seeds, temps, st.sampled_from(["forward_kl", "reverse_kl", "jsd"]))
def test_nonnegative_and_zero_iff_equal(n, v, scale, seed, temp, kind):
    s, t = _logits(n, v, scale, seed)
    d = divergence(s, t, kind=kind, temperature=temp, reduction="none", impl="torch")
    assert (d >= -1e-12).all()
    assert divergence(s, s, kind=kind, temperature=temp, reduction="none").abs().max() < 1e-12
    # distinct distributions give a positive divergence: by Pinsker's inequality (and its
    # JSD analogue) a total variation of 1e-5 forces KL >= 5e-11 and JSD >= 1e-11, far
    # above float64 rounding; closer distributions may round to +-1e-18
    tv = 0.5 * (torch.softmax(s / temp, -1) - torch.softmax(t / temp, -1)).abs().sum(-1)
    differs = tv > 1e-5
    assert (d[differs] > 0).all()


@settings(max_examples=60, deadline=None)
@given(rows, vocab, scales, seeds, temps)
def test_jsd_bounded_by_log2(n, v, scale, seed, temp):
    s, t = _logits(n, v, scale, seed)
    d = divergence(s, t, kind="jsd", beta=0.5, temperature=temp, reduction="none")
    assert (d <= math.log(2) + 1e-12).all()


@settings(max_examples=60, deadline=None)
@given(
    rows,
    vocab,
    scales,
    seeds,
    st.floats(1e-4, 1.0),
    st.sampled_from(["forward_kl", "reverse_kl", "jsd"]),
)
def test_clip_never_raises_the_loss(n, v, scale, seed, clip, kind):
    s, t = _logits(n, v, scale, seed)
    plain = divergence(s, t, kind=kind, reduction="none")
    clipped = divergence(s, t, kind=kind, clip=clip, reduction="none")
    assert (clipped <= plain + 1e-12).all()
    assert (clipped <= v * clip + 1e-12).all()


@settings(max_examples=40, deadline=None)
@given(rows, vocab, scales, seeds)
def test_shift_invariance(n, v, scale, seed):
    """Adding a constant to a row's logits changes no probability, hence no loss."""
    s, t = _logits(n, v, scale, seed)
    a = divergence(s, t, kind="jsd", reduction="none")
    b = divergence(s + 7.5, t - 3.0, kind="jsd", reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
