"""bench/report.py: the cost model's expected time beside each measured fused-linear time.

The expected values are recomputed here straight from ``bench/cost_model.py``
(``expected_ms(passes(...))`` at the run's GEMM rate and the device's HBM
bandwidth) and compared with the rendered markdown cells.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest

from bench.cost_model import DEFAULT_HBM_TBPS, Shape, expected_ms, passes

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
CPU_RUN = os.path.join(BENCH, "results", "cpu-2026-11-29.json")
GEMM_TFLOPS = 800.0
N, H, V = 8192, 2560, 151_936  # Qwen3-4B: HBM terms matter, so the bandwidth shows


@pytest.fixture
def report():
    sys.path.insert(0, BENCH)
    try:
        import report

        yield report
    finally:
        sys.path.remove(BENCH)


def _meta(device_name="NVIDIA H200"):
    return {
        "device_type": "cuda",
        "device_name": device_name,
        "device": f"{device_name}, 139.8 GiB",
        "label": "synthetic",
        "date": "2026-01-01",
        "time_utc": "2026-01-01 00:00 UTC",
        "machine": "synthetic",
        "commit": "synthetic",
        "versions": {"torch": "x"},
        "config": {
            "dtype": "bfloat16",
            "rounds": 3,
            "kind": "forward_kl",
            "beta": 0.5,
            "temperature": 1.1,
            "clip": 0.05,
            "compile_chunk": 1024,
        },
        "gemm": {
            "flops_per_s": GEMM_TFLOPS * 1e12,
            "shape": "8192x8192x8192",
            "dtype": "bfloat16",
            "seconds": 1.0,
        },
    }


def _row(impl, mode, weight, tokens, median_s, **extra):
    return {
        "op": "fused_linear",
        "preset": "qwen3-4b",
        "hidden": H,
        "vocab": V,
        "tokens": tokens,
        "dtype": "bfloat16",
        "mode": mode,
        "weight": weight,
        "impl": impl,
        "kind": "forward_kl",
        "beta": 0.5,
        "temperature": 1.1,
        "clip": 0.05,
        "flops": 8.0 * tokens * H * V,
        "input_bytes": 2 * (2 * tokens * H + V * H),
        "device": "cuda",
        "status": "ok",
        "median_s": median_s,
        "iqr_s": 0.001,
        "min_s": median_s,
        "max_s": median_s,
        "peak_bytes": 2**20,
        **extra,
    }


def _tables(md: str) -> dict[tuple[str, str, int], dict[str, str]]:
    """(section heading, impl, tokens) -> {column: cell} for every time table row."""
    out, section, head = {}, None, None
    for line in md.splitlines():
        if line.startswith("#### "):
            section, head = line[5:], None
        elif line.startswith("| tokens | impl | median ms"):
            head = [c.strip() for c in line.strip("|").split("|")]
        elif head and line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) == len(head):
                out[(section, cells[1], int(cells[0]))] = dict(zip(head, cells, strict=True))
        elif not line.strip():
            head = None
    return out


def _model(impl, trainable, tokens, elem=2, gemm=GEMM_TFLOPS, hbm=4.8, forward_only=False):
    p = passes(impl, "forward_kl", True, trainable, Shape(N=tokens, H=H, V=V, elem=elem), 0.0, 1.0)
    if forward_only:
        p = [x for x in p if x.name.startswith("fwd")]
    return expected_ms(p, gemm_tflops=gemm, hbm_tbps=hbm)


def test_model_column_of_a_gpu_run(report, tmp_path):
    chunked = _model("chunked", True, N)
    fused_frozen = _model("fused", False, N)
    # this row records its skipped and clip-recompute fractions: the model takes them
    onepass = expected_ms(
        passes("fused-onepass", "forward_kl", True, True, Shape(N=N // 2, H=H, V=V), 0.5, 0.1),
        gemm_tflops=GEMM_TFLOPS,
        hbm_tbps=4.8,
    )
    deterministic = expected_ms(
        passes("fused", "forward_kl", True, True, Shape(N=N // 2, H=H, V=V), 0.5, 0.1),
        gemm_tflops=GEMM_TFLOPS,
        hbm_tbps=4.8,
    )
    assert format(onepass, ".3g") != format(deterministic, ".3g")
    assert format(onepass, ".3g") != format(_model("fused-onepass", True, N // 2), ".3g")
    # the bandwidth matters at this shape: a wrong device default would show
    assert format(chunked, ".3g") != format(_model("chunked", True, N, hbm=3.35), ".3g")
    results = [
        _row("torch", "fwdbwd", "trainable", N, 1.25 * chunked / 1e3),
        _row("naive", "fwdbwd", "trainable", N, 0.5),
        _row("liger-fljsd", "fwdbwd", "trainable", N, 0.2),
        _row("fused", "fwdbwd", "frozen", N, 2.0 * fused_frozen / 1e3),
        _row(
            "fused",
            "fwdbwd",
            "trainable",
            N // 2,
            0.1,
            deterministic=False,
            skipped_fraction=0.5,
            clip_recompute_fraction=0.1,
        ),
        _row("fused", "fwdbwd", "frozen", N // 2, 0.1, clip=None),
        _row("fused", "fwdbwd", "frozen", N // 4, 0.1, clip=None, kind="jsd"),
        _row("fused", "fwd", "-", N, 0.05),
        _row("naive", "fwd", "-", N, 0.3),
    ]
    data = {"meta": _meta(), "results": results, "checks": [], "precision": []}
    md = Path(report.render(data, str(tmp_path))[0]).read_text()
    rows = _tables(md)
    tr, fr = "fwdbwd, trainable lm_head", "fwdbwd, frozen lm_head"

    assert rows[(tr, "torch", N)]["model ms"] == format(chunked, ".3g")
    assert rows[(tr, "torch", N)]["measured / model"] == "1.25"
    assert rows[(fr, "fused", N)]["model ms"] == format(fused_frozen, ".3g")
    assert rows[(fr, "fused", N)]["measured / model"] == "2"
    assert rows[(tr, "fused", N // 2)]["model ms"] == format(onepass, ".3g")

    # no clip: no terms pass; jsd: a terms pass over every tile
    def frozen(kind, clip, tokens):
        p = passes("fused", kind, clip, False, Shape(N=tokens, H=H, V=V), 0.0, 1.0)
        return format(expected_ms(p, gemm_tflops=GEMM_TFLOPS, hbm_tbps=4.8), ".3g")

    assert frozen("forward_kl", False, N // 2) != frozen("forward_kl", True, N // 2)
    assert frozen("jsd", False, N // 4) != frozen("forward_kl", False, N // 4)
    assert rows[(fr, "fused", N // 2)]["model ms"] == frozen("forward_kl", False, N // 2)
    assert rows[(fr, "fused", N // 4)]["model ms"] == frozen("jsd", False, N // 4)
    for key in ((tr, "naive", N), (tr, "liger-fljsd", N), ("fwd", "naive", N)):
        assert rows[key]["model ms"] == "—" and rows[key]["measured / model"] == "—"

    # a forward-only row counts the forward passes only (every model names its passes
    # fwd... / bwd...)
    for impl in ("chunked", "fused", "fused-onepass"):
        names = [p.name for p in passes(impl, "forward_kl", True, False, Shape(N=N, H=H, V=V))]
        assert all(n.startswith(("fwd", "bwd")) for n in names), names
    expected_fwd = _model("fused", False, N, forward_only=True)
    assert expected_fwd < fused_frozen
    assert rows[("fwd", "fused", N)]["model ms"] == format(expected_fwd, ".3g")
    assert "Model ms: the expected time" in md and "HBM 4.8 TB/s" in md
    assert "not expected to match" not in md


def test_fused_onepass_rows_get_the_one_pass_model(report, tmp_path):
    """The bench impl "fused-onepass" (impl="fused", deterministic=False) is modelled as
    cost_model's "fused-onepass", with or without the row's deterministic field, and
    its rows follow fused's in the tables."""
    meta = _meta()
    # half the tiles skipped: the one-pass backward skips their GEMM work too, so the
    # two models differ (at skipped fraction 0 both are 6 / 8NHV at the GEMM rate)
    frac = dict(skipped_fraction=0.5, clip_recompute_fraction=0.1)

    def model(impl, trainable):
        p = passes(impl, "forward_kl", True, trainable, Shape(N=N, H=H, V=V), 0.5, 0.1)
        return expected_ms(p, gemm_tflops=GEMM_TFLOPS, hbm_tbps=4.8)

    onepass = {w: model("fused-onepass", w == "trainable") for w in ("frozen", "trainable")}
    deterministic = {w: model("fused", w == "trainable") for w in ("frozen", "trainable")}
    for w in ("frozen", "trainable"):
        assert format(onepass[w], ".3g") != format(deterministic[w], ".3g")
    for extra in ({}, {"deterministic": False}):
        row = _row("fused-onepass", "fwdbwd", "trainable", N, 0.1, **frac, **extra)
        assert report.model_impl(row, meta) == "fused-onepass"
        assert report.model_ms(row, meta) == pytest.approx(onepass["trainable"], rel=1e-12)
    assert report.model_impl(_row("fused", "fwdbwd", "frozen", N, 0.1), meta) == "fused"
    results = [
        _row("naive", "fwdbwd", "frozen", N, 0.5),
        _row("fused-onepass", "fwdbwd", "frozen", N, 3.0 * onepass["frozen"] / 1e3, **frac),
        _row("fused", "fwdbwd", "frozen", N, 0.1, **frac),
        _row("fused-onepass", "fwdbwd", "trainable", N, 0.2, deterministic=False, **frac),
        _row("torch", "fwdbwd", "frozen", N, 0.1),
    ]
    data = {"meta": meta, "results": results, "checks": [], "precision": []}
    md = Path(report.render(data, str(tmp_path))[0]).read_text()
    rows = _tables(md)
    tr, fr = "fwdbwd, trainable lm_head", "fwdbwd, frozen lm_head"
    assert rows[(fr, "fused-onepass", N)]["model ms"] == format(onepass["frozen"], ".3g")
    assert rows[(fr, "fused-onepass", N)]["measured / model"] == "3"
    assert rows[(tr, "fused-onepass", N)]["model ms"] == format(onepass["trainable"], ".3g")
    assert rows[(fr, "fused", N)]["model ms"] == format(deterministic["frozen"], ".3g")
    frozen_table = md.split("#### " + fr, 1)[1].split("####", 1)[0]
    order = ("| torch |", "| fused |", "| fused-onepass |", "| naive |")
    pos = [frozen_table.find(x) for x in order]
    assert all(p >= 0 for p in pos) and pos == sorted(pos), pos


