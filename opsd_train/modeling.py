"""Model and tokenizer preparation: loading by path or hub id, pad-token handling, LoRA
(optional ``peft``), Liger kernels for the non-loss parts (optional, CUDA), gradient
checkpointing and precision."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

from .step import get_body, get_lm_head

__all__ = [
    "LORA_TARGET_MODULES",
    "ensure_pad_token",
    "resolve_dtype",
    "resolve_model_source",
    "load_tokenizer",
    "load_model_config",
    "load_model_and_tokenizer",
    "apply_lora",
    "apply_liger",
    "prepare_model",
]

LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def ensure_pad_token(tokenizer) -> None:
    """Make sure ``tokenizer`` has a pad token.

    Documented handling: a tokenizer without one gets its EOS token as pad token (with a
    warning; completions are cut at the first EOS and masked by length, so this is safe).
    Without EOS either, ``ValueError``.
    """
    if getattr(tokenizer, "pad_token_id", None) is not None:
        return
    if getattr(tokenizer, "eos_token", None) is None:
        raise ValueError(
            "the tokenizer has neither a pad token nor an EOS token: set one "
            "(tokenizer.pad_token = ...) before training"
        )
    warnings.warn(
        f"tokenizer has no pad token; using its EOS token {tokenizer.eos_token!r} for padding",
        stacklevel=2,
    )
    tokenizer.pad_token = tokenizer.eos_token


def resolve_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """``"auto"`` -> bfloat16 on CUDA, float32 elsewhere; ``"bf16"``/``"fp32"`` explicit.

    >>> resolve_dtype("auto", "cpu")
    torch.float32
    """
    device = torch.device(device)
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp32": torch.float32,
        "float32": torch.float32,
        "fp16": torch.float16,
    }
    if precision not in table:
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    return table[precision]


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model_source(name_or_path: str) -> tuple[str, bool]:
    """``(name, is_local)`` for ``--model``, checked without touching the network.

    An existing folder must hold a ``config.json``. A name that can only be a path
    (absolute, ``./``, ``~``, more than one ``/``, or ``org/name`` whose ``org`` is a local
    folder) must exist. Anything else is a hub id (refused when ``HF_HUB_OFFLINE`` is set).

    >>> resolve_model_source("Qwen/Qwen3-1.7B")
    ('Qwen/Qwen3-1.7B', False)
    >>> resolve_model_source("/no/such/model")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: --model /no/such/model: no such folder ...
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"--model must be a folder or a hub id, got {name_or_path!r}")
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise FileNotFoundError(
                f"--model {name_or_path}: {p} is not a model folder (no config.json in it)"
            )
        return str(p), True
    head = name_or_path.split("/")[0]
    if not _HUB_ID.match(name_or_path) or ("/" in name_or_path and Path(head).is_dir()):
        raise FileNotFoundError(
            f"--model {name_or_path}: no such folder (and not a hub id of the form org/name)"
        )
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise FileNotFoundError(
            f"--model {name_or_path}: no such local folder, and HF_HUB_OFFLINE is set"
        )
    return name_or_path, False


def load_tokenizer(name_or_path: str):
    """The tokenizer of ``--model`` (a local folder never contacts the hub)."""
    from transformers import AutoTokenizer

    name, local = resolve_model_source(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local)
    ensure_pad_token(tokenizer)
    return tokenizer


def load_model_config(name_or_path: str):
    """The model's ``transformers`` config (cheap: no weights)."""
    from transformers import AutoConfig

    name, local = resolve_model_source(name_or_path)
    return AutoConfig.from_pretrained(name, local_files_only=local)


def load_model_and_tokenizer(name_or_path: str, *, dtype=torch.float32, device="cpu"):
    """Load a causal LM and its tokenizer with ``transformers`` (local path or hub id; a
    local folder is read with ``local_files_only``, see :func:`resolve_model_source`)."""
    from transformers import AutoModelForCausalLM

    name, local = resolve_model_source(name_or_path)
    tokenizer = load_tokenizer(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=local)
    get_lm_head(model)
    get_body(model)
    return model.to(device), tokenizer


def apply_lora(
    model, r: int = 64, alpha: int = 128, dropout: float = 0.0, target_modules=LORA_TARGET_MODULES
):
    """Wrap ``model`` with a LoRA adapter (``peft``; install the ``[lora]`` extra).

    Defaults follow the method: r=64, alpha=128 on q,k,v,o,gate,up,down projections.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError(
            "LoRA needs the 'peft' package: pip install 'opsd-kernels[lora]' (or pip install peft)"
        ) from e
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def apply_liger(model) -> None:
    """Patch the model's RMSNorm, RoPE and SwiGLU with Liger kernels (CUDA only; the loss
    stays ours: Liger's cross-entropy patches are turned off)."""
    if not torch.cuda.is_available():
        raise RuntimeError("--liger needs a CUDA device")
    try:
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance
    except ImportError as e:
        raise ImportError("--liger needs the 'liger-kernel' package") from e
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _apply_liger_kernel_to_instance(
        model=base, cross_entropy=False, fused_linear_cross_entropy=False
    )


def prepare_model(
    model,
    *,
    lora: bool = False,
    lora_r: int = 64,
    lora_alpha: int = 128,
    lora_dropout: float = 0.0,
    lora_targets=LORA_TARGET_MODULES,
    gradient_checkpointing: bool = False,
    liger: bool = False,
):
    """Apply the optional pieces in a safe order and return the (possibly wrapped) model."""
    get_lm_head(model)
    get_body(model)
    if liger:
        apply_liger(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora:
        model = apply_lora(
            model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=lora_targets
        )
    return model
