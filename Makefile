# edge-agent: the two commands a new user needs are `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test check lint typecheck unit integration e2e demo bench clean

## Test processes (pytest-xdist): PYTEST_WORKERS=auto for one per core, 0 for one
## process. A test file runs whole in one worker (--dist loadfile: its module-scoped
## servers and packages are made once); every worker has its own brokers, PostgreSQL
## clusters and temporary directories.
PYTEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile

setup:
	@scripts/bootstrap

## Everything CI runs: lint, type check, the whole test suite (unit, integration, e2e).
test: setup lint typecheck
	$(PYTEST)

## The inner loop (under a minute): lint, type check, unit tests.
check: setup lint typecheck unit

lint: setup
	$(VENV)/bin/ruff check agent tests bench
	$(VENV)/bin/ruff format --check agent tests bench

typecheck: setup
	$(VENV)/bin/mypy

unit: setup
	$(PY) -m pytest tests/unit

integration: setup
	$(PYTEST) tests/integration

e2e: setup
	$(PYTEST) tests/e2e

## A local demonstration: private broker, the server (console URL printed), a simulated
## fleet, a phased deployment converging, a command, an abort (`make demo DEMO_ARGS=--keep`
## stays up until Ctrl-C).
demo: setup
	$(VENV)/bin/edge-agent demo $(DEMO_ARGS)

bench: setup
	$(PY) bench/convergence.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
