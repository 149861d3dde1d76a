"""`fused_linear_divergence` against the reference that materialises the logits."""

from __future__ import annotations

import pytest
import torch

from opsd_kernels import FusedLinearDivergence, fused_linear_divergence
from opsd_kernels.divergences import KINDS
from opsd_kernels.reference import fused_linear_divergence_reference
from tests.helpers import CHUNKED_IMPLS, DEVICE, HAS_CUDA, LINEAR_IMPLS, assert_close, make_mask

IMPLS = CHUNKED_IMPLS


def make_inputs(lead, H, V, H_T=None, dtype=torch.float32, seed=0, bias=False, separate=False):
    g = torch.Generator().manual_seed(seed)
    H_T = H_T or H
    hs = torch.randn(*lead, H, generator=g, dtype=torch.float64)
    ht = 0.6 * torch.cat([hs, torch.zeros(*lead, max(0, H_T - H), dtype=torch.float64)], -1)[
        ..., :H_T
    ] + 0.8 * torch.randn(*lead, H_T, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * (2.0 / H**0.5)
    out = dict(student_hidden=hs, teacher_hidden=ht, weight=w)
    if bias:
        out["bias"] = torch.randn(V, generator=g, dtype=torch.float64)
    if separate:
        out["teacher_weight"] = torch.randn(V, H_T, generator=g, dtype=torch.float64) * (
            2.0 / H_T**0.5
        )
        if bias:
            out["teacher_bias"] = torch.randn(V, generator=g, dtype=torch.float64)
    return {k: v.to(dtype).to(DEVICE) for k, v in out.items()}


def run_case(
    impl,
    lead=(2, 5),
    H=16,
    V=97,
    H_T=None,
    dtype=torch.float32,
    kind="forward_kl",
    temperature=1.1,
    clip=None,
    masked=False,
    reduction="mean",
    bias=False,
    separate=False,
    frozen=False,
    chunk_size=3,
    seed=0,
    noncontig=False,
    fp32_weight_grad=True,
    beta=0.3,
):
    x = make_inputs(lead, H, V, H_T, dtype, seed, bias, separate)
    if noncontig:  # transposed leading dims: not contiguous
        x["student_hidden"] = x["student_hidden"].transpose(0, 1).contiguous().transpose(0, 1)
        x["teacher_hidden"] = x["teacher_hidden"].transpose(0, 1).contiguous().transpose(0, 1)
        assert not x["student_hidden"].is_contiguous()
    mask = make_mask(lead, seed, DEVICE) if masked else None
    trainable = ["student_hidden"] + ([] if frozen else ["weight"]) + (["bias"] if bias else [])
    for k in trainable:
        x[k].requires_grad_()
    for k in ("teacher_hidden", "teacher_weight"):
        if k in x:
            x[k].requires_grad_()  # must receive no gradient: the teacher is a constant
    opts = dict(kind=kind, beta=beta, temperature=temperature, clip=clip, reduction=reduction)
    out = fused_linear_divergence(
        **x, mask=mask, impl=impl, chunk_size=chunk_size, fp32_weight_grad=fp32_weight_grad, **opts
    )
    ref_in = {k: v.detach().double().cpu().requires_grad_(k in trainable) for k, v in x.items()}
    ref = fused_linear_divergence_reference(
        **ref_in, mask=None if mask is None else mask.cpu(), **opts
    )
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out, ref, dtype, "loss")
    g = torch.Generator().manual_seed(seed + 3)
    upstream = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (out * upstream.to(out.dtype).to(DEVICE)).sum().backward()
    (ref * upstream).sum().backward()
    for k in trainable:
        assert x[k].grad is not None, k
        assert x[k].grad.dtype == dtype and x[k].grad.shape == x[k].shape
        assert_close(x[k].grad, ref_in[k].grad, dtype, f"grad {k}")
    if frozen:
        assert x["weight"].grad is None
    for k in ("teacher_hidden", "teacher_weight"):
        if k in x:
            assert x[k].grad is None, f"{k} must not receive a gradient"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("clip", [None, 0.02])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True])
def test_option_grid(impl, kind, clip, reduction, masked):
    run_case(impl, kind=kind, clip=clip, reduction=reduction, masked=masked)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_separate_teacher_weight_other_hidden_size(impl, reduction, frozen, bias):
    run_case(
        impl,
        H=16,
        H_T=24,
        separate=True,
        bias=bias,
        frozen=frozen,
        reduction=reduction,
        kind="jsd",
        clip=0.05,
        masked=True,
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("frozen", [False, True])
def test_shared_weight_bias_and_frozen(impl, reduction, frozen):
    run_case(impl, bias=True, frozen=frozen, reduction=reduction, clip=0.05, masked=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk_size", [1, 4, 10, 64, None])
def test_chunk_sizes(impl, chunk_size):
    # 10 tokens: chunks that divide N, that do not, a single chunk, and the automatic choice
    run_case(impl, lead=(10,), chunk_size=chunk_size, reduction="none", masked=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_single_token_and_3d(impl):
    run_case(impl, lead=(1,), chunk_size=None)
    run_case(impl, lead=(2, 3, 2), chunk_size=5, reduction="none")


@pytest.mark.parametrize("impl", IMPLS)
def test_noncontiguous_hidden(impl):
    run_case(impl, lead=(3, 4), noncontig=True, reduction="none")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fp32_weight_grad", [True, False])
def test_low_precision(impl, dtype, fp32_weight_grad):
    if impl == "torch" and dtype == torch.float16 and not HAS_CUDA:
        pass  # CPU half matmul is supported by torch 2.x
    run_case(
        impl,
        dtype=dtype,
        kind="forward_kl",
        clip=0.05,
        fp32_weight_grad=fp32_weight_grad,
        masked=True,
    )


def test_float64_torch():
    run_case("torch", dtype=torch.float64, kind="jsd", clip=0.01, reduction="none", bias=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_masked(impl):
    x = make_inputs((4,), 8, 20)
    x["student_hidden"].requires_grad_()
    x["weight"].requires_grad_()
    mask = torch.zeros(4, dtype=torch.bool, device=DEVICE)
    out = fused_linear_divergence(**x, mask=mask, impl=impl)
    assert out.item() == 0.0
    out.backward()
    assert torch.count_nonzero(x["student_hidden"].grad) == 0
    assert torch.count_nonzero(x["weight"].grad) == 0


def test_teacher_never_gets_a_graph():
    x = make_inputs((3,), 8, 20)
    x["teacher_hidden"].requires_grad_()
    out = fused_linear_divergence(**x)
    assert not out.requires_grad  # nothing on the student side requires grad


def test_module_form():
    x = make_inputs((3,), 8, 20, bias=True)
    mod = FusedLinearDivergence(
        kind="reverse_kl", temperature=1.1, clip=0.05, reduction="sum", chunk_size=2
    )
    assert "reverse_kl" in repr(mod)
    torch.testing.assert_close(
        mod(x["student_hidden"], x["teacher_hidden"], x["weight"], bias=x["bias"]),
        fused_linear_divergence(
            **x, kind="reverse_kl", temperature=1.1, clip=0.05, reduction="sum", chunk_size=2
        ),
    )


def test_auto_chunk_size_follows_budget(monkeypatch):
    import opsd_kernels
    from opsd_kernels.autograd import auto_chunk_size

    monkeypatch.setattr(opsd_kernels.config, "chunk_memory_budget", 64 * 2**20)
    # bf16 operands: float32 student + teacher logits and a bf16 gradient operand per entry
    c = auto_chunk_size(151_936, "triton", logit_bytes=4, operand_bytes=2)
    assert c * 151_936 * (2 * 4 + 2) <= 64 * 2**20 and c >= 32
    assert auto_chunk_size(151_936, "triton", logit_bytes=4) >= c  # no operand copy
    assert auto_chunk_size(151_936, "torch", logit_bytes=4, operand_bytes=2) < c
    monkeypatch.setattr(opsd_kernels.config, "chunk_memory_budget", 1)
    assert auto_chunk_size(151_936, "torch") == 1


@pytest.mark.parametrize("impl", LINEAR_IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_masked_rows_never_reach_any_gradient(impl, reduction, bias, poison):
    """Padding rows may hold anything: NaN or inf in masked student AND teacher rows
    must not reach the loss or any gradient, the weight and bias gradients included
    (0 * NaN = NaN in a GEMM that mixes rows)."""
    x = make_inputs((12,), 16, 70, bias=bias)
    mask = torch.ones(12, dtype=torch.bool, device=DEVICE)
    mask[[2, 7, 11]] = False
    clean = {k: v.clone() for k, v in x.items()}
    for k in ("student_hidden", "teacher_hidden"):
        x[k][~mask] = poison
        clean[k][~mask] = 0.0
    outs = []
    for inputs in (x, clean):
        trainable = {
            k: inputs[k].clone().requires_grad_()
            for k in ("student_hidden", "weight", "bias")
            if k in inputs
        }
        loss = fused_linear_divergence(
            **{**inputs, **trainable},
            mask=mask,
            impl=impl,
            chunk_size=5,
            reduction=reduction,
            clip=0.05,
        )
        (loss.sum() if reduction == "none" else loss).backward()
        outs.append((loss.detach(), {k: v.grad for k, v in trainable.items()}))
    (loss_p, grads_p), (loss_c, grads_c) = outs
    assert torch.isfinite(loss_p).all()
    torch.testing.assert_close(loss_p, loss_c)
    for k, g in grads_p.items():
        assert torch.isfinite(g).all(), k
        torch.testing.assert_close(g, grads_c[k], msg=k)
