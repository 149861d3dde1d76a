"""Argument checks shared by the public functions: clear errors, no host syncs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._env import triton_interpreting
from .divergences import KINDS, KindSpec

REDUCTIONS = ("mean", "sum", "none")
#: ``clip_mode`` values (see :class:`DivergenceOptions`)
CLIP_MODES = ("entry", "token", "entry_keep")
#: default of ``teacher_logit_scale`` / ``teacher_softcap``: the student's values
SAME_AS_STUDENT = "same"
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class DivergenceOptions:
    """Validated options shared by every implementation (one object, passed down whole).

    Logit transform (before the temperature), per role::

        z = softcap * tanh(logit_scale * x / softcap)    (softcap set; Gemma 2: 30)
        z = logit_scale * x                              (softcap None)

    where ``x`` is the raw logit (``h W^T + b``, or the ``divergence`` input). Row
    functions read RAW logits, apply the transform, and write gradients with respect
    to the RAW logits (chain rule: ``dz/dx = logit_scale * (1 - (z / softcap)^2)``,
    formed in float32 from the float32 logits).

    ``clip_mode`` (only read when ``clip`` is set):

    - ``"entry"``: the method's v3 loss, ``sum_v min(phi_v, clip)``; clipped entries
      (``not phi_v < clip``) pass no gradient through their own term.
    - ``"token"``: ``min(sum_v phi_v, clip)`` per token; a clipped token (``not L < clip``)
      passes no gradient at all (both sides).
    - ``"entry_keep"``: the loss VALUE and teacher gradient of ``"entry"``; the student
      gradient equals ``"entry"``'s on unclipped entries U, and on every clipped entry
      it is replaced by ``mu = sum_U pS_u grad_u / sum_U pS_u`` (0 if ``sum_U pS = 0``),
      the student-probability-weighted mean of the unclipped gradient. Then, to first
      order, a descent step leaves every clipped entry's student probability unchanged
      (``d log pS_j = -eta (grad_j - sum_v pS_v grad_v) = 0``), instead of lowering the
      student's logit on the tokens the teacher wants most (which ``"entry"`` does:
      forward KL gives a clipped entry ``pS_j * M_U / T > 0``). With
      ``grad_u = (g_u - pS_u G) / T``: ``mu = (sum_U pS g - G sum_U pS^2) / (T sum_U pS)``.
      Measured on SmolLM2-135M-Instruct (README, the clip recipe), holding the clipped
      entries did not prevent the accuracy collapse of ``"entry"``: the teacher's top token
      is still not pulled up while the unclipped entries move toward its other choices.
    """

    spec: KindSpec
    beta: float
    temperature: float
    clip: float | None
    reduction: str
    clip_mode: str = "entry"
    logit_scale: float = 1.0
    softcap: float | None = None
    teacher_logit_scale: float = 1.0
    teacher_softcap: float | None = None

    @property
    def transforms_logits(self) -> bool:
        """Whether either role's logits are scaled or soft-capped (the row functions
        then apply :class:`DivergenceOptions`' transform and its chain rule)."""
        return (
            self.logit_scale != 1.0
            or self.softcap is not None
            or self.teacher_logit_scale != 1.0
            or self.teacher_softcap is not None
        )


def _check_positive(name: str, value, allow_none: bool) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        expected = "None or a float > 0" if allow_none else "a float > 0"
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        expected = "None or a finite number > 0" if allow_none else "a finite number > 0"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return float(value)


