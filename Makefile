# recstack developer commands. `make` lists them; see README.md for the two-command set-up.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

PYTHON      ?= python3
UV_VERSION  := 0.13.9
VENV        := .venv
VENV_PY     := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
PROTO       := proto/recstack/v1/ranking.proto
STUBS       := recstack/v1/ranking_pb2.py recstack/v1/ranking_pb2.pyi recstack/v1/ranking_pb2_grpc.py
PY_DIRS     := $(wildcard recstack services feature_store models loadtests tests infra)
DUP_DIRS    := $(wildcard recstack services feature_store models loadtests benchmarks infra tests)
PYTEST_ARGS ?=
RERUNS      ?= 1
TESTS       ?= tests
KEEP        ?= 0
FUZZ_SECONDS ?= 300

# uv installs everything; `make install` bootstraps the pinned version into $(PYTHON) if it is missing.
UV = $(PYTHON) -m uv

.PHONY: help install tools lock proto up down status test demo chaos lint duplicates clean fuzz

help: ## list the targets
	@echo "recstack make targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  \1\t\2/' | expand -t 12
	@echo
	@echo "variables: TESTS=tests/unit PYTEST_ARGS='-k name' (test), KEEP=1 (demo: keep services running),"
	@echo "           CHAOS_ARGS='--faults consumer-kill,redis-restart --quick' (chaos),"
	@echo "           FUZZ_SECONDS=300 (fuzz),"
	@echo "           RECSTACK_KAFKA_PORT, RECSTACK_REDIS_PORT, RECSTACK_RUN_DIR (up/down/test/demo)"

install: $(STAMP) proto ## create .venv/ and install the project with its locked dependencies
	@echo "==> install: ready ($(VENV)/bin/recstack)"

$(STAMP): pyproject.toml constraints.txt
	@echo "==> install: environment in $(VENV)/ (locked by constraints.txt)"
	@$(UV) --version >/dev/null 2>&1 || { \
		echo "==> install: bootstrapping uv $(UV_VERSION) into $(PYTHON)"; \
		$(PYTHON) -m pip install --quiet "uv==$(UV_VERSION)" 2>/dev/null || \
		$(PYTHON) -m pip install --quiet --user --break-system-packages "uv==$(UV_VERSION)"; }
	@[ -x $(VENV_PY) ] || $(UV) venv --quiet $(VENV) --python $$($(PYTHON) -c 'import sys; print(sys.executable)')
	$(UV) pip install --python $(VENV_PY) -c constraints.txt -e '.[dev]'
	@# Byte-compile once here: with PYTHONDONTWRITEBYTECODE set, every process would otherwise
	@# recompile torch and feast on import (15-30 s per start-up on this machine).
	@echo "==> install: byte-compiling the environment"
	@$(VENV_PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	@touch $@

tools: ## install the tools the tests use: openssl, promtool, kustomize, grpcurl (once; then a no-op)
	@infra/tools.sh

lock: ## re-pin constraints.txt (the lock file) after changing pyproject.toml
	@echo "==> lock: resolve pyproject.toml, keeping what $(VENV)/ already has where it fits"
	@[ -x $(VENV_PY) ] || $(UV) venv --quiet $(VENV) --python $$($(PYTHON) -c 'import sys; print(sys.executable)')
	$(UV) pip install --python $(VENV_PY) -e '.[dev]'
	@{ echo "# The lock file: every package of .venv/, pinned (make lock). make install uses it as constraints."; \
	   $(UV) pip freeze --python $(VENV_PY) --exclude-editable | grep -v -i '^recstack[ =@]'; } > constraints.txt.tmp
	@mv constraints.txt.tmp constraints.txt
	@touch $(STAMP)
	@echo "==> lock: constraints.txt written"

proto: $(STUBS) recstack/v1/__init__.py ## generate the gRPC stubs into recstack/v1/

$(STUBS) &: $(PROTO) | $(STAMP)
	@echo "==> proto: generating recstack/v1 stubs from $(PROTO)"
	$(VENV_PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO)
	@touch $(STUBS)

recstack/v1/__init__.py:
	@mkdir -p $(@D)
	@echo '"""Generated gRPC stubs for the recstack.v1 ranking API (`make proto`; never edited by hand)."""' > $@

up: install ## start the local Kafka broker and Redis server (no Docker)
	@infra/up.sh

down: ## stop what `make up` started
	@infra/down.sh

status: ## show whether the local Kafka broker and Redis server are running
	@infra/kafka.sh status || true
	@infra/redis.sh status || true
	@infra/redis-cluster.sh status || true

test: install tools ## install, start the services, run the whole test suite (TESTS=path PYTEST_ARGS=... RERUNS=1)
	@# A failed test runs once more, and the summary counts it as "rerun". It was added for a stream
	@# consumer stall at start-up, since fixed (CHANGELOG, round 6, "Fixed"); it stays as a guard
	@# for a suite of real brokers on a shared machine. RERUNS=0 turns it off.
	@infra/with-services.sh $(VENV_PY) -m pytest -q --reruns $(RERUNS) --reruns-delay 5 $(TESTS) $(PYTEST_ARGS)

fuzz: install ## fuzz the event validator and the ranking requests (FUZZ_SECONDS=300, with atheris)
	@$(UV) pip install --quiet --python $(VENV_PY) -c constraints.txt -e '.[dev,fuzz]'
	@infra/with-services.sh $(VENV_PY) tests/fuzz/run.py --seconds $(FUZZ_SECONDS)

demo: install ## the end-to-end demo: replay, features, train, serve, load test, report (KEEP=1)
	@KEEP=$(KEEP) infra/with-services.sh $(VENV_PY) -m recstack.demo

chaos: install ## fault injection under traffic: nothing lost? report in artifacts/chaos/ (CHAOS_ARGS=...)
	@$(VENV)/bin/recstack chaos $(CHAOS_ARGS)

lint: install duplicates ## ruff check and format --check, the duplicate-code check (and shellcheck when installed)
	$(VENV)/bin/ruff check $(PY_DIRS)
	$(VENV)/bin/ruff format --check $(PY_DIRS)
	@if command -v shellcheck >/dev/null; then echo "shellcheck -x infra/*.sh .ci/run"; \
		shellcheck -x infra/*.sh .ci/run; else echo "==> lint: shellcheck not installed, shell scripts skipped"; fi

duplicates: install ## pylint's duplicate-code check: no six repeated lines between modules (imports ignored)
	$(VENV_PY) -m pylint --rcfile=pyproject.toml --score=n $(DUP_DIRS)

clean: down ## stop the services, remove .run/ and the generated stubs (caches and .venv/ are kept)
	rm -rf .run $(STUBS)
