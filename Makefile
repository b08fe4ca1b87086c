# Two entry points, each installing what it needs from scratch into .venv:
#   make demo   trains a small Pilot + Copilot and prints Pilot vs fused accuracy
#   make test   lint + the test suite, on the newest transformers and on the oldest supported
VENV ?= .venv
PYTHON ?= python3
# torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build on CPU machines.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
# The oldest transformers supported (it passed the cache to forward() as `past_key_values`): `make test` runs
# the suite there too, in its own environment.
TRANSFORMERS_FLOOR ?= transformers==5.23.0
FLOOR_VENV ?= .venv-floor

.PHONY: install demo test lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

$(FLOOR_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(FLOOR_VENV)/bin/python -m pip install --quiet -e ".[dev]" "$(TRANSFORMERS_FLOOR)"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/hf-copilot demo

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint $(FLOOR_VENV)/.installed
	$(PY) -m pytest
	$(FLOOR_VENV)/bin/python -m pytest
