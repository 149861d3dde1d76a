"""Integrations of the fused losses into other training libraries.

- :mod:`opsd_kernels.integrations.trl`: TRL's GKD and GOLD trainers with the distillation
  loss computed from hidden states and lm_heads (``FusedGKDTrainer``, ``FusedGOLDTrainer``).
- :mod:`opsd_kernels.integrations.trl_sdft`: TRL's self-distillation trainers, OPSD's home in
  TRL (``FusedSDFTTrainer``, ``FusedSDPOTrainer``), every distillation mode from hidden states.

Each integration imports its library only when one of its trainers is first used.
"""