def check_options(
    kind,
    beta,
    temperature,
    clip,
    reduction,
    clip_mode="entry",
    logit_scale=1.0,
    softcap=None,
    teacher_logit_scale=SAME_AS_STUDENT,
    teacher_softcap=SAME_AS_STUDENT,
) -> DivergenceOptions:
    """Validate the options of every public loss; see :class:`DivergenceOptions`.

    ``teacher_logit_scale`` / ``teacher_softcap`` default to ``"same"``: the student's
    values (pass ``teacher_softcap=None`` for an uncapped teacher beside a capped student).
    """
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    spec = KINDS[kind]
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or math.isnan(beta):
        raise TypeError(f"beta must be a float, got {beta!r}")
    if spec.needs_beta and not 0.0 < beta < 1.0:
        raise ValueError(
            f"beta must lie strictly between 0 and 1 for kind='jsd', got {beta!r} "
            "(beta=0 is forward_kl and beta=1 is reverse_kl: pass those kinds instead)"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {temperature!r}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if clip is not None:
        if isinstance(clip, bool) or not isinstance(clip, (int, float)):
            raise TypeError(f"clip must be None or a float, got {clip!r}")
        if not clip > 0:
            raise ValueError(f"clip must be None or a number > 0, got {clip!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if clip_mode not in CLIP_MODES:
        raise ValueError(f"clip_mode must be one of {CLIP_MODES}, got {clip_mode!r}")
    logit_scale = _check_positive("logit_scale", logit_scale, allow_none=False)
    softcap = _check_positive("softcap", softcap, allow_none=True)
    if isinstance(teacher_logit_scale, str) and teacher_logit_scale == SAME_AS_STUDENT:
        teacher_logit_scale = logit_scale
    teacher_logit_scale = _check_positive(
        "teacher_logit_scale", teacher_logit_scale, allow_none=False
    )
    if isinstance(teacher_softcap, str) and teacher_softcap == SAME_AS_STUDENT:
        teacher_softcap = softcap
    teacher_softcap = _check_positive("teacher_softcap", teacher_softcap, allow_none=True)
    return DivergenceOptions(
        spec,
        float(beta),
        float(temperature),
        None if clip is None else float(clip),
        reduction,
        clip_mode,
        logit_scale,
        softcap,
        teacher_logit_scale,
        teacher_softcap,
    )


def check_float_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float32, bfloat16, float16 or float64), "
            f"got dtype {x.dtype}"
        )


def check_mask(mask, leading_shape: torch.Size, device: torch.device) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be None or a bool torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool, got {mask.dtype}")
    if mask.shape != leading_shape:
        raise ValueError(
            f"mask must have the logits' leading shape {tuple(leading_shape)}, "
            f"got {tuple(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but the inputs are on {device}")


def check_impl(
    impl: str, allowed: tuple[str, ...], device: torch.device, dtype: torch.dtype
) -> str:
    """Resolve ``impl``: "auto" is Triton on CUDA, torch otherwise (and for float64,
    which only the torch path computes exactly)."""
    if impl not in allowed:
        raise ValueError(f"impl must be one of {allowed}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and dtype != torch.float64 else "torch"
    if impl != "torch" and dtype == torch.float64:
        raise TypeError(
            f"impl={impl!r} computes in float32; float64 inputs need impl='torch' (or 'auto')"
        )
    if impl in ("triton", "fused") and device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"impl={impl!r} needs CUDA tensors (got {device}); on CPU use impl='torch', "
            "or set TRITON_INTERPRET=1 before importing opsd_kernels to run the Triton "
            "interpreter (slow, for tests)"
        )
    return impl


def check_same_device(reference_name: str, reference: torch.Tensor, **others) -> None:
    for name, x in others.items():
        if x is not None and x.device != reference.device:
            raise ValueError(
                f"{name} is on {x.device} but {reference_name} is on {reference.device}"
            )


def check_logits_inputs(student_logits, teacher_logits, mask) -> None:
    """Checks of :func:`opsd_kernels.divergence`'s tensors."""
    check_float_tensor("student_logits", student_logits)
    check_float_tensor("teacher_logits", teacher_logits)
    if student_logits.dim() == 0:
        raise ValueError("student_logits must have at least one dimension (the vocabulary)")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    check_same_device("student_logits", student_logits, teacher_logits=teacher_logits)
    if student_logits.shape[-1] == 0:
        raise ValueError("student_logits has an empty vocabulary (last dimension is 0)")
    check_mask(mask, student_logits.shape[:-1], student_logits.device)


