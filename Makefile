# Everyday commands. `make setup` once, then the others.
PY ?= .venv/bin/python

.PHONY: setup test test-fast lint format bench demo gpu-check

setup:            ## virtualenv with CPU torch first, then the project and its test extras
	bash .ci/run --setup-only

test:             ## the whole suite, exactly as CI runs it
	$(PY) -m pytest

test-fast:        ## skip the slow cases
	$(PY) -m pytest -m "not slow" -x -q

lint:             ## ruff lint + format check (what pre-commit enforces)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:           ## apply ruff's fixes and formatting
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench:            ## memory/speed/precision reports into bench/results/
	$(PY) -m pytest bench/

demo:             ## the embedded default training run (CPU, no downloads)
	bash .ci/run --demo

gpu-check:        ## the one-call GPU script (on a machine with a CUDA GPU)
	bash bench/gpu_check.sh
