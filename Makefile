# make help: list targets. Every target creates .venv on first use (CPU torch first, then the project).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
ifeq ($(origin OMP_NUM_THREADS),undefined)
THREADS_FROM_MAKE := 1
endif
export OMP_NUM_THREADS ?= 1
# The GPU check machine: `python3` there holds torch (no venv is made); see benchmarks/gpu_check.py
GPU_PY ?= python3
# Three workers on 2 cores: most tests run one single-threaded training process, and the Slurm and server tests
# mostly wait (requeues, polls, server starts), which a third worker fills (measured: 500 s against 542 s with
# two). Slurm tests share one local cluster and stay on one worker (xdist_group, tests/conftest.py).
PYTEST_ARGS ?= -n 3 --dist loadgroup

.PHONY: help venv train test test-fast lint format bench gpu-wheels gpu-check clean

help:  ## show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0   # the CPU wheel first: a bare torch would pull CUDA
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed  ## create/update .venv (idempotent)

train: venv  ## run the default recipe (tiny VLM, SFT -> GRPO -> evaluate, CPU, < 10 min)
	$(PY) train.py $(ARGS)

test: venv  ## the whole test suite (CPU, 9-11 min on 2 cores)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv  ## units, composition, validation: nothing trains (< 2 min)
	$(PY) -m pytest -m "not slow and not slurm" $(PYTEST_ARGS)

lint: venv  ## ruff check + format check
	$(VENV)/bin/ruff check src tests benchmarks train.py
	$(VENV)/bin/ruff format --check src tests benchmarks train.py

format: venv  ## ruff fix + format
	$(VENV)/bin/ruff check --fix src tests benchmarks train.py
	$(VENV)/bin/ruff format src tests benchmarks train.py

bench: venv  ## the quickstart benchmark (benchmarks/README.md)
	$(PY) benchmarks/quickstart.py

gpu-wheels: venv  ## download what the GPU check machine lacks into .whl/ (git-ignored, ~9 MB)
	$(PY) benchmarks/gpu_check.py --fetch-wheels

gpu-check:  ## issue 9's GPU check on one GPU, <= 10 min, offline (benchmarks/gpu_check.py; ARGS=--cpu here)
	$(if $(THREADS_FROM_MAKE),env -u OMP_NUM_THREADS) $(GPU_PY) benchmarks/gpu_check.py $(ARGS)

clean:  ## remove run dirs and caches (not .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache
