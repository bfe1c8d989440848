# `make demo` and `make test` work on a fresh machine: they create .venv first.
# CPU machines take the CPU build of torch; on a GPU machine: make setup TORCH_SPEC=torch
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/activate
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test,bench]"

# The main job: grokking x*y mod 97, baseline against Grokfast EMA and MA (a few minutes on 2 cores).
demo: setup
	$(BIN)/python benchmarks/grokking.py

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/optimizer_step.py
	$(BIN)/python benchmarks/grokking.py

clean:
	rm -rf $(VENV) lightning_logs .pytest_cache
