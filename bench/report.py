"""Turn one benchmark run into ``<device>-<date>.md``, a JSON record and PNG plots.

Called by ``bench/conftest.py`` when a ``pytest bench/`` session ends. Every
number in the report is computed here from the run's measurements; nothing is
typed in. The JSON file keeps the raw rows, so a report can be rebuilt::

    python bench/report.py bench/results/cpu-2025-01-01.json [--out DIR]
    python bench/report.py RUN.json --short      # the short text table only
    python bench/report.py A.json B.json --out DIR   # merge runs of one machine

The achieved rate counts the *necessary* flops of the fused-linear loss (4NHV
forward, +2NHV for the hidden-state gradient, +2NHV for the weight gradient;
recomputation is not counted) and compares it with a GEMM rate measured in the
same run on the same device: ``torch.matmul`` of two 8192 x 8192 bfloat16
matrices on a GPU, of two 2048 x 2048 float32 matrices on a CPU.

Beside each measured fused-linear time of our impls the report prints the cost
model's expected time and measured / model (``bench/cost_model.py`` via
:func:`model_ms`): the same-run GEMM rate, HBM 4.8 TB/s on an H200 and 3.35 TB/s
(``cost_model.DEFAULT_HBM_TBPS``) elsewhere, no tiles skipped and every clip
tile recomputed unless a row records its fractions. It is a GPU model: CPU
reports print it labelled as not expected to match.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cost_model  # noqa: E402
import harness  # noqa: E402

ANCHORS = harness.ANCHORS
OURS = harness.OUR_IMPLS
IMPL_ORDER = harness.IMPL_ORDER
MIB = 2**20
#: HBM bandwidth (TB/s) for the cost model, by a name in the run's device; any
#: other device keeps cost_model.DEFAULT_HBM_TBPS
HBM_TBPS = {"H200": 4.8, "H100": 3.35}
#: bytes per operand element, by the rows' dtype
ELEM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ------------------------------------------------------------------ measurement of meta


def measure_gemm_rate(device: torch.device) -> dict:
    """Achieved matmul rate on this device, measured now (median of several calls)."""
    if device.type == "cuda":
        n, dtype, reps = 8192, torch.bfloat16, 20
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        times = []
        for _ in range(reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        del a, b
        torch.cuda.empty_cache()
    else:
        n, dtype, reps = 2048, torch.float32, 3
        a = torch.randn(n, n, dtype=dtype)
        b = torch.randn(n, n, dtype=dtype)
        a @ b
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {
        "flops_per_s": 2.0 * n**3 / t,
        "shape": f"{n}x{n}x{n}",
        "dtype": str(dtype)[6:],
        "seconds": t,
    }


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    env = os.environ.get("OPSD_BENCH_COMMIT")
    if env:
        return env
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return head + (" (+ uncommitted changes)" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git checkout; set OPSD_BENCH_COMMIT)"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _ram_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def collect_meta(cfg) -> dict:
    device = cfg.device
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        dev_name = torch.cuda.get_device_name(device)
        device_desc = f"{dev_name}, {props.total_memory / 2**30:.1f} GiB"
        label = re.sub(r"[^a-z0-9]+", "-", dev_name.lower()).strip("-")
    else:
        dev_name = "CPU"
        device_desc = f"CPU only: {_cpu_name()}"
        label = "cpu"
    import opsd_kernels

    return {
        "device_type": device.type,
        "device_name": dev_name,
        "device": device_desc,
        "label": label,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": (
            f"{platform.node()}; {platform.platform()}; {os.cpu_count()} CPU cores "
            f"({_cpu_name()}); {_ram_gib():.0f} GiB RAM; torch threads "
            f"{torch.get_num_threads()}"
        ),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda or "-",
            "triton": _version("triton"),
            "opsd-kernels": getattr(opsd_kernels, "__version__", "?"),
            "liger-kernel": _version("liger-kernel"),
            "pytest-benchmark": _version("pytest-benchmark"),
        },
        "commit": git_commit(),
        "config": {
            "dtype": str(cfg.dtype)[6:],
            "rounds": cfg.rounds,
            **cfg.options(),
            "compile_chunk": cfg.compile_chunk,
        },
        "gemm": measure_gemm_rate(device),
    }


def write_run(
    results: list[dict],
    checks: list[dict],
    cfg,
    out_dir: str,
    precision: list[dict] | None = None,
    meta: dict | None = None,
    render_report: bool = True,
) -> list[str]:
    """Save the run as JSON (measuring the meta data unless given), render markdown and plots.

    ``render_report=False`` writes the JSON only: the bench saves it after every
    case, so a run cut short (time budget, kill) still leaves what finished.
    """
    data = {
        "meta": meta or collect_meta(cfg),
        "results": results,
        "checks": checks,
        "precision": precision or [],
    }
    os.makedirs(out_dir, exist_ok=True)
    stem = f"{data['meta']['label']}-{data['meta']['date']}"
    json_path = os.path.join(out_dir, stem + ".json")
    with open(json_path + ".tmp", "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(json_path + ".tmp", json_path)
    if not render_report:
        return [json_path]
    return [json_path, *render(data, out_dir)]


# ---------------------------------------------------------------------------- rendering


def _fmt(x, spec=".3g", none="—"):
    if x is None or (isinstance(x, float) and x != x):
        return none
    return format(x, spec)


def _ms(x):
    return _fmt(None if x is None else x * 1e3, ".3g")


def _mib(x):
    return _fmt(None if x is None else x / MIB, ".4g")


def _impl_key(impl):
    return IMPL_ORDER.index(impl) if impl in IMPL_ORDER else len(IMPL_ORDER)


def _groups(results):
    keys = []
    for r in results:
        k = (r["op"], r["preset"], r["mode"], r["weight"])
        if k not in keys:
            keys.append(k)
    return keys


def _rate(r, gemm):
    if r.get("status") != "ok" or not r.get("flops") or not r.get("median_s"):
        return None, None
    rate = r["flops"] / r["median_s"]
    return rate / 1e12, 100.0 * rate / gemm


def _mode_name(mode, weight):
    return mode if weight == "-" else f"{mode}, {weight} lm_head"


def hbm_tbps(meta: dict) -> float:
    """HBM bandwidth (TB/s) the cost model assumes for the run's device."""
    name = f"{meta.get('device_name', '')} {meta.get('device', '')}".upper()
    return next(
        (tbps for key, tbps in HBM_TBPS.items() if key in name), cost_model.DEFAULT_HBM_TBPS
    )


