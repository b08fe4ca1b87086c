# Two entry points, each installing what it needs from scratch into .venv:
#   make demo   trains a small Pilot + Copilot and prints Pilot vs fused accuracy
#   make test   lint + the test suite
VENV ?= .venv
PYTHON ?= python3
# torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build on CPU machines.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: install demo test lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/hf-copilot demo

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest
