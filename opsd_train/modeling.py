"""Loading ``--model``: a local folder, a hub id, or a GGUF file (dequantised by
transformers with the ``gguf`` package and re-saved as a folder, which TRL's trainers
need to rebuild the fixed teacher); the LoRA adapter config."""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = [
    "LORA_TARGET_MODULES",
    "resolve_model_source",
    "load_tokenizer",
    "load_model_config",
    "materialize_gguf",
    "load_model",
    "lora_config",
]

LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model_source(name_or_path: str) -> tuple[str, bool]:
    """``(name, is_local)`` for ``--model``, checked without touching the network.

    An existing folder must hold a ``config.json``; an existing ``.gguf`` file is accepted.
    A name that can only be a path (absolute, ``./``, ``~``, more than one ``/``) must
    exist. Anything else is a hub id (refused when ``HF_HUB_OFFLINE`` is set).

    >>> resolve_model_source("Qwen/Qwen3-1.7B")
    ('Qwen/Qwen3-1.7B', False)
    >>> resolve_model_source("/no/such/model")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: --model /no/such/model: no such folder ...
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(
            f"--model must be a folder, a .gguf file or a hub id, got {name_or_path!r}"
        )
    p = Path(name_or_path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return str(p), True
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise FileNotFoundError(
                f"--model {name_or_path}: {p} is not a model folder (no config.json) nor a "
                ".gguf file"
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


def _gguf_kwargs(name: str) -> tuple[str, dict]:
    p = Path(name)
    if p.suffix == ".gguf":
        return str(p.parent), {"gguf_file": p.name}
    return name, {}


def load_tokenizer(name_or_path: str):
    """The tokenizer of ``--model`` (a pad token set to EOS when it has none)."""
    from transformers import AutoTokenizer

    name, local = resolve_model_source(name_or_path)
    where, kw = _gguf_kwargs(name)
    tok = AutoTokenizer.from_pretrained(where, local_files_only=local, **kw)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model_config(name_or_path: str):
    """The model's config (for a GGUF file: read from its metadata; no weights)."""
    from transformers import AutoConfig

    name, local = resolve_model_source(name_or_path)
    where, kw = _gguf_kwargs(name)
    return AutoConfig.from_pretrained(where, local_files_only=local, **kw)


def materialize_gguf(path: str, folder: str | Path) -> str:
    """Dequantise the GGUF file ``path`` into a transformers folder ``folder`` (once: an
    existing folder with a ``config.json`` is reused); returns the folder.

    The weights are those of the file (e.g. Q4_1 dequantised to float32), not the
    original checkpoint's."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        where, kw = _gguf_kwargs(path)
        loaded = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kw)
        # transformers marks it quantised (not serialisable) although the weights are plain
        # float32 now: save a fresh model of the same config with those weights
        config = loaded.config
        config.__dict__.pop("quantization_config", None)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(folder)
        load_tokenizer(path).save_pretrained(folder)
    return str(folder)


def load_model(name_or_path: str, dtype=None):
    """The causal LM of ``--model`` (folder or hub id)."""
    from transformers import AutoModelForCausalLM

    name, local = resolve_model_source(name_or_path)
    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=local)


def lora_config(r: int = 64, alpha: int = 128, dropout: float = 0.0):
    """The method's LoRA adapter (r 64, alpha 128 on q,k,v,o,gate,up,down), as a ``peft``
    config for the TRL trainers' ``peft_config``."""
    try:
        from peft import LoraConfig
    except ImportError as e:
        raise ImportError("--lora needs the 'peft' package: pip install peft") from e
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(LORA_TARGET_MODULES),
        task_type="CAUSAL_LM",
    )
