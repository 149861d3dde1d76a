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
        baselines.gkd_beta("symmetric_kl", 0.5)
    assert baselines.gkd_beta("forward_kl", 0.3) == 0.0
    assert baselines.gkd_beta("jsd", 0.3) == 0.3


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


# ------------------------------------------------------------- TRL's kernel, soft cap


def test_trl_kernel_is_pinned_in_one_place(bench_modules):
    """TRL 1.16.0's ChunkedDivergenceFunction: the module, class and forward arguments the
    bench relies on (a TRL release that moves or reorders them fails here, by name)."""
    import inspect

    baselines = bench_modules[0]
    fn, how = baselines.trl_kernel()
    assert fn is not None, how
    assert fn.__module__ == baselines.TRL_KERNEL_MODULE
    assert fn.__name__ == baselines.TRL_KERNEL_CLASS
    assert how.startswith("TRL 1.16.0")
    params = list(inspect.signature(fn.forward).parameters)[1:]  # after ctx
    assert params == [
        "student_hidden",
        "student_weight",
        "student_bias",
        "teacher_hidden",
        "teacher_weight",
        "teacher_bias",
        "beta",
        "temperature",
        "student_logit_scale",
        "student_final_logit_softcapping",
        "teacher_logit_scale",
        "teacher_final_logit_softcapping",
    ]
    src = inspect.getsource(inspect.getmodule(fn))
    # the only name the stand-in replaces when trl.trainer.utils cannot import
    assert f"from ..trainer.utils import {baselines.TRL_TRAINER_IMPORT}\n" in src


_STAND_IN_SCRIPT = """
import sys
for m in ("accelerate", "datasets", "pandas"):
    sys.modules[m] = None  # as on a GPU image without them
sys.path.insert(0, "bench")
import torch, baselines
fn, how = baselines.trl_kernel()
print("HOW", how)
g = torch.Generator().manual_seed(0)
hs, ht = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
w = torch.randn(40, 16, generator=g)
print("LOSS", float(baselines.trl_chunked_divergence("jsd", 0.3, 1.1, 30.0)(hs, ht, w)))
"""


