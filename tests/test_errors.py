"""Bad input gets a clear error naming the argument."""

import pytest
import torch

from opsd_kernels import Divergence, divergence, fused_linear_divergence, generalized_jsd

S = torch.randn(3, 10)
T = torch.randn(3, 10)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(kind="kl"), ValueError, "kind"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(kind="jsd", beta=0.0), ValueError, "beta"),
        (dict(kind="jsd", beta=1.0), ValueError, "beta"),
        (dict(kind="jsd", beta=1.5), ValueError, "beta"),
        (dict(beta="x"), TypeError, "beta"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(clip=0.0), ValueError, "clip"),
        (dict(clip=-0.1), ValueError, "clip"),
        (dict(clip="0.1"), TypeError, "clip"),
        (dict(mask=torch.ones(3)), TypeError, "mask"),
        (dict(mask=torch.ones(4, dtype=torch.bool)), ValueError, "mask"),
        (dict(mask=[True] * 3), TypeError, "mask"),
        (dict(impl="cuda"), ValueError, "impl"),
    ],
)
def test_bad_options(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        divergence(S, T, **kwargs)


def test_bad_tensors():
    with pytest.raises(ValueError, match="same shape"):
        divergence(S, torch.randn(3, 11))
    with pytest.raises(TypeError, match="student_logits.*floating"):
        divergence(S.long(), T)
    with pytest.raises(TypeError, match="teacher_logits.*floating"):
        divergence(S, T.int())
    with pytest.raises(TypeError, match="student_logits.*torch.Tensor"):
        divergence(S.tolist(), T)
    with pytest.raises(ValueError, match="empty vocabulary"):
        divergence(torch.randn(3, 0), torch.randn(3, 0))
    with pytest.raises(ValueError, match="at least one dimension"):
        divergence(torch.tensor(1.0), torch.tensor(1.0))
    meta = torch.randn(3, 10, device="meta")
    with pytest.raises(ValueError, match="teacher_logits is on"):
        divergence(S, meta)


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="kind"):
        Divergence(kind="tvd")


def test_generalized_jsd_errors():
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(S, T, beta=1.5)
    with pytest.raises(ValueError, match="reduction"):
        generalized_jsd(S, T, reduction="avg")
    with pytest.raises(ValueError, match="labels must be a tensor of shape"):
        generalized_jsd(S, T, labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        generalized_jsd(S, T, temperature=0.0)
    with pytest.raises(TypeError, match="logits_are_probs"):
        generalized_jsd(S, T, logits_are_probs="yes")
    with pytest.raises(TypeError, match="num_items_in_batch"):
        generalized_jsd(S, T, num_items_in_batch="7")
    with pytest.raises(ValueError, match="same shape"):
        generalized_jsd(S, T[:, :9])
    with pytest.raises(TypeError, match="student_logits"):
        generalized_jsd(S.long(), T)


H = torch.randn(3, 8)
W = torch.randn(10, 8)


@pytest.mark.parametrize(
    "args, kwargs, exc, words",
    [
        ((H, torch.randn(4, 8), W), {}, ValueError, "leading shape"),
        ((H, H, torch.randn(10, 9)), {}, ValueError, "hidden size"),
        ((H, H, torch.randn(10)), {}, ValueError, "weight must have shape"),
        ((H, H, torch.randn(0, 8)), {}, ValueError, "empty vocabulary"),
        ((H, torch.randn(3, 5), W), {}, ValueError, "teacher_weight for a teacher"),
        (
            (H, torch.randn(3, 5), W),
            dict(teacher_weight=torch.randn(10, 6)),
            ValueError,
            "teacher_weight must have shape",
        ),
        ((H, H, W), dict(teacher_bias=torch.randn(10)), ValueError, "teacher_bias"),
        ((H, H, W), dict(bias=torch.randn(11)), ValueError, "bias must have shape"),
        ((H, H, W.half()), dict(impl="fused"), TypeError, "one dtype"),
        ((H, H, W.double()), dict(impl="triton"), TypeError, "float64"),
        ((H, H, W), dict(chunk_size=0), ValueError, "chunk_size"),
        ((H, H, W), dict(chunk_size=2.5), ValueError, "chunk_size"),
        ((H, H, W), dict(mask=torch.ones(3)), TypeError, "mask"),
        ((H, H, W), dict(kind="jsd", beta=2.0), ValueError, "beta"),
        ((H.long(), H, W), {}, TypeError, "student_hidden"),
        ((H, H, W), dict(impl="fast"), ValueError, "impl"),
    ],
)
def test_fused_linear_bad_input(args, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        fused_linear_divergence(*args, **kwargs)


def test_fused_linear_device_mismatch():
    with pytest.raises(ValueError, match="weight is on"):
        fused_linear_divergence(H, H, W.to("meta"))


def test_zero_hidden_size():
    with pytest.raises(ValueError, match="hidden size > 0"):
        fused_linear_divergence(torch.randn(3, 0), torch.randn(3, 0), torch.randn(10, 0))
