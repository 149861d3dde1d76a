"""`divergence` (logits level) against the float64 reference, every impl and option."""

from __future__ import annotations

import math

import pytest
import torch

from opsd_kernels import Divergence, divergence, generalized_jsd
from opsd_kernels.divergences import KINDS
from opsd_kernels.reference import divergence_reference
from tests.helpers import DEVICE, LOGITS_IMPLS, TRITON_RUNS, assert_close, make_logits, make_mask

IMPLS = LOGITS_IMPLS


def run_case(
    impl,
    shape,
    dtype,
    kind,
    temperature,
    clip,
    masked,
    reduction,
    beta=0.3,
    seed=0,
    device=DEVICE,
    scale=3.0,
):
    s, t = make_logits(shape, dtype, seed=seed, device=device, scale=scale)
    mask = make_mask(shape[:-1], seed, device) if masked else None
    s.requires_grad_()
    t.requires_grad_()
    opts = dict(
        kind=kind, beta=beta, temperature=temperature, clip=clip, mask=mask, reduction=reduction
    )
    out = divergence(s, t, impl=impl, **opts)
    s_ref = s.detach().double().cpu().requires_grad_()
    t_ref = t.detach().double().cpu().requires_grad_()
    ref_mask = None if mask is None else mask.cpu()
    ref = divergence_reference(s_ref, t_ref, **{**opts, "mask": ref_mask})
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out, ref, dtype, "loss")
    g = torch.Generator().manual_seed(seed + 7)
    upstream = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (out * upstream.to(out.dtype).to(device)).sum().backward()
    (ref * upstream).sum().backward()
    assert s.grad.dtype == dtype and t.grad.dtype == dtype
    assert_close(s.grad, s_ref.grad, dtype, "student grad")
    assert_close(t.grad, t_ref.grad, dtype, "teacher grad")


# --- the option grid, float32 ---------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("clip", [None, 0.02])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temperature", [1.0, 1.1])
def test_option_grid(impl, kind, clip, masked, reduction, temperature):
    run_case(impl, (2, 3, 300), torch.float32, kind, temperature, clip, masked, reduction)


@pytest.mark.parametrize("V", [1, 7, 1000, 4099])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("clip", [None, 0.02])
def test_vocab_sizes_torch(V, kind, clip):
    run_case("torch", (5, V), torch.float32, kind, 1.1, clip, True, "mean")


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_large_vocab_torch(kind):
    run_case("torch", (3, 65537), torch.float32, kind, 1.1, 1e-4, False, "sum")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("V", [1, 7, 1000])
@pytest.mark.parametrize("kind", list(KINDS))
def test_vocab_sizes_triton_and_torch(impl, V, kind):
    run_case(impl, (4, V), torch.float32, kind, 1.0, None, False, "none")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("clip", [None, 0.02])
def test_dtypes(impl, dtype, kind, clip):
    if impl == "triton" and dtype == torch.float64:
        s, t = make_logits((2, 5), dtype, device=DEVICE)
        with pytest.raises(TypeError, match="float64"):
            divergence(s, t, impl="triton")
        return
    run_case(impl, (6, 257), dtype, kind, 1.1, clip, True, "none")


@pytest.mark.parametrize("impl", IMPLS)
def test_noncontiguous_and_3d(impl):
    s, t = make_logits((4, 5, 64), device=DEVICE)
    s_nc, t_nc = s.transpose(0, 1), t.transpose(0, 1)  # (5, 4, 64), not contiguous
    assert not s_nc.is_contiguous()
    out = divergence(s_nc, t_nc, impl=impl, reduction="none")
    ref = divergence_reference(s_nc.double().cpu(), t_nc.double().cpu(), reduction="none")
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_only_for_what_requires_grad(impl):
    s, t = make_logits((3, 40), device=DEVICE)
    s.requires_grad_()
    divergence(s, t, impl=impl).backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1")
