# batchops — the two commands a new user needs: `make up` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: up test install lint format bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

## Start the whole system on the embedded default (Prefect server on SQLite, store on SQLite
## under .data/) and run the demo batch through the CLI. Ctrl-C stops everything.
up: $(STAMP)
	$(BIN)/batchops up

## Run the whole test suite (starts PostgreSQL and Redis if they are stopped).
test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench.sql_target

clean:
	rm -rf .data .pytest_cache .mypy_cache .ruff_cache
