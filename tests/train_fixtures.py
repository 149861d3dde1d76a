"""Shared fixtures for the opsd_train tests: a tiny Qwen3 model and the code-built
tokenizer, saved to a temp folder and loaded back by path (no hub access)."""

from __future__ import annotations

import pytest
import torch

TINY_TEST_MODEL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=256,
)


def small_config(**overrides):
    """A TrainConfig for a few quick steps on the tiny model (no evaluation, no progress
    bar, seed 1); ``overrides`` replace any field."""
    from opsd_train.recipes import TrainConfig

    base = dict(
        algo="opsd",
        steps=4,
        batch_size=4,
        lr=1e-2,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=6,
        clip=None,
        progress=False,
        eval_at_start=False,
        eval_at_end=False,
        seed=1,
    )
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Folder holding a saved tiny Qwen3ForCausalLM + tokenizer (random weights)."""
    from opsd_train.tiny import build_tiny_model, build_tokenizer

    path = tmp_path_factory.mktemp("tiny_qwen3")
    tok = build_tokenizer()
    model = build_tiny_model(tok, seed=0, **TINY_TEST_MODEL)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def tiny(tiny_dir):
    """``(model, tokenizer)`` loaded by path, float32, on CPU, fresh for each test."""
    from opsd_train.modeling import load_model, load_tokenizer

    torch.manual_seed(0)
    return load_model(str(tiny_dir), dtype=torch.float32), load_tokenizer(str(tiny_dir))


@pytest.fixture(scope="session")
def problems():
    """A small seeded synthetic train/held-out split."""
    from opsd_train.data import synthetic_split

    return synthetic_split(n_train=24, n_eval=6, seed=3)
