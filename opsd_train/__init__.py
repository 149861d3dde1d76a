"""opsd_train: a thin on-policy self-distillation (OPSD) trainer built on
:func:`opsd_kernels.fused_linear_divergence`.

Modules: ``data`` (problems, loaders, synthetic generator), ``prompts`` (student/teacher
templates), ``rollout`` (sampling engines), ``step`` (the OPSD loss step with exact
teacher/student position alignment), ``trainer`` (training loop, ``TrainConfig``),
``config`` (options as documented dataclass fields: strict checks, CLI flags),
``checkpoint`` (atomic, verified checkpoints and the resume checks), ``evaluate`` (answer
checking, pass@1/avg@k), ``tiny`` (the code-built default model and tokenizer), ``demo``
(the embedded default run) and ``cli`` (``opsd-train``).
"""

from .data import Problem, load_hf_dataset, load_jsonl, synthetic_split
from .evaluate import answers_match, extract_boxed, is_correct

__all__ = [
    "Problem",
    "load_jsonl",
    "load_hf_dataset",
    "synthetic_split",
    "extract_boxed",
    "answers_match",
    "is_correct",
]