def test_triton_blocks_do_not_matter():
    """The Triton kernel sweeps V in blocks: results must not depend on the block size."""
    from opsd_kernels._validation import check_options
    from opsd_kernels.triton.divergence_rows import divergence_rows_triton

    for V in (1000, 4099):
        s, t = make_logits((3, V), device=DEVICE, seed=V)
        for kind in KINDS:
            for clip in (None, 0.01):
                opts = check_options(kind, 0.4, 1.1, clip, "sum")
                outs = []
                for block in (64, 1024):
                    gs = torch.empty_like(s)
                    loss = divergence_rows_triton(
                        s,
                        t,
                        opts,
                        mask=None,
                        scale=torch.ones(1, device=DEVICE),
                        grad_student=gs,
                        grad_teacher=None,
                        block_v=block,
                    )
                    outs.append((loss, gs))
                ref = divergence_reference(
                    s.double().cpu(),
                    t.double().cpu(),
                    kind=kind,
                    beta=0.4,
                    temperature=1.1,
                    clip=clip,
                    reduction="none",
                )
                for loss, _ in outs:
                    assert_close(loss, ref, torch.float32, f"{kind} {clip} V={V}")
                torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-6)


# --- hard but valid input ----------------------------------------------------------------


def _both(impl, s, t, **kw):
    out = divergence(s.to(DEVICE), t.to(DEVICE), impl=impl, **kw).cpu()
    ref = divergence_reference(s, t, **kw)
    return out, ref


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_banned_tokens(impl, kind):
    """-inf logits: exact handling of 0 log 0 and of infinite KL."""
    s, t = make_logits((4, 50), seed=3)
    t[0, :10] = -math.inf  # teacher bans tokens the student allows
    s[1, 5:9] = -math.inf  # student bans tokens the teacher allows
    s[2, :3] = -math.inf  # both ban the same tokens
    t[2, :3] = -math.inf
    out, ref = _both(impl, s, t, kind=kind, reduction="none")
    assert_close(out, ref, torch.float32, kind)
    expected_inf = {
        "forward_kl": [False, True, False, False],
        "reverse_kl": [True, False, False, False],
        "jsd": [False, False, False, False],
    }[kind]
    assert torch.isinf(out).tolist() == expected_inf
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_banned_tokens_gradients(impl, kind):
    """Where the loss is finite, banned tokens give exact, NaN-free gradients."""
    s, t = make_logits((3, 40), seed=4)
    s[:, :5] = -math.inf
    t[:, :5] = -math.inf
    t[1, 20:25] = -math.inf  # finite for forward KL and JSD
    if kind == "reverse_kl":
        s[1, 20:25] = -math.inf
    s_d = s.to(DEVICE, copy=True).requires_grad_()
    t_d = t.to(DEVICE, copy=True).requires_grad_()
    divergence(s_d, t_d, kind=kind, impl=impl).backward()
    s_r, t_r = s.double().requires_grad_(), t.double().requires_grad_()
    divergence_reference(s_r, t_r, kind=kind).backward()
    assert not torch.isnan(s_d.grad).any() and not torch.isnan(t_d.grad).any()
    assert_close(s_d.grad, s_r.grad, torch.float32, "student grad")
    assert_close(t_d.grad, t_r.grad, torch.float32, "teacher grad")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_clipped_infinite_entries_are_finite(impl, kind):
    s, t = make_logits((2, 30), seed=5)
    s[0, :4] = -math.inf
    t[1, :4] = -math.inf
    out, ref = _both(impl, s, t, kind=kind, clip=0.05, reduction="none")
    assert torch.isfinite(out).all()
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_masked_rows(impl, reduction):
    s, t = make_logits((3, 20), seed=6)
    s[1] = math.nan  # padding garbage in a masked row is never read
    s_d = s.to(DEVICE, copy=True).requires_grad_()
    mask = torch.tensor([False, False, False], device=DEVICE)
    out = divergence(s_d, t.to(DEVICE), mask=mask, reduction=reduction, impl=impl)
    assert torch.equal(out.cpu(), torch.zeros_like(out.cpu()))
    out.sum().backward()
    assert torch.equal(s_d.grad.cpu(), torch.zeros(3, 20))
    partial = torch.tensor([True, False, True], device=DEVICE)
    out = divergence(s.to(DEVICE), t.to(DEVICE), mask=partial, reduction=reduction, impl=impl)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_huge_logits(impl, kind):
    s, t = make_logits((3, 64), seed=8, scale=1e4)
    out, ref = _both(impl, s, t, kind=kind, temperature=1.1, reduction="none")
    assert torch.isfinite(out).all()
    # float32 rounding of logits of size 1e4 is about 1e-3 absolute per entry
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_identical_distributions(impl, kind, scale):
    s, _ = make_logits((4, 100), seed=9, scale=scale)
    s_d = s.to(DEVICE, copy=True).requires_grad_()
    out = divergence(s_d, s.to(DEVICE), kind=kind, impl=impl, reduction="none")
    assert out.abs().max().item() < 1e-6
    out.sum().backward()
    assert s_d.grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("impl", IMPLS)
