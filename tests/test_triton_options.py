"""The Triton row kernels' options against a float64 spec: the per-role logit transform
(``logit_scale``, ``softcap``), every ``clip_mode`` and the per-token statistics.

The spec below is written from the :class:`~opsd_kernels._validation.DivergenceOptions`
and :mod:`opsd_kernels.stats` definitions, on the reference's own pointwise terms
(:mod:`opsd_kernels.reference`), with gradients from autograd ("entry_keep" replaces the
clipped entries' autograd gradient by its pS-weighted mean over the unclipped ones). The
kernels run in the interpreter on CPU: tiny shapes, a small ``block_v`` so that every row
takes several blocks and a ragged last one.
"""

from __future__ import annotations

import pytest
import torch

from opsd_kernels._validation import check_options
from opsd_kernels.reference import _pointwise
from opsd_kernels.stats import NUM_STATS, new_stats_buffer
from tests.helpers import DEVICE, TRITON_RUNS, assert_close, make_mask

pytestmark = pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1")

KINDS = ("forward_kl", "reverse_kl", "jsd")
CLIP_MODES = (None, "entry", "token", "entry_keep")
# (logit_scale, softcap, teacher_logit_scale, teacher_softcap): none; both roles capped
# and scaled alike (Gemma 2-like, a small cap so that it bends); a capped student beside
# an uncapped, scaled teacher; an uncapped student beside a capped teacher
TRANSFORMS = {
    "plain": (1.0, None, "same", "same"),
    "capped": (1.3, 4.0, "same", "same"),
    "student_cap": (0.8, 3.0, 1.5, None),
    "teacher_cap": (1.0, None, 2.0, 5.0),
}


def _transform(x, scale, cap):
    return scale * x if cap is None else cap * torch.tanh(scale * x / cap)


def spec(student, teacher, opts, mask=None):
    """float64 ``(loss (R,), dL/ds (R, V), dL/dt (R, V), stats (R, NUM_STATS))`` of each
    row's own loss with respect to the RAW logits; masked rows all 0."""
    s = student.double().clone().requires_grad_(True)
    t = teacher.double().clone().requires_grad_(True)
    keep = torch.ones(s.shape[0], dtype=torch.bool) if mask is None else mask.cpu()
    s_in = torch.where(keep[:, None], s, 0.0)
    t_in = torch.where(keep[:, None], t, 0.0)
    z_s = _transform(s_in, opts.logit_scale, opts.softcap)
    z_t = _transform(t_in, opts.teacher_logit_scale, opts.teacher_softcap)
    z_s.retain_grad()
    lS = torch.log_softmax(z_s / opts.temperature, -1)
    lT = torch.log_softmax(z_t / opts.temperature, -1)
    phi = _pointwise(opts.spec.name, lT, lS, opts.beta)
    clip, mode = opts.clip, opts.clip_mode
    clipped = torch.zeros_like(phi, dtype=torch.bool)
    token_clipped = torch.zeros(phi.shape[0], dtype=torch.bool)
    if clip is None:
        loss = phi.sum(-1)
    elif mode == "token":
        total = phi.sum(-1)
        token_clipped = ~(total < clip)
        loss = torch.clamp(total, max=clip)
    else:
        clipped = ~(phi < clip)
        loss = torch.clamp(phi, max=clip).sum(-1)
    loss = torch.where(keep, loss, 0.0)
    loss.sum().backward()
    grad_s, grad_t = s.grad, t.grad
    with torch.no_grad():
        pS, pT = lS.exp(), lT.exp()
        if clip is not None and mode == "entry_keep":
            # on clipped entries: the pS-weighted mean of the unclipped dL/dz_s
            p_kept = torch.where(clipped, 0.0, pS)
            mu = (p_kept * z_s.grad).sum(-1, keepdim=True) / p_kept.sum(-1, keepdim=True)
            dz_dx = torch.autograd.functional.jacobian(
                lambda x: _transform(x, opts.logit_scale, opts.softcap).sum(), s_in
            )
            grad_s = torch.where(clipped, mu * dz_dx, grad_s)
            grad_s = torch.where(keep[:, None], grad_s, 0.0)
        stats = torch.zeros(s.shape[0], NUM_STATS, dtype=torch.float64)
        stats[:, 0] = -torch.where(pS > 0, pS * lS, 0.0).sum(-1)
        if clip is not None and mode == "token":
            stats[:, 1] = token_clipped.double()
            stats[:, 2] = token_clipped.double() * s.shape[1]
            stats[:, 3] = token_clipped.double()
        elif clip is not None:
            top1 = lT == lT.amax(-1, keepdim=True)
            stats[:, 1] = torch.where(clipped, pT, 0.0).sum(-1)
            stats[:, 2] = clipped.sum(-1).double()
            stats[:, 3] = (clipped & top1).any(-1).double()
        stats = torch.where(keep[:, None], stats, 0.0)
    return loss.detach(), grad_s, grad_t, stats


def make_rows(R, V, gen, dtype=torch.float32, spread=3.0):
    s = (torch.randn(R, V, generator=gen) * spread).to(dtype)
    t = (torch.randn(R, V, generator=gen) * spread).to(dtype)
    return s, t


def run_rows(s, t, opts, mask=None, scale=None, want_t=True, block_v=64, in_place=False):
    """The Triton launcher on copies of ``s``, ``t`` (DEVICE): (loss, grad_s, grad_t, stats)."""
    from opsd_kernels.triton.divergence_rows import divergence_rows_triton

    R = s.shape[0]
    s_d, t_d = s.to(DEVICE, copy=True).contiguous(), t.to(DEVICE, copy=True).contiguous()
    scale = torch.ones(1) if scale is None else scale
    grad_s = s_d if in_place else torch.empty_like(s_d)
    grad_t = torch.empty_like(t_d) if want_t else None
    stats = new_stats_buffer(R, s_d.device)
    loss = divergence_rows_triton(
        s_d,
        t_d,
        opts,
        mask=None if mask is None else mask.to(DEVICE),
        scale=scale.float().to(DEVICE),
        grad_student=grad_s,
        grad_teacher=grad_t,
        stats=stats,
        block_v=block_v,
    )
    return loss.cpu(), grad_s.cpu(), None if grad_t is None else grad_t.cpu(), stats.cpu()


def clip_for(mode, s, t, opts_kw, kind):
    """A clip that bites on some entries / tokens but not all (from the spec's terms)."""
    if mode is None:
        return None
    opts = check_options(kind, 0.4, 1.3, None, "none", **opts_kw)
    z_s = _transform(s.double(), opts.logit_scale, opts.softcap)
    z_t = _transform(t.double(), opts.teacher_logit_scale, opts.teacher_softcap)
    lS = torch.log_softmax(z_s / opts.temperature, -1)
    lT = torch.log_softmax(z_t / opts.temperature, -1)
    phi = _pointwise(kind, lT, lS, opts.beta).nan_to_num(0.0)
    if mode == "token":  # about half of the rows clipped
        return float(phi.sum(-1).median()) * 1.0001
    return float(phi.flatten().quantile(0.97))  # a few entries per row


def check(actual, expected, dtype=torch.float32, what=""):
    loss, gs, gt, st = actual
    e_loss, e_gs, e_gt, e_st = expected
    assert_close(loss, e_loss, dtype, f"{what} loss")
    assert_close(gs, e_gs, dtype, f"{what} grad_student")
    if gt is not None:
        assert_close(gt, e_gt, dtype, f"{what} grad_teacher")
    assert_close(st[:, :2], e_st[:, :2], dtype, f"{what} entropy, clipped mass")
    assert torch.equal(st[:, 2:], e_st[:, 2:].float()), f"{what} clipped count, top-1 flag"


