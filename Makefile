# One entry point for everything a developer or CI does. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STACK  := stack/stack.sh

.PHONY: help venv up down status test unit lint run bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml setup.py dataflow/core/_native.c
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if (3, 11) <= v < (3, 13) else "need Python 3.11 or 3.12 (bytewax 0.21.1 has no 3.13 wheels); set PYTHON=python3.12")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

venv: $(VENV)/.installed  ## create or update the virtualenv

up:  ## start Kafka, Redis, OpenSearch and Prometheus on 127.0.0.1 (installs on first use)
	@$(STACK) up

down:  ## stop the local stack (data is kept under .stack/)
	@$(STACK) down

status:  ## show what is running and where its log is
	@$(STACK) status

test: venv up lint  ## lint, then the whole suite against the real services
	$(PY) -m pytest

unit: venv  ## the tests that need no services and no external binaries
	$(PY) -m pytest -m "not integration and not external"

lint: venv  ## ruff (lint and format) and mypy --strict
	$(PY) -m ruff check dataflow tests bench setup.py
	$(PY) -m ruff format --check dataflow tests bench setup.py
	$(PY) -m mypy

run: venv up  ## demo: stack up, demo events in, pipeline run, features out
	$(PY) -m dataflow.tools.demo

bench: venv up  ## benchmarks (figures go to docs/benchmarks.md by hand)
	$(PY) bench/pipeline_throughput.py

clean:  ## remove the virtualenv and the local stack's data (keeps downloads)
	@$(STACK) down || true
	rm -rf $(VENV) .stack/data .stack/logs .recovery
