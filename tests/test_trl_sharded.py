"""The fused TRL trainers with sharded models: FSDP2 and DeepSpeed ZeRO-3 on CPU (gloo, 2
processes on 127.0.0.1) against one process on the same global batch.

One ``torchrun`` launch (spawning is the slow part) runs every sharded case in turn; each
rank builds the same tiny Qwen3 student and teacher, shards them by hand, and runs two
optimizer steps of ``FusedGKDTrainer.compute_loss`` + backward on its half of two global
batches (SGD; the loss divided by the global token count over the world size, so the
averaged gradients are the global batch's). The single process runs the same steps on the
whole batches with unsharded models. Loss and every updated parameter must agree within
float32 rounding.

- ``fsdp2_root``: ``fully_shard`` on each layer, then on the model (the lm_head is in the
  root unit: inside the redirected forward it is FSDP's unsharded parameter, and FSDP
  reduces its gradient); the teacher sharded the same way.
- ``fsdp2_head_unit``: the lm_head its own ``fully_shard`` unit, a teacher with another
  hidden size: the head is a ``Shard(0)`` DTensor, gathered with ``full_tensor()`` and its
  gradient averaged back to the shards (``Partial("avg")``).
- ``fsdp2_distillation``: the same with ``FusedDistillationTrainer`` (TRL's
  ``compute_loss``, its entropy metric gathered across the ranks); ``fsdp2_sdft`` with
  ``FusedSDFTTrainer`` (full logits, the student as its own teacher in another context).
- ``fsdp2_sdpo``: ``FusedSDPOTrainer`` (both terms: the policy term's log-probs and the
  clipped distillation term from the hidden states; a mixed ``self_distillation_mask``).
- ``fsdp2_gold`` / ``zero3_gold``: ``FusedGOLDTrainer`` (same tokenizer: its JSD goes
  through GKD's fused path, with GOLD's own forward keywords).
- ``replicate_head``: no ``fully_shard``; the student's lm_head weight a ``Replicate``
  DTensor (gathered by ``full_tensor()``, its gradient averaged back), the other gradients
  averaged by hand.
- ``zero3``: ``deepspeed.initialize`` with ZeRO stage 3 on DeepSpeed's CPU accelerator
  (``stage3_param_persistence_threshold`` 0: even the tiny lm_head is partitioned), the
  teacher its own ZeRO-3 engine, as TRL prepares it; ``zero3_distillation`` the same with
  ``FusedDistillationTrainer``; ``zero3_sdft`` with ``FusedSDFTTrainer`` (the student's
  top-k support, found by a sweep over the gathered head); ``zero3_sdpo`` with
  ``FusedSDPOTrainer``. Gradient clipping off (DeepSpeed's default clips at norm 1.0, which
  once passed for a trainer bug here: updates about half the one-process ones).

Checked with TRL 1.16.0, torch 2.13 (CPU) and DeepSpeed 0.19.8 (skipped without it).
The workers run this file as a module: ``torchrun ... -m tests.test_trl_sharded FOLDER``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODES = (
    "fsdp2_root",
    "fsdp2_head_unit",
    "fsdp2_distillation",
    "fsdp2_sdft",
    "fsdp2_sdpo",
    "fsdp2_gold",
    "replicate_head",
    "zero3",
    "zero3_distillation",
    "zero3_sdft",
    "zero3_sdpo",
    "zero3_gold",
)
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
WORLD, BATCH, SEQ, LR = 2, 4, 9, 0.5


def _model(vocab, pad, seed, hidden=16):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        pad_token_id=pad,
    )
    model = transformers.Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # sharper distributions than the default init: a real loss
        model.lm_head.weight.mul_(40.0)
    return model


def _kind(mode):
    """The trainer a mode runs: ``"gkd"``, ``"gold"``, ``"distillation"``, ``"sdft"`` or
    ``"sdpo"``."""
    kinds = ("_gold", "_distillation", "_sdft", "_sdpo")
    return mode.split("_")[-1] if mode.endswith(kinds) else "gkd"


def _teacher_hidden(mode):
    """A wider teacher (its own lm_head of another width) where the head is its own unit."""
    return 24 if mode in ("fsdp2_head_unit", "fsdp2_distillation") else 16


def _batches(vocab):
    """Two global batches: (input_ids, attention_mask, labels), left padding, prompt
    positions and padding excluded."""
    out = []
    g = torch.Generator().manual_seed(11)
    for _ in range(2):
        ids = torch.randint(3, vocab, (BATCH, SEQ), generator=g)
        mask = torch.ones_like(ids)
        labels = ids.clone()
        for row in range(BATCH):
            pad = row % 3
            ids[row, :pad], mask[row, :pad] = 0, 0
            labels[row, : pad + 3 + row % 2] = -100
        out.append((ids, mask, labels))
    return out


def _trainer(tok_dir, student, teacher, folder, mode):
    """The mode's fused trainer; SDFT's teacher is the student itself (``live``): full
    logits under FSDP2, the student's top-k support under ZeRO-3."""
    import datasets
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    common = dict(
        output_dir=str(folder),
        per_device_train_batch_size=2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=0,
        bf16=False,
    )
    prompts = {"prompt": [[{"role": "user", "content": "1 + 1"}]] * 4}
    loss_kwargs = dict(impl="torch", chunk_size=5)
    if _kind(mode) == "sdft":
        from opsd_kernels.integrations.trl_sdft import FusedSDFTConfig, FusedSDFTTrainer

        args = FusedSDFTConfig(
            num_generations=2,
            teacher_model_kind="live",
            distillation_mode="topk_logits" if mode.startswith("zero3") else "full_logits",
            distillation_topk=9,
            distillation_alpha=0.3,
            distillation_is_clip=None,
            fused_loss_kwargs=loss_kwargs,
            **common,
        )
        data = datasets.Dataset.from_dict({**prompts, "privileged_context": ["2"] * 4})
        return FusedSDFTTrainer(model=student, args=args, train_dataset=data, processing_class=tok)
    if _kind(mode) == "sdpo":
        from opsd_kernels.integrations.trl_sdft import FusedSDPOConfig, FusedSDPOTrainer

        args = FusedSDPOConfig(
            num_generations=2,
            teacher_model_kind="live",
            distillation_mode="full_logits",
            distillation_alpha=0.0,
            distillation_weight=0.5,  # both terms: the policy log-probs from hidden states
            loss_type="grpo",  # per-sequence means: the ranks' mean is the global one
            distillation_clip=0.05,
            fused_loss_kwargs=loss_kwargs,
            **common,
        )
        data = datasets.Dataset.from_dict(prompts)
        return FusedSDPOTrainer(
            model=student,
            reward_funcs=lambda completions, **kw: [0.0] * len(completions),
            args=args,
            train_dataset=data,
            processing_class=tok,
        )
    if _kind(mode) == "distillation":
        from opsd_kernels.integrations.trl_distillation import (
            FusedDistillationConfig,
            FusedDistillationTrainer,
        )

        cls, args = FusedDistillationTrainer, FusedDistillationConfig(beta=0.3, **common)
        data = datasets.Dataset.from_dict(prompts)
    elif _kind(mode) == "gold":  # same tokenizer: GOLD's JSD, fused as GKD's
        from trl.experimental.gold import GOLDConfig

        from opsd_kernels.integrations.trl import FusedGOLDTrainer

        cls = FusedGOLDTrainer
        args = GOLDConfig(lmbda=0.0, beta=0.3, max_completion_length=4, max_length=32, **common)
        data = datasets.Dataset.from_dict({"messages": prompts["prompt"]})
    else:
        from trl.experimental.gkd import GKDConfig

        from opsd_kernels.integrations.trl import FusedGKDTrainer

        cls = FusedGKDTrainer
        args = GKDConfig(lmbda=0.0, beta=0.3, max_length=32, disable_dropout=True, **common)
        data = datasets.Dataset.from_dict({"messages": prompts["prompt"]})
    return cls(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=data,
        processing_class=tok,
        fused_loss_kwargs=loss_kwargs,
    )