def _opts_kw(transform, mode):
    scale, cap, t_scale, t_cap = TRANSFORMS[transform]
    kw = dict(logit_scale=scale, softcap=cap, teacher_logit_scale=t_scale, teacher_softcap=t_cap)
    if mode is not None:
        kw["clip_mode"] = mode
    return kw


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", CLIP_MODES)
@pytest.mark.parametrize("transform", ["plain", "capped"])
def test_rows_every_kind_clip_mode_and_transform(kind, mode, transform):
    seed = 100 * KINDS.index(kind) + 10 * CLIP_MODES.index(mode) + len(transform)
    gen = torch.Generator().manual_seed(seed)
    R, V = 7, 301
    s, t = make_rows(R, V, gen)
    kw = _opts_kw(transform, mode)
    opts = check_options(kind, 0.4, 1.3, clip_for(mode, s, t, kw, kind), "none", **kw)
    mask = make_mask((R,), seed=R, p=0.7)
    s[~mask] = float("nan")  # padding rows: never read into an output
    row_scale = torch.rand(R, generator=gen) + 0.5
    expected = spec(s, t, opts, mask)
    e_loss, e_gs, e_gt, e_st = expected
    expected = (e_loss, e_gs * row_scale[:, None], e_gt * row_scale[:, None], e_st)
    check(run_rows(s, t, opts, mask, row_scale), expected, what=f"{kind} {mode} {transform}")
    if mode is not None:  # the clip bites somewhere and spares something
        assert 0 < expected[3][mask, 2].count_nonzero() < mask.sum() * V


@pytest.mark.parametrize("transform", ["student_cap", "teacher_cap"])
@pytest.mark.parametrize("kind", KINDS)
def test_rows_separate_teacher_transform(kind, transform):
    gen = torch.Generator().manual_seed(7 + KINDS.index(kind))
    s, t = make_rows(5, 203, gen, spread=4.0)
    opts = check_options(kind, 0.3, 0.9, 0.02, "none", **_opts_kw(transform, "entry_keep"))
    check(run_rows(s, t, opts), spec(s, t, opts), what=f"{kind} {transform}")


@pytest.mark.parametrize("mode", CLIP_MODES)
def test_rows_in_place_bf16_inputs(mode):
    """bf16 logits, the gradient written over the student logits (the chunked path)."""
    gen = torch.Generator().manual_seed(3)
    s, t = make_rows(6, 257, gen, dtype=torch.bfloat16)
    kw = _opts_kw("capped", mode)
    opts = check_options(
        "forward_kl", 0.5, 1.0, clip_for(mode, s, t, kw, "forward_kl"), "none", **kw
    )
    got = run_rows(s, t, opts, want_t=False, in_place=True)
    loss, gs, _, st = spec(s, t, opts)
    check(got, (loss, gs, None, st), dtype=torch.bfloat16, what=f"bf16 {mode}")


def test_rows_without_stats_or_options_match_with():
    """The plain specialisation (no stats, no options) gives the same loss and gradient
    as the one with statistics: the stats accumulators change nothing else."""
    from opsd_kernels.triton.divergence_rows import divergence_rows_triton

    gen = torch.Generator().manual_seed(11)
    s, t = make_rows(4, 150, gen)
    opts = check_options("jsd", 0.5, 1.0, 0.02, "none")
    g1, g2 = torch.empty_like(s), torch.empty_like(s)
    one = torch.ones(1)
    l1 = divergence_rows_triton(
        s, t, opts, mask=None, scale=one, grad_student=g1, grad_teacher=None, block_v=32
    )
    l2 = divergence_rows_triton(
        s,
        t,
        opts,
        mask=None,
        scale=one,
        grad_student=g2,
        grad_teacher=None,
        stats=new_stats_buffer(4, s.device),
        block_v=32,
    )
    assert torch.equal(l1, l2) and torch.equal(g1, g2)


