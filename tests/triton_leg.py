"""pytest plugin of the Triton 3.6 leg of ``.ci/run`` (``-p tests.triton_leg``): keeps
only the tests that run a Triton kernel, so that the leg checks every kernel under the
second Triton version without rerunning the torch-only suite.

A test runs a Triton kernel when its file is Triton-only (``test_triton_*.py``,
``test_fused.py``) or one of its parameters is the impl ``"triton"`` or ``"fused"``
(the suite's convention: ``tests.helpers.triton_param``, ``LINEAR_IMPLS``...).
"""

TRITON_ONLY_FILES = ("test_fused.py",)
TRITON_IMPLS = ("triton", "fused")


def runs_triton(item) -> bool:
    name = item.path.name
    if name.startswith("test_triton_") or name in TRITON_ONLY_FILES:
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(isinstance(v, str) and v in TRITON_IMPLS for v in params.values())


def pytest_collection_modifyitems(config, items):
    keep = [item for item in items if runs_triton(item)]
    dropped = [item for item in items if not runs_triton(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep
