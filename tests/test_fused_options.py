"""`impl="fused"` with this round's options: the per-role logit transform (``logit_scale``,
``softcap``, and the teacher's), ``clip_mode`` ("entry", "token", "entry_keep") and the
per-token statistics, against a float64 spec written here from the definitions in
:class:`opsd_kernels._validation.DivergenceOptions` and :mod:`opsd_kernels.stats`.

The spec is independent of the kernels' route: logits are materialised in float64, the
pointwise terms come from :mod:`opsd_kernels.reference`, gradients from autograd (for
"entry_keep", autograd's "entry" gradient with each clipped entry replaced by the
``pS``-weighted mean of the unclipped ones, as the docstring defines it). The kernels run
through :class:`~opsd_kernels.triton.fused_function.FusedTritonLinearDivergenceFunction`
in the Triton interpreter at tiny shapes with tiny tiles (several token blocks,
vocabulary blocks, splits and hidden-size steps).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from opsd_kernels._validation import check_options
from opsd_kernels.reference import POINTWISE
from opsd_kernels.stats import NUM_STATS, new_stats_buffer
from opsd_kernels.triton.fused_function import FusedTritonLinearDivergenceFunction as F
from tests.helpers import DEVICE, TRITON_RUNS, assert_close, make_mask
from tests.test_fused_linear import make_inputs

pytestmark = pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1")

KIND_NAMES = ("forward_kl", "reverse_kl", "jsd")
MODES = ("none", "entry", "token", "entry_keep")  # "none": no clip
#: per-role transforms: (separate teacher head, logit_scale, softcap, teacher_logit_scale,
#: teacher_softcap); random logits here are ~N(0, 2^2), so caps of 2.5-3 bend them hard
TRANSFORMS = {
    "plain": (False, 1.0, None, "same", "same"),
    "scale": (False, 1.7, None, "same", "same"),
    "softcap": (False, 1.3, 3.0, "same", "same"),
    "separate": (True, 1.0, 2.5, 0.8, None),
}


@pytest.fixture
def blocks(monkeypatch):
    """Override the fused kernels' tile sizes / options (every row of the config table)."""
    from opsd_kernels.triton import configs

    def set_blocks(**kw):
        rows = tuple(
            dataclasses.replace(r, config=dataclasses.replace(r.config, **kw))
            for r in configs.TABLE
        )
        monkeypatch.setattr(configs, "TABLE", rows)

    return set_blocks


# ---------------------------------------------------------------- the float64 spec


def _transform(x, scale, cap):
    return x * scale if cap is None else cap * torch.tanh(x * scale / cap)


def spec_rows(s_raw, t_raw, opts, mask):
    """Float64 row losses, per-token statistics (N, 4) and the student's log-probabilities
    and clipped-entry map (for the gradient), from RAW logits ``s_raw`` (a leaf that
    requires grad) and ``t_raw``."""
    z_s = _transform(s_raw, opts.logit_scale, opts.softcap)
    z_t = _transform(t_raw, opts.teacher_logit_scale, opts.teacher_softcap)
    lS = torch.log_softmax(z_s / opts.temperature, -1)
    lT = torch.log_softmax(z_t / opts.temperature, -1)
    phi = POINTWISE[opts.spec.name](lT, lS, opts.beta)
    clip, mode = opts.clip, opts.clip_mode
    V = s_raw.shape[-1]
    pS, pT = lS.detach().exp(), lT.detach().exp()
    stats = torch.zeros(s_raw.shape[0], NUM_STATS, dtype=torch.float64)
    stats[:, 0] = -torch.where(pS > 0, pS * lS.detach(), 0.0).sum(-1)
    clipped = torch.zeros_like(pS, dtype=torch.bool)
    if clip is None:
        rows = phi.sum(-1)
    elif mode == "token":
        rows = torch.clamp(phi.sum(-1), max=clip)
        hit = ~(phi.detach().sum(-1) < clip)
        stats[:, 1], stats[:, 2], stats[:, 3] = hit.double(), hit.double() * V, hit.double()
    else:
        rows = torch.clamp(phi, max=clip).sum(-1)
        clipped = ~(phi.detach() < clip)
        stats[:, 1] = (pT * clipped).sum(-1)
        stats[:, 2] = clipped.sum(-1).double()
        stats[:, 3] = (clipped & (pT == pT.max(-1, keepdim=True).values)).any(-1).double()
    if mask is not None:
        rows = torch.where(mask, rows, 0.0)
        stats = torch.where(mask[:, None], stats, 0.0)
    return rows, stats, pS, clipped


def spec(x, mask, opts, row_factor):
    """Float64 ``(row losses (N,), gradients {name: tensor}, stats (N, 4))`` for inputs
    ``x`` (make_inputs' names), rows weighted by ``row_factor`` (N,) in the gradient."""
    x = {k: v.detach().double().cpu() for k, v in x.items()}
    trainable = [k for k in ("student_hidden", "weight", "bias") if k in x]
    for k in trainable:
        x[k].requires_grad_()
    hs, ht = x["student_hidden"], x["teacher_hidden"]
    if mask is not None:  # padding may hold NaN: masked rows never reach any arithmetic
        mask = mask.cpu()
        hs = torch.where(mask[:, None], hs, 0.0)
        ht = torch.where(mask[:, None], ht, 0.0)
    s_raw = torch.nn.functional.linear(hs, x["weight"], x.get("bias"))
    w_t = x.get("teacher_weight", x["weight"]).detach()
    b_t = x.get("teacher_bias") if "teacher_weight" in x else x.get("bias")
    t_raw = torch.nn.functional.linear(ht, w_t, None if b_t is None else b_t.detach())
    s_leaf = s_raw.detach().requires_grad_()
    rows, stats, pS, clipped = spec_rows(s_leaf, t_raw, opts, mask)
    (grad_s,) = torch.autograd.grad((rows * row_factor).sum(), s_leaf)
    if opts.clip is not None and opts.clip_mode == "entry_keep":
        # with respect to the transformed logit z the entry gradient is dL/dz; a clipped
        # entry takes mu = sum_U pS dL/dz / sum_U pS (0 without unclipped mass)
        s2 = s_leaf.detach().requires_grad_()
        z = _transform(s2, opts.logit_scale, opts.softcap)
        (dzdx,) = torch.autograd.grad(z.sum(), s2)
        g_z = grad_s / dzdx
        kept = ~clipped
        u1 = (pS * kept).sum(-1, keepdim=True)
        mu = torch.where(u1 > 0, (pS * g_z * kept).sum(-1, keepdim=True) / u1, 0.0)
        grad_s = torch.where(kept, g_z, mu) * dzdx
    grads = torch.autograd.grad(s_raw, [x[k] for k in trainable], grad_s)
    grads = dict(zip(trainable, grads, strict=True))
    return rows.detach(), grads, stats


# ---------------------------------------------------------------- running a case


def options(kind, mode, transform, clip, reduction, temperature=1.1, beta=0.3):
    _, scale, cap, t_scale, t_cap = TRANSFORMS[transform]
    return check_options(
        kind,
        beta,
        temperature,
        None if mode == "none" else clip,
        reduction,
        clip_mode="entry" if mode == "none" else mode,
        logit_scale=scale,
        softcap=cap,
        teacher_logit_scale=t_scale,
        teacher_softcap=t_cap,
    )


def run_fused(x, mask, opts, upstream, deterministic, skip_threshold=0.0, with_stats=True):
    """Forward with stats, backward with ``upstream`` (the loss's shape): (loss, grads, stats)."""
    xs = {k: v.detach().clone() for k, v in x.items()}
    trainable = [k for k in ("student_hidden", "weight", "bias") if k in xs]
    for k in trainable:
        xs[k].requires_grad_()
    N = xs["student_hidden"].shape[0]
    stats = new_stats_buffer(N, xs["student_hidden"].device) if with_stats else None
    out = F.apply(
        xs["student_hidden"],
        xs["teacher_hidden"],
        xs["weight"],
        xs.get("teacher_weight"),
        xs.get("bias"),
        xs.get("teacher_bias"),
        mask,
        opts,
        skip_threshold,
        torch.float32,
        deterministic,
        stats,
    )
    (out * upstream.to(out)).sum().backward()
    return out.detach(), {k: xs[k].grad for k in trainable}, stats


def row_factors(opts, upstream, mask, N):
    if opts.reduction == "none":
        return upstream
    if opts.reduction == "sum":
        return upstream.expand(N)
    count = N if mask is None else max(int(mask.sum()), 1)
    return upstream.expand(N) / count


def reduce(rows, reduction, mask):
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    count = rows.numel() if mask is None else max(int(mask.sum()), 1)
    return rows.sum() / count


def check_case(x, mask, opts, deterministic, dtype=torch.float32, seed=0, stats_check=True):
    N = x["student_hidden"].shape[0]
    g = torch.Generator().manual_seed(seed + 11)
    shape = (N,) if opts.reduction == "none" else ()
    upstream = torch.randn(shape, generator=g, dtype=torch.float64)
    want_rows, want_grads, want_stats = spec(x, mask, opts, row_factors(opts, upstream, mask, N))
    out, grads, stats = run_fused(x, mask, opts, upstream, deterministic)
    assert_close(out, reduce(want_rows, opts.reduction, mask), dtype, "loss")
    keep = opts.clip is not None and opts.clip_mode == "entry_keep"
    for k, want in want_grads.items():
        assert grads[k].dtype == x[k].dtype
        if keep and dtype == torch.float32:
            # mu's sums over the unclipped entries are all-minus-clipped (no extra pass),
            # which costs float32 a factor sum_v |pS g| / sum_U pS: see test_entry_keep_mu
            scale = max(1.0, want.abs().max().item())
            torch.testing.assert_close(
                grads[k].double().cpu(), want, rtol=2e-4, atol=1e-4 * scale, msg=f"grad {k}"
            )
        else:
            assert_close(grads[k], want, dtype, f"grad {k}")
    if mask is not None:
        assert torch.count_nonzero(grads["student_hidden"][~mask]) == 0
    if stats_check:
        check_stats(stats, want_stats, dtype)
    return want_stats


def check_stats(stats, want, dtype):
    stats = stats.double().cpu()
    assert_close(stats[:, 0], want[:, 0], dtype, "student entropy")
    assert_close(stats[:, 1], want[:, 1], dtype, "teacher clipped mass")
    assert torch.equal(stats[:, 2], want[:, 2]), "clipped entries"
    assert torch.equal(stats[:, 3], want[:, 3]), "teacher top-1 clipped"


def make_case(transform, masked, seed=0, N=22, H=20, V=150, dtype=torch.float32, nan=True):
    separate = TRANSFORMS[transform][0]
    x = make_inputs((N,), H, V, H_T=28 if separate else None, dtype=dtype, seed=seed,
                    bias=True, separate=separate)  # fmt: skip
    mask = None
    if masked:
        mask = make_mask((N,), seed=seed, device=DEVICE)
        if nan:
            x["student_hidden"][~mask] = float("nan")
            x["teacher_hidden"][~mask] = float("nan")
    return x, mask


def token_clip_at_median(x, mask, kind, transform):
    """A token clip that clips about half the counted tokens, midway between two row
    losses (no row sits at the clip)."""
    opts = options(kind, "none", transform, None, "none")
    rows, _, _ = spec(x, mask, opts, torch.zeros(x["student_hidden"].shape[0]))
    counted = (rows if mask is None else rows[mask.cpu()]).sort().values
    k = counted.numel() // 2
    return float(counted[k - 1 : k + 1].mean())


CASES = list(itertools.product(KIND_NAMES, MODES, TRANSFORMS))
#: per-entry clips that clip some entries in every case of the grid (JSD terms are smaller)
ENTRY_CLIP = {"forward_kl": 0.05, "reverse_kl": 0.05, "jsd": 0.005}


