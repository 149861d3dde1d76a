"""`pytest bench/`: options, shapes, and the report written when the session ends.

Defaults depend on the machine:

* CPU (no CUDA): preset ``cpu-small`` (H 256, V 8192), tokens 128 and 512,
  float32, 3 rounds; only ``impl="torch"`` and the CPU baselines run (the
  Triton impls would need the interpreter, which is far too slow to time).
  With the memory-target check (N 4096, H 1024, V 65,536) it takes about
  four minutes on 2 cores.
* CUDA: preset ``qwen3-4b``, tokens 1024, 4096, 8192, bfloat16, 10 rounds;
  every impl and anchor. ``--full``: all presets, tokens 1k..16k.

Options (all optional)::

    --preset NAMES      comma-separated presets (qwen3-1.7b, qwen3-4b, qwen3-8b,
                        llama3-8b, gemma2-2b, gemma3-4b, cpu-small) or "all";
                        gemma2-2b carries Gemma 2's final-logit soft cap 30
                        (harness.PRESET_SOFTCAP): the fused-linear bench passes
                        softcap=30 to every impl that can cap and skips the
                        others (Liger)
    --tokens LIST       comma-separated token counts, e.g. 1024,8192
    --full              all presets, tokens 1024..16384 (for a GPU)
    --bench-dtype D     float32 | bfloat16 | float16
    --kind K            forward_kl | reverse_kl | jsd     (default forward_kl)
    --temperature T     (default 1.1)
    --clip C            per-entry clip, or "none"        (default 0.05)
    --beta B            JSD beta                          (default 0.5)
    --impls LIST        only these impls/baselines, e.g. torch,naive
    --precision-shape N,H,V   shape of bench_precision.py
    --rounds R          timed rounds per case
    --report-dir DIR    where the report goes (default bench/results)
    --no-report         do not write a report

This conftest never sets TRITON_INTERPRET (the repository's root conftest does
that on CPU-only machines, for the tests); the bench simply never runs a Triton
impl on CPU. It enables pytest-benchmark even when ``--benchmark-disable`` is
in the project's addopts: timing is the point of this directory.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

from opsd_kernels.divergences import KINDS  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEFAULT_TOKENS_GPU = (1024, 4096, 8192)
FULL_TOKENS = (1024, 2048, 4096, 8192, 16384)
GPU_PRESETS = ("qwen3-1.7b", "qwen3-4b", "qwen3-8b", "llama3-8b", "gemma2-2b", "gemma3-4b")


def pytest_addoption(parser):
    g = parser.getgroup("opsd-bench", "opsd-kernels benchmark")
    g.addoption("--preset", default=None, help="comma-separated model presets, or 'all'")
    g.addoption("--tokens", default=None, help="comma-separated token counts")
    g.addoption("--full", action="store_true", help="all presets, tokens 1k..16k")
    g.addoption("--bench-dtype", default=None, choices=("float32", "bfloat16", "float16"))
    g.addoption("--kind", default="forward_kl", choices=tuple(KINDS))
    g.addoption("--temperature", type=float, default=1.1)
    g.addoption("--clip", default="0.05", help="per-entry clip tau, or 'none'")
    g.addoption("--beta", type=float, default=0.5)
    g.addoption("--impls", default=None, help="comma-separated impls/baselines to run")
    g.addoption("--rounds", type=int, default=None)
    g.addoption(
        "--precision-shape",
        default=None,
        help="N,H,V of bench_precision.py (default 256,256,8192 CPU; 512,512,32768 CUDA)",
    )
    g.addoption("--report-dir", default=None)
    g.addoption("--no-report", action="store_true")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # run before pytest-benchmark builds its session, so timing is on even when
    # the project's addopts carry --benchmark-disable
    if hasattr(config.option, "benchmark_enable"):
        config.option.benchmark_enable = True


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` as test modules (pytest's default is ``test_*.py``)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        if parent.session.isinitpath(file_path):
            return None  # named on the command line: pytest collects it already
        return pytest.Module.from_parent(parent, path=file_path)
    return None


class BenchConfig:
    def __init__(self, config):
        opt = config.getoption
        self.device = torch.device("cuda" if HAS_CUDA else "cpu")
        if opt("--full"):
            presets = list(GPU_PRESETS)
            tokens = list(FULL_TOKENS)
        else:
            presets = ["qwen3-4b"] if HAS_CUDA else ["cpu-small"]
            tokens = list(DEFAULT_TOKENS_GPU) if HAS_CUDA else [128, 512]
        if opt("--preset"):
            presets = (
                list(GPU_PRESETS)
                if opt("--preset") == "all"
                else [p.strip() for p in opt("--preset").split(",") if p.strip()]
            )
        for p in presets:
            if p not in harness.PRESETS:
                raise pytest.UsageError(f"unknown preset {p!r}; known: {sorted(harness.PRESETS)}")
        if opt("--tokens"):
            tokens = [int(t) for t in opt("--tokens").split(",") if t.strip()]
        self.shapes = [
            harness.Shape(p, *harness.PRESETS[p], n, harness.PRESET_SOFTCAP.get(p))
            for p in presets
            for n in tokens
        ]
        self.dtype = getattr(torch, opt("--bench-dtype") or ("bfloat16" if HAS_CUDA else "float32"))
        self.kind = opt("--kind")
        self.temperature = opt("--temperature")
        clip = opt("--clip")
        self.clip = None if str(clip).lower() == "none" else float(clip)
        self.beta = opt("--beta")
        self.impls = None if not opt("--impls") else {s.strip() for s in opt("--impls").split(",")}
        self.rounds = opt("--rounds") or (10 if HAS_CUDA else 3)
        self.report_dir = opt("--report-dir") or os.path.join(os.path.dirname(__file__), "results")
        self.write_report = not opt("--no-report")
        # torch.compile's chunk: fixed, so one compiled graph serves every token count
        self.compile_chunk = 1024 if HAS_CUDA else 256

    def options(self) -> dict:
        return {
            "kind": self.kind,
            "beta": self.beta,
            "temperature": self.temperature,
            "clip": self.clip,
        }

    def wants(self, impl: str) -> bool:
        return self.impls is None or impl in self.impls


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        cfg = BenchConfig(metafunc.config)
        metafunc.parametrize("shape", cfg.shapes, ids=[s.id for s in cfg.shapes])


@pytest.fixture(scope="session")
def bench_cfg(request) -> BenchConfig:
    return BenchConfig(request.config)


@pytest.fixture
def device(bench_cfg) -> torch.device:
    return bench_cfg.device


_META: dict = {}  # measured once per session (it times a GEMM)


def _write(config, render_report: bool) -> list[str]:
    """Write this session's results (JSON; plus markdown and plots when rendering)."""
    if not (harness.RESULTS or harness.CHECKS or harness.PRECISION):
        return []
    cfg = BenchConfig(config)
    if not cfg.write_report:
        return []
    import report

    if not _META:
        _META.update(report.collect_meta(cfg))
    return report.write_run(
        harness.RESULTS,
        harness.CHECKS,
        cfg,
        cfg.report_dir,
        precision=harness.PRECISION,
        meta=_META,
        render_report=render_report,
    )


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    # the JSON after every case: a run cut short (time budget, SIGKILL) keeps what finished
    _write(item.config, render_report=False)


def pytest_sessionfinish(session, exitstatus):
    try:
        paths = _write(session.config, render_report=True)
    except Exception as exc:  # noqa: BLE001 - a report failure must be visible, not fatal
        print(f"\nopsd bench: writing the report failed: {exc!r}", file=sys.stderr)
        raise
    if not paths:
        return
    import report

    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = ["opsd bench report: " + p for p in paths]
    lines.append(report.short_table(harness.RESULTS, harness.CHECKS, harness.PRECISION))
    if tr is not None:
        tr.write_line("")
        for line in lines:
            tr.write_line(line)
    else:
        print("\n".join(lines))
