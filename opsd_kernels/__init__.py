"""opsd-kernels: memory-lean divergence losses for on-policy self-distillation."""

from . import config, reference
from ._version import __version__
from .api import divergence, fused_linear_divergence
from .modules import (
    Divergence,
    FusedLinearDivergence,
    FusedLinearTopkDivergence,
    TopkDivergence,
)
from .stats import DivergenceStats
from .topk import fused_linear_topk_divergence, topk_divergence
from .trl_compat import generalized_jsd

__all__ = [
    "__version__",
    "Divergence",
    "DivergenceStats",
    "FusedLinearDivergence",
    "FusedLinearTopkDivergence",
    "TopkDivergence",
    "config",
    "divergence",
    "fused_linear_divergence",
    "fused_linear_topk_divergence",
    "generalized_jsd",
    "reference",
    "topk_divergence",
]