def check_linear_inputs(
    student_hidden, teacher_hidden, weight, teacher_weight, bias, teacher_bias, mask
) -> None:
    """Checks of :func:`opsd_kernels.fused_linear_divergence`'s tensors.

    Dtypes may differ (e.g. bf16 hidden states against a float32 master lm_head);
    :mod:`opsd_kernels.gemm` states how mixed operands are computed.
    """
    for name, x in (
        ("student_hidden", student_hidden),
        ("teacher_hidden", teacher_hidden),
        ("weight", weight),
    ):
        check_float_tensor(name, x)
    for name, x in (
        ("teacher_weight", teacher_weight),
        ("bias", bias),
        ("teacher_bias", teacher_bias),
    ):
        if x is not None:
            check_float_tensor(name, x)
    if student_hidden.dim() == 0 or teacher_hidden.dim() == 0:
        raise ValueError("student_hidden and teacher_hidden must have shape (..., hidden)")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            "student_hidden and teacher_hidden must have the same leading shape, got "
            f"{tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}"
        )
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (V, H), got {tuple(weight.shape)}")
    V, H = weight.shape
    H_T = teacher_hidden.shape[-1]
    if V == 0:
        raise ValueError("weight has an empty vocabulary (V = 0 rows)")
    if H == 0 or H_T == 0:
        raise ValueError("student_hidden and teacher_hidden need a hidden size > 0")
    if student_hidden.shape[-1] != H:
        raise ValueError(
            f"student_hidden has hidden size {student_hidden.shape[-1]} but weight is "
            f"(V={V}, H={H})"
        )
    check_same_device(
        "student_hidden",
        student_hidden,
        teacher_hidden=teacher_hidden,
        weight=weight,
        teacher_weight=teacher_weight,
        bias=bias,
        teacher_bias=teacher_bias,
    )
    if teacher_weight is None:
        if teacher_bias is not None:
            raise ValueError(
                "teacher_bias is only used with a separate teacher_weight; with a shared "
                "lm_head the teacher uses `bias`"
            )
        if H_T != H:
            raise ValueError(
                f"teacher_hidden has hidden size {H_T} but the shared weight expects {H}; "
                "pass teacher_weight for a teacher of another size"
            )
    elif teacher_weight.dim() != 2 or teacher_weight.shape != (V, H_T):
        raise ValueError(
            f"teacher_weight must have shape (V={V}, H_T={H_T}), got {tuple(teacher_weight.shape)}"
        )
    for name, b in (("bias", bias), ("teacher_bias", teacher_bias)):
        if b is not None and b.shape != (V,):
            raise ValueError(f"{name} must have shape (V={V},), got {tuple(b.shape)}")
    check_mask(mask, student_hidden.shape[:-1], student_hidden.device)


def check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")


def check_skip_threshold(skip_threshold, impl: str):
    """``"auto"`` or a float in [0, 1]; a positive float only with ``impl="fused"``.

    Returned as given (``"auto"`` is resolved by the fused kernels, which know V and
    the gradient dtype: :func:`opsd_kernels.triton.configs.resolve_skip_threshold`).
    """
    if isinstance(skip_threshold, str):
        if skip_threshold != "auto":
            raise TypeError(
                f"skip_threshold must be 'auto' or a float in [0, 1], got {skip_threshold!r}"
            )
        return skip_threshold
    if isinstance(skip_threshold, bool) or not isinstance(skip_threshold, (int, float)):
        raise TypeError(f"skip_threshold must be 'auto' or a float, got {skip_threshold!r}")
    if not 0.0 <= skip_threshold <= 1.0:
        raise ValueError(f"skip_threshold must lie in [0, 1], got {skip_threshold!r}")
    if skip_threshold > 0 and impl != "fused":
        raise ValueError(f"skip_threshold only applies to impl='fused' (got impl={impl!r})")
    return float(skip_threshold)