@pytest.mark.parametrize("kind, mode, transform", CASES)
def test_options_against_float64_spec(blocks, kind, mode, transform):
    """Every kind x clip mode x per-role transform; masks with NaN padding, reductions and
    both backward modes rotate over the grid (each met by every kind and mode)."""
    i = CASES.index((kind, mode, transform))
    blocks(splits=3, scratch_bytes=4 * 16 * 64)
    reduction = ("none", "mean", "sum")[i % 3]
    masked = (i // 3) % 2 == 0
    x, mask = make_case(transform, masked, seed=i)
    clip = ENTRY_CLIP[kind]
    if mode == "token":
        clip = token_clip_at_median(x, mask, kind, transform)
    opts = options(kind, mode, transform, clip, reduction)
    for deterministic in (True, False):
        want_stats = check_case(x, mask, opts, deterministic, seed=i)
    if mode in ("entry", "entry_keep"):  # the case really clips, and not everything
        assert 0 < want_stats[:, 2].sum() < want_stats[:, 2].numel() * 150
    if mode == "token":
        hit = want_stats[:, 1]
        assert 0 < hit.sum() < (hit.numel() if mask is None else mask.sum())


@pytest.mark.parametrize("mode", ["entry", "token", "entry_keep"])
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_float16_softcapped(blocks, kind, mode):
    """float16 operands with a cap that bends the logits, against float64 on the same
    float16 values (float16 tolerances)."""
    blocks(scratch_bytes=16 * 4 * 16)
    x, mask = make_case("softcap", True, seed=3, N=24, H=16, V=90, dtype=torch.float16)
    clip = token_clip_at_median(x, mask, kind, "softcap") if mode == "token" else ENTRY_CLIP[kind]
    opts = options(kind, mode, "softcap", clip, "none")
    check_case(x, mask, opts, deterministic=True, dtype=torch.float16)


def test_transform_changes_the_result():
    """The transform is really applied: a soft cap changes the loss (a spec that ignored
    it could not pass the grid above)."""
    x, _ = make_case("plain", False)
    up = torch.ones(())
    plain, _, _ = run_fused(x, None, options("forward_kl", "none", "plain", None, "sum"), up, True)
    capped, _, _ = run_fused(
        x, None, options("forward_kl", "none", "softcap", None, "sum"), up, True
    )
    assert (plain - capped).abs() > 1e-2 * plain.abs()


# ---------------------------------------------------------------- skipping and bounds


def peaked_inputs(N, H, V, seed=0, opposite=False):
    """LM-like distributions (as in test_fused): tiles far down the vocabulary carry tiny
    probability for every token."""
    x = make_inputs((N,), H, V, dtype=torch.float64, seed=seed)
    decay = torch.linspace(1.5, -2.5, V, dtype=torch.float64)
    x["weight"][:, 0] = decay + 0.1 * x["weight"][:, 0]
    x["weight"][:, 1] = decay.flip(0) + 0.1 * x["weight"][:, 1]
    x["student_hidden"][:, 0] = 6.0
    x["student_hidden"][:, 1] = 0.0
    x["teacher_hidden"][:, 0] = 0.0 if opposite else 6.5
    x["teacher_hidden"][:, 1] = 6.5 if opposite else 0.0
    return {k: v.float().to(DEVICE) for k, v in x.items()}


def test_auto_skip_is_exact_in_float32_with_a_cap():
    """skip_threshold="auto" is 0 for float32 gradients: with a soft cap and a scale too
    the result is bitwise that of threshold 0 (and matches float64)."""
    x = peaked_inputs(24, 16, 300)
    opts = check_options("forward_kl", 0.5, 1.1, 0.05, "none", logit_scale=1.5, softcap=8.0)
    up = torch.linspace(-1.0, 2.0, 24, dtype=torch.float64)
    out0, g0, _ = run_fused(x, None, opts, up, True, skip_threshold=0.0)
    out1, g1, _ = run_fused(x, None, opts, up, True, skip_threshold="auto")
    assert torch.equal(out0, out1)
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k
    rows, grads, _ = spec(x, None, opts, up)
    assert_close(out0, rows, torch.float32, "loss")
    assert_close(g0["student_hidden"], grads["student_hidden"], torch.float32, "grad h")


@pytest.mark.parametrize("mode", ["entry", "entry_keep"])
def test_skipping_bound_with_logit_scale_and_cap(mode):
    """A positive threshold with a logit scale and a cap: the dropped hidden-state gradient
    stays within the forward-KL bound times logit_scale (|dz/dx| <= logit_scale), the loss
    is untouched, and with "entry_keep" no tile holding a clipped entry is skipped."""
    from opsd_kernels.triton.fused_backward import skipped_tiles
    from opsd_kernels.triton.fused_forward import fused_forward

    N, H, V, tau, thr, scale = 24, 16, 300, 1.1, 1e-3, 1.5
    x = peaked_inputs(N, H, V, opposite=True)
    opts = check_options(
        "forward_kl", 0.5, tau, 0.01, "none", clip_mode=mode, logit_scale=scale, softcap=30.0
    )
    up = torch.randn(N, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out0, g0, _ = run_fused(x, None, opts, up, True, skip_threshold=0.0)
    out1, g1, _ = run_fused(x, None, opts, up, True, skip_threshold=thr)
    assert torch.equal(out0, out1)
    args = (x["student_hidden"], x["teacher_hidden"], x["weight"], None, None, None, None, opts)
    st = fused_forward(*args)
    skipped = skipped_tiles(st, thr)
    assert 0.1 < skipped.float().mean().item() < 0.9
    if mode == "entry_keep":
        assert st.clipped_tiles.any()
        counts = {}
        from opsd_kernels.triton.fused_backward import fused_backward

        fused_backward(*args[:7], st, torch.ones(1), opts, skip_threshold=thr, want_h=True,
                       want_w=False, want_b=False, tile_counts=counts)  # fmt: skip
        assert (counts["backward"][st.clipped_tiles] == 1).all()
        assert torch.equal(counts["backward"].bool(), ~skipped | st.clipped_tiles)
    eh = (g1["student_hidden"] - g0["student_hidden"]).double().abs().cpu()
    assert eh.max() > 0
    w_max = x["weight"].double().abs().max(0).values.cpu()
    bound = scale * (2 * thr / tau) * (up.abs()[:, None] * V) * w_max[None, :]
    assert (eh <= bound + 1e-6).all()


def test_token_mode_skips_blocks_of_clipped_tokens(blocks):
    """clip_mode="token": a clipped token passes no gradient, so a token block whose
    tokens are all clipped (or masked) is not recomputed by the backward, even at
    threshold 0; the result still matches float64."""
    from opsd_kernels.triton.fused_backward import fused_backward
    from opsd_kernels.triton.fused_forward import fused_forward

    blocks(splits=2)
    N, H, V = 40, 16, 120
    x = make_inputs((N,), H, V, seed=4)
    up = torch.ones(N, dtype=torch.float64)
    x["teacher_hidden"][:16] *= 6.0  # the first token block: a large KL on every token
    rows, _, _ = spec(x, None, options("forward_kl", "none", "softcap", None, "none"), up)
    opts = options("forward_kl", "token", "softcap", 0.999 * rows[:16].min().item(), "none")
    args = (x["student_hidden"], x["teacher_hidden"], x["weight"], None, None, None, None, opts)
    st = fused_forward(*args)
    assert not st.grad_mask[:16].any() and st.grad_mask[16:].any()
    assert st.cfg.block_n == 16
    for deterministic in (True, False):
        counts = {}
        fused_backward(*args[:7], st, torch.ones(N), opts, skip_threshold=0.0, want_h=True,
                       want_w=True, want_b=False, deterministic=deterministic,
                       tile_counts=counts)  # fmt: skip
        live = torch.nn.functional.pad(st.grad_mask, (0, 8)).reshape(-1, 16).any(1)  # 2.5 blocks
        assert torch.equal(counts["backward"], live[:, None].int().expand_as(counts["backward"]))
    check_case(x, None, opts, deterministic=True, stats_check=True)


def test_entry_keep_holds_clipped_probabilities_to_first_order():
    """The point of "entry_keep": along the descent step -grad, a clipped entry's student
    log-probability moves by -(grad_j - sum_v pS_v grad_v) = 0 to first order, whereas
    "entry" moves it (down, for forward KL). One token: the bias gradient is the logit
    gradient the kernels form."""
    x, _ = make_case("plain", False, seed=8, N=1, V=120)
    xd = {k: v.double().cpu() for k, v in x.items()}
    s = xd["student_hidden"] @ xd["weight"].T + xd["bias"]
    t = xd["teacher_hidden"] @ xd["weight"].T + xd["bias"]
    one = torch.ones(1, dtype=torch.float64)
    moves, grads_z = {}, {}
    for mode in ("entry", "entry_keep"):
        opts = options("forward_kl", mode, "plain", 0.01, "none")
        _, _, pS, clipped = spec_rows(s.clone().requires_grad_(), t, opts, None)
        _, grads, _ = run_fused(x, None, opts, one, True)
        grad = grads["bias"].double().cpu()
        grads_z[mode] = grad[clipped[0]]
        moves[mode] = (grad - (pS[0] * grad).sum())[clipped[0]]
    assert clipped.sum() > 2
    assert (grads_z["entry"] > 0).all()  # "entry" lowers every clipped entry's logit
    assert moves["entry"].abs().min() > 1e-4  # and moves its probability
    assert moves["entry_keep"].abs().max() < 1e-5 * grads_z["entry"].abs().max()


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_entry_keep_mu_within_its_error_estimate(blocks, kind):
    """The per-token mu of "entry_keep" against float64. For forward/reverse KL its sums
    over the unclipped entries U are the stats pass's sums over all entries minus the
    terms pass's over the clipped ones (no extra pass), so float32 rounding of the
    logits (relative eps |b| per probability) costs mu an absolute error up to about
    eps |b|max (sum_v |pS g| + |G| sum_v pS^2 + |mu| sum_v pS) / sum_U pS beyond the
    rounding of the entries it averages; JSD sums U directly."""
    from opsd_kernels.triton.fused_forward import fused_forward

    blocks(splits=3)
    x, _ = make_case("scale", False, seed=5, N=24, V=200)
    opts = options(kind, "entry_keep", "scale", ENTRY_CLIP[kind], "none")
    st = fused_forward(x["student_hidden"], x["teacher_hidden"], x["weight"], None, x["bias"],
                       None, None, opts)  # fmt: skip
    xd = {k: v.double().cpu() for k, v in x.items()}
    s = xd["student_hidden"] @ xd["weight"].T + xd["bias"]
    t = xd["teacher_hidden"] @ xd["weight"].T + xd["bias"]
    lS = torch.log_softmax(s * opts.logit_scale / opts.temperature, -1)
    lT = torch.log_softmax(t * opts.logit_scale / opts.temperature, -1)
    phi = POINTWISE[kind](lT, lS, opts.beta)
    s_leaf = lS.detach().requires_grad_()
    (g,) = torch.autograd.grad(POINTWISE[kind](lT, s_leaf, opts.beta).sum(), s_leaf)
    pS, kept = lS.exp(), phi < opts.clip
    G = (g * kept).sum(-1)
    u1 = (pS * kept).sum(-1)
    mu = ((pS * g * kept).sum(-1) - G * (pS * pS * kept).sum(-1)) / u1
    assert (~kept).any(-1).sum() > 5  # several tokens really clip
    b_max = (s * opts.logit_scale / opts.temperature).abs().amax(-1)
    sums = (pS * g).abs().sum(-1) + G.abs() * (pS * pS).sum(-1) + mu.abs()  # sum pS = 1
    # the subtraction's cost, plus float32 rounding of the entries mu averages
    estimate = 2**-24 * b_max * (sums / u1 + g.abs().amax(-1) + G.abs() * pS.amax(-1))
    err = (st.mu.double().cpu() - mu).abs()
    assert (err <= 4 * estimate + 1e-7 * mu.abs()).all(), (err / estimate).max()


def test_stats_out_validation():
    x, _ = make_case("plain", False, N=4, V=40)
    opts = options("forward_kl", "entry", "plain", 0.02, "mean")
    args = (x["student_hidden"], x["teacher_hidden"], x["weight"], None, None, None, None, opts,
            0.0, torch.float32, True)  # fmt: skip
    for bad in (torch.zeros(4, 3), torch.zeros(4, 4, dtype=torch.float64), torch.zeros(5, 4)):
        with pytest.raises(ValueError, match="stats_out"):
            F.apply(*args, bad)
    assert math.isfinite(F.apply(*args, None).item())
