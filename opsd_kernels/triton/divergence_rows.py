"""Triton kernel: per-row divergence between two logit rows, with its gradient.

One program per row; the row is swept in BLOCK_V blocks. Derivation (see
opsd_kernels/divergences.py): with b = s/tau, a = t/tau,

    L      = sum_v c(phi_v)
    dL/ds  = (g - pS * G) / tau,   G = sum_v g_v   (clipped entries: g_v = 0)
    dL/dt  = (h - pT * H) / tau,   H = sum_v h_v

Passes over the row (each pass reads both rows once):
- forward/reverse KL without clip (ONE_PASS): pass 1 keeps online max and
  sum-exp of both rows plus one weighted sum, e.g. for forward KL
  w = sum e^(a - m_T) (a - b), so L = w / z_T - LSE_T + LSE_S; then G and H are
  closed forms (forward: G = -1, H = L + 1; reverse: G = L + 1, H = -1).
- jsd or clip: pass 1 gives the two log-sum-exps, pass 2 forms phi, L, G, H.
- last pass (only if a gradient is wanted) writes the gradients, multiplied
  by the row's upstream scale. The gradient may be written over the input
  logits in place (grad_s_ptr == s_ptr): each element is read before it is
  written, by the same program.

The options of :class:`~opsd_kernels._validation.DivergenceOptions` are constexpr
specialisations, so a launch without them compiles to the plain kernel:

- the per-role logit transform (``S_SOFTCAP``/``T_SOFTCAP``, ``s_scale``...): every
  pass reads the RAW logits and forms ``b = transform_logit(x) / tau``; the gradient
  is multiplied by ``transform_grad(z)`` (the chain rule to the raw logits, float32);
- ``CLIP_MODE`` "token": the passes run without the per-entry clip (the one-pass
  kinds still need one pass), then ``L = min(L, clip)`` and a clipped row
  (``not L < clip``) gets a zero gradient;
- ``CLIP_MODE`` "entry_keep": the clip pass also sums pS, pS g and pS^2 over the
  unclipped entries, and the gradient pass writes their mean ``mu`` (formulas.keep_mean)
  on the clipped entries of the student side;
- ``HAS_STATS``: the per-token statistics into an (R, 4) float32 buffer
  (:mod:`opsd_kernels.stats`): the student entropy from one more running sum in pass 1,
  the clipped teacher mass, count and top-1 flag from the clip pass (no extra pass).

A masked row (HAS_MASK, mask 0) skips the statistic passes, stores loss 0 (and
statistics 0) and a zero gradient, and never lets its contents (NaN padding
included) reach an output.
"""

import torch
import triton
import triton.language as tl

from .._validation import DivergenceOptions
from ..stats import NUM_STATS
from .configs import CLIP_MODE_IDS, option_args, transform_args
from .formulas import (
    CLIP_ENTRY_KEEP,
    CLIP_TOKEN,
    keep_mean,
    one_pass_finish,
    row_online_stats,
    row_term_sums,
    write_row_gradients,
)


@triton.jit
def store_row_stats(
    stats_ptr,
    stats_stride,
    valid,
    z_s,
    u,
    token_kept,
    mass,
    count,
    top_clipped,
    top,
    V,
    CLIP_TOKEN_MODE: tl.constexpr,
    CLIP_ENTRY: tl.constexpr,
):
    """The row's 4 statistics (stats.STATS_COLUMNS), 0 for a masked row."""
    entropy = tl.log(z_s) - u / z_s
    if CLIP_TOKEN_MODE:  # a clipped token counts every entry as clipped
        flag = tl.where(token_kept, 0.0, 1.0)
        mass = flag
        count = flag * V
        top1 = flag
    elif CLIP_ENTRY:
        top1 = tl.where((top_clipped == top) & (top_clipped > float("-inf")), 1.0, 0.0)
    else:
        mass = 0.0
        count = 0.0
        top1 = 0.0
    tl.store(stats_ptr, tl.where(valid, entropy, 0.0))
    tl.store(stats_ptr + stats_stride, tl.where(valid, mass, 0.0))
    tl.store(stats_ptr + 2 * stats_stride, tl.where(valid, count, 0.0))
    tl.store(stats_ptr + 3 * stats_stride, tl.where(valid, top1, 0.0))


