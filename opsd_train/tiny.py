"""The code-built tokenizer and tiny Qwen3-architecture model of the embedded default.

Nothing is downloaded: the vocabulary is built from the synthetic problems and prompt
templates, the model from a :class:`transformers.Qwen3Config` with random weights.

The tokenizer splits text into words (with their leading space), single digits and single
punctuation marks, and decodes by plain concatenation, so ``decode(encode(s)) == s`` for
any text made of known words.

>>> tok = build_tokenizer()
>>> s = "Ann has 12 pens. The answer is \\\\boxed{12}."
>>> tok.decode(tok(s)["input_ids"]) == s
True
>>> tok.pad_token, tok.eos_token
('<|endoftext|>', '<|im_end|>')
"""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from .data import ITEMS, NAMES, synthetic_problems
from .prompts import DEFAULT_STUDENT_TEMPLATE, DEFAULT_TEACHER_TEMPLATE

__all__ = ["build_tokenizer", "build_tiny_model", "TINY_MODEL_DEFAULTS", "CHAT_TEMPLATE"]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]
SPLIT_PATTERN = r" ?[A-Za-z]+| ?[0-9]| ?[^A-Za-z0-9\s]|\s"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus() -> list[str]:
    texts = [DEFAULT_STUDENT_TEMPLATE, DEFAULT_TEACHER_TEMPLATE, "user assistant system"]
    texts += [" ".join(NAMES), " ".join(ITEMS)]
    for p in synthetic_problems(2000, seed=12345):
        texts += [p.question, p.solution]
    return texts


def build_tokenizer(extra_texts: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer for the synthetic task, with a chat template.

    The vocabulary holds the special tokens, every printable ASCII character (with and
    without a leading space) and each word found in the synthetic problems, the default
    prompt templates and ``extra_texts``. Words outside it become ``<|unk|>``.
    ``<|endoftext|>`` pads; ``<|im_end|>`` ends a turn (EOS).
    """
    import re

    vocab: dict[str, int] = {}

    def add(tok: str) -> None:
        if tok not in vocab:
            vocab[tok] = len(vocab)

    for t in SPECIAL_TOKENS:
        add(t)
    for ch in string.printable:
        add(ch)
        if not ch.isspace():
            add(" " + ch)
    pat = re.compile(SPLIT_PATTERN)
    for text in _corpus() + list(extra_texts or []):
        for piece in pat.findall(text):
            add(piece)
            if piece.strip() and len(piece.strip()) > 1:
                add(piece.strip())
                add(" " + piece.strip())
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|unk|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


TINY_MODEL_DEFAULTS = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)


def build_tiny_model(tokenizer, seed: int = 0, **overrides) -> Qwen3ForCausalLM:
    """A randomly initialised tiny :class:`~transformers.Qwen3ForCausalLM` whose
    vocabulary matches ``tokenizer`` (``overrides`` change :data:`TINY_MODEL_DEFAULTS`)."""
    cfg = dict(TINY_MODEL_DEFAULTS)
    cfg.update(overrides)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **cfg,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model
