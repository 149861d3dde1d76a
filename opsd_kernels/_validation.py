"""Argument checks shared by the public functions: clear errors, no host syncs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .divergences import KINDS, KindSpec

REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class DivergenceOptions:
    """Validated options shared by every implementation."""

    spec: KindSpec
    beta: float
    temperature: float
    clip: float | None
    reduction: str


def check_options(kind, beta, temperature, clip, reduction) -> DivergenceOptions:
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
    return DivergenceOptions(spec, float(beta), float(temperature),
                             None if clip is None else float(clip), reduction)


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


def check_impl(impl: str, allowed: tuple[str, ...], device: torch.device,
               dtype: torch.dtype) -> str:
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
    if impl in ("triton", "fused") and device.type != "cuda":
        import os

        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise ValueError(
                f"impl={impl!r} needs CUDA tensors (got {device}); on CPU use impl='torch', "
                "or set TRITON_INTERPRET=1 before importing opsd_kernels to run the Triton "
                "interpreter (slow, for tests)"
            )
    return impl
