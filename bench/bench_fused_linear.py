"""fused_linear_divergence: every impl against the naive, compiled, Liger and TRL anchors.

Per shape (preset H, V and a token count N) and mode:

* ``fwd``: the loss only; no input requires grad (evaluation);
* ``fwdbwd`` with a ``frozen`` lm_head (LoRA): gradient to the student hidden
  states only;
* ``fwdbwd`` with a ``trainable`` lm_head: gradients to hidden states and weight.

The teacher shares the student's lm_head (self-distillation). Necessary flops:
4NHV for the two logits GEMMs, plus 2NHV for dh, plus 2NHV for dW.

A preset with a final-logit soft cap (``gemma2-2b``: 30, ``harness.PRESET_SOFTCAP``)
passes ``softcap=`` to our impls, the naive and compiled paths and TRL's kernel;
Liger cannot cap and is skipped there, with the reason.

Our impls are ``harness.OUR_IMPLS``: ``torch``, ``triton``, ``fused`` (deterministic
backward) and ``fused-onepass`` (``impl="fused", deterministic=False``: one backward
kernel with float32 atomics). ``fused-onepass`` has no ``fwd`` rows: its forward
is ``fused``'s. Before timing, every case of ours and of TRL's kernel
(``harness.CHECKED_IMPLS``) is checked on a 256-token slice against the float32
naive loss on the same (upcast) values, and in ``fwdbwd`` its gradients too
(relative Frobenius error). TRL's kernel has no clip: it is checked against the
unclipped naive loss.
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


def _options(cfg, softcap=None) -> dict:
    """The loss options of a case: the run's, plus ``softcap`` when the preset caps."""
    return {**cfg.options(), **({} if softcap is None else {"softcap": softcap})}


def _loss_fn(impl, cfg, chunk, softcap=None):
    o = _options(cfg, softcap)
    if impl in harness.OUR_IMPLS:
        args = harness.api_args(impl)
        return lambda hs, ht, w: opsd_kernels.fused_linear_divergence(hs, ht, w, **args, **o)
    if impl == "naive":
        return lambda hs, ht, w: baselines.naive_linear(hs, ht, w, **o)
    if impl == "compiled":
        return lambda hs, ht, w: baselines.compiled_chunked_linear(hs, ht, w, chunk=chunk, **o)
    if impl == "trl-chunked":
        return baselines.trl_chunked_divergence(cfg.kind, cfg.beta, cfg.temperature, softcap)
    if impl == "liger-fljsd":
        return baselines.liger_fused_linear_jsd(cfg.kind, cfg.beta, cfg.temperature)
    if impl == "liger-fljsd-loss":
        return baselines.liger_fused_linear_jsd_loss(cfg.kind, cfg.beta, cfg.temperature)
    raise ValueError(f"unknown fused_linear impl {impl!r}; known: {IMPLS}")


def _skip_reason(impl, cfg, device, mode="fwdbwd", softcap=None) -> str | None:
    if not cfg.wants(impl):
        return "not selected (--impls)"
    if impl in harness.TRITON_IMPLS and device.type != "cuda":
        return f"impl={impl} needs CUDA (the interpreter is too slow to time)"
    if mode == "fwd" and impl in harness.SAME_FORWARD_AS:
        return f"impl={impl} runs the forward of {harness.SAME_FORWARD_AS[impl]}: see its fwd row"
    if impl.startswith("liger") and softcap is not None:
        return f"Liger-Kernel has no final-logit soft cap (this preset caps at {softcap:g})"
    if impl.startswith("liger") and not baselines.liger_available():
        return "Liger-Kernel needs CUDA and the liger-kernel package"
    if impl.startswith("liger") and cfg.kind == "jsd" and cfg.beta in (0.0, 1.0):
        return "beta 0/1 is a KL kind"
    if impl.startswith("trl") and not baselines.trl_available():
        return baselines.trl_kernel()[1]
    return None


@pytest.mark.parametrize("mode,weight", MODES, ids=["fwd", "fwdbwd-frozen", "fwdbwd-trainable"])
@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear(benchmark, bench_cfg, device, shape, impl, mode, weight):
    reason = _skip_reason(impl, bench_cfg, device, mode, shape.softcap)
    if reason:
        pytest.skip(reason)
    h_s, h_t, w = _inputs(shape, bench_cfg.dtype, device, mode, weight)
    loss_fn = _loss_fn(impl, bench_cfg, bench_cfg.compile_chunk, shape.softcap)
    if impl in harness.CHECKED_IMPLS:
        clip = None if impl in harness.NO_CLIP else bench_cfg.clip
        try:
            _check_against_naive(loss_fn, h_s, h_t, w, bench_cfg, softcap=shape.softcap, clip=clip)
        except NotImplementedError as exc:  # an impl that refuses an option (e.g. the cap)
            pytest.skip(f"impl={impl} refuses these options: {exc}")

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
        "softcap": shape.softcap,
        # e.g. deterministic=False for fused-onepass
        **{k: v for k, v in harness.OUR_IMPL_ARGS.get(impl, {}).items() if k != "impl"},
        "flops": _flops(shape, mode, weight),
        "input_bytes": harness.tensor_bytes(h_s, h_t, w),
    }
    if impl.startswith("trl"):
        record["trl"] = baselines.trl_kernel()[1]
    harness.measure_case(benchmark, record, fn, setup, device, bench_cfg, impl, mode, shape)


def _rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref).norm() / ref.norm().clamp_min(1e-30))


_SAME = object()


def _check_against_naive(loss_fn, h_s, h_t, w, cfg, n: int = 256, softcap=None, clip=_SAME):
    """Correctness before timing, on the first ``n`` tokens: the loss, and the gradients
    of whatever requires grad (``h_s``; ``w`` when trainable), match the naive path
    in float32 on the same values (16-bit inputs upcast), soft-capped at ``softcap``
    and clipped at ``clip`` (default: the run's clip; None for an impl without one).
    Gradients are compared by relative Frobenius error; nothing is written to ``.grad``.
    """
    opts = _options(cfg, softcap)
    if clip is not _SAME:
        opts["clip"] = clip
    n = min(n, h_s.shape[0])
    tol = 1e-4 if h_s.dtype == torch.float32 else 2e-2
    grad_tol = 1e-3 if h_s.dtype == torch.float32 else 2e-2
    hs = h_s[:n].detach().requires_grad_(h_s.requires_grad)
    ht = h_t[:n].detach()
    hs_ref = hs.detach().float().requires_grad_(hs.requires_grad)
    w_ref = w.detach().float().requires_grad_(w.requires_grad)
    pairs = [
        (name, x, x_ref)
        for name, x, x_ref in (("d(hidden)", hs, hs_ref), ("d(weight)", w, w_ref))
        if x.requires_grad
    ]
    with torch.enable_grad() if pairs else torch.no_grad():
        ours = loss_fn(hs, ht, w)
        ref = baselines.naive_linear(hs_ref, ht.float(), w_ref, **opts)
        ours_grads = torch.autograd.grad(ours, [x for _, x, _ in pairs]) if pairs else ()
        ref_grads = torch.autograd.grad(ref, [x for _, _, x in pairs]) if pairs else ()
    ours, ref = ours.detach().float(), ref.detach()
    assert torch.allclose(ours, ref, rtol=tol, atol=tol), ("loss", float(ours), float(ref))
    for (name, _, _), g, g_ref in zip(pairs, ours_grads, ref_grads, strict=True):
        err = _rel_error(g, g_ref)
        assert err <= grad_tol, (f"{name} relative error", err, grad_tol)
