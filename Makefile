# The README's two commands: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest install clean

# Reinstall when the packages change too: the editable install maps each top-level package.
PACKAGES := $(wildcard */__init__.py)

$(STAMP): pyproject.toml $(PACKAGES)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned to the CPU build in pyproject.toml; install it first so no CUDA build is resolved.
	# --no-compile: pip would byte-compile all ~16,500 .py files of the dependencies (~55 s of
	# CPU on a fresh machine); Python compiles the few thousand a run imports when it does.
	$(BIN)/python -m pip install --quiet --no-compile "torch==2.13.0"
	$(BIN)/python -m pip install --quiet --no-compile -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

# The whole subnet on this machine: ledger, 2 validators, 4 miners, a few minutes on 2 cores.
demo: $(STAMP)
	$(BIN)/tensormine subnet up --config configs/demo.yaml

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache .hypothesis
