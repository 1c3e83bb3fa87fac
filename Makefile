# batchops — the two commands a new user needs: `make up` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: up up-scaled test install lint format bench bench-scale clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

## Start the whole system on the embedded default (an embedded PostgreSQL under .data/ holding
## the Prefect server's database and the store; the Prefect server, one batchops worker and the
## API) and run the demo batch through the CLI. Ctrl-C stops everything.
up: $(STAMP)
	$(BIN)/batchops up

## The same code on production backends, on this machine (local PostgreSQL and Redis): 2 Prefect
## API servers + services on PostgreSQL with prefect-redis, 2 workers on the 'batchops' work
## pool, 2 batchops APIs on :8000 and :8001. See docs/scaling.md. Ctrl-C stops everything.
up-scaled: $(STAMP)
	$(BIN)/batchops up --scaled

## Run the whole test suite (starts PostgreSQL and Redis if they are stopped): three pytest
## workers, longest files first (tests/conftest.py), then alone the tests that restart
## PostgreSQL or stop Redis.
test: $(STAMP)
	$(BIN)/pytest -q -n 3 --dist loadfile --no-loadscope-reorder -m "not disruptive"
	$(BIN)/pytest -q -m disruptive

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench.sql_target

bench-scale: $(STAMP)
	$(BIN)/python -m bench.scale

clean:
	rm -rf .data .pytest_cache .mypy_cache .ruff_cache
