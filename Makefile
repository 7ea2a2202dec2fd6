# edge-agent: the two commands a new user needs are `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test lint typecheck unit demo bench clean

setup:
	@scripts/bootstrap

## Everything CI runs: lint, type check, the whole test suite.
test: setup lint typecheck unit

lint: setup
	$(VENV)/bin/ruff check agent tests bench
	$(VENV)/bin/ruff format --check agent

typecheck: setup
	$(VENV)/bin/mypy

unit: setup
	$(PY) -m pytest

## A local demonstration: private broker, agent, a deployment converging.
demo: setup
	$(VENV)/bin/edge-agent demo

bench: setup
	$(PY) bench/convergence.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
