"""opsd-kernels: memory-lean divergence losses for on-policy self-distillation."""

from . import config, reference
from .api import divergence, fused_linear_divergence
from .trl_compat import generalized_jsd
from .modules import Divergence, FusedLinearDivergence

__all__ = [
    "Divergence",
    "FusedLinearDivergence",
    "config",
    "divergence",
    "fused_linear_divergence",
    "generalized_jsd",
    "reference",
]
__version__ = "0.1.0"
