"""Guard of bench/gpu_check.sh (the one-call GPU check) and of the bench's own rules, on CPU.

* the step budgets add up to less than 9 minutes, every step runs under its
  own ``timeout`` with the budget named for it, and larger budgets are refused;
* a dry run (``GPU_CHECK_DRY_RUN=1``, a fake ``nvidia-smi`` on PATH) prints the
  device first, then the curated tests, then the bench passes in priority
  order, each followed by a report merge;
* every line of ``bench/gpu_tests.txt`` selects at least one test that pytest
  collects today (a renamed or removed test is reported with its line), the
  subset stays small, and the ahead-of-time compile tests are not in it;
* bench hygiene: an unknown kind raises in the baselines; the precision table
  is measured and rendered.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
SCRIPT = os.path.join(BENCH, "gpu_check.sh")
NINE_MINUTES = 540


def _script() -> str:
    with open(SCRIPT) as f:
        return f.read()


def _defaults(text: str) -> dict[str, int]:
    """``NAME=${NAME:-N}`` and ``NAME=N`` integer assignments of the script."""
    out = {k: int(v) for k, v in re.findall(r"^(\w+)=\$\{\1:-(\d+)\}", text, re.M)}
    out.update({k: int(v) for k, v in re.findall(r"^(\w+)=(\d+)\s*(?:#.*)?$", text, re.M)})
    return out


def _steps(text: str) -> list[str]:
    m = re.search(r"^STEPS=\(([^)]*)\)", text, re.M)
    assert m, "gpu_check.sh must list its budgeted steps in STEPS=(...)"
    return m.group(1).split()


def test_budgets_add_up_to_less_than_nine_minutes():
    text = _script()
    d = _defaults(text)
    for name in ("KILL_GRACE", "MERGES", "BUDGET_LIMIT", "UNTIMED_RESERVE", "REPORT_CAP"):
        assert name in d, f"gpu_check.sh must set {name}"
    steps = _steps(text)
    for name in ("TEST_CAP", "QWEN_CAP", "PRECISION_CAP", "SKIPPING_CAP"):
        assert name in steps, f"{name} is not a budgeted step"
    missing = [s for s in steps if s not in d]
    assert not missing, f"steps without a default budget: {missing}"
    total = sum(d[s] + d["KILL_GRACE"] for s in steps)
    total += d["MERGES"] * (d["REPORT_CAP"] + d["KILL_GRACE"])
    assert total <= d["BUDGET_LIMIT"], (total, d["BUDGET_LIMIT"])
    assert d["BUDGET_LIMIT"] + d["UNTIMED_RESERVE"] <= NINE_MINUTES
    assert d["UNTIMED_RESERVE"] >= 15  # nvidia-smi, cp, ls: a few seconds in all
    # the test step must leave room for ~40 compilations at ~1.5 s plus start-up
    assert d["TEST_CAP"] >= 80


def test_every_step_runs_under_its_own_budget():
    text = _script()
    for cap in _steps(text) + ["REPORT_CAP"]:
        uses = re.findall(r'step\s+"[^"]+"\s+"\$' + cap + '"', text)
        assert uses, f"no step runs under ${cap}"
    # every Python command (tests, benches, report) runs through step, i.e. under timeout
    logical = text.replace("\\\n", " ")
    for line in logical.splitlines():
        code = line.split("#", 1)[0]
        if "$PY " in code:
            assert re.match(r'\s*step\s+"', code), f"not under a budget: {line.strip()[:100]}"


def _fake_path(tmp_path) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/bin/sh\necho "name, memory.total [MiB]"\necho "FAKE H200, 143771 MiB"\n')
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"


def _run_script(tmp_path, **env):
    full = {
        **os.environ,
        "PATH": _fake_path(tmp_path),
        "OUT": str(tmp_path / "out"),
        "RESULTS_DIR": str(tmp_path / "results"),
        "GPU_CHECK_DRY_RUN": "1",
        **env,
    }
    return subprocess.run(
        ["bash", SCRIPT], env=full, capture_output=True, text=True, timeout=60, cwd=str(tmp_path)
    )


def test_dry_run_order_and_commands(tmp_path):
    proc = _run_script(tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    order = [
        "FAKE H200",
        "== tests",
        "== bench qwen3-4b",
        "== bench precision",
        "== bench skipping",
        "== bench compiled",
    ]
    pos = [out.find(x) for x in order]
    assert all(p >= 0 for p in pos), [x for x, p in zip(order, pos, strict=True) if p < 0]
    assert pos == sorted(pos), "steps out of order: device, tests, qwen3-4b, precision, ..."
    dry = [line for line in out.splitlines() if line.startswith("DRY-RUN:")]
    assert all(re.match(r"DRY-RUN: timeout -s INT -k \d+ \d+ ", line) for line in dry), dry
    tests = [line for line in dry if "gpu_tests.py" in line]
    assert len(tests) == 1 and "test_triton_compile" not in out
    assert not any("pytest tests" in line or " tests/" in line for line in dry), (
        "the full test suite must not run on the GPU: only bench/gpu_tests.txt"
    )
    benches = [line for line in dry if "-m pytest bench/" in line]
    assert any("bench_precision.py" in line for line in benches)
    assert any("bench_skipping.py" in line for line in benches)
    assert any("--preset qwen3-4b" in line and "bench_fused_linear.py" in line for line in benches)
    # after every bench pass, the report is merged (what finished is kept)
    steps = [line for line in out.splitlines() if line.startswith("== ")]
    for i, s in enumerate(steps):
        if s.startswith("== bench "):
            assert steps[i + 1].startswith("== report"), steps


def test_larger_budgets_are_refused(tmp_path):
    proc = _run_script(tmp_path, QWEN_CAP="600")
    assert proc.returncode == 2
    assert "lower them" in proc.stderr


BAD_LINES = ['tests/test_fused.py -k "test_no_such_test_anywhere"', "tests/test_no_such_file.py"]


@pytest.fixture(scope="module")
def subset_check(tmp_path_factory):
    """One collection (``gpu_tests.py --check``) of the real list plus two bad lines."""
    with open(os.path.join(BENCH, "gpu_tests.txt")) as f:
        real = f.read().splitlines()
    listing = tmp_path_factory.mktemp("gpu") / "list.txt"
    listing.write_text("\n".join(real + BAD_LINES) + "\n")
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, "gpu_tests.py"), "--list", str(listing), "--check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    counts = {
        int(m.group(2)): int(m.group(1))
        for m in re.finditer(r"^\s*(\d+)\s+(\d+): ", proc.stdout, re.M)
    }
    problems = [line for line in proc.stdout.splitlines() if line.startswith("PROBLEM")]
    return proc, len(real), counts, problems


def test_gpu_subset_selects_existing_tests(subset_check):
    """Every line of bench/gpu_tests.txt selects tests pytest collects today (renames fail)."""
    proc, n_real, counts, problems = subset_check
    real_problems = [
        p for p in problems if not any(f"line {n_real + i + 1}" in p for i in range(len(BAD_LINES)))
    ]
    assert not real_problems, (
        "bench/gpu_tests.txt is out of date:\n"
        + "\n".join(real_problems)
        + "\n"
        + proc.stdout[-3000:]
        + proc.stderr[-2000:]
    )
    real_counts = [c for line, c in counts.items() if line <= n_real]
    assert real_counts and all(c > 0 for c in real_counts), proc.stdout[-3000:]
    total = int(re.search(r"^\s*(\d+)\s+in all", proc.stdout, re.M).group(1))
    assert 10 <= total <= 45, total


def test_gpu_subset_names_missing_tests_clearly(subset_check):
    proc, n_real, _, problems = subset_check
    assert proc.returncode == 1
    assert any(
        f"line {n_real + 1} selects no test" in p and "test_no_such_test_anywhere" in p
        for p in problems
    ), proc.stdout[-3000:]
    assert any(
        f"line {n_real + 2}: no such file tests/test_no_such_file.py" in p for p in problems
    ), proc.stdout[-3000:]


def test_gpu_subset_skips_the_ahead_of_time_compile_tests(tmp_path):
    sys.path.insert(0, BENCH)
    try:
        import gpu_tests
    finally:
        sys.path.remove(BENCH)
    files = {s.file for s in gpu_tests.read_selections()}
    assert files, "empty subset"
    assert "tests/test_triton_compile.py" not in files
    bad = tmp_path / "bad.txt"
    bad.write_text("# comment\n\ntests/test_fused.py -x cuda\n")
    with pytest.raises(ValueError, match="bad.txt:3: expected 'FILE"):
        gpu_tests.read_selections(str(bad))


# ------------------------------------------------------------------ bench hygiene


@pytest.fixture
def bench_modules():
    sys.path.insert(0, BENCH)
    try:
        import baselines
        import bench_precision
        import harness
        import report

        yield baselines, harness, bench_precision, report
    finally:
        sys.path.remove(BENCH)


def test_unknown_kind_raises_in_the_baselines(bench_modules):
    baselines = bench_modules[0]
    ls = torch.log_softmax(torch.randn(2, 5), -1)
    with pytest.raises(ValueError, match="kind must be one of"):
        baselines.naive_pointwise(ls, ls, "forward_kll", 0.5)
    with pytest.raises(ValueError, match="kind must be one of"):
        baselines.liger_beta("symmetric_kl", 0.5)
    assert baselines.liger_beta("forward_kl", 0.3) == 0.0
    assert baselines.liger_beta("jsd", 0.3) == 0.3


def test_one_impl_list_per_concern(bench_modules):
    _, harness, _, report = bench_modules
    assert set(harness.OUR_IMPLS) <= set(harness.IMPLS["fused_linear"])
    assert set(harness.IMPLS["precision"]) <= set(report.IMPL_ORDER)
    assert report.ANCHORS is harness.ANCHORS


@pytest.fixture
def bench_fused_linear(bench_modules):
    sys.path.insert(0, BENCH)
    try:
        import bench_fused_linear

        yield bench_fused_linear
    finally:
        sys.path.remove(BENCH)


def _qwen_pass_impls() -> list[str]:
    logical = _script().replace("\\\n", " ")
    line = next(x for x in logical.splitlines() if '"bench qwen3-4b"' in x)
    return re.search(r"--impls (\S+)", line).group(1).split(",")


def test_fused_onepass_is_registered_in_every_layer(bench_modules):
    """impl="fused", deterministic=False is one bench impl, fed from the one registry."""
    _, harness, _, report = bench_modules
    assert harness.api_args("fused-onepass") == {"impl": "fused", "deterministic": False}
    assert harness.api_args("fused") == {"impl": "fused"}
    assert "fused-onepass" in harness.IMPLS["fused_linear"]
    assert "fused-onepass" in harness.TRITON_IMPLS and "torch" not in harness.TRITON_IMPLS
    assert harness.SAME_FORWARD_AS == {"fused-onepass": "fused"}
    # the report: ours (GPU targets, ratio tables, plot styles), and right after fused
    assert "fused-onepass" in report.OURS
    order = report.IMPL_ORDER
    assert order.index("fused-onepass") == order.index("fused") + 1 < order.index("naive")
    # the precision and divergence benches call impl= only: API names there
    assert harness.API_IMPLS == ("torch", "triton", "fused")
    assert "fused-onepass" not in harness.IMPLS["precision"] + harness.IMPLS["divergence"]
    # every bench impl of ours names an impl the API accepts
    assert {a["impl"] for a in harness.OUR_IMPL_ARGS.values()} <= set(harness.API_IMPLS)
    with pytest.raises(ValueError, match="impl must be one of our impls"):
        harness.api_args("fused-one-pass")
    # the GPU check's Qwen3-4B pass runs every impl of ours, and only known names
    impls = _qwen_pass_impls()
    assert set(harness.OUR_IMPLS) <= set(impls), impls
    assert set(impls) <= set(report.IMPL_ORDER), set(impls) - set(report.IMPL_ORDER)


def test_bench_loss_fn_passes_the_registry_arguments(bench_fused_linear, monkeypatch):
    import types

    import opsd_kernels

    calls = []
    monkeypatch.setattr(
        opsd_kernels, "fused_linear_divergence", lambda *a, **kw: calls.append(kw) or 0.0
    )
    opts = dict(kind="jsd", beta=0.3, temperature=1.1, clip=None)
    cfg = types.SimpleNamespace(options=lambda: dict(opts))
    for impl in ("fused-onepass", "fused", "triton"):
        bench_fused_linear._loss_fn(impl, cfg, 16)(None, None, None)
    assert calls == [
        {"impl": "fused", "deterministic": False, **opts},
        {"impl": "fused", **opts},
        {"impl": "triton", **opts},
    ]
    with pytest.raises(ValueError, match="unknown fused_linear impl 'fused-atomic'"):
        bench_fused_linear._loss_fn("fused-atomic", cfg, 16)


def test_bench_skip_rules_of_the_onepass_impl(bench_fused_linear):
    import types

    cfg = types.SimpleNamespace(wants=lambda impl: True)
    skip = bench_fused_linear._skip_reason
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for impl in ("fused", "fused-onepass", "triton"):
        assert "needs CUDA" in skip(impl, cfg, cpu, "fwdbwd")
        assert skip(impl, cfg, cuda, "fwdbwd") is None
    assert skip("torch", cfg, cpu, "fwd") is None
    # its forward is fused's: no fwd rows of its own
    assert "forward of fused" in skip("fused-onepass", cfg, cuda, "fwd")
    assert skip("fused", cfg, cuda, "fwd") is None


def test_bench_correctness_check_covers_gradients(bench_fused_linear, bench_modules):
    """The pre-timing check compares the gradients too, so a wrong backward is caught;
    fused-onepass (deterministic=False) passes it under the Triton interpreter."""
    import types

    baselines = bench_modules[0]
    b = bench_fused_linear
    opts = dict(kind="forward_kl", beta=0.5, temperature=1.1, clip=0.05)
    cfg = types.SimpleNamespace(options=lambda: dict(opts))
    g = torch.Generator().manual_seed(3)
    h_s = torch.randn(24, 32, generator=g).requires_grad_()
    h_t = h_s.detach() + 0.5 * torch.randn(24, 32, generator=g)
    w = (0.35 * torch.randn(300, 32, generator=g)).requires_grad_()
    for impl in ("torch", "fused-onepass"):
        b._check_against_naive(b._loss_fn(impl, cfg, 16), h_s, h_t, w, cfg)
    assert h_s.grad is None and w.grad is None  # the check leaves .grad alone

    def wrong_weight_grad(hs, ht, w):  # the right loss, a wrong d(weight)
        loss = baselines.naive_linear(hs, ht, w, **opts)
        return loss + 1e-3 * ((w * w).sum() - (w * w).sum().detach())

    with pytest.raises(AssertionError, match="d\\(weight\\) relative error"):
        b._check_against_naive(wrong_weight_grad, h_s, h_t, w, cfg)
    # frozen lm_head: only d(hidden) is compared, and a wrong one is caught
    w_frozen = w.detach()

    def wrong_hidden_grad(hs, ht, w):
        loss = baselines.naive_linear(hs, ht, w, **opts)
        return loss + 1e-3 * (hs.sum() - hs.sum().detach())

    with pytest.raises(AssertionError, match="d\\(hidden\\) relative error"):
        b._check_against_naive(wrong_hidden_grad, h_s, h_t, w_frozen, cfg)
    b._check_against_naive(b._loss_fn("torch", cfg, 16), h_s, h_t, w_frozen, cfg)


def test_precision_table_measured_and_rendered(bench_modules):
    _, harness, bench_precision, report = bench_modules
    shape = (32, 32, 512)
    rows = [
        bench_precision.measure_precision(impl, torch.bfloat16, 0.01, torch.device("cpu"), shape)
        for impl in ("torch", "naive-16bit")
    ]
    harness.PRECISION.clear()
    ours, naive16 = rows
    assert ours["status"] == "ok" and naive16["status"] == "ok"
    assert 1e-5 < ours["kl_per_token"] < 1e-2  # really the near-agreement regime
    assert ours["loss_rel"] <= 5e-4 and ours["dh_rel"] <= 1e-2 and ours["dw_rel"] <= 1e-2
    assert naive16["loss_rel"] > 10 * ours["loss_rel"]  # 16-bit logits lose the difference
    md = "\n".join(report.precision_section(rows))
    assert "## Precision" in md and "| torch | bfloat16 | 0.01" in md
    assert "| naive-16bit | bfloat16 | 0.01" in md
