"""fused_linear_divergence: every impl against the naive, compiled and Liger anchors.

Per shape (preset H, V and a token count N) and mode:

* ``fwd``: the loss only; no input requires grad (evaluation);
* ``fwdbwd`` with a ``frozen`` lm_head (LoRA): gradient to the student hidden
  states only;
* ``fwdbwd`` with a ``trainable`` lm_head: gradients to hidden states and weight.

The teacher shares the student's lm_head (self-distillation). Necessary flops:
4NHV for the two logits GEMMs, plus 2NHV for dh, plus 2NHV for dW.
"""

from __future__ import annotations

import baselines
import harness
import pytest
import torch

import opsd_kernels

IMPLS = harness.IMPLS["fused_linear"]
MODES = (("fwd", "-"), ("fwdbwd", "frozen"), ("fwdbwd", "trainable"))


def _flops(shape: harness.Shape, mode: str, weight: str) -> float:
    nhv = float(shape.tokens) * shape.hidden * shape.vocab
    if mode == "fwd":
        return 4 * nhv
    return (8 if weight == "trainable" else 6) * nhv


def _inputs(shape, dtype, device, mode, weight):
    g = torch.Generator(device=device).manual_seed(1234)
    n, h, v = shape.tokens, shape.hidden, shape.vocab

    def randn(*size):  # drawn on the device: fast at real model shapes
        return torch.randn(*size, generator=g, device=device)

    # random (never zeros), the teacher near the student, logits with a std of about 2
    h_s = randn(n, h).to(dtype)
    h_t = (h_s.float() + 0.5 * randn(n, h)).to(dtype)
    w = (randn(v, h) * (2.0 / h**0.5)).to(dtype)
    h_s.requires_grad_(mode == "fwdbwd")
    w.requires_grad_(mode == "fwdbwd" and weight == "trainable")
    return h_s, h_t, w


def _loss_fn(impl, cfg, chunk):
    o = cfg.options()
    if impl in harness.OUR_IMPLS:
        return lambda hs, ht, w: opsd_kernels.fused_linear_divergence(hs, ht, w, impl=impl, **o)
    if impl == "naive":
        return lambda hs, ht, w: baselines.naive_linear(hs, ht, w, **o)
    if impl == "compiled":
        return lambda hs, ht, w: baselines.compiled_chunked_linear(hs, ht, w, chunk=chunk, **o)
    if impl == "liger-fljsd":
        return baselines.liger_fused_linear_jsd(cfg.kind, cfg.beta, cfg.temperature)
    if impl == "liger-fljsd-loss":
        return baselines.liger_fused_linear_jsd_loss(cfg.kind, cfg.beta, cfg.temperature)
    raise AssertionError(impl)


def _skip_reason(impl, cfg, device) -> str | None:
    if not cfg.wants(impl):
        return "not selected (--impls)"
    if impl in ("triton", "fused") and device.type != "cuda":
        return f"impl={impl} needs CUDA (the interpreter is too slow to time)"
    if impl.startswith("liger") and not baselines.liger_available():
        return "Liger-Kernel needs CUDA and the liger-kernel package"
    if impl.startswith("liger") and cfg.kind == "jsd" and cfg.beta in (0.0, 1.0):
        return "beta 0/1 is a KL kind"
    return None


@pytest.mark.parametrize("mode,weight", MODES, ids=["fwd", "fwdbwd-frozen", "fwdbwd-trainable"])
@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear(benchmark, bench_cfg, device, shape, impl, mode, weight):
    reason = _skip_reason(impl, bench_cfg, device)
    if reason:
        pytest.skip(reason)
    h_s, h_t, w = _inputs(shape, bench_cfg.dtype, device, mode, weight)
    loss_fn = _loss_fn(impl, bench_cfg, bench_cfg.compile_chunk)
    if impl == "fused":  # being added: run only when the API accepts it
        try:
            with torch.no_grad():
                loss_fn(h_s[:2], h_t[:2], w)
        except ValueError as exc:
            if "impl" in str(exc):
                pytest.skip(f"impl='fused' not available: {exc}")
            raise
    if impl in harness.OUR_IMPLS and shape.tokens <= 4096:
        _check_against_naive(loss_fn, h_s, h_t, w, bench_cfg)

    def fn():
        loss = loss_fn(h_s, h_t, w)
        if mode == "fwdbwd":
            loss.backward()
        return None

    def setup():
        h_s.grad = None
        w.grad = None

    record = {
        "op": "fused_linear",
        "preset": shape.preset,
        "hidden": shape.hidden,
        "vocab": shape.vocab,
        "tokens": shape.tokens,
        "dtype": str(bench_cfg.dtype)[6:],
        "mode": mode,
        "weight": weight,
        "impl": impl,
        **bench_cfg.options(),
        "flops": _flops(shape, mode, weight),
        "input_bytes": harness.tensor_bytes(h_s, h_t, w),
    }
    if impl.startswith("liger"):
        record["note"] = "no per-entry clip in Liger: unclipped loss" if bench_cfg.clip else ""
    estimate = None
    if impl == "naive":  # measured on CPU: 7 fp32 N x V tensors at the peak of fwd+bwd
        estimate = 8 * 4 * shape.tokens * shape.vocab
    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
        harness.measure(
            benchmark,
            record,
            fn,
            setup,
            device,
            bench_cfg.rounds,
            estimate,
            warmup=device.type == "cuda" or impl == "compiled",
        )


def _check_against_naive(loss_fn, h_s, h_t, w, cfg):
    """Correctness before timing: the loss matches the float32 naive path on a slice."""
    n = min(256, h_s.shape[0])
    with torch.no_grad():
        ours = loss_fn(h_s[:n], h_t[:n], w).float()
        ref = baselines.naive_linear(h_s[:n], h_t[:n], w, **cfg.options())
    tol = 1e-4 if h_s.dtype == torch.float32 else 2e-2
    assert torch.allclose(ours, ref, rtol=tol, atol=tol), (float(ours), float(ref))
