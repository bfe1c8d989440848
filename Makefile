# `make demo` and `make test` work on a fresh machine: they create .venv first (once; `make clean` starts over).
# CPU machines take the CPU build of torch; on a GPU machine: make setup TORCH_SPEC=torch
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: setup demo test bench clean

# pip prints its progress: the first set-up downloads torch and takes a few minutes.
$(INSTALLED): pyproject.toml
	@echo "== setting up $(VENV) with $(TORCH_SPEC) and this package (first run only: a few minutes)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[test,bench]"
	touch $@

setup: $(INSTALLED)

# The main job: x*y mod 97, Grokfast EMA until 95% validation accuracy, then the baseline for as many
# steps (a few minutes on 2 cores, a progress line every 100 steps). Writes runs/grokking/<time>/.
demo: setup
	$(BIN)/python benchmarks/grokking.py

test: setup
	$(BIN)/python -m pytest -q

# Benchmarks whose results the README quotes: they rewrite benchmarks/results/.
bench: setup
	$(BIN)/python benchmarks/optimizer_step.py
	$(BIN)/python benchmarks/grokking.py --methods grokfast-ema grokfast-ma --publish

clean:
	rm -rf $(VENV) lightning_logs runs .pytest_cache
