# Two entry points: `make run` serves calls, `make test` runs the checks. Each sets up .venv.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# setuptools as the build backend pyproject names, new enough (>=70.1) to build a wheel
# without the `wheel` package: tests/test_image.py builds the package offline with it.
$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 'setuptools>=70.1'
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

.PHONY: run test lint bench
run: $(STAMP)
	$(BIN)/python -m app serve

# pytest-xdist: 4 workers on 2 cores, so the real-time tests (subprocesses, redis, the
# image build) wait beside each other while the virtual-time ones use the CPU.
test: $(STAMP)
	$(BIN)/ruff check app tests bench examples
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache --no-logo
	$(BIN)/pytest -q -n 4

bench: $(STAMP)
	$(BIN)/python -m bench.relay
