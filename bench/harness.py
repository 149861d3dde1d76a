"""Shared machinery of the benchmark: shapes, measurement, the results registry.

Every benchmark case goes through :func:`measure`:

1. a warm-up call (compilation, autotuning, lazy initialisation), outside any
   measurement (on CPU only for torch.compile; eager CPU paths need none);
2. one call under :class:`opsd_kernels.memory.PeakMemory`: the peak bytes
   allocated by torch beyond what existed before the call, i.e. beyond the
   inputs (on CUDA the caching allocator's ``max_memory_allocated`` after a
   reset; on CPU an exact count of every torch allocation through a dispatch
   mode, see that module). Gradients written into ``.grad`` are counted: the
   weight gradient of a trainable lm_head is part of every path's footprint;
3. timed rounds through pytest-benchmark's ``benchmark.pedantic`` (wall
   clock; on CUDA every round ends with ``torch.cuda.synchronize()``, so the
   time is the device time of the whole call plus one launch latency).

A case that runs out of memory is recorded with status ``"OOM"`` (the test
passes); on CPU a naive case whose estimated footprint exceeds the free RAM
is recorded as OOM without being run, so the OS never kills the run.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from opsd_kernels.memory import PeakMemory

# design-notes.md section 5: hidden size H and vocabulary V per model
PRESETS: dict[str, tuple[int, int]] = {
    "qwen3-1.7b": (2048, 151_936),
    "qwen3-4b": (2560, 151_936),
    "qwen3-8b": (4096, 151_936),
    "llama3-8b": (4096, 128_256),
    "gemma2-2b": (2304, 256_000),
    "gemma3-4b": (2560, 262_208),
    # CPU stand-in: same structure, small enough for a 2-core machine
    "cpu-small": (256, 8192),
}
#: final-logit soft cap per preset (Gemma 2's ``final_logit_softcapping``): every impl that
#: can cap is called with ``softcap=``; one that cannot (Liger) is skipped with a note
PRESET_SOFTCAP: dict[str, float] = {"gemma2-2b": 30.0}

# results of this session, read by the session-finish hook (conftest.py)
RESULTS: list[dict] = []
CHECKS: list[dict] = []
PRECISION: list[dict] = []  # rows of bench_precision.py

# One list per concern; the bench files, the report and gpu_check.sh read these.
#: opsd_kernels' own impls by bench name -> the keyword arguments of
#: ``fused_linear_divergence`` each one runs. ``fused-onepass`` is ``impl="fused"``
#: with ``deterministic=False``: the same forward, the one-kernel backward with
#: float32 atomics (bench/cost_model.py's "fused-onepass")
OUR_IMPL_ARGS: dict[str, dict] = {
    "torch": {"impl": "torch"},
    "triton": {"impl": "triton"},
    "fused": {"impl": "fused"},
    "fused-onepass": {"impl": "fused", "deterministic": False},
}
OUR_IMPLS = tuple(OUR_IMPL_ARGS)
#: the API's ``impl=`` values (each also a bench impl of that name)
API_IMPLS = tuple(dict.fromkeys(a["impl"] for a in OUR_IMPL_ARGS.values()))
#: our impls that run Triton kernels: timed on CUDA only (the interpreter is too slow)
TRITON_IMPLS = tuple(k for k, a in OUR_IMPL_ARGS.items() if a["impl"] in ("triton", "fused"))
#: our impls whose forward is another impl's: their ``fwd`` rows would repeat it
SAME_FORWARD_AS = {"fused-onepass": "fused"}
#: what each operation is compared with (see baselines.py)
#: ``trl-chunked`` is TRL 1.16.0's ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction``
#: (the loss of its ``DistillationTrainer``), per-token divergence reduced to the token mean
ANCHORS: dict[str, tuple[str, ...]] = {
    "fused_linear": ("naive", "compiled", "liger-fljsd", "liger-fljsd-loss", "trl-chunked"),
    "divergence": ("naive", "compiled", "liger-kldiv", "liger-jsd"),
}
#: anchors without a per-entry clip: they compute the unclipped loss (a note says so), and the
#: pre-timing check compares them with the unclipped naive loss
NO_CLIP = ("liger-fljsd", "liger-fljsd-loss", "liger-kldiv", "liger-jsd", "trl-chunked")
#: what the pre-timing correctness check covers (bench_fused_linear.py)
CHECKED_IMPLS = OUR_IMPLS + ("trl-chunked",)
#: every case of each benchmark, ours first (``divergence`` has no fused impl)
IMPLS: dict[str, tuple[str, ...]] = {
    "fused_linear": OUR_IMPLS + ANCHORS["fused_linear"],
    "divergence": ("torch", "triton") + ANCHORS["divergence"],
}
#: the precision table (bench_precision.py): ours by API impl (it calls ``impl=``
#: only; the one-pass backward differs from the deterministic one in summation
#: order alone), then the anchors
IMPLS["precision"] = API_IMPLS + ("naive", "naive-16bit", "liger-fljsd-loss", "liger-fljsd")
#: the order of rows in the report's tables
IMPL_ORDER: tuple[str, ...] = tuple(
    dict.fromkeys(IMPLS["fused_linear"] + IMPLS["divergence"] + IMPLS["precision"])
)


@dataclass(frozen=True)
class Shape:
    preset: str
    hidden: int
    vocab: int
    tokens: int
    softcap: float | None = None

    @property
    def id(self) -> str:
        return f"{self.preset}-N{self.tokens}"


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg
    )


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def available_ram() -> int:
    """Bytes of RAM the kernel reports available (Linux), else a large number."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _own_timing(fn, setup, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _stats(times: list[float]) -> dict:
    times = sorted(times)
    if len(times) >= 4:
        q = statistics.quantiles(times, n=4, method="inclusive")
        iqr = q[2] - q[0]
    else:
        iqr = times[-1] - times[0]
    return {
        "median_s": statistics.median(times),
        "iqr_s": iqr,
        "min_s": times[0],
        "max_s": times[-1],
        "stddev_s": statistics.stdev(times) if len(times) > 1 else 0.0,
        "rounds": len(times),
    }


