"""Data-parallel training under ``torchrun`` with FSDP2 (``torch.distributed.fsdp.fully_shard``).

``torchrun --nproc_per_node=N -m opsd_train.cli --model ...`` runs one process per device;
:func:`init_from_env` joins the group (``nccl`` on CUDA, ``gloo`` on CPU) from torchrun's
environment, and :class:`DistributedTrainer` trains the sharded model:

* **Sharding.** Every decoder layer is its own FSDP2 unit, and a root unit
  (:class:`ShardedRoot`, which owns the whole model) holds the rest: the embeddings, the
  final norm and the lm_head (tied or not). LoRA adapters are sharded with their layers.
* **Batches.** Step ``s`` draws the same global batch as a single process
  (:meth:`~opsd_train.trainer.Trainer.batch_indices`); rank ``r`` takes the ``r``-th
  contiguous ``batch_size / N`` prompts for its rollouts and its loss.
* **Normalisation.** Trained-token counts are all-reduced, so each rank divides its token
  sum by the *global* count, and gradients are reduce-scattered as sums (divide factor 1):
  the loss and gradients equal the single-process ones on the same global batch.
* **The lm_head.** Under FSDP the lm_head weight outside a forward is a shard (the trap of
  TRL #6530, Liger #332). Here every loss (and every ``generate``) runs *inside* the
  root unit's forward (:meth:`ShardedRoot.forward` calls the loss function), so FSDP2
  itself unshards the root's parameters, the fused loss reads the full lm_head weight,
  and the root's post-backward reduce-scatters its gradient and frees the full copy when
  the backward of the micro-batch is done. No second copy of the weight is kept.
* **Rollouts.** ``generate`` runs inside the root forward with the layers left unsharded
  between decode steps (one all-gather per layer per generate call, not per token, and
  no collective that depends on how many tokens a rank generates); the layers are
  resharded afterwards. During rollouts each rank holds the full weights, as a colocated
  inference engine does.
* **Checkpoints.** ``torch.distributed.checkpoint`` (DCP) writes each rank's shards of
  the model and optimizer into the checkpoint's ``dcp/`` folder; rank 0 adds
  ``trainer_state.pt`` (step, scheduler, every rank's RNG states) and ``config.json``,
  and :func:`opsd_train.checkpoint.write_checkpoint` records every file in the completion
  marker, so a torn distributed checkpoint is detected like a single-process one.
* **Metrics.** Reduced over ranks and written once, by rank 0.

Limits: the teacher must be ``current`` or, with LoRA, ``fixed`` (the adapter is disabled
for the teacher; the method's default). A ``fixed``/``ema`` teacher of a full fine-tune
keeps a copy of the weights that FSDP does not shard; it is refused with a clear error.
The GRPO baseline is not wired for FSDP. Multi-GPU speed has not been measured.
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .step import get_body, opsd_loss, sft_loss
from .teacher import is_peft_model
from .trainer import Row, TrainConfig, Trainer

__all__ = [
    "DistInfo",
    "init_from_env",
    "init_for_cli",
    "ShardedRoot",
    "shard_model",
    "DistributedTrainer",
    "is_distributed_launch",
]


@dataclass
class DistInfo:
    """This process's place in the group: ``rank``, ``world_size``, ``local_rank`` and
    the torch ``device`` it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 (writes metrics, checkpoint metadata and final weights)."""
        return self.rank == 0


def is_distributed_launch() -> bool:
    """Whether this process was started by ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str | None = None) -> DistInfo | None:
    """Join the process group described by torchrun's environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); ``None`` when not
    launched with more than one process. The backend is ``nccl`` on CUDA (each process on
    ``cuda:LOCAL_RANK``), ``gloo`` on CPU.
    """
    if not is_distributed_launch() and not dist.is_initialized():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def init_for_cli(device: str | None) -> DistInfo | None:
    """:func:`init_from_env` for ``opsd-train`` under torchrun (``None`` otherwise); the
    process group is destroyed at exit."""
    if not is_distributed_launch():
        return None
    info = init_from_env(device)
    import atexit

    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return info


