# meterline developer commands. `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
BUF_VERSION := 1.75.0
BUF    := build/buf/node_modules/.bin/buf

.DEFAULT_GOAL := help
.PHONY: help install up test lint proto check-proto buf check bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(BIN)/meterline: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

install: $(BIN)/meterline ## create .venv and install meterline with its dev tools

up: install ## run everything on this machine: embedded Kafka (Tansu) and ClickHouse (chDB)
	$(BIN)/meterline up

test: install ## run the test suite (real Tansu broker and chDB)
	$(BIN)/pytest

lint: install ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

proto: install ## regenerate meterline/v1 from protos/
	$(BIN)/python scripts/gen_protos.py

check-proto: proto ## fail if the generated code is stale
	@git diff --exit-code --stat -- meterline/v1 || \
	  (echo "meterline/v1 is stale: run 'make proto' and commit the result" >&2; exit 1)
	@test -z "$$(git status --porcelain -- meterline/v1)" || \
	  (echo "untracked generated files in meterline/v1: run 'make proto' and commit" >&2; exit 1)

$(BUF):
	npm install --silent --no-audit --no-fund --prefix build/buf @bufbuild/buf@$(BUF_VERSION)

buf: $(BUF) ## buf lint and buf format on protos/
	$(BUF) lint
	$(BUF) format --diff --exit-code

check: lint buf check-proto ## everything CI checks before the tests

bench: install ## benchmarks (by hand; results go in bench/RESULTS.md)
	$(BIN)/python bench/pipeline_throughput.py
	$(BIN)/python bench/ingest_throughput.py

clean: ## remove the venv, build files and local data
	rm -rf $(VENV) build meterline-data