def test_one_hot_teacher_is_cross_entropy(impl):
    s, _ = make_logits((5, 33), seed=10)
    target = torch.arange(5) * 3
    t = torch.full((5, 33), -math.inf)
    t[torch.arange(5), target] = 0.0
    out = divergence(s.to(DEVICE), t.to(DEVICE), impl=impl, reduction="none").cpu()
    ce = torch.nn.functional.cross_entropy(s, target, reduction="none")
    torch.testing.assert_close(out, ce, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_nan_propagates(impl, kind):
    s, t = make_logits((3, 16), seed=11)
    t[1, 4] = math.nan
    out = divergence(s.to(DEVICE), t.to(DEVICE), kind=kind, impl=impl, reduction="none").cpu()
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()


def test_empty_leading_shape():
    s = torch.randn(0, 9)
    assert divergence(s, s).item() == 0.0
    assert divergence(s, s, reduction="none").shape == (0,)


# --- convenience forms ---------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.25, 1.0])
def test_generalized_jsd_matches_trl_convention(beta):
    """TRL's generalized_jsd_loss semantics written out (tests/test_trl_compat.py checks
    against TRL itself when it is installed)."""
    s, t = make_logits((2, 4, 30), seed=12)
    labels = torch.randint(0, 30, (2, 4))
    labels[0, :2] = -100
    # TRL's formula, written out: F.kl_div(input, target) = KL(target || input)
    ls = torch.log_softmax(s.double() / 1.1, -1)
    lt = torch.log_softmax(t.double() / 1.1, -1)
    kl = torch.nn.functional.kl_div
    if beta == 0:
        per = kl(ls, lt, reduction="none", log_target=True)
    elif beta == 1:
        per = kl(lt, ls, reduction="none", log_target=True)
    else:
        lm = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), 0)
        per = beta * kl(lm, lt, reduction="none", log_target=True) + (1 - beta) * kl(
            lm, ls, reduction="none", log_target=True
        )
    m = labels != -100

    def ours(**kw):
        return generalized_jsd(s, t, beta=beta, temperature=1.1, **kw).double()

    tol = dict(rtol=1e-5, atol=1e-6)
    # batchmean: per counted token with labels, per sequence (B) without
    torch.testing.assert_close(ours(labels=labels), per[m].sum() / m.sum(), **tol)
    torch.testing.assert_close(ours(), per.sum() / 2, **tol)
    # mean: over tokens AND vocabulary
    torch.testing.assert_close(ours(labels=labels, reduction="mean"), per[m].mean(), **tol)
    torch.testing.assert_close(ours(reduction="mean"), per.mean(), **tol)
    torch.testing.assert_close(ours(labels=labels, reduction="sum"), per[m].sum(), **tol)
    # none: the per-entry terms of the counted positions
    torch.testing.assert_close(ours(labels=labels, reduction="none"), per[m], **tol)
    torch.testing.assert_close(ours(reduction="none"), per, **tol)
    # num_items_in_batch overrides the reduction
    torch.testing.assert_close(
        ours(labels=labels, reduction="mean", num_items_in_batch=7), per[m].sum() / 7, **tol
    )


