# segjml: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install segjml (editable) with the dev extra, once

demo: $(STAMP) ## Train the demo (synthetic data, CPU, a few minutes)
	$(PY) train.py experiment=demo

test: $(STAMP) ## Run the test suite (every non-slow test)
	$(PY) -m pytest -q

test-slow: $(STAMP) ## Run only the slow tests (multi-process, large models)
	$(PY) -m pytest -q -m slow

LINTED := segjml tests scripts train.py eval.py predict.py export.py
lint: $(STAMP) ## Lint and check formatting with ruff (the same as the pre-commit hooks)
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)

models: $(STAMP) ## Print the model table (parameters vs paper Table 9)
	$(PY) -m segjml.models

bench: $(STAMP) ## Run the benchmarks (losses, metrics)
	$(PY) -m segjml.bench losses
	$(PY) -m segjml.bench metrics

gpu-check: $(STAMP) ## On a CUDA machine: the cuda tests, then the speed card (bench train, losses), < 8 min; else one line
	$(PY) -m segjml.gpu_check

TABLES ?= all
LAUNCHER ?= local
ARGS ?=
reproduce: $(STAMP) ## Train the paper's tables (TABLES=2,4 LAUNCHER=submitit_slurm DRY_RUN=1 ARGS="k=v ...") and build tables/figures
	$(PY) scripts/reproduce.py --tables $(TABLES) --launcher $(LAUNCHER) $(if $(DRY_RUN),--dry-run) -- $(ARGS)

reproduce-smoke: $(STAMP) ## The same pipeline on synthetic data with a tiny model (CPU, < 10 min): tables + figures
	$(PY) scripts/reproduce.py --smoke --launcher inprocess -- $(ARGS)

JOBS ?= 2
claims: $(STAMP) ## The paper's claims at the demo's scale: 6 losses x 3 seeds + BLS eps sweeps (2 CPU cores, ~30 min)
	$(PY) scripts/reproduce.py --claims --launcher local --jobs $(JOBS) -- $(ARGS)

tables: $(STAMP) ## Rebuild the tables from the finished runs (TABLES=...)
	$(PY) scripts/make_tables.py --tables $(TABLES) -- $(ARGS)

clean: ## Remove outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache

.PHONY: help install demo test test-slow lint models bench gpu-check reproduce reproduce-smoke claims tables clean
