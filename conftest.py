"""Root conftest: runs before any test module (and before doctests) imports opsd_kernels.

Without a CUDA device the Triton kernels can only run in the interpreter, and
TRITON_INTERPRET is read when a kernel is defined (at import), so it is set
here, first. Set TRITON_INTERPRET=0 yourself to opt out.
"""

import os

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_cuda = False

if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
