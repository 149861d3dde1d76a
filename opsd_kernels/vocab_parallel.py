"""Vocabulary-parallel divergences: the vocabulary is split across a process group.

Used by :func:`opsd_kernels.divergence` and
:func:`opsd_kernels.fused_linear_divergence` when ``process_group`` is given
(tensor parallelism of the lm_head: Megatron, NeMo-RL, torchtitan).

Layout. The vocabulary is split across the group's ranks in rank order, in
contiguous slices that may be uneven (rank 0 holds entries ``[0, V_0)``, rank
1 ``[V_0, V_0 + V_1)``, ...); every slice must be non-empty. ``divergence``
takes each rank's slice of the last dimension of both logits;
``fused_linear_divergence`` takes each rank's rows of ``weight``, ``bias``,
``teacher_weight`` and ``teacher_bias``. Everything else (hidden states, mask,
options, the upstream gradient) must be the same on every rank: it is not
checked, as that would cost a collective.

Results. Every rank returns the full loss. The gradient of each rank's logits,
weight and bias slice is that slice of the full gradient. The
``student_hidden`` gradient is the full gradient on every rank: each rank's
partial ``dS_r @ W_r`` is summed over the group inside the backward.

Phases (per row; the formulas are those of :mod:`opsd_kernels.divergences`,
with ``b = z_S / tau``, ``a = z_T / tau``, ``z`` each role's transformed logits,
``DivergenceOptions``' ``logit_scale``/``softcap``, applied locally, entry by entry):

1. one local sweep: the slice's max and sum of exponentials of ``b`` and of
   ``a``; for forward/reverse KL without clip also the weighted sum
   ``sum e^(a - m_T)(a - b)`` (forward) or ``sum e^(b - m_S)(b - a)`` (reverse)
   -> all-reduce MAX of the maxima (2 values per row), re-shift the local sums
   to the global maxima -> all-reduce SUM (2 or 3 values per row). This gives
   ``LSE_S``, ``LSE_T`` and, for those KL kinds, the loss in closed form
   (forward: ``L = w / z_T - LSE_T + LSE_S``, ``G = -1``, ``H = L + 1``;
   reverse: ``L = w / z_S - LSE_S + LSE_T``, ``G = L + 1``, ``H = -1``).
2. jsd or a per-entry clip only: local sums of the clipped terms ``phi`` and ``g``
   (and ``h`` when the teacher logits need a gradient) -> all-reduce SUM (2 or 3
   values per row): ``L``, ``G`` (and ``H``). ``clip_mode="entry_keep"`` adds
   ``sum_U pS g``, ``sum_U pS^2`` and ``sum_U pS`` over the unclipped entries U to
   the same all-reduce, which give the clipped entries' gradient ``mu``.
   ``clip_mode="token"`` caps the row loss afterwards, ``min(L, clip)``, and marks
   the capped rows (the KL kinds keep their closed form: no phase 2).
3. the gradient, local: ``dL/ds_j = (g_j - pS_j G) / tau`` for the rank's
   entries ``j`` (teacher: ``(h_j - pT_j H) / tau``), ``mu`` on the clipped
   entries for "entry_keep", 0 for capped "token" rows; times ``dz/dx``.

Per-token statistics (``return_stats``) ride on the same all-reduces: the
student entropy adds one value per row to phase 1's SUM (the slice's
``sum e^(b - max)(b - max)``, re-shifted like the sums; "token" also the slice's
V_r, for the count), and a per-entry clip adds three to phase 2's (the clipped
teacher mass, the clipped count, and whether the slice clipped the teacher's
global maximum, known after phase 1).

Collectives, with N tokens and H the hidden size:

- ``divergence``: forward 2 all-reduces (KL kinds without clip or with
  ``clip_mode="token"``) or 3 (jsd, or a per-entry clip), each of O(N) values;
  backward none (each rank's logit gradient is
  local; the backward runs phase 3 from the saved O(N) statistics).
- ``fused_linear_divergence``: the same 2 or 3 all-reduces per token chunk in
  the forward (O(chunk) values each, so O(N) in all); backward one all-reduce
  of the (N, H) float32 student-hidden gradient when it is wanted. That one is
  O(N x H): it is the gradient itself, which every rank must hold. With
  ``reduction="none"`` and a trainable weight or bias the backward recomputes
  the chunk logits from the saved per-token statistics: no further collective.

Nothing of size O(N x V) is communicated and the weight is never gathered.
``impl="torch"`` runs the local phases as torch operations on blocks of rows
(float64-capable); ``impl="triton"`` as the Triton row kernel of
:mod:`opsd_kernels.triton.vocab_parallel_rows` (one launch per phase, float32
arithmetic, every option). The chunk GEMMs are those of
:mod:`opsd_kernels.gemm` (float32 logits) for both. ``impl="fused"`` is not
supported (a clear error).
"""

