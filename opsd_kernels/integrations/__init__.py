"""Integrations of the fused losses into other training libraries.

- :mod:`opsd_kernels.integrations.trl`: TRL's GKD and GOLD trainers with the distillation
  loss computed from hidden states and lm_heads (``FusedGKDTrainer``, ``FusedGOLDTrainer``).

Each integration imports its library only when one of its trainers is first used.
"""