@triton.heuristics(
    {
        "HAS_MASK": lambda a: a["mask_ptr"] is not None,
        "GRAD_S": lambda a: a["grad_s_ptr"] is not None,
        "GRAD_T": lambda a: a["grad_t_ptr"] is not None,
        "ROW_SCALES": lambda a: a["scale_stride"] != 0,
        "HAS_STATS": lambda a: a["stats_ptr"] is not None,
    }
)
@triton.jit
def _divergence_rows_kernel(
    s_ptr,
    t_ptr,
    grad_s_ptr,
    grad_t_ptr,
    loss_ptr,
    mask_ptr,
    scale_ptr,
    stats_ptr,
    s_stride,
    t_stride,
    grad_s_stride,
    grad_t_stride,
    scale_stride,
    stats_row_stride,
    stats_col_stride,
    V,
    inv_temp,
    beta,
    log_beta,
    log_1m_beta,
    clip,
    s_scale,
    s_cap,
    t_scale,
    t_cap,
    KIND: tl.constexpr,
    ONE_PASS: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    CLIP_MODE: tl.constexpr,
    S_SOFTCAP: tl.constexpr,
    T_SOFTCAP: tl.constexpr,
    HAS_MASK: tl.constexpr,
    GRAD_S: tl.constexpr,
    GRAD_T: tl.constexpr,
    ROW_SCALES: tl.constexpr,
    HAS_STATS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    if HAS_MASK:
        valid = tl.load(mask_ptr + row) != 0
    else:
        valid = True
    # masked rows run no statistics pass at all
    v_stat = tl.where(valid, V, 0)
    TOKEN: tl.constexpr = HAS_CLIP and CLIP_MODE == CLIP_TOKEN
    # a per-entry clip ("entry", "entry_keep"), and "entry_keep"'s mean on clipped entries
    CLIP_ENTRY: tl.constexpr = HAS_CLIP and CLIP_MODE != CLIP_TOKEN
    KEEP: tl.constexpr = CLIP_ENTRY and CLIP_MODE == CLIP_ENTRY_KEEP
    # the loss follows from one sweep only for a one-pass kind without a per-entry clip
    SWEEP: tl.constexpr = ONE_PASS and not CLIP_ENTRY

    # ---- pass 1: online log-sum-exp of both rows (+ the KL weighted sum, the entropy) ----
    m_s, z_s, m_t, z_t, w, u = row_online_stats(
        s_row,
        t_row,
        V,
        v_stat,
        inv_temp,
        s_scale,
        s_cap,
        t_scale,
        t_cap,
        KIND,
        SWEEP,
        HAS_STATS,
        S_SOFTCAP,
        T_SOFTCAP,
        BLOCK_V,
    )
    lse_s = tl.where(m_s == float("-inf"), 0.0, m_s) + tl.log(z_s)
    lse_t = tl.where(m_t == float("-inf"), 0.0, m_t) + tl.log(z_t)

    keep_p = 0.0
    keep_pg = 0.0
    keep_p2 = 0.0
    mass = 0.0
    count = 0.0
    top_clipped = float("-inf")
    top = float("-inf")
    if SWEEP:
        loss, G, H = one_pass_finish(w, z_s, z_t, lse_s, lse_t, KIND)
    else:
        # ---- pass 2: pointwise terms, clip, and their sums ----
        loss, G, H, keep_p, keep_pg, keep_p2, mass, count, top_clipped, top = row_term_sums(
            s_row,
            t_row,
            V,
            v_stat,
            lse_s,
            lse_t,
            inv_temp,
            s_scale,
            s_cap,
            t_scale,
            t_cap,
            beta,
            log_beta,
            log_1m_beta,
            clip,
            KIND,
            CLIP_ENTRY,
            KEEP,
            HAS_STATS,
            S_SOFTCAP,
            T_SOFTCAP,
            BLOCK_V,
        )
    # "token": min(L, clip) (a NaN L stays NaN); a clipped row passes no gradient
    token_kept = loss < clip
    if TOKEN:
        loss = tl.where(loss > clip, clip, loss)
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    if HAS_STATS:
        store_row_stats(
            stats_ptr + row * stats_row_stride,
            stats_col_stride,
            valid,
            z_s,
            u,
            token_kept,
            mass,
            count,
            top_clipped,
            top,
            V,
            TOKEN,
            CLIP_ENTRY,
        )

    # ---- last pass: gradients (unit upstream times the row's scale) ----
    if GRAD_S or GRAD_T:
        if ROW_SCALES:
            scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32) * inv_temp
        else:
            scale = tl.load(scale_ptr).to(tl.float32) * inv_temp
        if TOKEN:
            grad_valid = valid & token_kept
        else:
            grad_valid = valid
        write_row_gradients(
            s_row,
            t_row,
            grad_s_ptr,
            row * grad_s_stride,
            grad_t_ptr,
            row * grad_t_stride,
            V,
            lse_s,
            lse_t,
            G,
            H,
            keep_mean(keep_p, keep_pg, keep_p2, G),
            scale,
            grad_valid,
            inv_temp,
            s_scale,
            s_cap,
            t_scale,
            t_cap,
            beta,
            log_beta,
            log_1m_beta,
            clip,
            KIND,
            CLIP_ENTRY,
            KEEP,
            S_SOFTCAP,
            T_SOFTCAP,
            GRAD_S,
            GRAD_T,
            BLOCK_V,
        )


