"""Counted cost of ``fused_linear_divergence``: FLOPs, HBM bytes and tiles of every pass.

Per impl (chunked ``torch``/``triton``, ``fused`` deterministic or one-pass), kind,
clip and frozen/trainable lm_head, :func:`passes` lists each pass with its
floating-point operations (a multiply-add is 2) and an estimate of its HBM
traffic; :func:`expected_ms` turns them into a time from a measured GEMM rate
(and an HBM bandwidth): per pass ``max(flops / rate, bytes / bandwidth)``, summed.

Units: ``NHV`` = N tokens x H hidden x V vocabulary. The logits of both roles
cost 4NHV, d(hidden) 2NHV, d(weight) 2NHV.

- chunked (``impl="torch"/"triton"``, reduction mean/sum): per chunk one logits
  GEMM for both roles (4NHV), the row kernel (reads the float32 logits, writes
  the gradient over them), then the gradient GEMMs (2NHV + 2NHV): 8NHV
  trainable, 6NHV frozen, all in the forward.
- fused (``impl="fused"``), fractions of the (N / BLOCK_N) x (V / BLOCK_V) tiles:
  * stats: every tile once: 4NHV;
  * terms: jsd every tile (4NHV); forward/reverse KL with clip the fraction
    ``clip_recompute_fraction`` of tiles whose exact bound allows clipping;
    none without clip;
  * backward, s = fraction of tiles skipped: deterministic: one recompute of the
    kept tiles into bounded gradient slabs (4(1 - s) NHV), then the dH GEMMs
    (2NHV) and, trainable, the dW GEMMs (2NHV), whose work skipping does not
    reduce: 4(1 - s) + 4 NHV trainable, 4(1 - s) + 2 frozen;
    one-pass (``deterministic=False``): (4 + 2 + 2)(1 - s) NHV trainable,
    (4 + 2)(1 - s) frozen.
  So forward KL + clip, trainable: 4 + 4c + 8 NHV deterministic at s = 0 (12NHV
  without clip tiles: the floor for a design that never stores logits), and
  4 + 4c + 8(1 - s) NHV one-pass, below the chunked path's 8NHV only when
  4c + 8(1 - s) < 4, i.e. through skipping.

HBM bytes are first-order estimates under stated L2 assumptions (see
:func:`passes`); they are for comparing designs, not measurements.
:func:`tiles_per_pass` is the tile model that ``tests/test_fused.py`` checks
against the kernels' debug counters.

    python bench/cost_model.py            # the Qwen3-4B table, bench/results/cost-model.md
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

#: design-notes.md: bf16 dense GEMM rate measured on an H100/H200 here (TFLOP/s)
DEFAULT_GEMM_TFLOPS = 790.0
#: H100 SXM HBM3 bandwidth (TB/s), a round figure
DEFAULT_HBM_TBPS = 3.35
#: programs running at a time (one per SM of an H100 / H200)
SMS = 132


@dataclass(frozen=True)
class Shape:
    N: int = 8192
    H: int = 2560
    V: int = 151_936
    elem: int = 2  # bytes per operand element (bf16)
    block_n: int = 64
    block_v: int = 128
    group: int = 32  # token blocks per group in the fused grouped order
    chunk: int = 1024  # tokens per chunk of the chunked paths

    @property
    def nhv(self) -> float:
        return float(self.N) * self.H * self.V

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.N / self.block_n)

    @property
    def n_vblocks(self) -> int:
        return math.ceil(self.V / self.block_v)


@dataclass(frozen=True)
class Pass:
    name: str
    flops: float
    hbm_bytes: float
    tiles: float | None = None  # fraction of tiles computed (fused passes)
    atomics: float = 0.0  # float32 atomic adds (one-pass backward)


def tiles_per_pass(
    kind: str,
    clip: bool,
    trainable: bool,
    deterministic: bool = True,
    skipped_fraction: float = 0.0,
    clip_recompute_fraction: float = 1.0,
) -> dict[str, float]:
    """Fraction of the tiles each fused pass computes, keyed as the kernels' debug
    counters are (``stats``, ``terms``, ``backward``: the tiles whose logits the
    backward recomputes, in either mode).

    >>> tiles_per_pass("forward_kl", clip=True, trainable=True, deterministic=False,
    ...                skipped_fraction=0.75, clip_recompute_fraction=0.1)
    {'stats': 1.0, 'terms': 0.1, 'backward': 0.25}
    """
    out = {"stats": 1.0}
    if kind == "jsd":
        out["terms"] = 1.0
    elif clip:
        out["terms"] = clip_recompute_fraction
    out["backward"] = 1.0 - skipped_fraction
    return out


def slab_layout(shape: Shape, trainable: bool, scratch_bytes: int = 32 * 2**20):
    """``(token slice rows, slab width)`` of the deterministic fused backward for a 16-bit
    hidden state and a float32 weight gradient, as
    ``opsd_kernels.triton.fused_backward._slab_layout`` chooses them (``SMS`` x 2
    programs to fill).

    >>> slab_layout(Shape(), trainable=True)
    (1408, 11776)
    """
    s = shape
    rows_most = max(s.block_n, scratch_bytes // 2 // (4 * s.H) // s.block_n * s.block_n)
    rows = _even(s.N, rows_most, s.block_n)
    width = _even(
        s.V, max(s.block_v, scratch_bytes // (s.elem * rows) // s.block_v * s.block_v), s.block_v
    )
    width = max(width, math.ceil(2 * SMS / math.ceil(rows / s.block_n)) * s.block_v)
    return rows, min(width, math.ceil(s.V / s.block_v) * s.block_v)


def _even(total: int, most: int, multiple: int) -> int:
    pieces = math.ceil(total / max(most, multiple))
    return math.ceil(math.ceil(total / pieces) / multiple) * multiple


def passes(
    impl: str,
    kind: str = "forward_kl",
    clip: bool = True,
    trainable: bool = True,
    shape: Shape = Shape(),
    skipped_fraction: float = 0.0,
    clip_recompute_fraction: float = 1.0,
) -> list[Pass]:
    """The passes of one forward + backward of ``impl``: ``"chunked"``, ``"fused"``
    (deterministic backward) or ``"fused-onepass"`` (``deterministic=False``).

    HBM assumptions (first order; ``SMS`` = 132 programs run at a time):
    chunked: float32 logits of both roles written by the GEMM and read by the row
    kernel, the gradient written over them and read by each gradient GEMM; W read
    once per chunk and GEMM; a float32 dW accumulator read and written per chunk.
    fused forward (grouped order): a group's hidden states (``group`` x 64 tokens,
    21 MB at H 2560) stay in L2 and its programs share each W tile, so W crosses
    HBM once per group and the hidden states once.
    deterministic backward (:func:`slab_layout`: token slices of ``rows``, vocabulary
    slabs of ``width``): the recompute kernel reads W once per group and token
    slice and both hidden states once, and writes the 16-bit dS slab (float32 for
    float16 or a bias gradient: not modelled); the dH GEMM reads the slab, W once
    per token slice, and reads and writes the float32 dH accumulator once per slab;
    the dW GEMM reads the slab and the slice's hidden states once per slab and reads
    and writes the float32 dW rows once per token slice.
    one-pass (grouped tiles, atomics): W once per group, hidden and dH once
    (a group's rows stay in L2), the float32 dW rows once per group.
    """
    s = shape
    nhv = s.nhv
    W = float(s.V) * s.H * s.elem
    hid = float(s.N) * s.H * s.elem
    logits32 = float(s.N) * s.V * 4
    n_chunks = math.ceil(s.N / s.chunk)
    n_groups = math.ceil(s.n_blocks / s.group)
    if impl == "chunked":
        out = [
            Pass("fwd logits GEMM (both roles)", 4 * nhv, n_chunks * W + 2 * hid + 2 * logits32),
            Pass("fwd row kernel (loss, G, dS in place)", 0.0, 2 * logits32 + logits32),
            Pass("bwd dH GEMM (run in the forward)", 2 * nhv, logits32 + n_chunks * W + hid),
        ]
        if trainable:
            out.append(
                Pass(
                    "bwd dW GEMM (fp32 accumulate, run in the forward)",
                    2 * nhv,
                    logits32 + hid + n_chunks * 2 * 4 * W / s.elem,
                )
            )
        return out
    if impl not in ("fused", "fused-onepass"):
        raise ValueError(f"impl must be 'chunked', 'fused' or 'fused-onepass', got {impl!r}")
    tiles = tiles_per_pass(
        kind, clip, trainable, impl == "fused", skipped_fraction, clip_recompute_fraction
    )
    fwd_bytes = n_groups * W + 2 * hid
    out = [Pass("fwd stats (LSE, weighted sum, tile extrema)", 4 * nhv, fwd_bytes, tiles["stats"])]
    if "terms" in tiles:
        f = tiles["terms"]
        out.append(Pass("fwd terms (clip / jsd)", 4 * nhv * f, f * fwd_bytes, f))
    if impl == "fused":
        kept = tiles["backward"]
        rows, width = slab_layout(s, trainable)
        n_slices, n_slabs = math.ceil(s.N / rows), math.ceil(s.V / width)
        slab = float(s.N) * s.V * s.elem
        groups_per_slice = math.ceil(math.ceil(rows / s.block_n) / s.group)
        recompute = kept * (n_slices * groups_per_slice * W + 2 * hid) + slab
        out.append(Pass("bwd recompute -> dS slabs", 4 * nhv * kept, recompute, kept))
        dh = slab + n_slices * W + n_slabs * float(s.N) * s.H * 8
        out.append(Pass("bwd dH GEMMs", 2 * nhv, dh))
        if trainable:
            dw = slab + n_slabs * hid + n_slices * 2 * 4 * W / s.elem
            out.append(Pass("bwd dW GEMMs", 2 * nhv, dw))
        return out
    kept = tiles["backward"]
    flops = (6 + (2 if trainable else 0)) * nhv * kept
    bytes_ = kept * (n_groups * W + 2 * hid) + 2 * float(s.N) * s.H * 4
    atomics = float(s.N) * s.H * s.n_vblocks * kept
    if trainable:
        bytes_ += n_groups * 2 * 4 * W / s.elem
        atomics += float(s.V) * s.H * s.n_blocks * kept
    out.append(Pass("bwd one pass (dH, dW atomics)", flops, bytes_, kept, atomics))
    return out


def extra_bytes(impl: str, shape: Shape = Shape(), trainable: bool = True) -> float:
    """Peak temporaries of one forward + backward on CUDA beyond the inputs and the
    returned gradients (default options: float32 weight-gradient accumulation, a mask).

    - chunked: both roles' float32 logits of a chunk and their 16-bit gradient operand,
      the float32 dH accumulator (N, H), and, trainable, the float32 (V, H) dW
      accumulator (cast to the weight's dtype at the end);
    - fused (deterministic, :func:`slab_layout`; bf16 on torch >= 2.10, whose GEMMs add
      float32 products in place): the 16-bit gradient slab, a float32 dH accumulator
      for one token slice, the per-tile maxima and skip map, and, trainable, the
      slice's hidden states with masked rows zeroed and the float32 dW accumulator
      (float16, or torch < 2.10, adds a float32 product buffer of the dH
      accumulator's size);
    - fused-onepass: float32 dH (N, H), the per-tile maps, and, trainable, float32 dW.

    >>> extra_bytes("fused", trainable=False) < 64e6
    True
    """
    s = shape
    maps = 9.0 * s.n_blocks * s.n_vblocks  # two float32 tile maxima + a uint8 skip map
    dw = 4.0 * s.V * s.H if trainable else 0.0
    if impl == "chunked":
        return 2 * 4.0 * s.chunk * s.V + s.elem * s.chunk * s.V + 4.0 * s.N * s.H + dw
    if impl == "fused":
        rows, width = slab_layout(s, trainable)
        masked_copy = s.elem * rows * s.H if trainable else 0.0
        return s.elem * rows * width + 4.0 * rows * s.H + masked_copy + maps + dw
    if impl == "fused-onepass":
        return 4.0 * s.N * s.H + maps + dw
    raise ValueError(f"impl must be 'chunked', 'fused' or 'fused-onepass', got {impl!r}")


def expected_ms(
    pass_list: list[Pass],
    gemm_tflops: float = DEFAULT_GEMM_TFLOPS,
    hbm_tbps: float = DEFAULT_HBM_TBPS,
) -> float:
    """Sum over passes of max(flops / GEMM rate, bytes / HBM bandwidth), in ms.

    Atomic throughput is not modelled (it must be measured); the one-pass
    backward's time is therefore a lower bound.

    >>> round(expected_ms([Pass("x", 790e12 * 1e-3, 0.0)]), 6)
    1.0
    """
    total = 0.0
    for p in pass_list:
        total += max(p.flops / (gemm_tflops * 1e12), p.hbm_bytes / (hbm_tbps * 1e12))
    return total * 1e3


def total_nhv(pass_list: list[Pass], shape: Shape = Shape()) -> float:
    """Total FLOPs in units of NHV."""
    return sum(p.flops for p in pass_list) / shape.nhv


def table(
    shape: Shape = Shape(),
    skipped: tuple[float, ...] = (0.0, 0.5, 0.9),
    clip_recompute: float = 0.05,
    gemm_tflops: float = DEFAULT_GEMM_TFLOPS,
    hbm_tbps: float = DEFAULT_HBM_TBPS,
) -> list[str]:
    """Markdown rows: every impl x kind x clip x frozen/trainable x skipped fraction."""
    md = [
        f"Shape N={shape.N}, H={shape.H}, V={shape.V}, {shape.elem}-byte operands, tiles "
        f"{shape.block_n}x{shape.block_v}, group {shape.group}, chunk {shape.chunk}; "
        f"GEMM rate {gemm_tflops:g} TFLOP/s, HBM {hbm_tbps:g} TB/s. Clip tiles recomputed "
        f"(forward/reverse KL + clip): {clip_recompute:.0%} (the simulation's figure is in "
        "skip-simulation.md). Times are model outputs, not measurements.",
        "",
        "Extra MiB: temporaries beyond the inputs and the returned gradients "
        "(`extra_bytes`; trainable rows include the float32 (V, H) weight-gradient "
        "accumulator of the default `fp32_weight_grad=True`).",
        "",
        "| impl | kind | clip | lm_head | skipped | FLOPs (NHV) | HBM GB | atomics (1e9) "
        "| expected ms | extra MiB |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, clip in (("forward_kl", True), ("forward_kl", False), ("jsd", False)):
        for trainable in (True, False):
            head = "trainable" if trainable else "frozen"
            rows = [("chunked", 0.0)] + [
                (impl, s) for impl in ("fused", "fused-onepass") for s in skipped
            ]
            for impl, s in rows:
                p = passes(impl, kind, clip, trainable, shape, s, clip_recompute)
                md.append(
                    f"| {impl} | {kind} | {'yes' if clip else 'no'} | {head} | "
                    f"{'-' if impl == 'chunked' else f'{s:.0%}'} | {total_nhv(p, shape):.2f} | "
                    f"{sum(x.hbm_bytes for x in p) / 1e9:.1f} | "
                    f"{sum(x.atomics for x in p) / 1e9:.1f} | "
                    f"{expected_ms(p, gemm_tflops, hbm_tbps):.1f} | "
                    f"{extra_bytes(impl, shape, trainable) / 2**20:,.0f} |"
                )
    return md


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--N", type=int, default=8192)
    ap.add_argument("--H", type=int, default=2560)
    ap.add_argument("--V", type=int, default=151_936)
    ap.add_argument("--gemm-tflops", type=float, default=DEFAULT_GEMM_TFLOPS)
    ap.add_argument("--hbm-tbps", type=float, default=DEFAULT_HBM_TBPS)
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results" / "cost-model.md"
    )
    args = ap.parse_args(argv)
    md = ["# Cost model of fused_linear_divergence (bench/cost_model.py)", ""]
    md += table(
        Shape(N=args.N, H=args.H, V=args.V), gemm_tflops=args.gemm_tflops, hbm_tbps=args.hbm_tbps
    )
    args.out.write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