def model_impl(row: dict, meta: dict) -> str | None:
    """The cost model's impl for a row of our impls; None for the baselines."""
    if row["impl"] in ("torch", "triton"):
        return "chunked"
    if row["impl"] == "fused-onepass":  # impl="fused", deterministic=False
        return "fused-onepass"
    if row["impl"] == "fused":
        deterministic = row.get("deterministic", meta["config"].get("deterministic", True))
        return "fused" if deterministic else "fused-onepass"
    return None


def model_ms(row: dict, meta: dict) -> float | None:
    """Expected time (ms) of a fused-linear row of our impls from ``bench/cost_model.py``.

    The GEMM rate is the one measured in the same run; the HBM bandwidth is
    :func:`hbm_tbps`. Skipped fraction 0 and every clip tile recomputed (worst
    case) unless the row records ``skipped_fraction`` / ``clip_recompute_fraction``.
    A ``fwd`` row counts only the passes named ``fwd...``; when the model's pass
    names do not all start with ``fwd`` or ``bwd`` there is no such split and
    the result is None, as for baselines, other ops and unknown dtypes.
    """
    impl = model_impl(row, meta)
    if row.get("op") != "fused_linear" or impl is None or row["dtype"] not in ELEM_BYTES:
        return None
    shape = cost_model.Shape(
        N=row["tokens"], H=row["hidden"], V=row["vocab"], elem=ELEM_BYTES[row["dtype"]]
    )
    pass_list = cost_model.passes(
        impl,
        row["kind"],
        row.get("clip") is not None,
        row["weight"] == "trainable",
        shape,
        row.get("skipped_fraction", 0.0),
        row.get("clip_recompute_fraction", 1.0),
    )
    if row["mode"] == "fwd":
        if not all(p.name.startswith(("fwd", "bwd")) for p in pass_list):
            return None
        pass_list = [p for p in pass_list if p.name.startswith("fwd")]
    elif row["mode"] != "fwdbwd":
        return None
    return cost_model.expected_ms(
        pass_list, gemm_tflops=meta["gemm"]["flops_per_s"] / 1e12, hbm_tbps=hbm_tbps(meta)
    )