def test_rows_entry_keep_mean_with_no_unclipped_mass():
    """Every entry clipped (sum_U pS = 0): mu is 0 (not 0/0), the gradient 0."""
    gen = torch.Generator().manual_seed(5)
    s, t = make_rows(2, 40, gen, spread=1.0)
    # JSD's pointwise terms are > 0 wherever pS != pT: a tiny clip clips them all
    opts = check_options("jsd", 0.5, 1.0, 1e-20, "none", clip_mode="entry_keep")
    loss, gs, gt, st = run_rows(s, t, opts, block_v=16)
    assert st[:, 2].eq(40).all()
    assert torch.equal(gs, torch.zeros_like(gs)) and torch.equal(gt, torch.zeros_like(gt))
    assert_close(loss, spec(s, t, opts)[0], torch.float32, "loss")


def test_rows_token_clip_keeps_nan_and_inf():
    """ "token": a NaN row stays NaN (min(NaN, clip)); an infinite KL row is clipped to
    the cap with a zero gradient."""
    s = torch.randn(3, 33)
    t = torch.randn(3, 33)
    s[0, 5] = float("nan")
    s[1, 3] = float("-inf")  # forward KL: teacher mass where the student has none
    opts = check_options("forward_kl", 0.5, 1.0, 0.5, "none", clip_mode="token")
    loss, gs, _, st = run_rows(s, t, opts, block_v=16)
    assert loss[0].isnan() and loss[1] == 0.5
    assert torch.equal(gs[1], torch.zeros(33)) and st[1, 2] == 33
    e = spec(s[2:], t[2:], opts)
    assert_close(loss[2:], e[0], torch.float32, "finite row")


def test_rows_stats_need_float32_r_by_4():
    from opsd_kernels.triton.divergence_rows import divergence_rows_triton

    s = torch.randn(2, 8)
    opts = check_options("forward_kl", 0.5, 1.0, None, "none")
    with pytest.raises(ValueError, match="stats must be a float32"):
        divergence_rows_triton(
            s,
            s,
            opts,
            mask=None,
            scale=torch.ones(1),
            grad_student=None,
            grad_teacher=None,
            stats=torch.zeros(2, 3),
        )


# ---- the vocabulary-parallel phase kernels, on two slices of each row ---------------


def _shift(m):
    return torch.where(m == float("-inf"), torch.zeros_like(m), m)