def clip_mode_id(opts: DivergenceOptions) -> int:
    """The ``CLIP_MODE`` constexpr of ``opts`` ("entry"'s id without a clip, so that a
    launch without clip compiles one specialisation whatever ``clip_mode`` says)."""
    return CLIP_MODE_IDS["entry" if opts.clip is None else opts.clip_mode]


def default_block_v(V: int, device: torch.device, heavy: bool = False) -> int:
    """Vocabulary block: big enough to stream, small enough for registers (``heavy``: see
    :func:`launch_config`)."""
    cap = (2048 if heavy else 4096) if device.type == "cuda" else 1024
    return max(16, min(cap, triton.next_power_of_2(V)))


def launch_config(V: int, device: torch.device, opts: DivergenceOptions, heavy: bool) -> dict:
    """Launch keywords ``BLOCK_V``, ``num_warps`` (and ``maxnreg``) of a row launch.

    ``heavy``: the launch carries more live values per entry (a logit transform, the
    statistics, a clip mode other than "entry"; :func:`carries_options`). On CUDA such
    specialisations get 2048-wide blocks, 8 warps and ``maxnreg=128``: left to itself,
    ptxas (sm_90) caps a 256-thread kernel at 64 registers for occupancy and spills
    instead (Triton 3.6 and 3.9 alike; 4 warps or narrower blocks only move the spill to
    another specialisation); with room for 128 it spills in none, at 2 CTAs (16 warps)
    per SM, plenty for a streaming kernel. ``tests/test_triton_compile.py`` checks every
    launch the options produce. ``opts`` is unused today (the rule is the same for every
    kind) but is the place to specialise it."""
    block = default_block_v(V, device, heavy)
    config = dict(BLOCK_V=block, num_warps=8 if block >= 2048 else 4)
    if heavy and device.type == "cuda":
        config["maxnreg"] = 128
    return config


def carries_options(opts: DivergenceOptions, stats: torch.Tensor | None) -> bool:
    """Whether a row launch compiles any of the round's options (see
    :func:`launch_config`): a logit transform, statistics, or a clip mode other than
    "entry"."""
    clip_mode = "entry" if opts.clip is None else opts.clip_mode
    return opts.transforms_logits or stats is not None or clip_mode != "entry"


