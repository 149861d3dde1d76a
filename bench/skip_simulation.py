"""CPU simulation of ``impl="fused"``'s tile rules at the real Qwen3-4B shape.

The backward skips a (64 tokens x 128 entries) tile when
``exp(tile max - smallest LSE of the block's tokens) < threshold`` on both sides
(:func:`opsd_kernels.triton.fused_backward.skipped_tiles`), and the clip pass
recomputes only tiles whose exact bound allows ``phi >= clip``
(:func:`opsd_kernels.triton.fused_forward.clip_tiles`). Both rules read only
per-tile logit extrema and per-token LSEs, so they can be simulated in torch on
logits without any GEMM: this script draws LM-like logits, forms the same
statistics the stats pass records, and applies the library's own rule functions.

Logits (V = 151,936, N = 8192 tokens = 128 token blocks): a Zipf-like prior
``-alpha * log(rank)`` (alpha 1.1) over the vocabulary, plus per token a
Gaussian context term and a boost on 32 context tokens drawn from the prior,
all scaled so that the student's mean entropy hits the target (1, 2 or 3
nats at temperature 1.1). The teacher is the student plus a small Gaussian
perturbation (per-token KL about 1e-2). Two vocabulary layouts:
``sorted`` (token ids in frequency order, as BPE vocabularies roughly are) and
``shuffled`` (a random permutation: the worst case for tile skipping).

Token blocks are i.i.d. here, so a subsample of blocks (``--blocks``, default
16 of 128) estimates the fractions of the full grid; ``--blocks 128`` processes
all 8192 tokens (in blocks, about 40 MB live). Output:
``bench/results/skip-simulation.md``.

    python bench/skip_simulation.py                 # ~2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from opsd_kernels.triton.configs import FusedConfig, resolve_skip_threshold  # noqa: E402
from opsd_kernels.triton.fused_backward import skipped_tiles  # noqa: E402
from opsd_kernels.triton.fused_forward import ForwardStats, clip_tiles  # noqa: E402

V, N, BN, BV = 151_936, 8192, 64, 128
TEMPERATURE = 1.1
CLIP = 0.05
THRESHOLDS = (1e-10, 1e-8, 1e-6, 1e-4)
ALPHA = 1.1
CONTEXT_TOKENS = 32


def _prior(layout: str, gen: torch.Generator) -> torch.Tensor:
    prior = -ALPHA * torch.log(torch.arange(1, V + 1, dtype=torch.float32))
    if layout == "shuffled":
        prior = prior[torch.randperm(V, generator=gen)]
    return prior


def _student(prior: torch.Tensor, n: int, scale: float, gen: torch.Generator) -> torch.Tensor:
    """(n, V) student logits: prior + context noise + boosted context tokens, times scale."""
    logits = prior + 1.5 * torch.randn(n, V, generator=gen)
    probs = torch.softmax(prior, 0)
    boost = torch.multinomial(probs.expand(n, V), CONTEXT_TOKENS, generator=gen)
    logits.scatter_add_(1, boost, 6.0 * torch.rand(n, CONTEXT_TOKENS, generator=gen))
    return logits * scale


def _entropy(logits: torch.Tensor) -> float:
    lp = torch.log_softmax(logits / TEMPERATURE, -1)
    return float(-(lp.exp() * lp).sum(-1).mean())


def _scale_for_entropy(prior, target, gen_seed) -> float:
    lo, hi = 0.05, 20.0
    for _ in range(25):
        mid = math.sqrt(lo * hi)
        g = torch.Generator().manual_seed(gen_seed)
        if _entropy(_student(prior, 16, mid, g)) > target:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def _block_stats(s: torch.Tensor, t: torch.Tensor):
    """What the stats pass records for one token block (all tokens counted)."""
    b, a = s / TEMPERATURE, t / TEMPERATURE
    pad = (-V) % BV
    tiles_b = torch.nn.functional.pad(b, (0, pad), value=-math.inf).view(b.shape[0], -1, BV)
    tiles_a = torch.nn.functional.pad(a, (0, pad), value=-math.inf).view(a.shape[0], -1, BV)
    mins_b = torch.nn.functional.pad(b, (0, pad), value=math.inf).view(b.shape[0], -1, BV)
    mins_a = torch.nn.functional.pad(a, (0, pad), value=math.inf).view(a.shape[0], -1, BV)
    return (
        torch.logsumexp(b, -1),
        torch.logsumexp(a, -1),
        tiles_b.amax((0, 2)),
        tiles_a.amax((0, 2)),
        mins_b.amin((0, 2)),
        mins_a.amin((0, 2)),
    )


def simulate(layout: str, entropy: float, blocks: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    prior = _prior(layout, gen)
    scale = _scale_for_entropy(prior, entropy, seed + 1)
    cfg = FusedConfig(block_n=BN, block_v=BV)
    thresholds = THRESHOLDS + (resolve_skip_threshold("auto", torch.bfloat16, V),)
    skipped = {thr: 0 for thr in thresholds}
    dropped = {thr: 0.0 for thr in thresholds}  # max over rows of dropped pS + pT mass
    clip_tiles_n, tiles, ent_s, kl = 0, 0, [], []
    for _ in range(blocks):
        s = _student(prior, BN, scale, gen)
        t = s + 0.15 * scale * torch.randn(BN, V, generator=gen)
        lse_s, lse_t, tmax_s, tmax_t, tmin_s, tmin_t = _block_stats(s, t)
        stats = ForwardStats(
            torch.zeros(BN), lse_s, lse_t, torch.zeros(BN), tmax_s[None], tmax_t[None], cfg
        )
        lps = torch.log_softmax(s / TEMPERATURE, -1)
        lpt = torch.log_softmax(t / TEMPERATURE, -1)
        ent_s.append(float(-(lps.exp() * lps).sum(-1).mean()))
        kl.append(float((lpt.exp() * (lpt - lps)).sum(-1).mean()))
        mass = torch.nn.functional.pad(lps.exp() + lpt.exp(), (0, (-V) % BV)).view(BN, -1, BV)
        mass = mass.sum(-1)  # (BN, vocab blocks)
        for thr in thresholds:
            skip = skipped_tiles(stats, thr)[0]
            skipped[thr] += int(skip.sum())
            dropped[thr] = max(dropped[thr], float((mass * skip).sum(-1).max()))
        clip = clip_tiles(
            0, CLIP, lse_s, lse_t, tmax_s[None], tmax_t[None], tmin_s[None], tmin_t[None], BN, None
        )
        clip_tiles_n += int(clip.sum())
        tiles += tmax_s.numel()
    return dict(
        layout=layout,
        target=entropy,
        entropy=sum(ent_s) / len(ent_s),
        kl=sum(kl) / len(kl),
        tiles=tiles,
        clip_frac=clip_tiles_n / tiles,
        skipped={thr: n / tiles for thr, n in skipped.items()},
        dropped=dropped,
    )


def report(results: list[dict], blocks: int, secs: float) -> list[str]:
    auto = resolve_skip_threshold("auto", torch.bfloat16, V)
    thr_names = [f"{t:g}" for t in THRESHOLDS] + [f"auto bf16 ({auto:.1e})"]
    md = [
        "# impl='fused' tile rules on LM-like logits at the Qwen3-4B shape (CPU simulation)",
        "",
        f"bench/skip_simulation.py: V={V}, tiles {BN}x{BV}, temperature {TEMPERATURE}, "
        f"{blocks} of {N // BN} token blocks ({blocks * BN} tokens; blocks are i.i.d., so "
        "this estimates the fractions of the full 8192-token grid). The rules are the "
        "library's own (`skipped_tiles`, `clip_tiles`) applied to the statistics the stats "
        f"pass records. CPU, {secs:.0f} s. No GPU: fractions only, no timings.",
        "",
        "Skipped fraction of backward tiles per threshold; the clip column is the fraction "
        f"of tiles the exact clip test sends to the terms pass (forward KL, clip {CLIP}); "
        "cost columns: FLOPs in NHV of the one-pass backward at the 'auto' skip "
        "(4 + 4c + 8(1 - s) trainable, 4 + 4c + 6(1 - s) frozen; chunked: 8 / 6).",
        "",
        "| layout | entropy (nats) | KL | "
        + " | ".join(thr_names)
        + " | clip tiles | NHV trainable | NHV frozen |",
        "|---|---:|---:|" + "---:|" * (len(thr_names) + 3),
    ]
    for r in results:
        s_auto = r["skipped"][auto]
        c = r["clip_frac"]
        md.append(
            f"| {r['layout']} | {r['entropy']:.2f} | {r['kl']:.3f} | "
            + " | ".join(f"{r['skipped'][t]:.1%}" for t in THRESHOLDS + (auto,))
            + f" | {c:.1%} | {4 + 4 * c + 8 * (1 - s_auto):.2f} | "
            f"{4 + 4 * c + 6 * (1 - s_auto):.2f} |"
        )
    md += [
        "",
        "Largest probability mass (pS + pT) dropped from one token row by the skipped tiles:",
        "",
        "| layout | entropy | " + " | ".join(thr_names) + " |",
        "|---|---:|" + "---:|" * len(thr_names),
    ]
    for r in results:
        md.append(
            f"| {r['layout']} | {r['entropy']:.2f} | "
            + " | ".join(f"{r['dropped'][t]:.1e}" for t in THRESHOLDS + (auto,))
            + " |"
        )
    md += [
        "",
        "Reading: the skip rule bounds every probability of a tile by the tile's "
        "largest logit against the block's smallest LSE (64 tokens x 128 entries), and "
        "on these distributions some entry of almost every tile sits above 1e-6, so "
        "thresholds that keep the gradient exact to bf16 skip (almost) nothing and the "
        "fused backward does its full work; only thresholds near 1e-4 skip most tiles, "
        "and then the dropped mass per row reaches 1e-2..1e-1. The exact clip test "
        "sends only the listed fraction of tiles to the terms pass (instead of all).",
    ]
    return md


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=16, help="token blocks of 64 (max 128)")
    ap.add_argument("--entropies", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "skip-simulation.md",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()
    results = [
        simulate(layout, e, min(args.blocks, N // BN))
        for layout in ("sorted", "shuffled")
        for e in args.entropies
    ]
    md = report(results, min(args.blocks, N // BN), time.time() - t0)
    args.out.write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