def test_module_form():
    s, t = make_logits((3, 17))
    mask = torch.tensor([True, False, True])
    mod = Divergence(kind="jsd", beta=0.2, temperature=1.3, clip=0.1, reduction="sum")
    assert "jsd" in repr(mod)
    torch.testing.assert_close(
        mod(s, t, mask),
        divergence(
            s, t, kind="jsd", beta=0.2, temperature=1.3, clip=0.1, reduction="sum", mask=mask
        ),
    )


def test_second_backward_is_refused():
    s, t = make_logits((2, 8))
    s.requires_grad_()
    loss = divergence(s, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single backward"):
        loss.backward()


def test_auto_picks_torch_on_cpu(monkeypatch):
    import opsd_kernels.api as api

    seen = []
    monkeypatch.setattr(
        api, "_row_function", lambda impl: seen.append(impl) or api.divergence_rows_torch
    )
    s, t = make_logits((2, 8))
    divergence(s, t)
    assert seen == ["torch"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
def test_infinite_kl_survives_a_later_larger_maximum(impl, kind):
    """+inf found in an early vocabulary block must stay +inf when a later block raises
    the running maximum so far that the rescale factor underflows (inf * 0 is NaN)."""
    V = 2048  # several blocks of the Triton kernel (1024 on CPU, 4096 on CUDA: one)
    s, t = make_logits((2, V), seed=13)
    heavy, banned = (t, s) if kind == "forward_kl" else (s, t)
    heavy[:, 0] = 0.0
    banned[:, 0] = -math.inf  # the other side bans what this side allows
    heavy[:, 1500] = 200.0  # a much larger maximum later in the row
    out = divergence(s.to(DEVICE), t.to(DEVICE), kind=kind, impl=impl, reduction="none").cpu()
    ref = divergence_reference(s, t, kind=kind, reduction="none")
    assert torch.isinf(ref).all()
    assert torch.equal(out, ref.float())


def test_mixed_float64_is_computed_in_float64():
    s, t = make_logits((3, 50), torch.float64, seed=14)
    out = divergence(s.float(), t, kind="jsd", reduction="none")
    ref = divergence_reference(s.float().double(), t, kind="jsd", reduction="none")
    assert out.dtype == torch.float64
    assert_close(out, ref, torch.float64)


def test_logits_near_the_float32_limit_stay_finite_torch():
    """3e38 / 0.5 overflows float32; the divergence itself is finite (the torch path
    shifts each row by its maximum before scaling by 1/temperature)."""
    s = torch.tensor([[3.0e38, 2.9e38, -3.0e38, 0.0]], dtype=torch.float32, requires_grad=True)
    t = torch.tensor([[2.9e38, 3.0e38, 0.0, -1.0e38]], dtype=torch.float32)
    loss = divergence(s, t, temperature=0.5, impl="torch", kind="jsd")
    ref_s = s.detach().double().requires_grad_()
    ref = divergence_reference(ref_s, t.double(), temperature=0.5, kind="jsd")
    assert torch.isfinite(loss) and torch.isfinite(ref)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    ref.backward()
    assert torch.isfinite(s.grad).all()
    torch.testing.assert_close(s.grad.double(), ref_s.grad, rtol=1e-4, atol=1e-6)


def test_one_dimensional_logits_are_one_row():
    """(V,) logits are one token: the same loss and gradient as (1, V)."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(11, generator=g), torch.randn(11, generator=g)
    s1, s2 = s.clone().requires_grad_(), s[None].clone().requires_grad_()
    a = divergence(s1, t, kind="jsd", clip=0.05)
    b = divergence(s2, t[None], kind="jsd", clip=0.05)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    assert s1.grad.shape == (11,)
    torch.testing.assert_close(s1.grad, s2.grad[0])