def test_trl_kernel_imports_without_the_trainer_dependencies(bench_modules):
    """Where accelerate/datasets/pandas are missing (the GPU image), TRL's kernel is still
    imported, with the stand-in named, and computes what the plain import computes."""
    baselines = bench_modules[0]
    proc = subprocess.run(
        [sys.executable, "-c", _STAND_IN_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    how = re.search(r"^HOW (.*)$", proc.stdout, re.M).group(1)
    assert re.search(r"trl.trainer.utils stood in for \(no (accelerate|datasets|pandas) here", how)
    g = torch.Generator().manual_seed(0)
    hs, ht = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    w = torch.randn(40, 16, generator=g)
    expected = float(baselines.trl_chunked_divergence("jsd", 0.3, 1.1, 30.0)(hs, ht, w))
    assert float(re.search(r"^LOSS (.*)$", proc.stdout, re.M).group(1)) == expected


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_trl_anchor_passes_the_correctness_check(bench_fused_linear, kind):
    """TRL's kernel through the bench's pre-timing check: against the unclipped naive loss
    (it has no clip), with and without Gemma 2's cap; the check fails when the clip or
    the cap differ, so it compares something."""
    import types

    b = bench_fused_linear
    opts = dict(kind=kind, beta=0.3, temperature=1.1, clip=0.001)
    cfg = types.SimpleNamespace(options=lambda: dict(opts), kind=kind, beta=0.3, temperature=1.1)
    g = torch.Generator().manual_seed(5)
    h_s = torch.randn(24, 32, generator=g).requires_grad_()
    h_t = h_s.detach() + 0.5 * torch.randn(24, 32, generator=g)
    w = (8.0 * torch.randn(300, 32, generator=g)).requires_grad_()  # logits of std ~45
    for cap in (None, 30.0):
        fn = b._loss_fn("trl-chunked", cfg, 16, cap)
        b._check_against_naive(fn, h_s, h_t, w, cfg, softcap=cap, clip=None)
        with pytest.raises(AssertionError):
            b._check_against_naive(fn, h_s, h_t, w, cfg, softcap=cap)  # the run's clip
    with pytest.raises(AssertionError):  # capped kernel against the uncapped loss
        capped = b._loss_fn("trl-chunked", cfg, 16, 30.0)
        b._check_against_naive(capped, h_s, h_t, w, cfg, clip=None)
    assert h_s.grad is None and w.grad is None


def test_softcap_presets_and_skip_rules(bench_fused_linear, bench_modules, monkeypatch):
    import types

    _, harness, _, _ = bench_modules
    b = bench_fused_linear
    assert harness.PRESETS["gemma2-2b"] == (2304, 256_000)
    assert harness.PRESETS["gemma3-4b"] == (2560, 262_208)
    assert harness.PRESET_SOFTCAP == {"gemma2-2b": 30.0}  # Gemma 3 does not cap
    assert "trl-chunked" in harness.ANCHORS["fused_linear"]
    assert "trl-chunked" in harness.CHECKED_IMPLS and "trl-chunked" in harness.NO_CLIP
    cfg = types.SimpleNamespace(wants=lambda impl: True, kind="forward_kl", beta=0.5)
    cuda = torch.device("cuda")
    for impl in ("liger-fljsd", "liger-fljsd-loss"):
        assert "no final-logit soft cap" in b._skip_reason(impl, cfg, cuda, "fwdbwd", 30.0)
    assert b._skip_reason("trl-chunked", cfg, cuda, "fwdbwd", 30.0) is None
    assert b._skip_reason("compiled", cfg, cuda, "fwdbwd", 30.0) is None
    assert b._skip_reason("fused", cfg, cuda, "fwdbwd", 30.0) is None  # every impl caps
    monkeypatch.setattr(b.baselines, "trl_kernel", lambda: (None, "TRL is not installed (x)"))
    assert b._skip_reason("trl-chunked", cfg, cuda) == "TRL is not installed (x)"


def test_bench_passes_the_cap_to_ours_and_the_anchors(bench_fused_linear, monkeypatch):
    import types

    import opsd_kernels

    b = bench_fused_linear
    calls = []
    monkeypatch.setattr(
        opsd_kernels, "fused_linear_divergence", lambda *a, **kw: calls.append(kw) or 0.0
    )
    monkeypatch.setattr(
        b.baselines, "naive_linear", lambda *a, **kw: calls.append(("naive", kw)) or 0.0
    )
    opts = dict(kind="forward_kl", beta=0.5, temperature=1.1, clip=0.05)
    cfg = types.SimpleNamespace(options=lambda: dict(opts))
    b._loss_fn("fused", cfg, 16, 30.0)(None, None, None)
    b._loss_fn("naive", cfg, 16, 30.0)(None, None, None)
    assert calls == [
        {"impl": "fused", **opts, "softcap": 30.0},
        ("naive", {**opts, "softcap": 30.0}),
    ]


def test_naive_and_compiled_baselines_soft_cap(bench_modules):
    """The naive path caps both roles' logits (z = 30 tanh(x / 30)) before the temperature,
    as opsd_kernels' float64 reference transform does; the compiled chunk function too."""
    from opsd_kernels.divergences import transform_logits

    baselines = bench_modules[0]
    g = torch.Generator().manual_seed(2)
    h_s, h_t = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    w = 10 * torch.randn(50, 8, generator=g)
    capped = baselines.naive_linear(h_s, h_t, w, temperature=1.1, clip=0.05, softcap=30.0)
    ref = baselines.naive_divergence(
        transform_logits(h_s @ w.T, 1.0, 30.0),
        transform_logits(h_t @ w.T, 1.0, 30.0),
        temperature=1.1,
        clip=0.05,
    )
    assert torch.allclose(capped, ref, rtol=1e-6)
    assert not torch.allclose(
        capped, baselines.naive_linear(h_s, h_t, w, temperature=1.1, clip=0.05)
    )
    chunk = baselines._chunk_loss_linear(h_s, w, h_t, w, "forward_kl", 0.5, 1.1, 0.05, 30.0)
    assert torch.allclose(chunk / 6, capped, rtol=1e-6)


def test_gpu_check_runs_trl_in_the_qwen_pass():
    impls = _qwen_pass_impls()
    assert "trl-chunked" in impls
    assert '"trl"' in _script()  # its version is printed


def test_our_capped_impl_passes_the_correctness_check(bench_fused_linear):
    """impl="torch" with softcap=30 (the gemma2-2b preset) through the pre-timing check, with
    the run's clip, against the capped naive loss; the uncapped naive loss fails it."""
    import types

    b = bench_fused_linear
    opts = dict(kind="forward_kl", beta=0.5, temperature=1.1, clip=0.05)
    cfg = types.SimpleNamespace(options=lambda: dict(opts))
    g = torch.Generator().manual_seed(6)
    h_s = torch.randn(24, 32, generator=g).requires_grad_()
    h_t = h_s.detach() + 0.5 * torch.randn(24, 32, generator=g)
    w = (8.0 * torch.randn(300, 32, generator=g)).requires_grad_()  # the cap bends these
    fn = b._loss_fn("torch", cfg, 16, 30.0)
    b._check_against_naive(fn, h_s, h_t, w, cfg, softcap=30.0)
    with pytest.raises(AssertionError):
        b._check_against_naive(fn, h_s, h_t, w, cfg)