def test_operand_bytes_follow_the_row_dtype(report):
    """At a GEMM rate high enough that HBM bytes set the time, bf16 and fp32 rows differ."""
    meta = _meta()
    meta["gemm"]["flops_per_s"] = 1e20
    for dtype, elem in (("bfloat16", 2), ("float32", 4)):
        row = _row("fused", "fwdbwd", "trainable", N, 0.1, dtype=dtype)
        shape = Shape(N=N, H=H, V=V, elem=elem)
        expected = expected_ms(
            passes("fused", "forward_kl", True, True, shape, 0.0, 1.0),
            gemm_tflops=1e8,
            hbm_tbps=4.8,
        )
        assert report.model_ms(row, meta) == pytest.approx(expected, rel=1e-12)
    assert report.model_ms(_row("fused", "fwdbwd", "frozen", N, 0.1, dtype="int8"), meta) is None


def test_hbm_bandwidth_by_device(report):
    assert report.hbm_tbps(_meta("NVIDIA H200")) == 4.8
    assert report.hbm_tbps(_meta("NVIDIA H100 80GB HBM3")) == 3.35
    assert report.hbm_tbps(_meta("NVIDIA A100-SXM4-80GB")) == DEFAULT_HBM_TBPS


def test_committed_cpu_run_rebuilds_with_the_labelled_model(report, tmp_path):
    with open(CPU_RUN) as f:
        data = json.load(f)
    meta = data["meta"]
    assert meta["device_type"] == "cpu"
    md = Path(report.render(copy.deepcopy(data), str(tmp_path))[0]).read_text()
    assert "Model ms (GPU cost model; CPU rows are not expected to match)" in md
    rows = _tables(md)
    gemm = meta["gemm"]["flops_per_s"] / 1e12
    row = next(
        r
        for r in data["results"]
        if r["op"] == "fused_linear" and r["impl"] == "torch" and r["weight"] == "trainable"
    )
    # the committed run is at cpu-small (H 256, V 8192)
    shape = Shape(N=row["tokens"], H=row["hidden"], V=row["vocab"], elem=4)
    expected = expected_ms(
        passes("chunked", "forward_kl", True, True, shape, 0.0, 1.0),
        gemm_tflops=gemm,
        hbm_tbps=DEFAULT_HBM_TBPS,
    )
    cell = rows[("fwdbwd, trainable lm_head", "torch", row["tokens"])]
    assert cell["model ms"] == format(expected, ".3g")
    assert rows[("fwdbwd, trainable lm_head", "naive", row["tokens"])]["model ms"] == "—"
    # three fused-linear time tables (fwd, frozen, trainable) carry it, the divergence ones not
    fused_part, divergence_part = md.split("## `divergence`")
    assert fused_part.count("| median ms | model ms | measured / model |") == 3
    assert "model ms" not in divergence_part


