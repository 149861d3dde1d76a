"""What an ``impl="fused"`` launch needs besides tensors: block sizes and option arguments.

- :data:`TABLE`: the tile sizes, one row per (device type, hidden-size range, dtype
  group); :func:`config_for` picks the first matching row. The CUDA rows are
  starting points that compile for sm_90 within its limits
  (``tests/test_triton_compile.py`` compiles every row as a real launch does);
  they have not been tuned on a GPU yet.
- :func:`option_args`: the one place where :class:`~opsd_kernels._validation.DivergenceOptions`
  become kernel scalars and ``tl.constexpr`` flags; every fused launcher passes
  its result by keyword.
- :func:`resolve_skip_threshold`: the ``skip_threshold`` argument, float or
  ``"auto"``, as the probability threshold the skip rule uses (see
  :mod:`opsd_kernels.triton.fused_backward` for the bound it guarantees).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._env import triton_interpreting
from .._validation import DivergenceOptions

SIXTEEN_BIT = (torch.bfloat16, torch.float16)

#: vocabulary size up to which ``skip_threshold="auto"`` keeps its guarantee (Gemma's
#: 256k and every current LM vocabulary is below it)
AUTO_SKIP_MAX_VOCAB = 2**20


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, CPU)."""
    return triton_interpreting()


@dataclass(frozen=True)
class FusedConfig:
    """Tile sizes and launch options of the fused kernels.

    ``block_n`` tokens x ``block_v`` vocabulary entries per tile, ``block_k`` hidden
    units per ``tl.dot`` step. ``splits``: vocabulary splits of the forward per token
    block; None picks enough programs to fill the device twice over.
    ``dot_precision``: ``input_precision`` of ``tl.dot`` for float32 operands
    ("ieee" exact, "tf32" faster on GPU); ignored for 16-bit operands.
    ``scratch_bytes``: bound on the deterministic backward's gradient slab (its
    float32 dH accumulator takes at most half as much more, and so does a float32
    product buffer where the GEMMs cannot add in place; see
    :func:`opsd_kernels.triton.fused_backward.fused_backward`).
    ``terms_stages`` / ``backward_stages``: ``num_stages`` of the forward's terms pass /
    of the backward kernels, where they differ from ``num_stages`` (None: the same).
    ``group``: token blocks that run side by side over the vocabulary splits in the
    forward's grouped launch order: programs running at the same time then touch
    ``group`` token blocks' hidden states (32 x 64 tokens x H=2560 x 2 sides x 2
    bytes = 21 MB, within an H100's 50 MB L2) instead of every token block's, and
    share each W tile among ``group`` programs; the backward kernels use the same
    order over their tiles.
    """

    block_n: int = 64
    block_v: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    splits: int | None = None
    dot_precision: str = "ieee"
    scratch_bytes: int = 32 * 2**20
    group: int = 32
    terms_stages: int | None = None
    backward_stages: int | None = None


@dataclass(frozen=True)
class ConfigRow:
    """One row of :data:`TABLE`: ``config`` serves ``device`` inputs of a dtype in
    ``dtypes`` with hidden size ``h_min <= H <= h_max``."""

    device: str
    dtypes: tuple[torch.dtype, ...]
    h_min: int
    h_max: int
    config: FusedConfig


_CUDA_16 = FusedConfig()
_CUDA_16_WIDE = FusedConfig(
    block_k=32, group=16
)  # large H: a shorter K step keeps the stages small
# float32: 64-wide vocabulary tiles, 16-wide K steps, and stage counts per kernel. With
# "ieee" dots (FMA, no tensor cores) each thread holds its rows' and columns' slices of
# both dot operands for the whole K step, so register use sits near sm_90's 255 and
# ptxas's allocation swings with Triton's version and the pipelining depth. At block_k
# 32 the one-pass backward with "entry_keep" spilled 72-88 bytes (Triton 3.6 and 3.9)
# and 3.6's forward-KL clip terms pass 20. The stage counts below are the ones at which
# no specialisation that tests/test_triton_compile.py compiles spills under 3.6 or 3.9
# (2/1/4: stats/terms/backward; every other uniform count spilled somewhere). Chosen
# for that, not tuned for speed on a GPU.
_CUDA_32 = FusedConfig(block_v=64, block_k=16, num_stages=2, terms_stages=1, backward_stages=4)
_CPU = FusedConfig(
    block_n=16, block_v=32, block_k=16, num_warps=4, num_stages=1, splits=1, group=2
)  # interpreter: tl.dot needs every dimension >= 16

#: the block-size table; first matching row wins
TABLE: tuple[ConfigRow, ...] = (
    ConfigRow("cuda", SIXTEEN_BIT, 1, 4096, _CUDA_16),
    ConfigRow("cuda", SIXTEEN_BIT, 4097, 2**31, _CUDA_16_WIDE),
    ConfigRow("cuda", (torch.float32,), 1, 2**31, _CUDA_32),
    ConfigRow("cpu", SIXTEEN_BIT + (torch.float32,), 1, 2**31, _CPU),
)


def config_for(device: torch.device | str, hidden: int, dtype: torch.dtype) -> FusedConfig:
    """The :data:`TABLE` row for inputs on ``device`` with hidden size ``hidden`` and ``dtype``.

    Any non-CUDA device uses the interpreter's row.

    >>> config_for("cpu", 64, torch.float32).block_n
    16
    """
    dev = "cuda" if torch.device(device).type == "cuda" else "cpu"
    for row in TABLE:
        if row.device == dev and dtype in row.dtypes and row.h_min <= hidden <= row.h_max:
            return row.config
    raise ValueError(f"no fused-kernel config for {dev}, H={hidden}, {dtype}")


def option_args(opts: DivergenceOptions) -> dict:
    """Kernel scalars and constexpr flags of the options, as launch keywords.

    ``KIND`` (the Triton twin's id), ``HAS_CLIP``, ``ONE_PASS`` (the kind's loss
    follows from one online pass: forward/reverse KL), ``inv_temp``, ``beta``,
    ``log_beta``, ``log_1m_beta`` (a kind without beta gets 0.5, keeping the logs
    finite) and ``clip`` (0 without clip).

    >>> from opsd_kernels._validation import check_options
    >>> option_args(check_options("jsd", 0.25, 2.0, None, "mean"))["inv_temp"]
    0.5
    """
    beta = opts.beta if opts.spec.needs_beta else 0.5
    return dict(
        KIND=opts.spec.kind_id,
        HAS_CLIP=opts.clip is not None,
        ONE_PASS=opts.spec.one_pass,
        inv_temp=1.0 / opts.temperature,
        beta=beta,
        log_beta=math.log(beta),
        log_1m_beta=math.log1p(-beta),
        clip=0.0 if opts.clip is None else opts.clip,
    )


#: ``CLIP_MODE`` constexpr of each ``clip_mode`` (DivergenceOptions)
CLIP_MODE_IDS = {"entry": 0, "token": 1, "entry_keep": 2}


def transform_args(opts: DivergenceOptions) -> dict:
    """Launch keywords of the logit transform (``logit_scale``, ``softcap``; see
    :class:`~opsd_kernels._validation.DivergenceOptions`), per role.

    ``S_SOFTCAP`` / ``T_SOFTCAP`` (constexpr: whether the student's / teacher's logits are
    soft-capped), ``s_scale``, ``s_cap``, ``t_scale``, ``t_cap`` (a cap of 1.0 when unset,
    never read). Kernels that take these apply
    :func:`opsd_kernels.triton.formulas.transform_logit` to the raw logits and
    :func:`~opsd_kernels.triton.formulas.transform_grad` to the gradient.

    >>> from opsd_kernels._validation import check_options
    >>> transform_args(check_options("forward_kl", 0.5, 1.0, None, "mean", softcap=30.0))["T_SOFTCAP"]
    True
    """
    return dict(
        S_SOFTCAP=opts.softcap is not None,
        T_SOFTCAP=opts.teacher_softcap is not None,
        s_scale=opts.logit_scale,
        s_cap=1.0 if opts.softcap is None else opts.softcap,
        t_scale=opts.teacher_logit_scale,
        t_cap=1.0 if opts.teacher_softcap is None else opts.teacher_softcap,
    )


def block_args(cfg: FusedConfig, dtype: torch.dtype) -> dict:
    """Tile-size constexprs and launch options of ``cfg`` for operands of ``dtype``.

    ``UPCAST``: operands go to float32 before ``tl.dot`` (only in the interpreter,
    whose bf16 dot is wrong).
    """
    return dict(
        BLOCK_N=cfg.block_n,
        BLOCK_V=cfg.block_v,
        BLOCK_K=cfg.block_k,
        UPCAST=interpreting() and dtype == torch.bfloat16,
        DOT_PRECISION=cfg.dot_precision,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half an ulp of 1.0 in ``dtype``: 2^-8 bfloat16, 2^-11 float16, 2^-24 float32."""
    return torch.finfo(dtype).eps / 2


def resolve_skip_threshold(
    value, dtype: torch.dtype, vocab_size: int = AUTO_SKIP_MAX_VOCAB
) -> float:
    """The tile-skipping probability threshold for ``skip_threshold=value``.

    Args:
        value: a float in [0, 1] (returned as is; 0 is exact), or ``"auto"``.
        dtype: dtype of the gradients the backward writes (the student hidden states').
        vocab_size: V; ``"auto"``'s guarantee holds for every V up to this.

    ``"auto"`` is 0.0 (exact) for float32 and float64. For 16-bit gradients it is
    ``u / V`` with ``u`` the dtype's unit roundoff (half an ulp of 1.0): then for
    forward KL and JSD the logit-gradient entries the backward drops sum, per token
    row i, to less than ``u |r_i| / temperature`` -- half an ulp of the row's gradient
    scale ``|r_i| / temperature`` (``r_i``: the token's upstream factor). The proof
    is in :mod:`opsd_kernels.triton.fused_backward`.

    >>> resolve_skip_threshold("auto", torch.float32)
    0.0
    >>> resolve_skip_threshold("auto", torch.bfloat16) == 2.0**-8 / 2**20
    True
    >>> resolve_skip_threshold(1e-6, torch.bfloat16)
    1e-06
    """
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"skip_threshold must be a float in [0, 1] or 'auto', got {value!r}")
        if dtype not in SIXTEEN_BIT:
            return 0.0
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        return unit_roundoff(dtype) / vocab_size
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"skip_threshold must be a float in [0, 1] or 'auto', got {value!r}")
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise ValueError(f"skip_threshold must lie in [0, 1] or be 'auto', got {value!r}")
    return float(value)
