"""opsd_train: on-policy self-distillation (OPSD), SFT and GRPO recipes on TRL trainers.

Modules: ``data`` (problems, loaders, synthetic generator), ``prompts`` (student/teacher/
evaluation templates with per-role thinking flags), ``evaluate`` (answer checking,
pass@1/avg@k), ``recipes`` (``TrainConfig`` and the TRL trainers it configures),
``checkpoint`` (crash-safe checkpoints), ``config`` (options as dataclass fields, the CLI
generated from them), ``presets`` (the paper's runs), ``modeling`` (``--model`` loading,
GGUF, LoRA), ``tiny`` (the code-built default model and tokenizer), ``demo`` (the embedded
default run) and ``cli`` (``opsd-train``).
"""

from .data import Problem, extract_boxed, load_hf_dataset, load_jsonl, synthetic_split
from .evaluate import answers_match, is_correct

__all__ = [
    "Problem",
    "load_jsonl",
    "load_hf_dataset",
    "synthetic_split",
    "extract_boxed",
    "answers_match",
    "is_correct",
]