def measure_case(benchmark, record, fn, setup, device, bench_cfg, impl, mode, shape) -> dict:
    """:func:`measure` for one case of a divergence or fused-linear bench: the note on
    the unclipped loss of the anchors without a clip (Liger, TRL), the naive path's RAM
    estimate (7 float32 N x V tensors at the peak of forward+backward, measured on CPU,
    plus one), no autograd for forward-only cases, and a warm-up where something compiles
    or tunes (CUDA, torch.compile)."""
    if impl in NO_CLIP and bench_cfg.clip is not None:
        who = "TRL's kernel" if impl.startswith("trl") else "Liger"
        record["note"] = f"no per-entry clip in {who}: unclipped loss"
    estimate = 8 * 4 * shape.tokens * shape.vocab if impl == "naive" else None
    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
        return measure(
            benchmark,
            record,
            fn,
            setup,
            device,
            bench_cfg.rounds,
            estimate,
            warmup=device.type == "cuda" or impl == "compiled",
        )


def measure(
    benchmark,
    record: dict,
    fn: Callable[[], object],
    setup: Callable[[], None],
    device: torch.device,
    rounds: int,
    ram_estimate: int | None = None,
    warmup: bool = True,
) -> dict:
    """Warm up, measure peak memory once, time ``rounds`` rounds; record and return the row.

    ``warmup=False`` lets the memory call double as the warm-up (CPU eager paths
    have nothing to compile or tune). ``fn`` runs one complete case (forward,
    and backward where the case has one) and must leave nothing alive but
    gradients in ``.grad``; ``setup`` clears those gradients before each call.
    """
    # "incomplete" until the timing is in: an interrupted run (time cap) says so
    record = dict(record, status="incomplete", device=device.type)
    RESULTS.append(record)
    if device.type == "cpu" and ram_estimate is not None and ram_estimate > 0.8 * available_ram():
        record["status"] = "OOM"
        record["note"] = f"estimated {ram_estimate / 2**30:.1f} GiB exceeds the free RAM; not run"
        return record

    def call():
        fn()
        sync(device)

    oom = False
    try:
        if warmup:
            setup()
            call()
        setup()
        free_memory(device)
        with PeakMemory(device) as pm:
            fn()
        record["peak_bytes"] = int(pm.peak_bytes)
        setup()
        if getattr(benchmark, "disabled", False):
            times = _own_timing(call, setup, rounds)
            record.update(_stats(times))
        else:
            benchmark.extra_info.update(
                {k: v for k, v in record.items() if isinstance(v, str | int | float)}
            )
            benchmark.pedantic(call, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)
            record.update(_stats(list(benchmark.stats.stats.data)))
        record["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any OOM is a result, anything else re-raised
        if not is_oom(exc):
            record["status"] = f"error: {type(exc).__name__}"
            raise
        oom = True
    if oom:
        record["status"] = "OOM"
        for k in ("peak_bytes",):
            record.pop(k, None)
    setup()
    free_memory(device)
    return record


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def api_args(impl: str) -> dict:
    """The ``fused_linear_divergence`` keyword arguments of our bench impl ``impl``.

    >>> api_args("fused-onepass")
    {'impl': 'fused', 'deterministic': False}
    """
    if impl not in OUR_IMPL_ARGS:
        raise ValueError(f"impl must be one of our impls {OUR_IMPLS}, got {impl!r}")
    return dict(OUR_IMPL_ARGS[impl])