def _local_inputs(mode, batch, rows, world):
    """``compute_loss``'s inputs and keywords for ``rows`` of a global batch.

    GKD: the loss divided by the global count of trained tokens over the world size (the
    averaged gradients are then the global batch's). DistillationTrainer: the first 4
    positions are the prompt, the rest the completion (trained where labelled); TRL's
    ``compute_loss`` takes the global count from the batch and divides it itself. SDFT:
    the same split, the teacher's prompt the student's reversed (another context); TRL's
    per-sequence then batch mean (equal local batches: the ranks' mean is the global one).
    """
    ids, mask, labels = batch
    if _kind(mode) in ("gkd", "gold"):
        n = (labels[:, 1:] != -100).sum().double() / world
        inputs = dict(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows])
        return inputs, dict(num_items_in_batch=n)
    inputs = dict(
        prompt_ids=ids[:, :4],
        prompt_mask=mask[:, :4],
        completion_ids=ids[:, 4:],
        completion_mask=(labels[:, 4:] != -100).long(),
    )
    if _kind(mode) == "sdpo":  # a mixed distillation mask and non-zero advantages
        g = torch.Generator().manual_seed(int(ids.sum()))
        inputs["self_distillation_mask"] = torch.tensor([1.0, 0.0, 1.0, 1.0])
        inputs["advantages"] = torch.randn(ids.shape[0], generator=g)
    if _kind(mode) in ("sdft", "sdpo"):
        inputs["teacher_input_ids"] = torch.cat([ids[:, :4].flip(1), ids[:, 4:]], dim=1)
        inputs["teacher_attention_mask"] = torch.cat(
            [torch.ones_like(ids[:, :4]), inputs["completion_mask"]], dim=1
        )
    local = {k: v[rows] for k, v in inputs.items()}
    if _kind(mode) == "distillation":
        local["num_items_in_batch"] = inputs["completion_mask"].sum().double()
    return local, {}


