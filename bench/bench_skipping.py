"""impl="fused" tile skipping on LM-like distributions: fraction skipped and the error.

Inputs: hidden states and an lm_head scaled so that the student's next-token
distributions have a chosen entropy (2 nats by default, like real LM outputs),
the teacher's hidden states correlated with the student's (0.8 h_S + 0.6 noise).
Two vocabulary layouts: ``gaussian`` (no structure along the vocabulary) and
``zipf`` (a frequency-like logit offset falling along the vocabulary, as in a
frequency-sorted vocabulary). For each ``skip_threshold`` the case reports the
fraction of (token block x vocabulary block) tiles the backward skips and the
relative error of the hidden and weight gradients against the exact mode
(threshold 0); the loss is exact in every mode. CUDA only, at the Qwen3-4B
shape, with timings (the Triton interpreter is far too slow for useful sizes;
``tests/test_fused.py`` checks the skipping bound at small shapes on CPU).

    pytest bench/bench_skipping.py            # on a GPU machine
"""

from __future__ import annotations

import time

import harness
import pytest
import torch

from opsd_kernels import fused_linear_divergence

HAS_CUDA = torch.cuda.is_available()
THRESHOLDS = (0.0, 1e-8, 1e-6, 1e-4)
TARGET_ENTROPY = 2.0  # nats


def _entropy(h: torch.Tensor, w: torch.Tensor, temperature: float) -> float:
    logp = torch.log_softmax((h.double() @ w.double().T) / temperature, -1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def lm_like_inputs(N, H, V, layout, dtype, device, temperature, seed=0):
    """Student/teacher hidden states and lm_head with ~TARGET_ENTROPY nats per token."""
    g = torch.Generator(device=device).manual_seed(seed)
    h_s = torch.randn(N, H, generator=g, device=device)
    h_t = 0.8 * h_s + 0.6 * torch.randn(N, H, generator=g, device=device)
    w = torch.randn(V, H, generator=g, device=device) / H**0.5
    if layout == "zipf":
        # a logit offset falling along the vocabulary, carried by one hidden unit
        w[:, 0] = -torch.log1p(torch.arange(V, dtype=torch.float32, device=device))
        h_s[:, 0] = 1.0
        h_t[:, 0] = 1.0
    # scale the hidden states (not the offset unit) to reach the target entropy
    sample = slice(0, min(N, 64))
    lo, hi = 0.05, 50.0
    for _ in range(40):
        mid = (lo * hi) ** 0.5
        hs_try = h_s.clone()
        hs_try[:, 1:] *= mid
        if _entropy(hs_try[sample], w, temperature) > TARGET_ENTROPY:
            lo = mid
        else:
            hi = mid
    h_s[:, 1:] *= lo
    h_t[:, 1:] *= lo
    ent_s = _entropy(h_s[sample], w, temperature)
    ent_t = _entropy(h_t[sample], w, temperature)
    to = dict(dtype=dtype, device=device)
    return h_s.to(**to), h_t.to(**to), w.to(**to), ent_s, ent_t


@pytest.mark.parametrize("layout", ["gaussian", "zipf"])
def test_tile_skipping(bench_cfg, device, layout):
    from opsd_kernels._validation import check_options
    from opsd_kernels.triton.configs import resolve_skip_threshold
    from opsd_kernels.triton.fused_backward import skipped_tiles
    from opsd_kernels.triton.fused_forward import fused_forward

    if not HAS_CUDA:
        pytest.skip("CUDA only: the Triton interpreter is far too slow at useful sizes")
    N, H, V, dtype = 8192, 2560, 151_936, torch.bfloat16
    tau = bench_cfg.temperature
    clip = bench_cfg.clip
    h_s, h_t, w, ent_s, ent_t = lm_like_inputs(N, H, V, layout, dtype, device, tau)
    try:
        opts = check_options("forward_kl", 0.5, tau, clip, "mean")
        stats = fused_forward(h_s, h_t, w, None, None, None, None, opts)
    except ValueError as exc:  # impl unavailable
        pytest.skip(str(exc))

    def run(threshold):
        hs = h_s.detach().clone().requires_grad_()
        ww = w.detach().clone().requires_grad_()
        harness.sync(device)
        t0 = time.perf_counter()
        loss = fused_linear_divergence(
            hs,
            h_t,
            ww,
            kind="forward_kl",
            temperature=tau,
            clip=clip,
            impl="fused",
            skip_threshold=threshold,
        )
        loss.backward()
        harness.sync(device)
        return loss.detach(), hs.grad, ww.grad, time.perf_counter() - t0

    run(0.0)  # warm-up (compilation)
    exact = run(0.0)
    rows = []
    for thr in THRESHOLDS + ("auto",):
        value = resolve_skip_threshold(thr, dtype)
        loss, gh, gw, secs = run(value) if value > 0 else exact
        frac = float(skipped_tiles(stats, value).float().mean()) if value > 0 else 0.0
        err_h = float((gh - exact[1]).float().norm() / exact[1].float().norm().clamp_min(1e-30))
        err_w = float((gw - exact[2]).float().norm() / exact[2].float().norm().clamp_min(1e-30))
        assert torch.equal(loss, exact[0])  # the loss never depends on skipping
        rows.append((thr, frac, err_h, err_w, secs))
    md = [
        "| skip_threshold | tiles skipped | rel. error dH | rel. error dW | fwd+bwd s |",
        "|---:|---:|---:|---:|---:|",
    ]
    md += [
        f"| {t if isinstance(t, str) else f'{t:g}'} | {f:.1%} | {eh:.2e} | {ew:.2e} | {s:.3f} |"
        for t, f, eh, ew, s in rows
    ]
    harness.CHECKS.append(
        {
            "name": f"impl='fused' tile skipping, {layout} vocabulary",
            "shape": (
                f"N={N}, H={H}, V={V}, {str(dtype).split('.')[-1]}, forward KL, "
                f"T={tau}, clip={clip}, entropy student {ent_s:.2f} / teacher {ent_t:.2f} "
                f"nats, trainable lm_head"
            ),
            "markdown": md,
        }
    )
    print("\n" + "\n".join(md))
