"""The curated CUDA test subset that ``bench/gpu_check.sh`` runs, and its guard.

On a GPU every Triton kernel specialisation costs about 1.5 s to compile, and
the whole suite compiles about 300: far more than a 9-minute GPU check allows.
``bench/gpu_tests.txt`` lists a subset, one selection a line::

    FILE [-k EXPRESSION]      # comment

``EXPRESSION`` is pytest's ``-k`` syntax, matched against each test of FILE
(its name, parameter ids and markers), so a selection survives new parameters
and reordered ids. A line without ``-k`` takes the whole file.

    python bench/gpu_tests.py [PYTEST ARGS]    # run the subset (gpu_check.sh)
    python bench/gpu_tests.py --collect-only -q
    python bench/gpu_tests.py --check          # each line selects >= 1 test;
                                               # counts per line (tests/test_gpu_check.py)
    python bench/gpu_tests.py --count-variants # CPU: run the subset under the Triton
                                               # interpreter and count the distinct
                                               # kernel specialisations it launches
    python bench/gpu_tests.py --count-variants --dry   # launch nothing, count the
                                               # CUDA-only tests too (they then fail)

``--count-variants`` estimates the compilations of the CPU-runnable part of
the subset (a launch's key: kernel, constexpr values, launch options, argument
dtypes, and Triton's integer/pointer specialisations: ``== 1``, divisible by
16, 16-byte aligned). Tests that skip on CPU (the CUDA-only cases) are not in
that count; ``ESTIMATED_CUDA_ONLY_VARIANTS`` holds their hand count.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections import defaultdict
from dataclasses import dataclass, field

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LIST = os.path.join(HERE, "gpu_tests.txt")
#: at most this many tests in the subset (a proxy for the compilations: about 40)
MAX_TESTS = 45
#: kernel variants of the tests that skip on CPU (so --count-variants without --dry
#: cannot see them): --dry counted 16 forward launches, plus about 10 backward ones
#: it cannot reach (see gpu_tests.txt); plus about 4 of impl="fused" in bf16 under
#: Gemma 2's soft cap (its statistics and backward kernels with the cap constexprs)
ESTIMATED_CUDA_ONLY_VARIANTS = 30


@dataclass
class Selection:
    file: str
    expr: str | None
    line_no: int
    text: str
    nodeids: list[str] = field(default_factory=list)

    def matches(self, item) -> bool:
        path = item.nodeid.split("::", 1)[0]
        if path != self.file:
            return False
        if self.expr is None:
            return True
        from _pytest.mark import KeywordMatcher
        from _pytest.mark.expression import Expression

        return Expression.compile(self.expr).evaluate(KeywordMatcher.from_item(item))


def read_selections(path: str = LIST) -> list[Selection]:
    """Parse the list; a malformed line raises ValueError naming it."""
    out = []
    with open(path) as f:
        for no, raw in enumerate(f, 1):
            text = raw.split("#", 1)[0].strip()
            if not text:
                continue
            parts = shlex.split(text)
            if len(parts) == 1:
                expr = None
            elif len(parts) == 3 and parts[1] == "-k":
                expr = parts[2]
            else:
                raise ValueError(f"{path}:{no}: expected 'FILE [-k EXPRESSION]', got {text!r}")
            if "::" in parts[0] or not parts[0].endswith(".py"):
                raise ValueError(f"{path}:{no}: FILE must be a test file path, got {parts[0]!r}")
            out.append(Selection(parts[0], expr, no, text))
    return out


def files(selections: list[Selection]) -> list[str]:
    return list(dict.fromkeys(s.file for s in selections))


class SelectPlugin:
    """Keeps the tests that some line of the list selects; deselects the rest."""

    def __init__(self, selections: list[Selection]):
        self.selections = selections

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, session, config, items):
        keep, drop = [], []
        for item in items:
            hits = [s for s in self.selections if s.matches(item)]
            for s in hits:
                s.nodeids.append(item.nodeid)
            (keep if hits else drop).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
        items[:] = keep


class VariantCounter:
    """Records a key per Triton kernel launch under the interpreter (see the module doc).

    ``dry=True``: launches are recorded but not executed, and the tests that skip
    without CUDA run anyway (their skip marks are dropped and the test module's
    ``HAS_CUDA`` reads True), so the CUDA-only tests are counted too. Their
    results are garbage and they fail; only the count matters. A test that fails
    before its last launch is undercounted.
    """

    def __init__(self, dry: bool = False):
        self.dry = dry
        self.keys: dict[str, set] = defaultdict(set)
        self.by_test: dict[str, set] = defaultdict(set)
        self.current = None

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, session, config, items):
        if self.dry:
            for item in items:
                item.own_markers = [m for m in item.own_markers if m.name not in ("skip", "skipif")]

    def pytest_configure(self, config):
        from triton.runtime import interpreter

        original = interpreter.InterpretedFunction.run
        counter = self

        def run(fn_self, *args, grid, warmup, **kwargs):
            key = (
                tuple(_arg_key(a) for a in args),
                tuple(sorted((k, _arg_key(v)) for k, v in kwargs.items())),
            )
            name = fn_self.fn.__name__
            counter.keys[name].add(key)
            if counter.current:
                counter.by_test[counter.current].add((name, key))
            if counter.dry:
                return None
            return original(fn_self, *args, grid=grid, warmup=warmup, **kwargs)

        interpreter.InterpretedFunction.run = run

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        self.current = item.nodeid
        module = getattr(item, "module", None)
        had = getattr(module, "HAS_CUDA", None)
        if self.dry and had is False:
            module.HAS_CUDA = True  # in-test `if not HAS_CUDA: pytest.skip(...)`
        try:
            return (yield)
        finally:
            self.current = None
            if self.dry and had is False:
                module.HAS_CUDA = False

    def summary(self) -> list[str]:
        total = sum(len(v) for v in self.keys.values())
        lines = [f"distinct kernel variants launched (CPU, interpreter): {total}"]
        lines += [f"  {name}: {len(v)}" for name, v in sorted(self.keys.items())]
        seen: set = set()
        lines.append("new variants per test (in run order):")
        for test, keys in self.by_test.items():
            new = keys - seen
            seen |= keys
            if new:
                lines.append(f"  {len(new):3d}  {test}")
        if not self.dry:
            lines.append(
                f"+ about {ESTIMATED_CUDA_ONLY_VARIANTS} for the CUDA-only tests "
                f"(--dry counts them): about {total + ESTIMATED_CUDA_ONLY_VARIANTS} "
                "compilations"
            )
        return lines


def _arg_key(a):
    import torch

    if isinstance(a, torch.Tensor):
        return ("ptr", str(a.dtype), a.data_ptr() % 16 == 0)
    if isinstance(a, bool):
        return ("const", a)
    if isinstance(a, int):
        return ("int", a == 1, a % 16 == 0, -(2**31) <= a < 2**31)
    if isinstance(a, float):
        return ("fp",)
    if isinstance(a, str | type(None)):
        return ("const", a)
    return ("other", type(a).__name__, repr(a)[:40])


def check(selections: list[Selection], path: str = LIST) -> tuple[int, list[str]]:
    """Collect the subset; returns (number of tests, problems). Prints a table per line."""
    plugin = SelectPlugin(selections)
    present = [f for f in files(selections) if os.path.exists(os.path.join(ROOT, f))]
    code = (
        pytest.main(
            ["--collect-only", "-q", "-p", "no:cacheprovider", "--rootdir", ROOT, *present],
            plugins=[plugin],
        )
        if present
        else 5
    )
    problems = [
        f"{os.path.basename(path)} line {s.line_no}: no such file {s.file}"
        for s in selections
        if s.file not in present
    ]
    if code not in (0, 5):
        problems.append(f"collection failed (pytest exit code {code})")
    total = len({n for s in selections for n in s.nodeids})
    print(f"\n{'tests':>5}  line of {os.path.relpath(path, ROOT)}")
    for s in selections:
        print(f"{len(s.nodeids):5d}  {s.line_no}: {s.text}")
        if not s.nodeids:
            problems.append(
                f"{os.path.basename(path)} line {s.line_no} selects no test: "
                f"{s.text!r} (renamed or removed? see `pytest --collect-only -q "
                f"{s.file}`)"
            )
    print(f"{total:5d}  in all (at most {MAX_TESTS})")
    if total > MAX_TESTS:
        problems.append(
            f"the subset has {total} tests, more than {MAX_TESTS}: it would not fit "
            "the GPU check's test budget"
        )
    return total, problems


def main(argv: list[str]) -> int:
    os.chdir(ROOT)
    path = LIST
    if argv[:1] == ["--list"]:  # another selection file (the guard test uses it)
        path, argv = argv[1], argv[2:]
    selections = read_selections(path)
    if argv[:1] == ["--check"]:
        _, problems = check(selections, path)
        for p in problems:
            print("PROBLEM:", p)
        return 1 if problems else 0
    plugins: list = [SelectPlugin(selections)]
    counter = None
    if argv[:1] == ["--count-variants"]:
        argv = argv[1:]
        dry = "--dry" in argv
        argv = [a for a in argv if a != "--dry"]
        import torch

        if torch.cuda.is_available():
            print("--count-variants runs on CPU, under the Triton interpreter", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before opsd_kernels is imported
        counter = VariantCounter(dry)
        plugins.append(counter)
    code = pytest.main(
        ["-p", "no:cacheprovider", "--rootdir", ROOT, *files(selections), *argv], plugins=plugins
    )
    if counter is not None:
        print("\n".join(counter.summary()))
    return int(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