def vocab_parallel_two_slices(s, t, opts, mask, scale, cut):
    """The phases of :mod:`opsd_kernels.triton.vocab_parallel_rows` on the slices
    ``[:cut]`` and ``[cut:]`` of each row, combined in float64 as the ranks'
    all-reduces would: (loss, grad_s, grad_t, stats)."""
    from opsd_kernels.triton import vocab_parallel_rows as vp

    R = s.shape[0]
    pieces = [(s[:, :cut].contiguous(), t[:, :cut].contiguous())]
    pieces.append((s[:, cut:].contiguous(), t[:, cut:].contiguous()))
    p0 = [vp.local_stats_triton(a, b, opts, mask, entropy=True).double() for a, b in pieces]
    m_s = torch.stack([p[:, 0] for p in p0]).amax(0)
    m_t = torch.stack([p[:, 2] for p in p0]).amax(0)
    rs = [torch.exp(_shift(p[:, 0]) - _shift(m_s)) for p in p0]
    rt = [torch.exp(_shift(p[:, 2]) - _shift(m_t)) for p in p0]
    z_s = sum(r * p[:, 1] for r, p in zip(rs, p0, strict=True))
    z_t = sum(r * p[:, 3] for r, p in zip(rt, p0, strict=True))
    u = sum(
        r * (p[:, 5] + torch.where(p[:, 1] == 0, 0.0, p[:, 1] * (_shift(p[:, 0]) - _shift(m_s))))
        for r, p in zip(rs, p0, strict=True)
    )
    lse_s, lse_t = _shift(m_s) + z_s.log(), _shift(m_t) + z_t.log()
    keep = torch.ones(R, dtype=torch.bool) if mask is None else mask
    lse_s, lse_t = torch.where(keep, lse_s, 0.0), torch.where(keep, lse_t, 0.0)
    # the row statistics vocab_parallel keeps: LSE_S, LSE_T, G_SUM, H_SUM, KEEP_MEAN,
    # DROPPED, MAX_T (the term sums read the LSEs and MAX_T)
    row_stats = torch.zeros(R, 7, dtype=torch.float64)
    row_stats[:, 0], row_stats[:, 1], row_stats[:, 6] = lse_s, lse_t, m_t
    p1 = [
        vp.local_term_sums_triton(a, b, opts, mask, row_stats.float().contiguous()).double()
        for a, b in pieces
    ]
    sums = p1[0] + p1[1]
    loss, G, H = sums[:, 0], sums[:, 1], sums[:, 2]
    stats = torch.zeros(R, NUM_STATS, dtype=torch.float64)
    stats[:, 0] = z_s.log() - u / z_s
    if opts.clip is not None and opts.clip_mode == "token":
        clipped = ~(loss < opts.clip)
        loss = torch.clamp(loss, max=opts.clip)
        row_stats[:, 5] = clipped.double()
        stats[:, 1], stats[:, 2], stats[:, 3] = clipped, clipped * s.shape[1], clipped
    elif opts.clip is not None:
        stats[:, 1], stats[:, 2], stats[:, 3] = sums[:, 6], sums[:, 7], sums[:, 8] > 0
    kept_p = sums[:, 5]
    mu = (sums[:, 3] - G * sums[:, 4]) / (opts.temperature * kept_p)
    row_stats[:, 2], row_stats[:, 3] = G, H
    row_stats[:, 4] = torch.where(kept_p == 0, 0.0, mu)
    row_stats = row_stats.float().contiguous()
    row_scale = scale.float().expand(R).contiguous()
    grads = []
    for a, b in pieces:
        gs, gt = torch.empty_like(a), torch.empty_like(b)
        vp.local_gradients_triton(a, b, opts, mask, row_stats, row_scale, gs, gt)
        grads.append((gs, gt))
    grad_s = torch.cat([grads[0][0], grads[1][0]], 1)
    grad_t = torch.cat([grads[0][1], grads[1][1]], 1)
    return (
        torch.where(keep, loss, 0.0),
        grad_s,
        grad_t,
        torch.where(keep[:, None], stats, 0.0).float(),
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", CLIP_MODES)
def test_vocab_parallel_phases_every_kind_clip_mode(kind, mode):
    seed = 1000 + 10 * KINDS.index(kind) + CLIP_MODES.index(mode)
    gen = torch.Generator().manual_seed(seed)
    R, V = 5, 211
    s, t = make_rows(R, V, gen)
    kw = _opts_kw("student_cap" if kind == "jsd" else "capped", mode)
    opts = check_options(kind, 0.4, 1.3, clip_for(mode, s, t, kw, kind), "none", **kw)
    mask = make_mask((R,), seed=seed, p=0.7)
    t[~mask] = float("nan")
    row_scale = torch.rand(R, generator=gen) + 0.5
    e_loss, e_gs, e_gt, e_st = spec(s, t, opts, mask)
    expected = (e_loss, e_gs * row_scale[:, None], e_gt * row_scale[:, None], e_st)
    got = vocab_parallel_two_slices(s, t, opts, mask, row_scale, cut=97)
    check(got, expected, what=f"vocab-parallel {kind} {mode}")


# ---- the top-k row kernel: the student's transform, "token" ----------------------------


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("mode", [None, "entry", "token"])
def test_topk_rows_student_transform_with_inf_logits(tail, mode):
    """The Triton top-k rows against the float64 reference: a soft-capped, scaled
    student with genuine -inf logits (the cap maps them to -cap, unlike the launcher's
    -inf marks of excluded ids), ragged blocks, a mask, clip modes."""
    from opsd_kernels import topk_divergence
    from opsd_kernels.reference import topk_divergence_reference

    gen = torch.Generator().manual_seed(40 + len(tail) + CLIP_MODES.index(mode))
    N, V, K = 6, 150, 7
    s = torch.randn(N, V, generator=gen) * 6
    s[0, :3] = float("-inf")
    s[1, 10] = float("-inf")
    t_lp = torch.log_softmax(torch.randn(N, V, generator=gen) * 3, -1)
    lp, ids = t_lp.topk(K, dim=-1)
    ids[1, 0] = 10  # a -inf student logit among the ids
    lp[2, -2:] = float("-inf")  # padding
    mask = make_mask((N,), seed=3, p=0.8)
    kw = dict(kind="jsd", beta=0.3, tail=tail, temperature=1.2, logit_scale=1.5, softcap=4.0)
    if mode == "token":  # about half of the rows capped
        free = topk_divergence_reference(s, ids, lp, mask=mask, reduction="none", **kw)
        kw.update(clip=float(free[mask].median()) * 1.0001, clip_mode=mode)
    elif mode == "entry":
        kw.update(clip=0.02, clip_mode=mode)
    x = s.clone().requires_grad_(True)
    ref = topk_divergence_reference(x, ids, lp, mask=mask, reduction="none", **kw)
    ref.sum().backward()
    y = s.clone().to(DEVICE).requires_grad_(True)
    got = topk_divergence(
        y,
        ids.to(DEVICE),
        lp.to(DEVICE),
        mask=mask.to(DEVICE),
        reduction="none",
        impl="triton",
        **kw,
    )
    got.sum().backward()
    assert_close(got, ref, torch.float32, "loss")
    assert_close(y.grad, x.grad, torch.float32, "grad")
    if mode == "token":  # some rows capped, some not
        assert 0 < (ref[mask] == kw["clip"]).sum() < mask.sum()


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("mode", [None, "entry", "token", "entry_keep"])
def test_topk_rows_stats_and_entry_keep(tail, mode):
    """The Triton top-k rows' statistics (and "entry_keep"'s gradient) against the float64
    reference, with a cap and -inf student logits (complement and ids)."""
    from opsd_kernels import topk_divergence
    from opsd_kernels.reference import topk_divergence_reference
    from tests.option_helpers import assert_stats_close

    gen = torch.Generator().manual_seed(70 + len(tail) + [None, "entry", "token"].count(mode))
    N, V, K = 7, 131, 6
    s = torch.randn(N, V, generator=gen) * 5
    s[0, 7] = float("-inf")
    t_lp = torch.log_softmax(s + torch.randn(N, V, generator=gen) * 2, -1)
    lp, ids = t_lp.topk(K, dim=-1)
    lp[3, -1] = float("-inf")  # padding
    mask = make_mask((N,), seed=4, p=0.8)
    kw = dict(kind="forward_kl", tail=tail, temperature=0.9, logit_scale=1.2, softcap=6.0)
    if mode == "token":
        free = topk_divergence_reference(s, ids, lp, mask=mask, reduction="none", **kw)
        kw.update(clip=float(free[mask].median()) * 1.0001, clip_mode=mode)
    elif mode is not None:
        kw.update(clip=0.03, clip_mode=mode)
    x = s.clone().requires_grad_(True)
    ref, ref_stats = topk_divergence_reference(
        x, ids, lp, mask=mask, reduction="none", return_stats=True, **kw
    )
    ref.sum().backward()
    y = s.clone().to(DEVICE).requires_grad_(True)
    got, stats = topk_divergence(
        y,
        ids.to(DEVICE),
        lp.to(DEVICE),
        mask=mask.to(DEVICE),
        reduction="none",
        impl="triton",
        return_stats=True,
        **kw,
    )
    got.sum().backward()
    assert_close(got, ref, torch.float32, "loss")
    assert_close(y.grad, x.grad, torch.float32, "grad")
    assert_stats_close(stats, ref_stats, torch.float32, f"top-k {tail} {mode}")
    if mode is not None:
        assert (ref_stats.clipped_entries[mask] > 0).any()