def check_rows_contiguous(**rows: torch.Tensor | None) -> None:
    """Every given (R, V) tensor must be contiguous in its last dimension (row kernels)."""
    for name, x in rows.items():
        if x is not None and x.stride(-1) != 1:
            raise ValueError(f"{name} rows must be contiguous (stride(-1) == 1)")


def divergence_rows_triton(
    student: torch.Tensor,
    teacher: torch.Tensor,
    opts: DivergenceOptions,
    *,
    mask: torch.Tensor | None,
    scale: torch.Tensor,
    grad_student: torch.Tensor | None,
    grad_teacher: torch.Tensor | None,
    stats: torch.Tensor | None = None,
    block_v: int | None = None,
) -> torch.Tensor:
    """Launch the row kernel on (R, V) RAW logits; returns float32 row losses (R,).

    ``opts``: the validated options (:class:`~opsd_kernels._validation.DivergenceOptions`:
    kind, temperature, clip and ``clip_mode``, each role's logit transform).
    ``scale``: float32 tensor of shape (R,) or (1,) (broadcast): each row's
    gradient is multiplied by it. ``grad_student``/``grad_teacher``: (R, V)
    outputs (may be the inputs themselves, for in-place use) or None; gradients with
    respect to the raw logits. ``stats``: None, or a float32 (R, NUM_STATS) buffer
    (:func:`opsd_kernels.stats.new_stats_buffer`) that gets the per-row statistics
    (masked rows 0). Rows must be contiguous in the last dimension.

    >>> from opsd_kernels._validation import check_options
    >>> from opsd_kernels.stats import new_stats_buffer
    >>> s, t = torch.randn(3, 50), torch.randn(3, 50)
    >>> opts = check_options("forward_kl", 0.5, 1.0, 0.05, "mean", clip_mode="token", softcap=3.0)
    >>> stats = new_stats_buffer(3, s.device)
    >>> grad = torch.empty_like(s)
    >>> loss = divergence_rows_triton(s, t, opts, mask=None, scale=torch.ones(1),
    ...                               grad_student=grad, grad_teacher=None, stats=stats)
    >>> loss.shape, stats.shape
    (torch.Size([3]), torch.Size([3, 4]))
    """
    R, V = student.shape
    loss = torch.empty(R, dtype=torch.float32, device=student.device)
    if R == 0:
        return loss
    check_rows_contiguous(
        student=student, teacher=teacher, grad_student=grad_student, grad_teacher=grad_teacher
    )
    if stats is not None and (stats.dtype != torch.float32 or tuple(stats.shape) != (R, NUM_STATS)):
        raise ValueError(
            f"stats must be a float32 ({R}, {NUM_STATS}) tensor, got "
            f"{stats.dtype} {tuple(stats.shape)}"
        )
    config = launch_config(V, student.device, opts, carries_options(opts, stats))
    if block_v is not None:
        config["BLOCK_V"] = block_v
    _divergence_rows_kernel[(R,)](
        s_ptr=student,
        t_ptr=teacher,
        grad_s_ptr=grad_student,
        grad_t_ptr=grad_teacher,
        loss_ptr=loss,
        mask_ptr=None if mask is None else mask.view(torch.uint8),
        scale_ptr=scale,
        stats_ptr=stats,
        s_stride=student.stride(0),
        t_stride=teacher.stride(0),
        grad_s_stride=0 if grad_student is None else grad_student.stride(0),
        grad_t_stride=0 if grad_teacher is None else grad_teacher.stride(0),
        scale_stride=scale.stride(0) if scale.numel() > 1 else 0,
        stats_row_stride=0 if stats is None else stats.stride(0),
        stats_col_stride=0 if stats is None else stats.stride(1),
        V=V,
        **option_args(opts),
        **transform_args(opts),
        CLIP_MODE=clip_mode_id(opts),
        **config,
    )
    return loss
