"""Integrations of the fused losses into other training libraries.

- :mod:`opsd_kernels.integrations.trl`: TRL's GKD and GOLD trainers with the distillation
  loss computed from hidden states and lm_heads (``FusedGKDTrainer``, ``FusedGOLDTrainer``).
- :mod:`opsd_kernels.integrations.trl_sdft`: TRL's self-distillation trainers, OPSD's home in
  TRL (``FusedSDFTTrainer``, ``FusedSDPOTrainer``), every distillation mode from hidden states.
- :mod:`opsd_kernels.integrations.trl_distillation`: TRL's ``DistillationTrainer`` with
  this project's kernel in place of TRL's (``FusedDistillationTrainer``).
- :mod:`opsd_kernels.integrations._heads`: the lm_head of a (possibly FSDP2/ZeRO-3
  sharded) model whole, for the fused losses (``gathered_lm_head``, ``lm_heads``).

Each integration imports its library only when one of its trainers is first used.
"""
