# The README's two commands: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Let Python cache bytecode. Some CI images and sandboxes set PYTHONDONTWRITEBYTECODE; with
# pip's --no-compile below the dependencies would then have no .pyc at all and every process
# would compile torch, transformers and hivemind from source again: 23 s of CPU instead of
# 8 s to import a miner, for each of the ~100 processes the tests and the demo start. Unset,
# the first import of a module writes its cache and the rest read it.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test lint typecheck pytest install clean

# Reinstall when the packages change too: the editable install maps each top-level package.
PACKAGES := $(wildcard */__init__.py)

$(STAMP): pyproject.toml $(PACKAGES)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned to the CPU build in pyproject.toml; install it first so no CUDA build is resolved.
	# --no-compile: pip would byte-compile all ~16,500 .py files of the dependencies (~55 s of
	# CPU on a fresh machine); Python compiles the few thousand a run imports, once (see above).
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