class ShardedRoot(torch.nn.Module):
    """The root FSDP unit: owns ``model``; ``root(fn, *args, **kwargs)`` returns
    ``fn(*args, **kwargs)`` inside this module's forward, so FSDP2 unshards the root's
    parameters (embeddings, final norm, lm_head) around it and reduce-scatters their
    gradients in its backward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


def _fsdp_modules(root) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in root.modules() if isinstance(m, FSDPModule)]


def shard_model(model) -> ShardedRoot:
    """Apply FSDP2 ``fully_shard`` to each decoder layer of ``model`` and to a
    :class:`ShardedRoot` around it (in place: ``model``'s parameters become DTensor
    shards). Gradients are reduce-scattered as sums (the losses divide by the global
    token count). Returns the root."""
    from torch.distributed.fsdp import fully_shard

    layers = getattr(get_body(model), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers (body.layers) to shard")
    for layer in layers:
        fully_shard(layer)
    root = ShardedRoot(model)
    fully_shard(root)
    for m in _fsdp_modules(root):
        m.set_gradient_divide_factor(1.0)
        # plain SUM collectives (gloo has no PREMUL_SUM); the post-division by 1 is free
        m.set_force_sum_reduction_for_comms(True)
    return root


class _RootEngine:
    """A rollout engine whose ``generate`` runs inside the root's forward, with every
    layer kept unsharded between decode steps and resharded afterwards."""

    def __init__(self, engine, root: ShardedRoot):
        self.engine = engine
        self.root = root

    def generate(self, prompts, params, num_return_sequences: int = 1):
        mods = _fsdp_modules(self.root)
        for m in mods:
            m.set_reshard_after_forward(False, recurse=False)
        try:
            with torch.no_grad():
                return self.root(self.engine.generate, prompts, params, num_return_sequences)
        finally:
            for m in mods:
                # FSDP2's defaults: layers reshard after forward; the root keeps its
                # parameters (the lm_head) gathered until the backward of its forward
                m.set_reshard_after_forward(m is not self.root, recurse=False)
                m.reshard()


def _all_reduce_sum(values: Sequence[float], device) -> list[float]:
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class DistributedTrainer(Trainer):
    """:class:`~opsd_train.trainer.Trainer` for one rank of a torchrun group (see the
    module docstring). ``model`` is the unsharded model (identical on every rank, e.g.
    loaded and seeded the same way); it is sharded here, before the optimizer is built.
    Other arguments as :class:`~opsd_train.trainer.Trainer`; ``output_dir`` must be the
    same (shared) folder on every rank."""

    def __init__(
        self,
        model,
        tokenizer,
        train_problems,
        config: TrainConfig,
        *,
        info: DistInfo,
        engine=None,
        **kwargs,
    ):
        from .modeling import ensure_pad_token
        from .rollout import HFGenerateEngine

        if config.objective not in ("opsd", "sft"):
            raise ValueError(
                f"algo {config.objective!r} is not supported under FSDP (opsd and sft are)"
            )
        if config.batch_size % info.world_size:
            raise ValueError(
                f"batch_size ({config.batch_size}) must be divisible by the "
                f"number of processes ({info.world_size})"
            )
        if (config.batch_size // info.world_size) % config.grad_accum:
            raise ValueError(
                f"batch_size per process ({config.batch_size // info.world_size})"
                f" must be divisible by grad_accum ({config.grad_accum})"
            )
        lora = is_peft_model(model)
        if config.objective == "opsd" and not (
            config.teacher == "current" or (config.teacher == "fixed" and lora)
        ):
            raise ValueError(
                f"teacher {config.teacher!r} without LoRA keeps a full copy of the weights "
                "outside FSDP: under torchrun use --lora (the fixed teacher is the base "
                "model with the adapter disabled) or --teacher current"
            )
        self.info = info
        self.root = shard_model(model)
        ensure_pad_token(tokenizer)
        eos = (
            tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
        )
        inner = engine or HFGenerateEngine(model, tokenizer.pad_token_id, eos)
        self._global: dict = {}
        super().__init__(
            model, tokenizer, train_problems, config, engine=_RootEngine(inner, self.root), **kwargs
        )
        # every rank was seeded alike (identical initial weights); from here on each
        # samples its rollouts from its own stream (saved per rank in checkpoints)
        if info.rank:
            torch.manual_seed((torch.initial_seed() + 1_000_003 * info.rank) % 2**63)

    # ------------------------------------------------------------------ one step
    def local_indices(self, idx: Sequence[int]) -> list[int]:
        """This rank's contiguous slice of the global batch ``idx``."""
        per = len(idx) // self.info.world_size
        return list(idx[self.info.rank * per : (self.info.rank + 1) * per])

    def collect_rows(self, idx: Sequence[int]) -> list[Row]:
        rows = super().collect_rows(self.local_indices(idx))
        n_rows, tokens, gen = _all_reduce_sum(
            [len(rows), sum(r.trained_tokens for r in rows), sum(len(r.completion) for r in rows)],
            self._comm_device,
        )
        self._global = {
            "rows": n_rows,
            "tokens": int(tokens),
            "generated": int(gen),
            "local_generated": sum(len(r.completion) for r in rows),
        }
        return rows

    @property
    def _comm_device(self):
        return self.info.device if self.info.device.type == "cuda" else torch.device("cpu")

    def loss_backward(self, rows: Sequence[Row], total_tokens: int) -> dict:
        """As :meth:`Trainer.loss_backward`, with the normalisers taken over all ranks (the
        global token count, or with ``loss_normalization="microbatch"`` each micro-batch's
        tokens times the number of non-empty micro-batches of all ranks), every loss
        inside the root forward, and the results summed over ranks. Every rank
        runs the same number of micro-batches (rows with empty completions are kept, with
        nothing to count), so the collectives match."""
        cfg = self.config
        total = self._global.get("tokens", total_tokens)
        out = {"loss": 0.0, "div_sum": 0.0, "forward_tokens": 0}
        slices = self._micro_slices(len(rows))
        norms = [float(total)] * len(slices)
        if getattr(cfg, "loss_normalization", "global") == "microbatch":
            # the mean of every micro-batch's token mean, over all ranks' micro-batches
            own = [sum(r.trained_tokens for r in rows[sl]) for sl in slices]
            (n_micro,) = _all_reduce_sum([sum(1 for n in own if n > 0)], self._comm_device)
            norms = [max(n, 1) * n_micro for n in own]
        if total > 0:
            lcfg = cfg.loss_config()
            ctx = None
            if self.teacher is not None and self.teacher.mode != "current":
                ctx = self.teacher.weights
            for sl, norm in zip(slices, norms, strict=True):
                sb, tb = self.pack_rows(rows[sl])
                out["forward_tokens"] += int(sb.attention_mask.sum())
                sb = sb.to(self.device)
                with self._autocast():
                    if tb is not None:
                        out["forward_tokens"] += int(tb.attention_mask.sum())
                        tb = tb.to(self.device)
                        if cfg.teacher_topk is not None:
                            from .topk_teacher import topk_teacher_loss

                            loss, st = self.root(topk_teacher_loss, self, sb, tb, lcfg, ctx, norm)
                        else:
                            loss, st = self.root(
                                opsd_loss,
                                self.model,
                                sb,
                                tb,
                                lcfg,
                                teacher_ctx=ctx,
                                normalizer=norm,
                            )
                    else:
                        loss, st = self.root(sft_loss, self.model, sb, normalizer=norm)
                loss.backward()
                out["loss"] += float(loss.detach())
                out["div_sum"] += st["div_sum"]
        loss, div, fwd = _all_reduce_sum(
            [out["loss"], out["div_sum"], out["forward_tokens"]], self._comm_device
        )
        self._global["div_sum"] = div
        return {"loss": loss, "div_sum": div, "forward_tokens": int(fwd)}

    def optimizer_step(self) -> tuple[float, float]:
        """Clip by the global gradient norm (over every rank's shards), step, clear."""
        from torch.distributed.tensor import DTensor

        cfg = self.config
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            if isinstance(norm, DTensor):
                norm = norm.full_tensor()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(params, cfg.max_grad_norm, norm)
            gn = float(norm)
        else:
            gn = 0.0
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return gn, lr

    # ------------------------------------------------------------------ logging
    def _log(self, rec: dict) -> None:
        if rec.get("event") == "step" and self._global:
            g = self._global
            tokens = g["tokens"]
            rec["completion_tokens"] = tokens
            rec["divergence"] = g.get("div_sum", 0.0) / max(tokens, 1)
            rec["rollout_len"] = tokens / max(g["rows"], 1)
            if "generated_tokens" in rec and rec["generated_tokens"]:
                rec["generated_tokens"] = g["generated"]
                if hasattr(self, "generated_tokens_total"):
                    self.generated_tokens_total += g["generated"] - g["local_generated"]
                    rec["generated_tokens_total"] = self.generated_tokens_total
            rec["world_size"] = self.info.world_size
        self.history.append(rec)
        if self.info.is_main and self.output_dir is not None:
            history, self.history = self.history, []
            try:
                super()._log(rec)
            finally:
                self.history = history

    # ------------------------------------------------------------------ checkpoints
    def _state_dicts(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(ignore_frozen_params=is_peft_model(self.model))
        return get_state_dict(self.root, self.optimizer, options=opts)

    def save_checkpoint(self, path: str | Path) -> Path:
        """Collective: every rank writes its shards with ``torch.distributed.checkpoint``
        into ``path/dcp``; rank 0 writes the trainer state and the completion marker
        (:func:`opsd_train.checkpoint.write_checkpoint`), atomically."""
        import torch.distributed.checkpoint as dcp

        path = Path(path)
        staging = path.parent / f".{path.name}.dcp-staging"
        if self.info.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.parent.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        msd, osd = self._state_dicts()
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(staging))
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        rngs: list = [None] * self.info.world_size
        dist.all_gather_object(rngs, rng)
        error = None
        if self.info.is_main:
            state = {
                "format": "opsd_train.checkpoint.v2",
                "step": self.step,
                "peft": is_peft_model(self.model),
                "distributed": {"world_size": self.info.world_size, "weights": "dcp"},
                "model": None,
                "optimizer": None,
                "scheduler": self.scheduler.state_dict(),
                "teacher": self.teacher.state_dict() if self.teacher is not None else None,
                "rng": rngs[0],
                "rng_per_rank": rngs,
            }
            try:
                ckpt.write_checkpoint(
                    path, state, self.effective_config(), self.step, extra={"dcp": staging}
                )
                if self.config.keep_last:
                    ckpt.prune_checkpoints(path.parent, self.config.keep_last)
            except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                error = e
        flag = [repr(error) if error is not None else None]
        dist.broadcast_object_list(flag, src=0)
        if error is not None:
            raise error
        if flag[0] is not None:
            raise ckpt.CheckpointWriteError(f"rank 0 failed to write checkpoint {path}: {flag[0]}")
        self.last_saved_step = self.step
        return path

    def load_checkpoint(self, path: str | Path, *, allow_changes: Iterable[str] = ()) -> None:
        """Collective: restore a :meth:`save_checkpoint` folder (the same world size)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        path = Path(path)
        stored = ckpt.read_checkpoint_config(path)
        ckpt.check_resume_config(
            stored,
            self.config.to_dict(),
            TrainConfig.resume_policies(),
            allow_changes,
            where=f"checkpoint {path}",
        )
        state = ckpt.load_checkpoint_state(path)
        meta = state.get("distributed")
        if meta is None:
            raise ckpt.CheckpointError(
                f"checkpoint {path} was written by a single process; resume it without torchrun"
            )
        if state.get("peft") != is_peft_model(self.model):
            raise ckpt.CheckpointError(f"checkpoint {path}: resume with the same --lora setting")
        msd, osd = self._state_dicts()
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=str(path / "dcp"))
        set_state_dict(
            self.root,
            self.optimizer,
            model_state_dict=sd["model"],
            optim_state_dict=sd["optim"],
            options=StateDictOptions(ignore_frozen_params=is_peft_model(self.model)),
        )
        self.scheduler.load_state_dict(state["scheduler"])
        if self.teacher is not None and state["teacher"] is not None:
            self.teacher.load_state_dict(state["teacher"])
        self.step = self.last_saved_step = int(state["step"])
        rngs = state["rng_per_rank"]
        if len(rngs) == self.info.world_size:
            rng = rngs[self.info.rank]
        else:
            warnings.warn(
                f"checkpoint {path} was written by {len(rngs)} processes, this run "
                f"has {self.info.world_size}: the rollouts' random streams differ "
                "from an uninterrupted run",
                stacklevel=2,
            )
            rng = rngs[0]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if self.info.is_main and self.output_dir is not None:
            ckpt.truncate_metrics(self.output_dir / "metrics.jsonl", self.config.phase, self.step)
        dist.barrier()

    def save_final(self, path: str | Path) -> None:
        """Collective: gather the full weights (or adapter) and ``save_pretrained`` them
        on rank 0 into ``path``; every rank returns once it is written."""
        sd = self.full_state_dict()
        error = None
        if self.info.is_main:
            try:
                self.model.save_pretrained(path, state_dict=sd)
            except OSError as e:
                error = e
        flag = [repr(error) if error is not None else None]
        dist.broadcast_object_list(flag, src=0)
        if error is not None:
            raise error
        if flag[0] is not None:
            raise ckpt.CheckpointWriteError(f"rank 0 failed to write {path}: {flag[0]}")

    def full_state_dict(self) -> dict:
        """Collective: the full (unsharded) model state dict on rank 0 (CPU tensors;
        empty on the other ranks), e.g. for ``save_pretrained``."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_model_state_dict(self.root, options=opts)
        return {k.removeprefix("model."): v for k, v in sd.items()}
