"""Drivers of the tests of this round's options (clip modes, logit transform, statistics).

Each driver runs a public function with an option set, the float64 reference on the
SAME (rounded) inputs, and compares the loss, the gradients under a random upstream
gradient (so ``reduction="none"`` is exercised row by row) and the per-token statistics.
"""

from __future__ import annotations

import pytest
import torch

from opsd_kernels import divergence, fused_linear_divergence
from opsd_kernels.reference import divergence_reference, fused_linear_divergence_reference
from tests.helpers import DEVICE, TRITON_RUNS, assert_close, make_logits, make_mask


def options_impl(impl: str, linear: bool = False):
    """``impl`` as a pytest parameter, skipped only where Triton cannot run."""
    marks = []
    if impl != "torch":
        marks.append(pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1"))
    return pytest.param(impl, marks=marks)


def assert_stats_close(actual, expected, dtype, what=""):
    """Statistics against the float64 reference's: float columns at ``dtype``'s
    tolerance, the count and the top-1 flag exactly."""
    assert actual.student_entropy.dtype == torch.float32
    assert actual.clipped_entries.dtype == torch.int32
    assert actual.teacher_top1_clipped.dtype == torch.bool
    stored = torch.float32 if dtype == torch.float64 else dtype  # statistics are float32
    for name in ("student_entropy", "teacher_clipped_mass"):
        assert_close(getattr(actual, name), getattr(expected, name), stored, f"{what} {name}")
    for name in ("clipped_entries", "teacher_top1_clipped"):
        a, e = getattr(actual, name).cpu(), getattr(expected, name).cpu()
        assert a.shape == e.shape, (what, name)
        assert torch.equal(a.to(e.dtype), e), f"{what} {name}: {a} != {e}"


def nan_padding(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` with NaN in the rows ``mask`` leaves out (they must reach no output)."""
    if mask is None:
        return x
    return torch.where(mask.unsqueeze(-1), x, torch.full_like(x, float("nan")))


def check_divergence(
    impl="torch",
    shape=(3, 7, 61),
    dtype=torch.float32,
    kind="forward_kl",
    temperature=1.1,
    clip=None,
    clip_mode="entry",
    masked=False,
    reduction="mean",
    seed=0,
    scale=3.0,
    beta=0.3,
    **transform,
):
    """``divergence`` (with its statistics) against the reference, loss, both gradients."""
    s, t = make_logits(shape, dtype, seed=seed, device=DEVICE, scale=scale)
    mask = make_mask(shape[:-1], seed, DEVICE) if masked else None
    s, t = nan_padding(s, mask), nan_padding(t, mask)
    s.requires_grad_()
    t.requires_grad_()
    opts = dict(
        kind=kind,
        beta=beta,
        temperature=temperature,
        clip=clip,
        clip_mode=clip_mode,
        reduction=reduction,
        **transform,
    )
    out, stats = divergence(s, t, mask=mask, impl=impl, return_stats=True, **opts)
    s_ref = s.detach().double().cpu().requires_grad_()
    t_ref = t.detach().double().cpu().requires_grad_()
    ref_mask = None if mask is None else mask.cpu()
    ref, ref_stats = divergence_reference(s_ref, t_ref, mask=ref_mask, return_stats=True, **opts)
    assert_close(out, ref, dtype, "loss")
    assert_stats_close(stats, ref_stats, dtype, "stats")
    g = torch.Generator().manual_seed(seed + 7)
    upstream = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (out * upstream.to(out.dtype).to(DEVICE)).sum().backward()
    (ref * upstream).sum().backward()
    assert_close(s.grad, s_ref.grad, dtype, "student grad")
    assert_close(t.grad, t_ref.grad, dtype, "teacher grad")
    return ref, ref_stats


def linear_inputs(lead, H, V, H_T=None, dtype=torch.float32, seed=0, separate=False, std=3.0):
    """Hidden states and heads whose logits have std ~ ``std`` (large enough for a cap
    of a few units to bend them)."""
    g = torch.Generator().manual_seed(seed)
    H_T = H_T or H
    hs = torch.randn(*lead, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * (std / H**0.5)
    x = dict(student_hidden=hs, weight=w, bias=torch.randn(V, generator=g, dtype=torch.float64))
    if separate:
        x["teacher_hidden"] = torch.randn(*lead, H_T, generator=g, dtype=torch.float64)
        x["teacher_weight"] = torch.randn(V, H_T, generator=g, dtype=torch.float64) * (
            std / H_T**0.5
        )
        x["teacher_bias"] = torch.randn(V, generator=g, dtype=torch.float64)
    else:
        x["teacher_hidden"] = 0.7 * hs + 0.6 * torch.randn(*lead, H, generator=g).double()
    return {k: v.to(dtype).to(DEVICE) for k, v in x.items()}


def check_fused_linear(
    impl="torch",
    lead=(2, 5),
    H=16,
    V=97,
    H_T=None,
    dtype=torch.float32,
    kind="forward_kl",
    temperature=1.1,
    clip=None,
    clip_mode="entry",
    masked=False,
    reduction="mean",
    separate=False,
    chunk_size=3,
    seed=0,
    beta=0.3,
    std=3.0,
    frozen=False,
    **transform,
):
    """``fused_linear_divergence`` (with statistics) against the reference: loss, the
    student hidden, weight (unless ``frozen``) and bias gradients."""
    x = linear_inputs(lead, H, V, H_T, dtype, seed, separate, std)
    mask = make_mask(lead, seed, DEVICE) if masked else None
    x["student_hidden"] = nan_padding(x["student_hidden"], mask)
    x["teacher_hidden"] = nan_padding(x["teacher_hidden"], mask)
    trainable = ("student_hidden", "bias") + (() if frozen else ("weight",))
    for k in trainable:
        x[k].requires_grad_()
    opts = dict(
        kind=kind,
        beta=beta,
        temperature=temperature,
        clip=clip,
        clip_mode=clip_mode,
        reduction=reduction,
        **transform,
    )
    out, stats = fused_linear_divergence(
        **x, mask=mask, impl=impl, chunk_size=chunk_size, return_stats=True, **opts
    )
    # the reference's own GEMM would spread the NaN padding (0 * NaN): it gets zero rows
    ref_in = {k: v.detach().double().cpu() for k, v in x.items()}
    if mask is not None:
        for k in ("student_hidden", "teacher_hidden"):
            ref_in[k] = torch.where(mask.cpu().unsqueeze(-1), ref_in[k], 0.0)
    ref_in = {k: v.requires_grad_(k in trainable) for k, v in ref_in.items()}
    ref, ref_stats = fused_linear_divergence_reference(
        **ref_in, mask=None if mask is None else mask.cpu(), return_stats=True, **opts
    )
    assert_close(out, ref, dtype, "loss")
    assert_stats_close(stats, ref_stats, dtype, "stats")
    g = torch.Generator().manual_seed(seed + 3)
    upstream = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (out * upstream.to(out.dtype).to(DEVICE)).sum().backward()
    (ref * upstream).sum().backward()
    for k in trainable:
        assert_close(x[k].grad, ref_in[k].grad, dtype, f"grad {k}")
    assert not frozen or x["weight"].grad is None
    return ref, ref_stats