def render(data: dict, out_dir: str) -> list[str]:
    meta, results, checks = data["meta"], data["results"], data["checks"]
    stem = f"{meta['label']}-{meta['date']}"
    gemm = meta["gemm"]["flops_per_s"]
    cpu = meta["device_type"] != "cuda"
    lines = []
    title = "CPU run — no GPU numbers" if cpu else f"GPU run — {meta['device_name']}"
    lines += [f"# opsd-kernels benchmark: {title}", ""]
    if cpu:
        lines += [
            "> **CPU numbers.** Measured on a CPU-only machine at small stand-in shapes "
            "(plus the CPU memory target at N=4096, H=1024, V=65,536). They say nothing "
            "about GPU speed; only the memory ratios carry over in kind.",
            "",
        ]
    c = meta["config"]
    lines += [
        f"- Date: {meta['time_utc']}",
        f"- Device: {meta['device']}",
        f"- Machine: {meta['machine']}",
        f"- Commit: `{meta['commit']}`",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- Loss: {c['kind']}, temperature {c['temperature']}, clip {c['clip']}"
        + (f", beta {c['beta']}" if c["kind"] == "jsd" else "")
        + f"; dtype {c['dtype']}; {c['rounds']} timed rounds per case",
        f"- Measured GEMM rate (torch.matmul {meta['gemm']['shape']} {meta['gemm']['dtype']}): "
        f"{gemm / 1e12:.3g} TFLOP/s",
        "",
        "Time: wall clock per call (forward, plus backward in `fwdbwd`; on a GPU each round "
        "ends with a device synchronise), median of the rounds after a warm-up call (on CPU "
        "the memory-measuring call is the warm-up of the eager paths); "
        "spread = interquartile range and min–max. TFLOP/s counts the necessary flops "
        "(4NHV forward, 6NHV fwd+bwd with a frozen lm_head, 8NHV trainable). Peak memory: "
        "bytes allocated beyond the inputs during one call "
        + (
            "(exact count of torch allocations, `opsd_kernels.memory.PeakMemory`)."
            if cpu
            else "(`torch.cuda.max_memory_allocated` after a reset)."
        ),
        "Impls: `torch`/`triton`/`fused`/`fused-onepass` are opsd_kernels "
        '(`fused-onepass` = `impl="fused", deterministic=False`); `naive` = full logits, '
        "log_softmax, F.kl_div, autograd; `compiled` = torch.compile of a token-chunked loss "
        f"(chunk {c['compile_chunk']}); `liger-*` = Liger-Kernel (no per-entry clip: it "
        "computes the unclipped loss); `trl-chunked` = TRL's `ChunkedDivergenceFunction` "
        "(`trl.kernels.chunked_divergence`, the loss of its `DistillationTrainer`; no "
        "per-entry clip either: unclipped loss; per-token divergence, token mean). A preset "
        "with a final-logit soft cap (gemma2-2b: 30) passes it to every impl that can cap; "
        "Liger cannot and is skipped there.",
        "",
    ]
    if any(r["op"] == "fused_linear" for r in results):
        lines += [
            "Model ms"
            + (" (GPU cost model; CPU rows are not expected to match)" if cpu else "")
            + ": the expected time from `bench/cost_model.py` (per pass max(flops / GEMM rate, "
            "HBM bytes / bandwidth), summed) at the GEMM rate measured above and HBM "
            f"{hbm_tbps(meta):g} TB/s, for our impls (torch/triton = chunked, fused = "
            "deterministic backward, fused-onepass (or a row saying deterministic=False) = "
            "one-pass); "
            "skipped fraction 0 and every clip tile recomputed (worst case) unless a row records "
            "them; `fwd` rows count the forward passes only (— where the model has no "
            "forward/backward split); — for the baselines.",
            "",
        ]
    lines += _checks_section(checks)
    lines += precision_section(data.get("precision", []))
    if not cpu:
        lines += _gpu_targets(results, gemm)
    lines += trl_section(results)
    pngs = []
    for op in ("fused_linear", "divergence"):
        op_rows = [r for r in results if r["op"] == op]
        if not op_rows:
            continue
        lines += [f"## `{'fused_linear_divergence' if op == 'fused_linear' else 'divergence'}`", ""]
        presets = list(dict.fromkeys(r["preset"] for r in op_rows))
        for preset in presets:
            rows_p = [r for r in op_rows if r["preset"] == preset]
            r0 = rows_p[0]
            shape = (
                f"H={r0['hidden']}, V={r0['vocab']}" if op == "fused_linear" else f"V={r0['vocab']}"
            )
            if op == "fused_linear" and r0.get("softcap") is not None:
                shape += f", softcap {r0['softcap']:g}"
            lines += [f"### {preset} ({shape}, {r0['dtype']})", ""]
            try:
                png = _plot(rows_p, op, preset, out_dir, stem)
            except ImportError:  # e.g. the GPU image has no matplotlib
                png = None
                lines += [
                    "(No plot: matplotlib is not installed here; rebuild the report with "
                    f"`python bench/report.py {stem}.json` where it is.)",
                    "",
                ]
            if png:
                pngs.append(png)
                lines += [f"![{op} {preset}]({os.path.basename(png)})", ""]
            for key in _groups(rows_p):
                rows = [r for r in rows_p if (r["op"], r["preset"], r["mode"], r["weight"]) == key]
                lines += [f"#### {_mode_name(key[2], key[3])}", ""]
                lines += _time_table(rows, gemm, op, meta)
                lines += _ratio_table(rows, op)
    md_path = os.path.join(out_dir, stem + ".md")
    with open(md_path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return [md_path, *pngs]


def _checks_section(checks):
    if not checks:
        return []
    out = ["## Targets checked in this run", ""]
    for ch in checks:
        if "markdown" in ch:  # a check that renders itself (e.g. the tile-skipping table)
            out += [f"- **{ch['name']}** ({ch['shape']}):", "", *ch["markdown"], ""]
            continue
        p = ch["peak_bytes"]
        out += [
            f"- **{ch['name']}** ({ch['shape']}): torch peak {p['torch'] / MIB:.1f} MiB, naive "
            f"peak {p['naive'] / MIB:.1f} MiB, ratio **{ch['ratio']:.3f}** "
            f"(target ≤ {ch['target']:.3g}): **{'met' if ch['passed'] else 'NOT met'}**. "
            "One fwd+bwd each: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in ch["seconds_once"].items())
            + ".",
        ]
    return out + [""]


def _precision_key(r):
    order = harness.IMPLS["precision"]
    return (order.index(r["impl"]) if r["impl"] in order else len(order), r["dtype"], -r["eps"])


def precision_section(rows: list[dict]) -> list[str]:
    """The precision table (bench_precision.py): impl x dtype x eps -> errors against float64."""
    if not rows:
        return []
    r0 = rows[0]
    dev = "GPU" if r0["device"] == "cuda" else "CPU"
    out = [
        "## Precision: 16-bit inputs against float64",
        "",
        f"`fused_linear_divergence` set-up of issue 10 ({dev}): {r0['kind']}, temperature "
        f"{r0['temperature']}, no clip, shared trainable lm_head, N={r0['tokens']}, "
        f"H={r0['hidden']}, V={r0['vocab']}, logits std ≈ 4, teacher hidden = student hidden "
        "+ eps · noise. Reference: float64 on the same 16-bit values. Errors: loss |L−L64|/|L64|; "
        "gradients ‖g−g64‖/‖g64‖. Target (the precision tests): loss ≤ 5e-4, gradients ≤ 1%. "
        "`naive` = logits in the input dtype, float32 log_softmax + F.kl_div, autograd; "
        "`naive-16bit` = all of it in the input dtype; `liger-fljsd-loss` = Liger's "
        "`chunked_loss.LigerFusedLinearJSDLoss` (beta 0, eager); `liger-fljsd` = Liger's "
        "Triton `LigerFusedLinearJSD`.",
        "",
        "| impl | dtype | eps (KL/token) | loss rel. error | d(hidden) rel. error | "
        "d(weight) rel. error | within target |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in sorted(rows, key=_precision_key):
        eps = f"{r['eps']:g} ({r['kl_per_token']:.2g})"
        if r.get("status") != "ok":
            out.append(f"| {r['impl']} | {r['dtype']} | {eps} | — | — | — | {r.get('status')} |")
            continue
        note = f" ({r['note']})" if r.get("note") else ""
        out.append(
            f"| {r['impl']}{note} | {r['dtype']} | {eps} | {r['loss_rel']:.2g} | "
            f"{r['dh_rel']:.2g} | {r['dw_rel']:.2g} | "
            f"{'yes' if r['meets_target'] else 'NO'} |"
        )
    return out + [""]


def _find(results, **kw):
    for r in results:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def _gpu_targets(results, gemm):
    """The fused-linear issue's GPU targets at Qwen3-4B, 8192 tokens, where measured."""
    out = []
    for weight in ("trainable", "frozen"):
        base = {
            "op": "fused_linear",
            "preset": "qwen3-4b",
            "tokens": 8192,
            "mode": "fwdbwd",
            "weight": weight,
        }
        naive = _find(results, impl="naive", **base)
        liger = _find(results, impl="liger-fljsd", **base)
        for impl in OURS:
            r = _find(results, impl=impl, **base)
            if r is None or r.get("status") != "ok":
                continue
            if not out:
                out += [
                    "## GPU targets (Qwen3-4B, 8192 tokens, fwd+bwd)",
                    "",
                    "| lm_head | impl | mem ≤ naive/10 | mem ≤ Liger | time ≤ naive | "
                    "≥ 1.2x Liger | ≥ 50% GEMM rate |",
                    "|---|---|---|---|---|---|---|",
                ]

            m, t = r["peak_bytes"], r["median_s"]
            cells = [
                _verdict(
                    naive, lambda o, m=m: _yn(m <= o["peak_bytes"] / 10, m / o["peak_bytes"], "x")
                ),
                _verdict(liger, lambda o, m=m: _yn(m <= o["peak_bytes"], m / o["peak_bytes"], "x")),
                _verdict(naive, lambda o, t=t: _yn(t <= o["median_s"], o["median_s"] / t, "x")),
                _verdict(
                    liger, lambda o, t=t: _yn(o["median_s"] / t >= 1.2, o["median_s"] / t, "x")
                ),
                _yn(r["flops"] / t >= 0.5 * gemm, 100 * r["flops"] / t / gemm, "%"),
            ]
            out.append(f"| {weight} | {impl} | " + " | ".join(cells) + " |")
    return out + [""] if out else []


#: the anchor of :func:`trl_section`
TRL_ANCHOR = "trl-chunked"


def trl_section(results: list[dict]) -> list[str]:
    """Our impls against TRL's kernel: speedup (TRL time / ours) and memory ratio (our
    peak / TRL's), per preset, mode, lm_head and token count where both ran."""
    out = []
    trl_rows = [
        r
        for r in results
        if r["op"] == "fused_linear"
        and r["impl"] == TRL_ANCHOR
        and r.get("status") in ("ok", "OOM")
    ]
    for t in sorted(
        trl_rows,
        key=lambda r: (r["preset"], r["mode"] != "fwd", r["weight"], r["tokens"]),
    ):
        key = {k: t[k] for k in ("op", "preset", "mode", "weight", "tokens")}
        for impl in OURS:
            r = _find(results, impl=impl, **key)
            if r is None or r.get("status") != "ok":
                continue
            if not out:
                out += [
                    f"## Against TRL's kernel (`{TRL_ANCHOR}`)",
                    "",
                    "Speedup = TRL's time / ours (>1: ours faster); memory ratio = our peak / "
                    "TRL's peak (<1: ours leaner), beyond the inputs, same run and device. "
                    "TRL computes the unclipped loss; ours the run's clip.",
                    "",
                    "| preset | mode | tokens | impl | speedup vs TRL | mem ratio vs TRL |",
                    "|---|---|---:|---|---:|---:|",
                ]
            if t["status"] == "OOM":
                cells = ["TRL OOM", "TRL OOM"]
            else:
                mr = r["peak_bytes"] / t["peak_bytes"] if t.get("peak_bytes") else None
                cells = [f"{t['median_s'] / r['median_s']:.3g}x", _fmt(mr, ".3g")]
            out.append(
                f"| {t['preset']} | {_mode_name(t['mode'], t['weight'])} | {t['tokens']} | "
                f"{impl} | " + " | ".join(cells) + " |"
            )
    return out + [""] if out else []


def _verdict(other, test):
    """A target against an anchor row: met trivially when the anchor ran out of memory."""
    if other is None or other.get("status") not in ("ok", "OOM"):
        return "n/a"
    if other["status"] == "OOM":
        return "yes (anchor OOM)"
    return test(other)


def _yn(ok, value, unit):
    return f"{'yes' if ok else 'NO'} ({value:.3g}{unit})"


def _time_table(rows, gemm, op, meta):
    rate_head = "TFLOP/s | % GEMM" if op == "fused_linear" else "GB/s | % GEMM"
    model_head, model_cols = (
        ("model ms | measured / model | ", "---:|---:|") if op == "fused_linear" else ("", "")
    )
    out = [
        f"| tokens | impl | median ms | {model_head}IQR ms | min–max ms | {rate_head} | peak MiB | "
        "vs inputs | status |",
        f"|---:|---|---:|{model_cols}---:|---|---:|---:|---:|---:|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["tokens"], _impl_key(r["impl"]))):
        ok = r.get("status") == "ok"
        if op == "fused_linear":
            tf, pct = _rate(r, gemm)
            rate = f"{_fmt(tf)} | {_fmt(pct, '.3g')}"
        else:
            bw = r["bytes_moved"] / r["median_s"] / 1e9 if ok and r.get("median_s") else None
            rate = f"{_fmt(bw)} | —"
        spread = f"{_ms(r.get('min_s'))}–{_ms(r.get('max_s'))}" if ok else "—"
        rel = (
            r["peak_bytes"] / r["input_bytes"]
            if ok and r.get("peak_bytes") is not None and r.get("input_bytes")
            else None
        )
        status = r.get("status", "?") + (f" ({r['note']})" if r.get("note") else "")
        model = ""
        if op == "fused_linear":
            expected = model_ms(r, meta)
            ratio = (
                r["median_s"] * 1e3 / expected if ok and expected and r.get("median_s") else None
            )
            model = f"{_fmt(expected)} | {_fmt(ratio)} | "
        out.append(
            f"| {r['tokens']} | {r['impl']} | {_ms(r.get('median_s'))} | {model}"
            f"{_ms(r.get('iqr_s'))} | {spread} | {rate} | {_mib(r.get('peak_bytes'))} | "
            f"{_fmt(rel, '.3g')}x | {status} |"
        )
    return out + [""]


def _ratio_table(rows, op):
    anchors = [a for a in ANCHORS[op] if any(r["impl"] == a for r in rows)]
    ours = [r for r in rows if r["impl"] in OURS and r.get("status") == "ok"]
    if not anchors or not ours:
        return []
    head = (
        "| tokens | impl | "
        + " | ".join(f"speedup vs {a} | mem ratio vs {a}" for a in anchors)
        + " |"
    )
    out = [
        "Speedup = anchor time / impl time (>1: faster); memory ratio = impl peak / anchor "
        "peak (<1: leaner).",
        "",
        head,
        "|---:|---|" + "---:|---:|" * len(anchors),
    ]
    for r in sorted(ours, key=lambda r: (r["tokens"], _impl_key(r["impl"]))):
        cells = []
        for a in anchors:
            o = next((x for x in rows if x["impl"] == a and x["tokens"] == r["tokens"]), None)
            if o is None:
                cells += ["—", "—"]
            elif o.get("status") == "OOM":
                cells += ["anchor OOM", "anchor OOM"]
            elif o.get("status") != "ok":
                cells += ["—", "—"]
            else:
                sp = o["median_s"] / r["median_s"]
                mr = r["peak_bytes"] / o["peak_bytes"] if o["peak_bytes"] else None
                cells += [f"{sp:.3g}x", _fmt(mr, ".3g")]
        out.append(f"| {r['tokens']} | {r['impl']} | " + " | ".join(cells) + " |")
    return out + [""]


def _plot(rows, op, preset, out_dir, stem):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys((r["mode"], r["weight"]) for r in rows))
    fig, axes = plt.subplots(2, len(modes), figsize=(4.6 * len(modes), 7.5), squeeze=False)
    for j, (mode, weight) in enumerate(modes):
        sub = [r for r in rows if (r["mode"], r["weight"]) == (mode, weight)]
        for impl in sorted(dict.fromkeys(r["impl"] for r in sub), key=_impl_key):
            pts = sorted(
                (r["tokens"], r) for r in sub if r["impl"] == impl and r.get("status") == "ok"
            )
            if not pts:
                continue
            x = [p[0] for p in pts]
            style = "-" if impl in OURS else "--"
            axes[0][j].plot(x, [p[1]["median_s"] * 1e3 for p in pts], style, marker="o", label=impl)
            axes[1][j].plot(
                x, [p[1]["peak_bytes"] / MIB for p in pts], style, marker="o", label=impl
            )
            ooms = [r["tokens"] for r in sub if r["impl"] == impl and r.get("status") == "OOM"]
            for n in ooms:
                axes[1][j].annotate(
                    f"{impl} OOM",
                    (n, 1),
                    xycoords=("data", "axes fraction"),
                    fontsize=7,
                    rotation=90,
                    va="top",
                )
        axes[0][j].set_title(_mode_name(mode, weight))
        axes[0][j].set_ylabel("time per call (ms, median)")
        axes[1][j].set_ylabel("peak memory beyond inputs (MiB)")
        for i in range(2):
            ax = axes[i][j]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    r0 = rows[0]
    dev = "CPU" if r0.get("device") == "cpu" else "GPU"
    fig.suptitle(f"{op} — {preset} (H={r0['hidden']}, V={r0['vocab']}, {r0['dtype']}) — {dev}")
    fig.tight_layout()
    path = os.path.join(out_dir, f"{stem}-{op}-{preset}.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def short_table(results: list[dict], checks: list[dict], precision: list[dict] = ()) -> str:
    """A compact text table: the fused-linear fwd+bwd cases, the checks, the precision rows."""
    rows = [r for r in results if r["op"] == "fused_linear" and r["mode"] == "fwdbwd"]
    if not rows:
        rows = [r for r in results if r["mode"] == "fwdbwd"]
    out = (
        []
        if not rows
        else [
            f"{'op':<13}{'preset':<11}{'lm_head':<10}{'tokens':>7}  {'impl':<17}"
            f"{'median ms':>10}{'peak MiB':>11}  status"
        ]
    )
    for r in sorted(
        rows, key=lambda r: (r["op"], r["preset"], r["weight"], r["tokens"], _impl_key(r["impl"]))
    ):
        out.append(
            f"{r['op']:<13}{r['preset']:<11}{r['weight']:<10}{r['tokens']:>7}  "
            f"{r['impl']:<17}{_ms(r.get('median_s')):>10}{_mib(r.get('peak_bytes')):>11}"
            f"  {r.get('status')}"
        )
    for ch in checks:
        if "markdown" in ch:  # renders itself (tile skipping)
            out += [ch["name"] + ":", *ch["markdown"]]
            continue
        out.append(
            f"{ch['name']}: ratio {ch['ratio']:.3f} (target <= {ch['target']:.3g}) "
            f"{'met' if ch['passed'] else 'NOT met'}"
        )
    if precision:
        out.append(
            f"{'precision':<13}{'impl':<18}{'dtype':<10}{'eps':>6}{'loss rel':>10}"
            f"{'dh rel':>10}{'dw rel':>10}  status"
        )
        for r in sorted(precision, key=_precision_key):
            ok = r.get("status") == "ok"
            out.append(
                f"{'':<13}{r['impl']:<18}{r['dtype']:<10}{r['eps']:>6g}"
                + "".join(
                    f"{_fmt(r.get(k) if ok else None, '.2g'):>10}"
                    for k in ("loss_rel", "dh_rel", "dw_rel")
                )
                + f"  {r.get('status')}"
            )
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_json", nargs="+", help="one run, or several of one device to merge")
    ap.add_argument("--out", default=None, help="output folder (default: beside the JSON)")
    ap.add_argument("--short", action="store_true", help="print the short table only")
    ap.add_argument(
        "--with-short", action="store_true", help="render the report, then print the short table"
    )
    a = ap.parse_args(argv)
    data = None
    for path in a.run_json:
        with open(path) as f:
            part = json.load(f)
        if data is None:
            data = part
            continue
        if part["meta"]["label"] != data["meta"]["label"]:
            ap.error(f"{path} is from {part['meta']['device']}, not {data['meta']['device']}")
        data["results"] += part["results"]
        data["checks"] += part["checks"]
        data["precision"] = data.get("precision", []) + part.get("precision", [])
    if len(a.run_json) > 1 or (a.out and not a.short):  # the merged run beside its report
        out = a.out or os.path.dirname(os.path.abspath(a.run_json[0]))
        os.makedirs(out, exist_ok=True)
        merged = os.path.join(out, f"{data['meta']['label']}-{data['meta']['date']}.json")
        with open(merged, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        print(merged)
    if a.short:
        print(short_table(data["results"], data["checks"], data.get("precision", [])))
        return 0
    for p in render(data, a.out or os.path.dirname(os.path.abspath(a.run_json[0]))):
        print(p)
    if a.with_short:
        print(short_table(data["results"], data["checks"], data.get("precision", [])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
