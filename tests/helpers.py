"""Shared test helpers: tolerances (stated once), input makers, comparison."""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TRITON_RUNS = HAS_CUDA or INTERPRET
DEVICE = "cuda" if HAS_CUDA else "cpu"

_needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1")


def triton_param(impl: str):
    """``impl`` as a pytest parameter that skips where Triton cannot run."""
    return pytest.param(impl, marks=_needs_triton)


# the implementations each API offers, as pytest parameters (one list per concern)
LOGITS_IMPLS = ["torch", triton_param("triton")]  # divergence()
CHUNKED_IMPLS = ["torch", triton_param("triton")]  # fused_linear_divergence, chunked
LINEAR_IMPLS = CHUNKED_IMPLS + [triton_param("fused")]  # every fused_linear_divergence impl

# Tolerances per input dtype, for values compared against the float64 reference
# computed from the SAME (already rounded) inputs. Gradients are stored in the
# input dtype, so low-precision dtypes carry their rounding (bf16: 2^-8 relative).
# atol is relative to the largest magnitude of the expected tensor.
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-10),
    torch.float32: dict(rtol=2e-4, atol=2e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}


def assert_close(actual, expected, dtype, what=""):
    """Compare to the float64 expectation at the tolerance of ``dtype``."""
    tol = TOL[dtype]
    expected = expected.detach().to(torch.float64).cpu()
    actual = actual.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    finite = torch.isfinite(expected)
    # infinities and NaNs must match exactly
    assert torch.equal(torch.isfinite(actual), finite), f"{what}: non-finite pattern differs"
    assert torch.equal(actual[~finite].nan_to_num(), expected[~finite].nan_to_num()), what
    if finite.any():
        scale = max(1.0, expected[finite].abs().max().item())
        torch.testing.assert_close(
            actual[finite],
            expected[finite],
            rtol=tol["rtol"],
            atol=tol["atol"] * scale,
            msg=lambda m: f"{what}: {m}",
        )


def make_logits(shape, dtype=torch.float32, scale=3.0, seed=0, device="cpu", correlated=True):
    """Random student/teacher logits; the teacher correlated with the student."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    t = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if correlated:
        t = 0.7 * s + 0.5 * t
    return s.to(dtype).to(device), t.to(dtype).to(device)


def make_mask(shape, seed=0, device="cpu", p=0.6):
    g = torch.Generator().manual_seed(seed + 1)
    m = torch.rand(shape, generator=g) < p
    if m.numel():
        m.view(-1)[0] = True
    return m.to(device)