def test_ratios_against_trls_kernel(report, tmp_path):
    """The report's TRL section: our time and peak against TRL's kernel row of the same
    preset, mode, lm_head and tokens (speedup = TRL / ours, memory = ours / TRL); a TRL
    OOM is said as such; the ratio tables carry a TRL column; a capped preset says so."""
    gemma = dict(preset="gemma2-2b", hidden=2304, vocab=256_000, softcap=30.0)
    results = [
        _row("fused", "fwdbwd", "trainable", N, 0.1, peak_bytes=100 * 2**20),
        _row("torch", "fwdbwd", "trainable", N, 0.4, peak_bytes=300 * 2**20),
        _row("trl-chunked", "fwdbwd", "trainable", N, 0.25, peak_bytes=1200 * 2**20),
        _row("fused", "fwdbwd", "frozen", N, 0.1),
        _row("trl-chunked", "fwdbwd", "frozen", N, 0.1, status="OOM", peak_bytes=None),
        _row("fused", "fwdbwd", "trainable", N, 0.5, peak_bytes=2**20, **gemma),
        _row("trl-chunked", "fwdbwd", "trainable", N, 1.0, peak_bytes=4 * 2**20, **gemma),
    ]
    data = {"meta": _meta(), "results": results, "checks": [], "precision": []}
    md = Path(report.render(data, str(tmp_path))[0]).read_text()
    section = md.split("## Against TRL's kernel (`trl-chunked`)", 1)[1].split("\n## ", 1)[0]
    lines = {tuple(c.strip() for c in x.strip("|").split("|")[:4]): x for x in section.splitlines()}
    tr, fr = "fwdbwd, trainable lm_head", "fwdbwd, frozen lm_head"
    assert "| 2.5x | 0.0833 |" in lines[("qwen3-4b", tr, str(N), "fused")]
    assert "| 0.625x | 0.25 |" in lines[("qwen3-4b", tr, str(N), "torch")]
    assert "| TRL OOM | TRL OOM |" in lines[("qwen3-4b", fr, str(N), "fused")]
    assert "| 2x | 0.25 |" in lines[("gemma2-2b", tr, str(N), "fused")]
    assert "speedup vs trl-chunked | mem ratio vs trl-chunked" in md
    assert "### gemma2-2b (H=2304, V=256000, softcap 30, bfloat16)" in md
    assert "### qwen3-4b (H=2560, V=151936, bfloat16)" in md
    # no TRL rows: no section
    data["results"] = [r for r in results if r["impl"] != "trl-chunked"]
    md = Path(report.render(data, str(tmp_path))[0]).read_text()
    assert "Against TRL" not in md
