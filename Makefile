# canvas-jobs: the front door. `make help` lists the targets; CI calls `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
MEMBERS := libs/events libs/store services/gateway services/job-orchestrator services/ai-generator services/fake-openai services/notifier clients/cli
PYPROJECTS := $(addsuffix /pyproject.toml,$(MEMBERS))
PYTEST_ARGS ?=
# pytest processes of make test (pytest-xdist), each taking whole test files, so that a
# module's running system is started once. Most of the suite's time is spent waiting
# (on servers, processes and deadlines): two took 742 s where one took 1,160 on this
# two-core machine, beside the same other work. PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2
# The project's own sources the services and the CLI import (the tests' are pytest's).
COMPILED := libs services clients tools

.PHONY: help install lock test lint format dev bench bench-notifier chaos token dlq browser require-browser promtool require-promtool clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-15s %s\n", $$1, $$2}'

$(BIN)/uv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"

# The stamp is remade whenever the lock or a member's pyproject changes. Bytecode is
# compiled here: where PYTHONDONTWRITEBYTECODE is set (as on CI machines) nothing else
# would write it, and every process would compile its imports from source again (a
# generator started in 3.6 s of CPU instead of 1.5; the suite starts hundreds).
$(VENV)/.installed: requirements.lock $(PYPROJECTS) | $(BIN)/uv
	$(BIN)/uv pip sync --quiet --compile-bytecode --python $(BIN)/python requirements.lock
	touch $@

install: $(VENV)/.installed ## create .venv from the pinned lock, every member editable

lock: | $(BIN)/uv ## re-pin requirements.lock from requirements.in
	$(BIN)/uv pip compile --quiet --python-version 3.11 requirements.in -o requirements.lock

test: require-browser require-promtool install lint ## lint, then the whole suite on the real PostgreSQL and RabbitMQ (or containers)
	$(BIN)/python -m tests.preflight  # where PostgreSQL and RabbitMQ come from, or why none
	$(BIN)/python -m compileall -q $(COMPILED)  # the members are editable: their bytecode too
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: install ## ruff check and format check, mypy strict
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install ## apply ruff's formatting and safe fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

dev: install ## run the four services (and the stand-in model without OPENAI_API_KEY) in the foreground
	$(BIN)/python -m tools.dev

bench: install ## end-to-end benchmark on real processes (SCENARIO=idle|0ms|1000ms|0ms-nostream|10s|history|orchestrators|fair|budget|all, JOBS=N, QUEUE_TYPE=quorum|classic)
	$(BIN)/python -m bench.e2e --scenario $(or $(SCENARIO),all) $(if $(JOBS),--jobs $(JOBS),) $(if $(QUEUE_TYPE),--queue-type $(QUEUE_TYPE),)

bench-notifier: install ## WebSocket fan-out on one notifier process (ARGS="--clients 5000 --rate 1000 --seconds 30")
	$(BIN)/python -m bench.notifier $(ARGS)

chaos: install ## soak: two of each service, a random fault every few seconds (MINUTES=10 RATE=3 SEED=n)
	$(BIN)/python -m tests.faults.chaos --minutes $(or $(MINUTES),10) --rate $(or $(RATE),3) $(if $(SEED),--seed $(SEED),)

token: install ## print a development token: make token [USER_ID=alice] [ADMIN=1]
	@CANVAS_ENV=$${CANVAS_ENV:-development} $(BIN)/canvas-gateway token --user "$(or $(USER_ID),dev-user)" $(if $(ADMIN),--admin,)

dlq: install ## dead letters: make dlq ARGS="list" (or "replay ID...", "drop --all --yes"; --help)
	$(BIN)/canvas-orchestrator dlq $(or $(ARGS),list)

# $(call debian_tool,COMMAND,PACKAGE,TARGET): install Debian's PACKAGE (as root) unless
# COMMAND is on PATH already.
define debian_tool
	@if command -v $(1) >/dev/null; then echo "$(3): $$(command -v $(1))"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(2); \
	else echo "make $(3): $(1) is missing and installing it needs root:" \
	  "sudo apt-get install $(2)" >&2; exit 1; fi
endef

# $(call require_tool,COMMAND,TARGET,WHO): fail at once, saying how to get COMMAND.
define require_tool
	@command -v $(1) >/dev/null || { echo "make test: $(1) is missing; $(3)" \
	  "need it: run 'make $(2)' as root" >&2; exit 1; }
endef

browser: ## install Debian's chromium for the page's tests (apt-get, as root), unless it is there
	$(call debian_tool,chromium,chromium,browser)

promtool: ## install Debian's prometheus package for promtool (the rules' check), unless it is there
	$(call debian_tool,promtool,prometheus,promtool)

# First of `make test`'s steps: those tests never skip, so say at once what is missing.
require-browser:
	$(call require_tool,chromium,browser,the page's tests (tests/e2e/test_page.py))

require-promtool:
	$(call require_tool,promtool,promtool,the Prometheus rules' tests (tests/deploy/test_prometheus_rules.py))

clean: ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
