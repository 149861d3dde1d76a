"""fused_linear_topk_divergence (a top-k teacher) against a naive top-k implementation.

Per shape (preset H, V and a token count N), K = 20 teacher entries per token
(a typical serving-engine ``logprobs`` count), and mode:

* ``fwd``: the loss only (no input requires grad);
* ``fwdbwd`` with a ``frozen`` lm_head (LoRA): gradient to the student hidden states;
* ``fwdbwd`` with a ``trainable`` lm_head: gradients to hidden states and weight.

Impls: ``torch``/``triton`` (bucket tail, the default), ``torch-renorm``
(renormalize tail: K gathered weight rows, no vocabulary pass) and the naive
baselines ``naive`` / ``naive-renorm``: full float32 student logits,
``log_softmax``, ``gather`` at the ids, the bucket's rest as ``1 - sum``
(the usual hand-written form), autograd. Liger-Kernel has no top-k-teacher
loss (its distillation losses take the full teacher logits or probabilities),
so there is no Liger anchor here.

The cases are measured with :func:`harness.measure` but kept out of the main
report (which knows the two divergence ops only); this module writes its own
table, ``bench/results/topk-<device>-<date>.md``, at the end of the session.
"""

from __future__ import annotations

import datetime
import os
import platform

import harness
import pytest
import torch
import torch.nn.functional as F

import opsd_kernels

K = 20
IMPLS = ("torch", "triton", "torch-renorm", "naive", "naive-renorm")
MODES = (("fwd", "-"), ("fwdbwd", "frozen"), ("fwdbwd", "trainable"))
TOPK_RESULTS: list[dict] = []


def naive_topk(h, w, ids, lp, *, tail, temperature):
    """Forward KL against a top-k teacher, as it is usually written: full logits."""
    ls = F.log_softmax((h @ w.t()).float() / temperature, dim=-1)
    lsk = ls.gather(-1, ids)
    pt = lp.exp()
    if tail == "renormalize":
        lq = lp - torch.logsumexp(lp, -1, keepdim=True)
        lu = lsk - torch.logsumexp(lsk, -1, keepdim=True)
        return (lq.exp() * (lq - lu)).sum(-1).mean()
    rest_t = (1 - pt.sum(-1)).clamp(min=1e-12)
    rest_s = (1 - lsk.exp().sum(-1)).clamp(min=1e-12)
    per = (pt * (lp - lsk)).sum(-1) + rest_t * (rest_t.log() - rest_s.log())
    return per.mean()


def _inputs(shape, dtype, device, mode, weight):
    g = torch.Generator(device=device).manual_seed(99)
    n, h, v = shape.tokens, shape.hidden, shape.vocab

    def randn(*size):
        return torch.randn(*size, generator=g, device=device)

    h_s = randn(n, h).to(dtype)
    w = (randn(v, h) * (2.0 / h**0.5)).to(dtype)
    with torch.no_grad():  # teacher: the student's logits plus noise, its top-K
        lp, ids = [], []
        for i in range(0, n, 1024):
            t = h_s[i : i + 1024].float() @ w.float().t() + 0.5 * randn(min(1024, n - i), v)
            top = t.log_softmax(-1).topk(K, dim=-1)
            lp.append(top.values)
            ids.append(top.indices)
        lp, ids = torch.cat(lp), torch.cat(ids)
    h_s.requires_grad_(mode == "fwdbwd")
    w.requires_grad_(mode == "fwdbwd" and weight == "trainable")
    return h_s, w, ids, lp


def _loss_fn(impl, temperature):
    if impl in ("torch", "triton"):
        return lambda h, w, ids, lp: opsd_kernels.fused_linear_topk_divergence(
            h, w, ids, lp, temperature=temperature, impl=impl, validate=False
        )
    if impl == "torch-renorm":
        return lambda h, w, ids, lp: opsd_kernels.fused_linear_topk_divergence(
            h, w, ids, lp, temperature=temperature, impl="torch", tail="renormalize", validate=False
        )
    tail = "renormalize" if impl == "naive-renorm" else "bucket"
    return lambda h, w, ids, lp: naive_topk(h, w, ids, lp, tail=tail, temperature=temperature)