from __future__ import annotations

import torch

from . import gemm
from ._validation import DivergenceOptions
from .chunked import ChunkGradients, chunk_logits
from .divergences import transform_grad, transform_logits, weighted_log_ratio
from .reductions import as_rows, forward_scale, reduce_rows
from .stats import CLIPPED_ENTRIES, STUDENT_ENTROPY, TEACHER_CLIPPED_MASS, TEACHER_TOP1_CLIPPED
from .torch_impl import rows_per_chunk

# columns of the per-row statistics tensor (R, NUM_ROW_STATS) the phases share; the Triton
# phase kernels read the first four (LSE_S, LSE_T, G_SUM, H_SUM)
LSE_S, LSE_T, G_SUM, H_SUM, KEEP_MEAN, DROPPED, MAX_T = range(7)
NUM_ROW_STATS = 7
# columns of the local term sums (phase 3); the Triton phases return the first three
PHI, G, H, KEPT_PS_G, KEPT_PS_SQ, KEPT_PS, CLIPPED_MASS, CLIPPED_COUNT, TOP1_CLIPPED = range(9)
NUM_TERM_SUMS = 9


def check_process_group(process_group, impl: str):
    """The group, validated: a ``torch.distributed.ProcessGroup`` and a supported impl."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("process_group needs torch.distributed, which this torch lacks")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "process_group must be None or a torch.distributed.ProcessGroup (e.g. "
            f"torch.distributed.group.WORLD or dist.new_group(...)), got "
            f"{type(process_group).__name__}"
        )
    if impl == "fused":
        raise ValueError(
            "impl='fused' does not support process_group (vocabulary parallelism); use "
            "impl='triton' or 'torch', or 'auto'"
        )
    return process_group


def _all_reduce(x: torch.Tensor, op, group) -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(x, op=op, group=group)
    return x


def _block(x, lo, hi, keep, compute, inv_t, scale=1.0, cap=None):
    """``(b, dz/dx)``: rows lo:hi of the raw logits ``x`` through the logit transform
    (``scale``, ``cap``: one role's, see ``DivergenceOptions``), then scaled by 1/tau,
    in ``compute``; masked rows read as 0."""
    x = x[lo:hi].to(compute)
    if keep is not None:
        x = torch.where(keep, x, torch.zeros((), dtype=compute, device=x.device))
    if cap is None:
        return x * (scale * inv_t) if scale != 1.0 else x * inv_t, scale
    z = transform_logits(x, scale, cap)
    return z * inv_t, transform_grad(z, scale, cap)


def _student_block(x, lo, hi, keep, compute, opts):
    return _block(x, lo, hi, keep, compute, 1.0 / opts.temperature, opts.logit_scale, opts.softcap)


def _teacher_block(x, lo, hi, keep, compute, opts):
    inv_t = 1.0 / opts.temperature
    return _block(x, lo, hi, keep, compute, inv_t, opts.teacher_logit_scale, opts.teacher_softcap)


def _row_blocks(R: int, V: int, mask):
    step = rows_per_chunk(V, R)
    for lo in range(0, R, step):
        hi = min(R, lo + step)
        yield lo, hi, None if mask is None else mask[lo:hi].unsqueeze(-1)


def _shift(m: torch.Tensor) -> torch.Tensor:
    """The finite shift of a running max: 0 while the max is -inf."""
    return torch.where(m == float("-inf"), torch.zeros_like(m), m)


def _one_pass(opts: DivergenceOptions) -> bool:
    """Whether the loss, G and H follow in closed form from phase 1 (KL kinds, without a
    clip or with the token clip, which caps the closed-form loss afterwards)."""
    return opts.spec.one_pass and (opts.clip is None or opts.clip_mode == "token")


def local_stats_torch(
    student, teacher, opts: DivergenceOptions, mask, entropy: bool = False
) -> torch.Tensor:
    """(R, 6): the slice's ``max_S, sumexp_S, max_T, sumexp_T, w, u`` per row, one read.

    Sum-exps are relative to their side's max (shift 0 while it is -inf); ``w``
    (:func:`_one_pass` kinds only, else 0) is ``sum e^(a - max_T)(a - b)``
    (forward) or ``sum e^(b - max_S)(b - a)`` (reverse); ``u`` (only with ``entropy``,
    else 0) is ``sum e^(b - max_S)(b - max_S)``, the slice's part of the student
    entropy. ``b``, ``a``: the transformed logits over tau. Masked rows read as zeros.
    """
    R, V = student.shape
    compute = gemm.compute_dtype(student.dtype, teacher.dtype)
    one_pass = _one_pass(opts)
    out = torch.zeros(R, 6, dtype=compute, device=student.device)
    for lo, hi, keep in _row_blocks(R, V, mask):
        b, _ = _student_block(student, lo, hi, keep, compute, opts)
        a, _ = _teacher_block(teacher, lo, hi, keep, compute, opts)
        m_s, m_t = b.amax(-1), a.amax(-1)
        b_rel = b - _shift(m_s)[:, None]
        es = torch.exp(b_rel)
        et = torch.exp(a - _shift(m_t)[:, None])
        out[lo:hi, 0], out[lo:hi, 1] = m_s, es.sum(-1)
        out[lo:hi, 2], out[lo:hi, 3] = m_t, et.sum(-1)
        if one_pass:
            w = (
                weighted_log_ratio(et, a, b)
                if opts.spec.name == "forward_kl"
                else weighted_log_ratio(es, b, a)
            )
            out[lo:hi, 4] = w.sum(-1)
        if entropy:
            out[lo:hi, 5] = torch.where(es == 0, torch.zeros_like(es), es * b_rel).sum(-1)
    return out


def _terms(student, teacher, lo, hi, keep, stats, opts, compute):
    """``phi, g, h, pS, pT, clipped, dz_s, dz_t`` of rows lo:hi of the local slices:
    the terms clipped per entry ("entry"/"entry_keep"; ``clipped`` None otherwise),
    and each role's transform derivative."""
    b, dz_s = _student_block(student, lo, hi, keep, compute, opts)
    a, dz_t = _teacher_block(teacher, lo, hi, keep, compute, opts)
    lS = b - stats[lo:hi, LSE_S, None]
    lT = a - stats[lo:hi, LSE_T, None]
    pS, pT = lS.exp(), lT.exp()
    phi, g, h = opts.spec.terms(lT, lS, pT, pS, opts.beta)
    clipped = None
    if opts.clip is not None and opts.clip_mode != "token":
        clipped = ~(phi < opts.clip)
        phi = torch.clamp(phi, max=opts.clip)
        zero = torch.zeros((), dtype=compute, device=phi.device)
        g = torch.where(clipped, zero, g)
        h = torch.where(clipped, zero, h)
    return phi, g, h, pS, pT, clipped, dz_s, dz_t, a


def local_term_sums_torch(student, teacher, opts: DivergenceOptions, mask, stats):
    """(R, NUM_TERM_SUMS): the slice's sums, given the full-row LSEs (and MAX_T), of the
    (clipped) ``phi, g, h``; with a per-entry clip also ``sum_U pS g, sum_U pS^2,
    sum_U pS`` over the unclipped entries U ("entry_keep"'s mean) and the clipped
    entries' teacher mass, count and whether one holds the teacher's maximum."""
    R, V = student.shape
    out = torch.zeros(R, NUM_TERM_SUMS, dtype=stats.dtype, device=student.device)
    for lo, hi, keep in _row_blocks(R, V, mask):
        phi, g, h, pS, pT, clipped, _, _, a = _terms(
            student, teacher, lo, hi, keep, stats, opts, stats.dtype
        )
        block = out[lo:hi]
        block[:, PHI], block[:, G], block[:, H] = phi.sum(-1), g.sum(-1), h.sum(-1)
        if clipped is not None:
            p_kept = torch.where(clipped, torch.zeros_like(pS), pS)
            block[:, KEPT_PS_G] = (p_kept * g).sum(-1)
            block[:, KEPT_PS_SQ] = (p_kept * pS).sum(-1)
            block[:, KEPT_PS] = p_kept.sum(-1)
            block[:, CLIPPED_MASS] = torch.where(clipped, pT, torch.zeros_like(pT)).sum(-1)
            block[:, CLIPPED_COUNT] = clipped.sum(-1)
            top1 = a == stats[lo:hi, MAX_T, None]
            block[:, TOP1_CLIPPED] = (clipped & top1).any(-1)
    return out


def local_gradients_torch(
    student, teacher, opts: DivergenceOptions, mask, stats, scale, grad_student, grad_teacher
) -> None:
    """The last phase: the slice's dL/ds (and dL/dt) with respect to the raw logits, times
    the row factors ``scale`` ((1,) or (R,)). "token": rows with DROPPED get 0;
    "entry_keep": clipped student entries get KEEP_MEAN. The outputs may alias the inputs
    (each block is read before it is written)."""
    R, V = student.shape
    compute = stats.dtype
    inv_t = 1.0 / opts.temperature
    for lo, hi, keep in _row_blocks(R, V, mask):
        _, g, h, pS, pT, clipped, dz_s, dz_t, _ = _terms(
            student, teacher, lo, hi, keep, stats, opts, compute
        )
        row = (scale if scale.numel() == 1 else scale[lo:hi]).to(compute).reshape(-1, 1)
        if opts.clip is not None and opts.clip_mode == "token":
            row = row * (1.0 - stats[lo:hi, DROPPED, None])
        for out, terms, p, col, dz in (
            (grad_student, g, pS, G_SUM, dz_s),
            (grad_teacher, h, pT, H_SUM, dz_t),
        ):
            if out is None:
                continue
            grad = (terms - p * stats[lo:hi, col, None]) * (row * inv_t)
            if col == G_SUM and clipped is not None and opts.clip_mode == "entry_keep":
                grad = torch.where(clipped, stats[lo:hi, KEEP_MEAN, None] * row, grad)
            grad = grad * dz
            if keep is not None:
                grad = torch.where(keep, grad, torch.zeros((), dtype=compute, device=grad.device))
            out[lo:hi].copy_(grad)


def _local_functions(impl: str):
    if impl == "triton":
        from .triton.vocab_parallel_rows import (
            local_gradients_triton,
            local_stats_triton,
            local_term_sums_triton,
        )

        return local_stats_triton, local_term_sums_triton, local_gradients_triton
    return local_stats_torch, local_term_sums_torch, local_gradients_torch


def _phase_stats(stats: torch.Tensor, impl: str) -> torch.Tensor:
    """The row statistics as a phase function reads them (the Triton kernels: float32,
    contiguous)."""
    if impl != "triton":
        return stats
    return stats.float().contiguous()


def row_statistics(
    student: torch.Tensor,
    teacher: torch.Tensor,
    opts: DivergenceOptions,
    mask: torch.Tensor | None,
    group,
    want_h: bool,
    impl: str = "torch",
    token_stats: torch.Tensor | None = None,
):
    """The phases up to the loss on a rank's (R, V_r) logit slices, identical on every rank.

    Returns ``(loss (R,), stats (R, NUM_ROW_STATS))`` in the compute dtype, with
    ``stats`` columns ``LSE_S, LSE_T, G_SUM, H_SUM`` (``H_SUM`` only meaningful when
    ``want_h``), ``KEEP_MEAN`` ("entry_keep": the clipped student entries' gradient per
    unit row factor), ``DROPPED`` ("token": 1 for a clipped token) and ``MAX_T``.
    Masked rows get loss 0 and finite statistics. ``token_stats``: None, or an
    (R, NUM_STATS) float32 buffer filled with the per-token statistics
    (:mod:`opsd_kernels.stats`; they ride on the same collectives). Issues 2 all-reduces
    (:func:`_one_pass`) or 3 (otherwise) on ``group``, none when R == 0.
    """
    import torch.distributed as dist

    R = student.shape[0]
    compute = gemm.compute_dtype(student.dtype, teacher.dtype)
    spec, clip = opts.spec, opts.clip
    mode = None if clip is None else opts.clip_mode
    one_pass = _one_pass(opts)
    want_stats = token_stats is not None
    stats = torch.zeros(R, NUM_ROW_STATS, dtype=compute, device=student.device)
    if R == 0:
        return torch.zeros(R, dtype=compute, device=student.device), stats
    local_stats, local_term_sums, _ = _local_functions(impl)

    # phases 1-2: one local sweep, then all-reduce MAX of the maxima ...
    extra = {"entropy": True} if want_stats else {}
    loc = local_stats(student, teacher, opts, mask, **extra).to(compute)
    m = _all_reduce(torch.stack([loc[:, 0], loc[:, 2]]), dist.ReduceOp.MAX, group)
    big = _shift(m)
    # ... and all-reduce SUM of the sums re-shifted to the global maxima
    rs = torch.exp(_shift(loc[:, 0]) - big[0])
    rt = torch.exp(_shift(loc[:, 2]) - big[1])
    parts = [loc[:, 1] * rs, loc[:, 3] * rt]
    if one_pass:
        w = loc[:, 4]
        r = rt if spec.name == "forward_kl" else rs
        # an infinite KL stays infinite when its factor underflows (never inf * 0 = NaN)
        parts.append(torch.where(w == float("inf"), w, w * r))
    if want_stats:
        # sum_v e^(b - M)(b - M) = sum_r e^(m_r - M) (u_r + (m_r - M) z_r)
        ent_col = len(parts)
        parts.append(rs * (loc[:, 5] + (_shift(loc[:, 0]) - big[0]) * loc[:, 1]))
        if mode == "token":
            parts.append(torch.full_like(rs, float(student.shape[1])))  # V_r -> V
    z = _all_reduce(torch.stack(parts), dist.ReduceOp.SUM, group)
    lse_s, lse_t = big[0] + torch.log(z[0]), big[1] + torch.log(z[1])
    if mask is not None:
        # masked rows: finite statistics, so no inf - inf reaches a later phase
        lse_s = torch.where(mask, lse_s, torch.zeros_like(lse_s))
        lse_t = torch.where(mask, lse_t, torch.zeros_like(lse_t))
    stats[:, LSE_S], stats[:, LSE_T], stats[:, MAX_T] = lse_s, lse_t, m[1]

    sums = None
    if one_pass:
        if spec.name == "forward_kl":
            loss = z[2] / z[1] - lse_t + lse_s
            stats[:, G_SUM] = -1.0
            stats[:, H_SUM] = loss + 1.0
        else:
            loss = z[2] / z[0] - lse_s + lse_t
            stats[:, G_SUM] = loss + 1.0
            stats[:, H_SUM] = -1.0
    else:
        # phase 3: the clipped terms' sums (and what the clip mode and statistics need)
        cols = [PHI, G] + ([H] if want_h else [])
        if mode == "entry_keep":
            cols += [KEPT_PS_G, KEPT_PS_SQ, KEPT_PS]
        if want_stats and mode in ("entry", "entry_keep"):
            cols += [CLIPPED_MASS, CLIPPED_COUNT, TOP1_CLIPPED]
        local = local_term_sums(student, teacher, opts, mask, _phase_stats(stats, impl))
        reduced = _all_reduce(local[:, cols].t().to(compute).contiguous(), dist.ReduceOp.SUM, group)
        sums = dict(zip(cols, reduced, strict=True))
        loss = sums[PHI]
        stats[:, G_SUM] = sums[G]
        if want_h:
            stats[:, H_SUM] = sums[H]
        if mode == "entry_keep":
            # mu = sum_U pS grad_u / sum_U pS, grad_u = (g_u - pS_u G) / tau
            kept = sums[KEPT_PS]
            mean = (sums[KEPT_PS_G] - sums[G] * sums[KEPT_PS_SQ]) / (opts.temperature * kept)
            stats[:, KEEP_MEAN] = torch.where(kept == 0, torch.zeros_like(mean), mean)
    dropped = None
    if mode == "token":
        dropped = ~(loss < clip)
        stats[:, DROPPED] = dropped.to(compute)
        loss = torch.clamp(loss, max=clip)  # a NaN sum stays NaN
    if mask is not None:
        loss = torch.where(mask, loss, torch.zeros_like(loss))
    if want_stats:
        _fill_token_stats(token_stats, z, ent_col, sums, mode, dropped, mask)
    return loss.contiguous(), stats


def _fill_token_stats(token_stats, z, ent_col, sums, mode, dropped, mask) -> None:
    """The public per-token statistics from the all-reduced values."""
    out = torch.zeros(token_stats.shape, dtype=z.dtype, device=z.device)
    out[:, STUDENT_ENTROPY] = torch.log(z[0]) - z[ent_col] / z[0]
    if mode == "token":
        flag = dropped.to(z.dtype)
        out[:, TEACHER_CLIPPED_MASS] = flag
        out[:, CLIPPED_ENTRIES] = flag * z[ent_col + 1]
        out[:, TEACHER_TOP1_CLIPPED] = flag
    elif mode is not None:
        out[:, TEACHER_CLIPPED_MASS] = sums[CLIPPED_MASS]
        out[:, CLIPPED_ENTRIES] = sums[CLIPPED_COUNT]
        out[:, TEACHER_TOP1_CLIPPED] = (sums[TOP1_CLIPPED] > 0).to(z.dtype)
    if mask is not None:
        out = torch.where(mask.unsqueeze(-1), out, torch.zeros_like(out))
    token_stats.copy_(out)


def write_gradients(
    student,
    teacher,
    stats,
    opts: DivergenceOptions,
    mask,
    scale,
    grad_student,
    grad_teacher,
    impl: str = "torch",
) -> None:
    """The last phase, local: each rank's slice of dL/ds (and dL/dt) times the row
    factors ``scale`` ((1,) or (R,)). The outputs may alias the inputs."""
    if student.shape[0] == 0:
        return
    _, _, local_gradients = _local_functions(impl)
    local_gradients(
        student,
        teacher,
        opts,
        mask,
        _phase_stats(stats, impl),
        scale.contiguous(),
        grad_student,
        grad_teacher,
    )


class VocabParallelDivergenceFunction(torch.autograd.Function):
    """Divergence of vocabulary-sharded logits; gradients are each rank's slices.

    The forward keeps only O(N) statistics (besides references to the inputs);
    the backward forms the logit gradients locally, with the upstream factor
    applied first (safe for float16 and GradScaler), and communicates nothing.
    """

    @staticmethod
    def forward(
        ctx, student, teacher, mask, opts: DivergenceOptions, group, impl: str, token_stats=None
    ):
        lead = student.shape[:-1]
        s2, t2 = as_rows(student), as_rows(teacher)
        mask1 = None if mask is None else mask.reshape(-1).contiguous()
        want_s, want_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        compute = gemm.compute_dtype(student.dtype, teacher.dtype)
        scale = forward_scale(opts.reduction, mask1, s2.shape[0], student.device, compute)
        with torch.autocast(student.device.type, enabled=False):
            loss, stats = row_statistics(s2, t2, opts, mask1, group, want_t, impl, token_stats)
        ctx.impl = impl
        ctx.wants = (want_s, want_t)
        ctx.shapes = (student.shape, teacher.shape)
        ctx.opts = opts
        ctx.mask = mask1
        if want_s or want_t:
            ctx.save_for_backward(s2, t2, stats, scale)
        return reduce_rows(loss, opts.reduction, scale, lead)

    @staticmethod
    def backward(ctx, grad_out):
        s2, t2, stats, fwd_scale = ctx.saved_tensors
        want_s, want_t = ctx.wants
        scale = (fwd_scale * grad_out.reshape(-1).to(fwd_scale.dtype)).contiguous()
        grad_s = torch.empty(s2.shape, dtype=s2.dtype, device=s2.device) if want_s else None
        grad_t = torch.empty(t2.shape, dtype=t2.dtype, device=t2.device) if want_t else None
        with torch.autocast(s2.device.type, enabled=False):
            write_gradients(s2, t2, stats, ctx.opts, ctx.mask, scale, grad_s, grad_t, ctx.impl)
        outs = [
            None if g is None else g.view(shape)
            for g, shape in zip((grad_s, grad_t), ctx.shapes, strict=True)
        ]
        return outs[0], outs[1], None, None, None, None, None


class VocabParallelSweep:
    """The sweep of :class:`opsd_kernels.autograd.FusedLinearDivergenceFunction` over this
    rank's vocabulary slice (the protocol of :class:`opsd_kernels.autograd.ChunkedSweep`).

    Without ``stats`` (the forward) each chunk's statistics are all-reduced (2 or 3
    collectives per chunk) and returned; with ``stats`` (a deferred backward) they are
    reused and nothing is communicated. The hidden gradient of a sweep is this rank's
    partial sum; :meth:`reduce_hidden` all-reduces it (the one O(N x H) collective).
    """

    def __init__(self, group, chunk: int, impl: str):
        self.group, self.chunk, self.impl = group, chunk, impl

    def __call__(
        self,
        hs,
        ht,
        weight,
        teacher_weight,
        bias,
        teacher_bias,
        mask,
        opts,
        scale,
        want_h,
        want_w,
        want_b,
        weight_grad_dtype,
        stats=None,
        token_stats=None,
    ):
        N = hs.shape[0]
        cdt = gemm.compute_dtype(
            hs.dtype,
            ht.dtype,
            weight.dtype,
            (weight if teacher_weight is None else teacher_weight).dtype,
        )
        forward = stats is None
        loss = torch.zeros(N, dtype=cdt, device=hs.device)
        if forward:
            stats = torch.zeros(N, NUM_ROW_STATS, dtype=cdt, device=hs.device)
        grads = ChunkGradients(
            hs, weight, cdt, weight_grad_dtype, want_h, want_w, want_b, zero_hidden=True
        )
        for lo in range(0, N, self.chunk):
            hi = min(N, lo + self.chunk)
            mask_c = None if mask is None else mask[lo:hi]
            hs_c, s_l, t_l = chunk_logits(
                hs[lo:hi], ht[lo:hi], weight, teacher_weight, bias, teacher_bias, mask_c
            )
            if forward:
                loss[lo:hi], stats[lo:hi] = row_statistics(
                    s_l,
                    t_l,
                    opts,
                    mask_c,
                    self.group,
                    False,
                    self.impl,
                    None if token_stats is None else token_stats[lo:hi],
                )
            if not grads.any:
                continue
            write_gradients(
                s_l,
                t_l,
                stats[lo:hi],
                opts,
                mask_c,
                scale if scale.numel() == 1 else scale[lo:hi],
                s_l,
                None,
                self.impl,
            )
            del t_l
            # s_l now holds this rank's slice of dL/d(student logits), row factors applied
            grads.add(lo, hi, s_l, hs_c, weight)
            del s_l
        grad_h, grad_w, grad_b = grads.as_tuple()
        return loss, stats, grad_h, grad_w, grad_b

    def reduce_hidden(self, grad_h: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        # each rank holds dS_r @ W_r: the gradient is the sum over the group
        dist.all_reduce(grad_h, op=dist.ReduceOp.SUM, group=self.group)
        return grad_h


def divergence_vocab_parallel(
    student_logits,
    teacher_logits,
    mask,
    opts: DivergenceOptions,
    process_group,
    impl: str = "torch",
    token_stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`opsd_kernels.divergence` on vocabulary slices (validated inputs).

    ``student_logits``/``teacher_logits``: (..., V_r), this rank's slice.
    Returns the full loss on every rank.

    A one-process group (under torchrun: the tensor-parallel group, each rank
    passing its slice ``[..., lo:hi]``):

    >>> import torch, torch.distributed as dist
    >>> from opsd_kernels import divergence
    >>> made_here = not dist.is_initialized()
    >>> if made_here:
    ...     dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> group = dist.new_group([0])
    >>> s, t = torch.randn(3, 10, requires_grad=True), torch.randn(3, 10)
    >>> loss = divergence(s, t, kind="jsd", process_group=group)
    >>> torch.allclose(loss, divergence(s, t, kind="jsd"))
    True
    >>> dist.destroy_process_group(group)
    >>> if made_here:
    ...     dist.destroy_process_group()
    """
    return VocabParallelDivergenceFunction.apply(
        student_logits, teacher_logits, mask, opts, process_group, impl, token_stats
    )
