"""Peak-memory measurement that is exact for torch allocations, on CPU and CUDA.

On CUDA it uses the caching allocator's statistics
(``torch.cuda.reset_peak_memory_stats`` / ``max_memory_allocated``). On CPU
torch keeps no such statistics, so :class:`PeakMemory` watches every tensor
that an aten operator returns (a ``TorchDispatchMode``), counts each new
storage's bytes when it appears (outputs that share an input's storage, i.e.
views and in-place results, are not new) and subtracts them when the storage is freed
(a ``weakref.finalize`` on the storage). The peak of that running total is
the peak of live bytes allocated by torch operators inside the block, beyond
what existed before it. It is deterministic: it counts bytes, not time.
Scratch memory that a single kernel allocates and frees internally (e.g.
inside a matmul) is not seen.

>>> with PeakMemory() as pm:
...     x = torch.empty(1000, dtype=torch.float32)
...     del x
...     y = torch.empty(10, dtype=torch.float64)
>>> pm.peak_bytes, pm.current_bytes
(4000, 80)
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _StorageTracker(TorchDispatchMode):
    def __init__(self, owner: PeakMemory):
        super().__init__()
        self.owner = owner
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # an output that shares an input's storage (a view, an in-place or out= op)
        # is no new allocation
        inputs = {
            a.untyped_storage().data_ptr()
            for a in tree_flatten((args, kwargs))[0]
            if isinstance(a, torch.Tensor) and a.device.type == "cpu"
        }
        for t in tree_flatten(out)[0]:
            if (
                isinstance(t, torch.Tensor)
                and t.device.type == "cpu"
                and t.untyped_storage().data_ptr() not in inputs
            ):
                self.owner._track(t)
        return out


class PeakMemory:
    """Context manager: ``peak_bytes`` allocated inside the block beyond its start.

    ``device``: "cpu" (dispatch-mode tracking, see the module docstring) or a
    CUDA device (allocator statistics).
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.current_bytes = 0
        self._live: dict[int, int] = {}

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        nbytes = storage.nbytes()
        if key in self._live or nbytes == 0:
            return
        self._live[key] = nbytes
        self.current_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        nbytes = self._live.pop(key, 0)
        self.current_bytes -= nbytes

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._mode = _StorageTracker(self)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            self.current_bytes = torch.cuda.memory_allocated(self.device) - self._base
        else:
            self._mode.__exit__(*exc)
