"""divergence on logits: every impl against the naive, compiled and Liger anchors.

Logits (N, V) for the preset's vocabulary; modes ``fwd`` (no grad) and
``fwdbwd`` (gradient to the student logits). No GEMM is involved, so the report
gives the achieved bandwidth (bytes of logits read and gradient written per
second) instead of a flop rate.
"""

from __future__ import annotations

import baselines
import harness
import pytest
import torch

import opsd_kernels

IMPLS = harness.IMPLS["divergence"]


def _inputs(shape, dtype, device, mode):
    g = torch.Generator(device=device).manual_seed(4321)
    n, v = shape.tokens, shape.vocab
    s = (2.0 * torch.randn(n, v, generator=g, device=device)).to(dtype)
    t = (s.float() + torch.randn(n, v, generator=g, device=device)).to(dtype)
    s.requires_grad_(mode == "fwdbwd")
    return s, t


def _loss_fn(impl, cfg):
    o = cfg.options()
    if impl in harness.OUR_IMPLS:
        return lambda s, t: opsd_kernels.divergence(s, t, impl=impl, **o)
    if impl == "naive":
        return lambda s, t: baselines.naive_divergence(s, t, **o)
    if impl == "compiled":
        return lambda s, t: baselines.compiled_chunked_logits(s, t, chunk=cfg.compile_chunk, **o)
    if impl == "liger-kldiv":
        return baselines.liger_kldiv(cfg.temperature)
    if impl == "liger-jsd":
        return baselines.liger_jsd(cfg.kind, cfg.beta, cfg.temperature)
    raise AssertionError(impl)


def _skip_reason(impl, cfg, device) -> str | None:
    if not cfg.wants(impl):
        return "not selected (--impls)"
    if impl == "triton" and device.type != "cuda":
        return "impl=triton needs CUDA (the interpreter is too slow to time)"
    if impl.startswith("liger") and not baselines.liger_available():
        return "Liger-Kernel needs CUDA and the liger-kernel package"
    if impl == "liger-kldiv" and cfg.kind != "forward_kl":
        return "LigerKLDIVLoss computes forward KL only"
    return None


@pytest.mark.parametrize("mode", ("fwd", "fwdbwd"))
@pytest.mark.parametrize("impl", IMPLS)
def test_divergence(benchmark, bench_cfg, device, shape, impl, mode):
    reason = _skip_reason(impl, bench_cfg, device)
    if reason:
        pytest.skip(reason)
    s, t = _inputs(shape, bench_cfg.dtype, device, mode)
    loss_fn = _loss_fn(impl, bench_cfg)
    if impl in harness.OUR_IMPLS and shape.tokens <= 4096:
        n = min(256, shape.tokens)
        with torch.no_grad():
            ours = loss_fn(s[:n], t[:n]).float()
            ref = baselines.naive_divergence(s[:n], t[:n], **bench_cfg.options())
        tol = 1e-4 if s.dtype == torch.float32 else 1e-2
        assert torch.allclose(ours, ref, rtol=tol, atol=tol), (float(ours), float(ref))

    def fn():
        loss = loss_fn(s, t)
        if mode == "fwdbwd":
            loss.backward()

    def setup():
        s.grad = None

    elt = s.element_size()
    moved = (2 + (mode == "fwdbwd")) * shape.tokens * shape.vocab * elt
    record = {
        "op": "divergence",
        "preset": shape.preset,
        "hidden": shape.hidden,
        "vocab": shape.vocab,
        "tokens": shape.tokens,
        "dtype": str(bench_cfg.dtype)[6:],
        "mode": mode,
        "weight": "-",
        "impl": impl,
        **bench_cfg.options(),
        "flops": 0.0,
        "bytes_moved": moved,
        "input_bytes": harness.tensor_bytes(s, t),
    }
    harness.measure_case(benchmark, record, fn, setup, device, bench_cfg, impl, mode, shape)