def _run(mode, trainer, model, batches, rows, world, backward, step) -> list[float]:
    """Two steps of the trainer's loss on ``rows`` of each global batch; returns the
    global losses (the ranks' mean)."""
    trainer.current_gradient_accumulation_steps = 1  # set by the train loop otherwise
    losses = []
    for batch in batches:
        inputs, kwargs = _local_inputs(mode, batch, rows, world)
        loss = trainer.compute_loss(model, inputs, **kwargs)
        backward(loss)
        step()
        total = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(total)
        losses.append(total.item() / world)
    return losses


def _full_state(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        out[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
    return out


def _fsdp2_case(mode, tok_dir, folder, vocab, pad):
    from torch.distributed.fsdp import fully_shard

    student = _model(vocab, pad, 0)
    teacher = _model(vocab, pad, 1, hidden=_teacher_hidden(mode))
    trainer = _trainer(tok_dir, student, teacher, folder, mode)
    for model in {id(m): m for m in (student, trainer.teacher_model)}.values():
        for layer in model.model.layers:
            fully_shard(layer)
        if mode != "fsdp2_root":
            fully_shard(model.lm_head)
        fully_shard(model)
    rank = torch.distributed.get_rank()
    opt = torch.optim.SGD(student.parameters(), lr=LR)

    def step():
        opt.step()
        opt.zero_grad()

    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    batches = _batches(vocab)
    losses = _run(mode, trainer, student, batches, rows, WORLD, lambda x: x.backward(), step)
    return losses, _full_state(student)


def _replicate_case(mode, tok_dir, folder, vocab, pad):
    """The student's lm_head weight a ``Replicate`` DTensor (as tensor or hybrid
    parallelism leaves it), the rest plain with its gradients averaged by hand (DDP's
    job); ``FusedGKDTrainer``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    student, teacher = _model(vocab, pad, 0), _model(vocab, pad, 1)
    mesh = init_device_mesh("cpu", (WORLD,))
    head = student.lm_head
    head.weight = torch.nn.Parameter(distribute_tensor(head.weight.data, mesh, [Replicate()]))
    trainer = _trainer(tok_dir, student, teacher, folder, mode)
    opt = torch.optim.SGD(student.parameters(), lr=LR)

    def backward(loss):
        loss.backward()
        for p in student.parameters():
            if p.grad is not None and p is not head.weight:
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)

    def step():
        opt.step()
        opt.zero_grad()

    rank = torch.distributed.get_rank()
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    losses = _run(mode, trainer, student, _batches(vocab), rows, WORLD, backward, step)
    return losses, _full_state(student)


def _zero3_case(mode, tok_dir, folder, vocab, pad):
    import deepspeed

    student, teacher = _model(vocab, pad, 0), _model(vocab, pad, 1)
    trainer = _trainer(tok_dir, student, teacher, folder, mode)
    config = {
        "train_micro_batch_size_per_gpu": BATCH // WORLD,
        "gradient_accumulation_steps": 1,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        # off, as in the one-process run: DeepSpeed clips at norm 1.0 unless told otherwise
        # (GRADIENT_CLIPPING_DEFAULT in 0.19.8; accelerate passes max_grad_norm instead)
        "gradient_clipping": 0.0,
    }
    opt = torch.optim.SGD(student.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=student, optimizer=opt, config=config)
    if trainer.teacher_model is not student:  # SDFT's live teacher is the student
        teacher_engine, *_ = deepspeed.initialize(model=trainer.teacher_model, config=config)
        trainer.teacher_model = teacher_engine
    assert student.lm_head.weight.numel() == 0  # partitioned
    rank = torch.distributed.get_rank()
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    losses = _run(mode, trainer, engine, _batches(vocab), rows, WORLD, engine.backward, engine.step)
    state = {}
    for name, p in student.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            state[name] = p.detach().clone()
    return losses, state


def _worker(folder: str) -> None:
    import transformers

    folder = Path(folder)
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    tok_dir = folder / "tok"
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    vocab, pad = len(tok), tok.pad_token_id
    rank = torch.distributed.get_rank()
    for mode in os.environ.get("OPSD_SHARDED_MODES", ",".join(MODES)).split(","):
        if mode.startswith("zero3"):
            if not HAS_DEEPSPEED:
                continue
            losses, state = _zero3_case(mode, tok_dir, folder / mode, vocab, pad)
        elif mode == "replicate_head":
            losses, state = _replicate_case(mode, tok_dir, folder / mode, vocab, pad)
        else:
            losses, state = _fsdp2_case(mode, tok_dir, folder / mode, vocab, pad)
        if rank == 0:
            torch.save({"losses": losses, "state": state}, folder / f"{mode}.pt")
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    """The one torchrun launch: ``(folder, tokenizer folder)``; each case's rank-0 results
    in ``folder / f"{mode}.pt"``."""
    pytest.importorskip("trl.experimental.gkd")
    from tests.test_trl_integration import build_tokenizer

    folder = tmp_path_factory.mktemp("sharded")
    build_tokenizer().save_pretrained(folder / "tok")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",  # DeepSpeed's CPU accelerator, gloo without oneCCL
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(WORLD),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "tests.test_trl_sharded",
        str(folder),
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return folder


def _single_process(mode, folder):
    """The same two steps on one process, unsharded models, whole batches."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(folder / "tok")
    vocab, pad = len(tok), tok.pad_token_id
    student = _model(vocab, pad, 0)
    teacher = _model(vocab, pad, 1, hidden=_teacher_hidden(mode))
    trainer = _trainer(folder / "tok", student, teacher, folder / "single", mode)
    opt = torch.optim.SGD(student.parameters(), lr=LR)

    def step():
        opt.step()
        opt.zero_grad()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batches = _batches(vocab)
        losses = _run(mode, trainer, student, batches, slice(None), 1, lambda x: x.backward(), step)
    finally:
        torch.set_num_threads(threads)
    return losses, _full_state(student), _model(vocab, pad, 0).state_dict()


@pytest.mark.parametrize("mode", MODES)
def test_two_sharded_processes_match_one_process(sharded_runs, mode):
    if mode.startswith("zero3") and not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed")
    got = torch.load(sharded_runs / f"{mode}.pt", weights_only=False)
    losses, state, init = _single_process(mode, sharded_runs)
    assert losses[0] > 1e-2, losses  # a real divergence
    assert got["losses"] == pytest.approx(losses, rel=1e-5), (got["losses"], losses)
    assert got["state"].keys() == state.keys()
    for name, p in state.items():
        moved = (p - init[name]).abs().max()
        assert moved > 1e-4 or "norm" in name, (name, moved)  # the steps updated it
        torch.testing.assert_close(got["state"][name], p, rtol=1e-4, atol=1e-4 * moved, msg=name)


def test_trl_forward_redirection_is_where_we_expect_it():
    """The one private TRL name the integrations use (``_heads.route_through``)."""
    pytest.importorskip("trl")
    from opsd_kernels.integrations._heads import _forward_redirection

    redirect = _forward_redirection()
    outer, inner = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    outer.forward = lambda *a, **k: inner(*a, **k)  # a wrapper that calls its module
    assert redirect(outer, inner, lambda x: json.dumps(x), [1]) == "[1]"


if __name__ == "__main__":
    _worker(sys.argv[1])
    # the results are saved: skip the interpreter's shutdown, where a native thread can
    # abort the process ("terminate called without an active exception", seen with the
    # DDP launch of tests/test_trl_sdft.py about once in five)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
