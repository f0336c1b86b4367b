# The two entry points of the README: `make up` and `make test`.
SHELL := /bin/sh
PYTHON ?= /usr/bin/python3
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: up test setup lint proto bench clean-venv

# exec: capsa is make's own child, so a SIGTERM to make (which forwards it) reaches capsa.
up: setup
	exec $(VENV)/bin/capsa up

test: $(VENV)/.test-deps
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

setup: host-packages $(VENV)/.deps

lint: $(VENV)/.test-deps
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

# The benchmark suite (bench/README.md); BENCH_ARGS=--smoke for tiny counts.
bench: $(VENV)/.test-deps
	$(VENV)/bin/python -m bench $(BENCH_ARGS)

# Regenerates the CRI stubs from capsa's own subset of api.proto.
proto: $(VENV)/.test-deps
	$(VENV)/bin/python -m capsa.cri.proto.generate

host-packages:
	@tools/install-host-packages

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: pyproject.toml | host-packages $(VENV)/bin/python
	$(VENV)/bin/pip install -q -e .
	touch $@

$(VENV)/.test-deps: $(VENV)/.deps
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

clean-venv:
	rm -rf $(VENV)
