"""Top-k teachers: `topk_divergence` and `fused_linear_topk_divergence` against the
float64 reference (opsd_kernels.reference), special cases, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from opsd_kernels import divergence
from opsd_kernels.memory import PeakMemory
from opsd_kernels.reference import (
    fused_linear_topk_divergence_reference,
    topk_divergence_reference,
)
from opsd_kernels.topk import fused_linear_topk_divergence, topk_divergence
from tests.helpers import HAS_CUDA, TRITON_RUNS, assert_close, make_mask

DEVICE = "cuda" if HAS_CUDA else "cpu"
TRITON = pytest.param(
    "triton", marks=pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1")
)
KINDS = ("forward_kl", "reverse_kl", "jsd")
TAILS = ("bucket", "renormalize")
INF = math.inf


def make_teacher(lead, V, K, seed=0, scale=3.0, pad=True, student=None, dtype=torch.float32):
    """Top-K of a teacher correlated with ``student`` (float64 logits), ids shuffled
    within each row, some rows padded (-inf log-probs; their ids are junk: -1 or a
    repeat of a real id)."""
    g = torch.Generator().manual_seed(seed + 7)
    noise = torch.randn(*lead, V, generator=g, dtype=torch.float64) * scale
    t = noise if student is None else 0.7 * student.double().cpu() + 0.5 * noise
    lp, ids = torch.log_softmax(t, -1).topk(K, dim=-1)
    order = torch.rand(*lead, K, generator=g).argsort(-1)
    lp, ids = lp.gather(-1, order), ids.gather(-1, order)
    if pad and K > 1:
        flat_lp, flat_ids = lp.view(-1, K), ids.view(-1, K)
        for r in range(0, flat_lp.shape[0], 3):  # every third row keeps fewer entries
            keep = 1 + r % K
            flat_lp[r, keep:] = -INF
            flat_ids[r, keep:] = -1 if r % 2 else flat_ids[r, 0]
    return ids.to(DEVICE), lp.to(dtype).to(DEVICE)


def make_student(lead, V, seed=0, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*lead, V, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def check_logits_case(
    impl,
    *,
    lead=(3, 4),
    V=37,
    K=5,
    dtype=torch.float32,
    kind="forward_kl",
    tail="bucket",
    temperature=1.3,
    clip=None,
    masked=False,
    reduction="mean",
    scale=3.0,
    seed=0,
    pad=True,
    beta=0.3,
    **options,
):
    s = make_student(lead, V, seed, scale, dtype)
    ids, lp = make_teacher(lead, V, K, seed, scale, pad, student=s)
    mask = make_mask(lead, seed, DEVICE) if masked else None
    if masked:  # masked rows may hold anything
        s[~mask] = math.nan
        ids[~mask] = 10**6
        lp[~mask] = math.nan
    s.requires_grad_()
    opts = dict(
        kind=kind,
        tail=tail,
        temperature=temperature,
        clip=clip,
        mask=mask,
        reduction=reduction,
        beta=beta,
        **options,
    )
    out = topk_divergence(s, ids, lp, impl=impl, **opts)
    s_ref = s.detach().double().cpu().requires_grad_()
    ref = topk_divergence_reference(
        s_ref, ids.cpu(), lp.cpu(), **{**opts, "mask": None if mask is None else mask.cpu()}
    )
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out, ref, dtype, "loss")
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (out * up.to(out)).sum().backward()
    (ref * up).sum().backward()
    assert s.grad.dtype == dtype
    assert_close(s.grad, s_ref.grad, dtype, "d student_logits")


# --------------------------------------------------------------------------- logits path


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("clip", [None, 0.02])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", TAILS)
def test_logits_float64_grid(tail, kind, clip, reduction):
    check_logits_case(
        "torch",
        dtype=torch.float64,
        kind=kind,
        tail=tail,
        clip=clip,
        reduction=reduction,
        masked=reduction != "sum",
    )


@pytest.mark.parametrize("impl", ["torch", TRITON])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
def test_logits_dtypes(impl, dtype, tail, kind):
    check_logits_case(
        impl, dtype=dtype, tail=tail, kind=kind, masked=True, clip=0.05, reduction="none"
    )


@pytest.mark.parametrize("impl", ["torch", TRITON])
@pytest.mark.parametrize("tail", TAILS)
def test_peaked(impl, tail):
    # logits of scale 30: near-one-hot distributions, tiny rest masses (log-space needed).
    # (Not reverse KL with the bucket: a teacher whose top-k mass rounds to 1 has rT = 0,
    # and the exact loss is +inf wherever the student keeps mass outside the ids.)
    check_logits_case(impl, tail=tail, scale=30.0, K=3, kind="forward_kl")
    if tail == "renormalize":
        check_logits_case(impl, tail=tail, scale=30.0, K=3, kind="reverse_kl", seed=1)


@pytest.mark.parametrize("impl", ["torch", TRITON])
def test_k1_and_odd_shapes(impl):
    check_logits_case(impl, lead=(5,), V=11, K=1, pad=False)
    check_logits_case(impl, lead=(2, 1, 3), V=3, K=2, kind="jsd", tail="renormalize")
    # K above the kernel's K block (256): the K loops run twice
    check_logits_case(impl, lead=(2,), V=270, K=260, clip=0.01)


def test_int32_ids_and_teacher_gets_no_gradient():
    s = make_student((4,), 30).requires_grad_()
    ids, lp = make_teacher((4,), 30, 5, student=s.detach())
    lp.requires_grad_()
    a = topk_divergence(s, ids.int(), lp)
    b = topk_divergence(s, ids, lp)
    assert torch.equal(a, b)
    a.backward()
    assert lp.grad is None and s.grad is not None


@pytest.mark.parametrize("impl", ["torch", TRITON])
@pytest.mark.parametrize("clip", [None, 0.01])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", TAILS)
def test_k_equals_v_is_the_full_divergence(impl, tail, kind, clip):
    if impl == "triton" and clip is not None and not HAS_CUDA:
        pytest.skip("interpreter time: the clip specialisations are covered elsewhere")
    V = 19
    dtype = torch.float64 if impl == "torch" else torch.float32
    s, t = make_student((6,), V, 0, dtype=dtype), make_student((6,), V, 1, dtype=dtype)
    s.requires_grad_()
    tau = 1.2
    lp, ids = torch.log_softmax(t.double() / tau, -1).to(dtype).topk(V, dim=-1)
    out = topk_divergence(
        s, ids, lp, kind=kind, tail=tail, clip=clip, temperature=tau, impl=impl, beta=0.4
    )
    full = divergence(s, t, kind=kind, clip=clip, temperature=tau, impl="torch", beta=0.4)
    assert_close(out, full, dtype, "loss")
    (g1,) = torch.autograd.grad(out, s)
    (g2,) = torch.autograd.grad(full, s)
    assert_close(g1, g2, dtype, "grad")


@pytest.mark.parametrize("impl", ["torch", TRITON])
def test_exact_special_values(impl):
    V = 6
    dtype = torch.float64 if impl == "torch" else torch.float32
    s = torch.randn(4, V, generator=torch.Generator().manual_seed(0), dtype=dtype)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [1, 2]])
    # row 0: teacher mass exactly 1 on its ids (rT = 0) -> reverse KL bucket is +inf (the
    # student has rest mass); row 1: all padding -> 0; row 2: a banned student token (-inf
    # logit) among the ids -> forward KL +inf; row 3: banned tokens in the complement are
    # exact zeros
    lp = torch.tensor([[0.0, -INF], [-INF, -INF], [math.log(0.3), -1.0], [-0.5, -2.0]], dtype=dtype)
    s[2, 4] = -INF
    s[3, 3:] = -INF
    s, ids, lp = s.to(DEVICE), ids.to(DEVICE), lp.to(DEVICE)
    rev = topk_divergence(s, ids, lp, kind="reverse_kl", reduction="none", impl=impl)
    fwd = topk_divergence(s, ids, lp, kind="forward_kl", reduction="none", impl=impl)
    ref_rev = topk_divergence_reference(
        s.cpu(), ids.cpu(), lp.cpu(), kind="reverse_kl", reduction="none"
    )
    ref_fwd = topk_divergence_reference(
        s.cpu(), ids.cpu(), lp.cpu(), kind="forward_kl", reduction="none"
    )
    assert rev[0] == INF and ref_rev[0] == INF
    assert rev[1] == 0 and fwd[1] == 0
    assert fwd[2] == INF and ref_fwd[2] == INF
    assert_close(fwd[[0, 1, 3]], ref_fwd[[0, 1, 3]], dtype, "forward")
    assert_close(rev[1:], ref_rev[1:], dtype, "reverse")
    # gradients of the finite rows are finite and match
    s.requires_grad_()
    out = topk_divergence(s, ids, lp, kind="forward_kl", reduction="none", impl=impl)
    (g,) = torch.autograd.grad(out[3], s)
    s_ref = s.detach().cpu().double().requires_grad_()
    ref = topk_divergence_reference(s_ref, ids.cpu(), lp.cpu(), reduction="none")
    (g_ref,) = torch.autograd.grad(ref[3], s_ref)
    assert_close(g, g_ref, dtype, "grad")


# --------------------------------------------------------------------------- fused linear


def linear_inputs(lead, H, V, K, dtype, seed=0, bias=False, peaked=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * ((8.0 if peaked else 2.0) / H**0.5)
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    ids, lp = make_teacher(lead, V, K, seed, student=h @ w.T)
    x = dict(student_hidden=h, weight=w) | ({"bias": b} if bias else {})
    return {k: v.to(dtype).to(DEVICE) for k, v in x.items()}, ids, lp


def check_linear_case(
    impl,
    *,
    lead=(2, 5),
    H=16,
    V=41,
    K=4,
    dtype=torch.float32,
    kind="forward_kl",
    tail="bucket",
    temperature=1.1,
    clip=None,
    masked=False,
    reduction="mean",
    bias=False,
    frozen=False,
    chunk_size=3,
    seed=0,
    peaked=False,
    **options,
):
    x, ids, lp = linear_inputs(lead, H, V, K, dtype, seed, bias, peaked)
    mask = make_mask(lead, seed, DEVICE) if masked else None
    if masked:
        x["student_hidden"][~mask] = math.nan
        lp[~mask] = math.nan
    trainable = ["student_hidden"] + ([] if frozen else ["weight"]) + (["bias"] if bias else [])
    for k in trainable:
        x[k].requires_grad_()
    opts = dict(
        kind=kind, tail=tail, temperature=temperature, clip=clip, reduction=reduction, **options
    )
    out = fused_linear_topk_divergence(
        **x,
        teacher_ids=ids,
        teacher_logprobs=lp,
        mask=mask,
        impl=impl,
        chunk_size=chunk_size,
        **opts,
    )
    ref_in = {k: v.detach().double().cpu().requires_grad_(k in trainable) for k, v in x.items()}
    ref = fused_linear_topk_divergence_reference(
        **ref_in,
        teacher_ids=ids.cpu(),
        teacher_logprobs=lp.cpu(),
        mask=None if mask is None else mask.cpu(),
        **opts,
    )
    assert_close(out, ref, dtype, "loss")
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (out * up.to(out)).sum().backward()
    (ref * up).sum().backward()
    for k in trainable:
        assert x[k].grad.dtype == x[k].dtype
        assert_close(x[k].grad, ref_in[k].grad, dtype, f"d {k}")
    if frozen:
        assert x["weight"].grad is None


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", TAILS)
def test_linear_float64_grid(tail, kind, reduction):
    check_linear_case(
        "torch",
        dtype=torch.float64,
        kind=kind,
        tail=tail,
        reduction=reduction,
        masked=True,
        bias=True,
        clip=0.03 if kind == "forward_kl" else None,
    )


@pytest.mark.parametrize("impl", ["torch", TRITON])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tail", TAILS)
def test_linear_dtypes(impl, dtype, tail):
    check_linear_case(impl, dtype=dtype, tail=tail, masked=True, reduction="none", clip=0.05)


@pytest.mark.parametrize("impl", ["torch", TRITON])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_frozen_bias_peaked(impl, reduction):
    check_linear_case(
        impl,
        reduction=reduction,
        frozen=True,
        bias=True,
        kind="reverse_kl",
        peaked=True,
        chunk_size=4,
    )
    check_linear_case(
        impl, reduction=reduction, bias=True, tail="renormalize", peaked=True, chunk_size=None
    )


@pytest.mark.parametrize("impl", ["torch", TRITON])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_linear_k1_is_the_token_nll(impl, dtype):
    """K = 1, teacher log-prob 0, bucket, forward KL, "none": exactly -log p_S(token)
    per token, with the gradients of -log_softmax(h W^T)[token] under any upstream."""
    if impl == "triton" and dtype == torch.float64:
        pytest.skip("float64 runs on the torch path")
    lead, H, V = (3, 7), 12, 29
    x, _, _ = linear_inputs(lead, H, V, 1, dtype, seed=4, bias=True)
    tokens = torch.randint(0, V, (*lead, 1), generator=torch.Generator().manual_seed(1))
    tokens = tokens.to(DEVICE)
    mask = make_mask(lead, 2, DEVICE)
    for v in x.values():
        v.requires_grad_()
    nll = fused_linear_topk_divergence(
        **x,
        teacher_ids=tokens,
        teacher_logprobs=torch.zeros(*lead, 1, device=DEVICE),
        mask=mask,
        reduction="none",
        impl=impl,
        chunk_size=5,
    )
    ref_in = {k: v.detach().double().cpu().requires_grad_() for k, v in x.items()}
    logits = ref_in["student_hidden"] @ ref_in["weight"].T + ref_in["bias"]
    ref = -torch.log_softmax(logits, -1).gather(-1, tokens.cpu())[..., 0]
    ref = torch.where(mask.cpu(), ref, torch.zeros_like(ref))
    assert_close(nll, ref, dtype, "nll")
    up = torch.randn(lead, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    (nll * up.to(nll)).sum().backward()
    (ref * up).sum().backward()
    for k in x:
        assert_close(x[k].grad, ref_in[k].grad, dtype, f"d {k}")


def test_linear_fp16_loss_scaling():
    """fp16 with a GradScaler-like factor: gradients of ~1e-9 per entry survive (no fp16
    buffer holds a gradient before the upstream factor is applied)."""
    N, H, V = 4096, 16, 64
    x, ids, lp = linear_inputs((N,), H, V, 4, torch.float16, seed=3)
    for v in x.values():
        v.requires_grad_()
    loss = fused_linear_topk_divergence(**x, teacher_ids=ids, teacher_logprobs=lp, chunk_size=1024)
    (loss * 65536).backward()
    ref_in = {k: v.detach().double().cpu().requires_grad_() for k, v in x.items()}
    ref = fused_linear_topk_divergence_reference(
        **ref_in, teacher_ids=ids.cpu(), teacher_logprobs=lp.cpu()
    )
    (ref * 65536).backward()
    for k in x:
        g, r = x[k].grad.double().cpu(), ref_in[k].grad
        assert (g - r).norm() <= 1e-2 * r.norm(), k
        assert (g != 0).float().mean() > 0.99, f"{k}: gradient entries flushed to zero"


@pytest.mark.parametrize(
    "dtype, eps, tail",
    [
        (torch.bfloat16, 0.1, "bucket"),
        (torch.bfloat16, 0.01, "bucket"),
        (torch.float16, 0.01, "bucket"),
        (torch.bfloat16, 0.01, "renormalize"),
        (torch.float16, 0.1, "renormalize"),
    ],
)
def test_linear_precision_near_agreement(dtype, eps, tail):
    """The OPSD regime (the precision issue): teacher = student hidden + eps noise, logits
    of std ~4, 16-bit operands. Against float64 on the same 16-bit values: loss rel <=
    5e-4, gradients rel <= 1% (float32 chunk logits; 16-bit logits would fail this)."""
    g = torch.Generator().manual_seed(0)
    N, H, V, K = 256, 128, 2048, 20
    h = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * (4 / H**0.5)).to(dtype)
    h_t = h.double() + eps * torch.randn(N, H, generator=g, dtype=torch.float64)
    lp, ids = torch.log_softmax(h_t @ w.double().T / 1.1, -1).topk(K, -1)
    lp = lp.float()
    a, b = h.clone().to(DEVICE).requires_grad_(), w.clone().to(DEVICE).requires_grad_()
    out = fused_linear_topk_divergence(
        a, b, ids.to(DEVICE), lp.to(DEVICE), temperature=1.1, tail=tail
    )
    out.backward()
    ra, rb = h.double().requires_grad_(), w.double().requires_grad_()
    ref = fused_linear_topk_divergence_reference(ra, rb, ids, lp, temperature=1.1, tail=tail)
    ref.backward()
    assert abs(float(out.detach()) - float(ref.detach())) <= 5e-4 * abs(float(ref.detach()))
    for x, r in ((a.grad, ra.grad), (b.grad, rb.grad)):
        assert (x.double().cpu() - r).norm() <= 1e-2 * r.norm()


def test_linear_never_forms_full_logits():
    N, H, V, K = 1024, 16, 512, 8
    x, ids, lp = linear_inputs((N,), H, V, K, torch.float32, seed=1)
    x["student_hidden"].requires_grad_()
    with PeakMemory() as pm:
        loss = fused_linear_topk_divergence(
            **x, teacher_ids=ids, teacher_logprobs=lp, chunk_size=64
        )
        loss.backward()
    full = N * V * 4
    # one chunk of logits plus its temporaries, O(N*K) teacher rows, the (N, H) gradient
    assert pm.peak_bytes < full / 3, (pm.peak_bytes, full)


def test_linear_renormalize_reads_only_k_rows():
    N, H, V, K = 256, 16, 20000, 4
    x, ids, lp = linear_inputs((N,), H, V, K, torch.float32, seed=2)
    x["student_hidden"].requires_grad_()
    with PeakMemory() as pm:
        loss = fused_linear_topk_divergence(
            **x, teacher_ids=ids, teacher_logprobs=lp, tail="renormalize", chunk_size=64
        )
        loss.backward()
    assert pm.peak_bytes < N * V * 4 / 50, pm.peak_bytes  # no (chunk x V) buffer at all
    ref = fused_linear_topk_divergence(
        **x, teacher_ids=ids, teacher_logprobs=lp, tail="renormalize", chunk_size=64, impl="torch"
    )
    ref_in = {k: v.detach().double() for k, v in x.items()}
    expected = fused_linear_topk_divergence_reference(
        **ref_in, teacher_ids=ids, teacher_logprobs=lp, tail="renormalize"
    )
    assert_close(ref, expected, torch.float32, "loss")


def test_linear_second_backward_is_an_error():
    x, ids, lp = linear_inputs((4,), 8, 30, 3, torch.float32)
    x["student_hidden"].requires_grad_()
    loss = fused_linear_topk_divergence(**x, teacher_ids=ids, teacher_logprobs=lp)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


def test_modules():
    from opsd_kernels.modules import FusedLinearTopkDivergence, TopkDivergence

    s = make_student((4,), 20)
    ids, lp = make_teacher((4,), 20, 3, student=s)
    m = TopkDivergence(kind="reverse_kl", tail="renormalize", clip=0.1)
    assert torch.equal(
        m(s, ids, lp), topk_divergence(s, ids, lp, kind="reverse_kl", tail="renormalize", clip=0.1)
    )
    head = torch.nn.Linear(8, 20, bias=False)
    h = torch.randn(4, 8)
    f = FusedLinearTopkDivergence(temperature=1.1)
    assert torch.equal(
        f(h, head.weight, ids, lp),
        fused_linear_topk_divergence(h, head.weight, ids, lp, temperature=1.1),
    )
    assert "tail='bucket'" in repr(f)
    with pytest.raises(ValueError, match="tail"):
        TopkDivergence(tail="rest")


# --------------------------------------------------------------------------- bad input

S = torch.randn(2, 10)
IDS = torch.tensor([[1, 2, 3], [4, 5, 6]])
LP = torch.log(torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.3, 0.3]]))


@pytest.mark.parametrize(
    "ids, lp, exc, words",
    [
        (IDS.float(), LP, TypeError, "teacher_ids.*int64"),
        (IDS, LP.long(), TypeError, "teacher_logprobs.*floating"),
        (IDS[:, :2], LP, ValueError, "same shape"),
        (IDS[:1], LP[:1], ValueError, r"teacher_ids must have shape \(\*\(2,\), K\)"),
        (IDS[:, :0], LP[:, :0], ValueError, "K = 0"),
        (torch.tensor([[1, 2, 10], [4, 5, 6]]), LP, ValueError, r"\[0, V=10\).*row 0.*entry 2"),
        (torch.tensor([[1, 2, 3], [-1, 5, 6]]), LP, ValueError, r"\[0, V=10\).*row 1"),
        (
            IDS,
            LP.clone().index_put_((torch.tensor(1), torch.tensor(0)), torch.tensor(0.1)),
            ValueError,
            "<= 0.*row 1",
        ),
        (
            IDS,
            torch.log(torch.tensor([[0.5, 0.4, 0.2], [0.3, 0.3, 0.3]])),
            ValueError,
            "sum.*at most 1.*row 0",
        ),
        (torch.tensor([[1, 2, 3], [4, 6, 4]]), LP, ValueError, "distinct.*row 1"),
    ],
)
def test_bad_teacher(ids, lp, exc, words):
    with pytest.raises(exc, match=words):
        topk_divergence(S, ids, lp)
    with pytest.raises(exc, match=words):
        fused_linear_topk_divergence(torch.randn(2, 4), torch.randn(10, 4), ids, lp)


def test_padding_is_exempt_and_masked_rows_unchecked():
    ids = torch.tensor([[1, 2, 2], [4, 5, 99]])
    lp = torch.tensor([[-1.0, -2.0, -INF], [-1.0, -2.0, -INF]])  # junk ids in padding
    assert torch.isfinite(topk_divergence(S, ids, lp))
    bad = torch.tensor([[1, 1, 99], [4, 5, 6]])  # row 0 invalid but masked
    out = topk_divergence(
        S,
        bad,
        torch.tensor([[0.5, 1.0, 0.0], [-1.0, -2.0, -3.0]]),
        mask=torch.tensor([False, True]),
        reduction="none",
    )
    assert out[0] == 0 and torch.isfinite(out[1])


def test_unvalidated_bad_rows_are_nan():
    ids = torch.tensor([[1, 2, 2], [4, 5, 6]])  # row 0 repeats an id
    s = S.clone().requires_grad_()
    out = topk_divergence(s, ids, LP, reduction="none", validate=False)
    assert torch.isnan(out[0]) and torch.isfinite(out[1])
    out.sum().backward()
    assert torch.isnan(s.grad[0]).all() and torch.isfinite(s.grad[1]).all()
    h = torch.randn(2, 4, requires_grad=True)
    loss = fused_linear_topk_divergence(h, torch.randn(10, 4), ids, LP, validate=False)
    assert torch.isnan(loss)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(tail="rest"), ValueError, "tail"),
        (dict(kind="kl"), ValueError, "kind"),
        (dict(clip=0.0), ValueError, "clip"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(mask=torch.ones(3, dtype=torch.bool)), ValueError, "mask"),
        (dict(validate=1), TypeError, "validate"),
        (dict(impl="fused"), ValueError, "impl"),
    ],
)
def test_bad_options(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        topk_divergence(S, IDS, LP, **kwargs)


def test_bad_linear_shapes():
    with pytest.raises(ValueError, match="hidden size"):
        fused_linear_topk_divergence(torch.randn(2, 5), torch.randn(10, 4), IDS, LP)
    with pytest.raises(ValueError, match="bias"):
        fused_linear_topk_divergence(
            torch.randn(2, 4), torch.randn(10, 4), IDS, LP, bias=torch.randn(9)
        )
    with pytest.raises(ValueError, match="fused"):
        fused_linear_topk_divergence(torch.randn(2, 4), torch.randn(10, 4), IDS, LP, impl="fused")
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_topk_divergence(torch.randn(2, 4), torch.randn(10, 4), IDS, LP, chunk_size=0)


COMPILE_SCRIPT = """
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from opsd_kernels.triton.topk_rows import _topk_rows_kernel as k

types = ["*fp32"] * 8 + ["i64", "i32", "i32", "i32", "i32", "i32"] + ["fp32"] * 7
done = []
# every branch at least once: each kind, both tails, clip, with and without gradient
cases = [(0, True, False, True), (1, True, True, True), (2, False, True, True),
         (0, True, False, False)]
for kind, bucket, clip, grad in cases:
    consts = dict(KIND=kind, BUCKET=bucket, HAS_CLIP=clip, TOKEN=False, KEEP=False,
                  S_SOFTCAP=False, HAS_STATS=False, GRAD=grad, BLOCK_V=4096, BLOCK_K=32)
    sig = dict(zip(k.arg_names, types + ["constexpr"] * len(consts)))
    out = triton.compile(ASTSource(fn=k, signature=sig, constexprs=consts),
                         target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert out.asm["ptx"]
    done.append([kind, bucket, clip, grad])
print(json.dumps(done))
"""


def test_row_kernel_compiles_for_sm90():
    """The interpreter accepts code the compiler rejects: compile for an H100 target."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0 and "GPUTarget" in proc.stderr and "ImportError" in proc.stderr:
        pytest.skip("this Triton build cannot compile ahead of time")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(json.loads(proc.stdout.strip().splitlines()[-1])) == 4