@pytest.mark.parametrize("mode,weight", MODES, ids=["fwd", "fwdbwd-frozen", "fwdbwd-trainable"])
@pytest.mark.parametrize("impl", IMPLS)
def test_topk(benchmark, bench_cfg, device, shape, impl, mode, weight):
    if not bench_cfg.wants(impl):
        pytest.skip("not selected (--impls)")
    if impl == "triton" and device.type != "cuda":
        pytest.skip("impl=triton needs CUDA (the interpreter is too slow to time)")
    h_s, w, ids, lp = _inputs(shape, bench_cfg.dtype, device, mode, weight)
    loss_fn = _loss_fn(impl, bench_cfg.temperature)
    if not impl.startswith("naive") and shape.tokens <= 4096:  # correctness before timing
        n = min(256, shape.tokens)
        with torch.no_grad():
            ours = loss_fn(h_s[:n], w, ids[:n], lp[:n]).float()
            ref = _loss_fn("naive-renorm" if "renorm" in impl else "naive", bench_cfg.temperature)(
                h_s[:n], w, ids[:n], lp[:n]
            )
        tol = 1e-4 if bench_cfg.dtype == torch.float32 else 2e-2
        assert torch.allclose(ours, ref, rtol=tol, atol=tol), (float(ours), float(ref))

    def fn():
        loss = loss_fn(h_s, w, ids, lp)
        if mode == "fwdbwd":
            loss.backward()

    def setup():
        h_s.grad = None
        w.grad = None

    nhv = float(shape.tokens) * shape.hidden * shape.vocab
    record = {
        "op": "topk",
        "preset": shape.preset,
        "hidden": shape.hidden,
        "vocab": shape.vocab,
        "tokens": shape.tokens,
        "k": K,
        "dtype": str(bench_cfg.dtype)[6:],
        "mode": mode,
        "weight": weight,
        "impl": impl,
        "kind": "forward_kl",
        "temperature": bench_cfg.temperature,
        "flops": nhv * {"fwd": 2, "frozen": 4, "trainable": 6}[weight if mode != "fwd" else mode],
        "input_bytes": harness.tensor_bytes(h_s, w, ids, lp),
    }
    estimate = 6 * 4 * shape.tokens * shape.vocab if impl.startswith("naive") else None
    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
        out = harness.measure(
            benchmark,
            record,
            fn,
            setup,
            device,
            bench_cfg.rounds,
            estimate,
            warmup=device.type == "cuda",
        )
    # kept out of the main report (see the module docstring)
    if out in harness.RESULTS:
        harness.RESULTS.remove(out)
    TOPK_RESULTS.append(out)


@pytest.fixture(scope="module", autouse=True)
def _write_topk_report(bench_cfg):
    yield
    if not TOPK_RESULTS or not bench_cfg.write_report:
        return
    os.makedirs(bench_cfg.report_dir, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    path = os.path.join(bench_cfg.report_dir, f"topk-{dev}-{datetime.date.today().isoformat()}.md")
    with open(path, "w") as f:
        f.write(render(TOPK_RESULTS))
    print(f"\nopsd bench (top-k): {path}")


def render(results: list[dict]) -> str:
    dev = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads)"
    )
    lines = [
        "# Top-k teacher: `fused_linear_topk_divergence` vs naive",
        "",
        f"- Device: {dev}; torch {torch.__version__}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Forward KL, K = {K}, temperature {results[0]['temperature']}; dtype "
        f"{results[0]['dtype']}. Time: median wall clock of the timed rounds. Peak: bytes "
        "allocated beyond the inputs during one call (exact torch allocation count on CPU), "
        "the weight gradient included where the lm_head is trainable.",
        "- `naive`: full float32 logits, log_softmax, gather, rest as 1 - sum, autograd; "
        "`torch`/`triton`: bucket tail; `*-renorm`: renormalize tail. Liger-Kernel has no "
        "top-k-teacher loss (no anchor).",
        "",
        "| preset | N | mode | impl | median ms | peak MiB | peak / naive | time / naive |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def key(r):
        return (r["preset"], r["tokens"], r["mode"], r["weight"])

    def naive_of(r):
        base = "naive-renorm" if "renorm" in r["impl"] else "naive"
        return next((x for x in results if key(x) == key(r) and x["impl"] == base), None)

    for r in sorted(results, key=lambda r: (*key(r), IMPLS.index(r["impl"]))):
        n = naive_of(r)
        ok = r.get("status") == "ok"
        ms = f"{r['median_s'] * 1e3:.3g}" if ok else r.get("status")
        mib = f"{r['peak_bytes'] / 2**20:.4g}" if ok else "-"
        pr = tr = "-"
        if ok and n is not None and n.get("status") == "ok" and n is not r:
            pr = f"{r['peak_bytes'] / max(1, n['peak_bytes']):.3f}"
            tr = f"{r['median_s'] / n['median_s']:.2f}"
        mode = r["mode"] if r["weight"] == "-" else f"{r['mode']} ({r['weight']})"
        lines.append(
            f"| {r['preset']} | {r['tokens']} | {mode} | {r['impl']} | {ms} | {mib} | {pr} | {tr} |"
        )
    return "\n".join(lines) + "\n"
