# One command each: `make demo` sets up and runs the demo; `make test` sets up and runs every test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-newer-python lint typecheck check bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/koban demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) lint typecheck
	$(BIN)/pytest
	$(MAKE) test-newer-python

# The conformance suite (every engine, every outcome) again on the newest Python 3.12+ found:
# job tasks start eagerly there (src/koban/runtime/producer.py). NEWER_PYTHON picks another.
PYENV_VERSIONS := $(or $(PYENV_ROOT),$(HOME)/.pyenv)/versions
NEWER_PYTHON ?= $(lastword $(sort $(wildcard $(PYENV_VERSIONS)/3.1[2-9]*/bin/python)))
NEWER_VENV := .venv-newer
NEWER_STAMP := $(NEWER_VENV)/.installed

$(NEWER_STAMP): pyproject.toml
	@test -n "$(NEWER_PYTHON)" || { echo "make test: no Python 3.12 or newer found under $(PYENV_VERSIONS); set NEWER_PYTHON=/path/to/python3.12 (the conformance suite also runs on it)"; exit 1; }
	$(NEWER_PYTHON) -m venv $(NEWER_VENV)
	$(NEWER_VENV)/bin/pip install --quiet --upgrade pip
	$(NEWER_VENV)/bin/pip install --quiet -e '.[test]'
	touch $(NEWER_STAMP)

test-newer-python: $(NEWER_STAMP)
	$(NEWER_VENV)/bin/python -VV
	$(NEWER_VENV)/bin/python -m pytest -p no:cacheprovider tests/conformance

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) $(NEWER_VENV) .pytest_cache .mypy_cache .ruff_cache
