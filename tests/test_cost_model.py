"""bench/cost_model.py: the counted FLOPs of every impl, and the skip simulation's rules.

The kernels' own tile counts are checked against :func:`bench.cost_model.tiles_per_pass`
in ``tests/test_fused.py`` (debug counters, interpreter); here the arithmetic of
the model itself: the NHV totals the README and the issue state.
"""

from __future__ import annotations

import pytest
import torch

from bench.cost_model import Pass, Shape, expected_ms, passes, table, tiles_per_pass, total_nhv


@pytest.mark.parametrize("trainable, nhv", [(True, 8.0), (False, 6.0)])
def test_chunked_is_8_or_6_nhv(trainable, nhv):
    assert total_nhv(passes("chunked", trainable=trainable)) == pytest.approx(nhv)


@pytest.mark.parametrize(
    "kind, clip, trainable, deterministic, s, c, nhv",
    [
        # one-pass backward, forward KL + clip, no skipping: 4 + 4c + 8
        ("forward_kl", True, True, False, 0.0, 0.0, 12.0),
        ("forward_kl", True, True, False, 0.5, 0.1, 4 + 0.4 + 4),
        ("forward_kl", False, False, False, 0.9, 1.0, 4 + 0.6),
        # deterministic: one recompute into slabs, then the gradient GEMMs: 4 + 4(1-s) + 4
        ("forward_kl", False, True, True, 0.0, 1.0, 12.0),
        ("forward_kl", True, True, True, 0.0, 0.0, 12.0),
        ("forward_kl", False, False, True, 0.0, 1.0, 10.0),
        ("forward_kl", False, True, True, 0.5, 1.0, 4 + 2 + 4),
        # jsd: the terms pass always runs over every tile
        ("jsd", False, True, False, 0.0, 0.0, 16.0),
        ("jsd", True, False, True, 0.25, 0.0, 8 + 4 * 0.75 + 2),
    ],
)
def test_fused_counts(kind, clip, trainable, deterministic, s, c, nhv):
    impl = "fused" if deterministic else "fused-onepass"
    p = passes(impl, kind, clip, trainable, Shape(), skipped_fraction=s, clip_recompute_fraction=c)
    assert total_nhv(p) == pytest.approx(nhv)
    assert all(x.hbm_bytes >= 0 for x in p) and sum(x.hbm_bytes for x in p) > 0


def test_skipping_breaks_even_with_chunked_above_half():
    """The trade-off the README states: one-pass fused (no clip tiles) beats the
    chunked path's 8NHV only once more than half of the backward tiles are skipped."""
    chunked = total_nhv(passes("chunked"))
    for s, below in ((0.4, False), (0.5, False), (0.6, True)):
        fused = total_nhv(passes("fused-onepass", "forward_kl", False, True, skipped_fraction=s))
        assert (fused < chunked) == below, (s, fused)


def test_deterministic_backward_is_at_most_the_chunked_work():
    """Issue 16's bound: a deterministic backward of at most 8NHV trainable, 6NHV frozen."""
    for trainable, bound in ((True, 8.0), (False, 6.0)):
        p = passes("fused", "forward_kl", False, trainable)
        assert total_nhv([x for x in p if x.name.startswith("bwd")]) == pytest.approx(bound)


def test_slab_layout_matches_the_library(monkeypatch):
    from bench.cost_model import slab_layout
    from opsd_kernels.triton import fused_backward
    from opsd_kernels.triton.configs import FusedConfig

    monkeypatch.setattr(fused_backward, "device_programs", lambda device: 2 * 132)
    cases = [(Shape(), 32 * 2**20), (Shape(N=16384, H=4096), 32 * 2**20)]
    # small scratch: the width is set by filling the device (2 x 132 programs), not the scratch
    cases += [(Shape(N=512, H=896), 32 * 2**20), (Shape(N=8192, H=4096), 2**20)]
    for shape, scratch in cases:
        lib = fused_backward._slab_layout(
            shape.N, shape.H, shape.V, FusedConfig(scratch_bytes=scratch), 2, True,
            torch.float32, torch.device("cpu"),
        )  # fmt: skip
        assert lib == slab_layout(shape, True, scratch), (shape, scratch)
    rows, width = slab_layout(Shape(N=8192, H=4096), True, 2**20)
    assert width > 2**20 // (2 * rows) and (rows // 64) * (width // 128) >= 2 * 132


def test_extra_memory_model():
    """The issue's memory target (< 64 MB beyond inputs and gradients, frozen lm_head, at
    the Qwen3-4B shape) in the model, and what a trainable lm_head adds in every path."""
    from bench.cost_model import extra_bytes, slab_layout

    s = Shape()
    assert extra_bytes("fused", s, trainable=False) < 64e6
    assert extra_bytes("chunked", s, trainable=False) > 10 * extra_bytes("fused", s, False)
    for impl in ("chunked", "fused", "fused-onepass"):
        added = extra_bytes(impl, s, True) - extra_bytes(impl, s, False)
        # the fused slab path also zeroes the masked rows of a token slice for dW
        masked_copy = s.elem * slab_layout(s, True)[0] * s.H if impl == "fused" else 0.0
        assert added == 4.0 * s.V * s.H + masked_copy, impl
    with pytest.raises(ValueError, match="impl"):
        extra_bytes("naive")


def test_tiles_per_pass_keys():
    assert tiles_per_pass("reverse_kl", False, False) == {"stats": 1.0, "backward": 1.0}
    assert tiles_per_pass("jsd", True, True, skipped_fraction=0.5) == {
        "stats": 1.0,
        "terms": 1.0,
        "backward": 0.5,
    }


def test_expected_time_is_roofline_sum():
    ps = [Pass("a", 790e12 * 2e-3, 0.0), Pass("b", 0.0, 3.35e12 * 1e-3)]
    assert expected_ms(ps) == pytest.approx(3.0)
    assert passes("chunked", shape=Shape(N=64, H=16, V=100, chunk=64))
    with pytest.raises(ValueError, match="impl"):
        passes("naive")
    assert len(table(Shape(N=128, H=16, V=1000))) > 10


def test_simulation_rules_match_library():
    """The skip simulation applies the library's rule functions to statistics it forms in
    torch; on a small block they agree with the definitions."""
    import math

    from opsd_kernels.triton.configs import FusedConfig
    from opsd_kernels.triton.fused_backward import skipped_tiles
    from opsd_kernels.triton.fused_forward import ForwardStats

    g = torch.Generator().manual_seed(0)
    s = torch.randn(8, 64, generator=g) * 3
    t = s + 0.1 * torch.randn(8, 64, generator=g)
    lse_s, lse_t = torch.logsumexp(s, -1), torch.logsumexp(t, -1)
    tmax_s = s.view(8, 4, 16).amax((0, 2))[None]
    tmax_t = t.view(8, 4, 16).amax((0, 2))[None]
    st = ForwardStats(
        torch.zeros(8),
        lse_s,
        lse_t,
        torch.zeros(8),
        tmax_s,
        tmax_t,
        FusedConfig(block_n=8, block_v=16),
    )
    thr = 0.05
    ps, pt = torch.softmax(s, -1).view(8, 4, 16), torch.softmax(t, -1).view(8, 4, 16)
    skip = skipped_tiles(st, thr)[0]
    # a skipped tile really holds only probabilities below the threshold (the bound holds)
    for vb in range(4):
        if skip[vb]:
            assert ps[:, vb].max() < thr and pt[:, vb].max() < thr
    assert math.isclose(
        float(torch.exp(tmax_s[0, 0] - lse_s.min())),
        float(torch.exp(s.view(8, 4, 16)[:, 0].max() - lse_s.min())),
    )
