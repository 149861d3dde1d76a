"""Environment switches read in one place."""

import os


def triton_interpreting() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, CPU).

    Triton reads the variable when a kernel is defined (at import), so it must be set
    before ``opsd_kernels`` is imported; the tests' root conftest does that on CPU.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
