# Two commands set everything up on a fresh machine (Python 3.10-3.12 and make are all it needs):
#   make demo   install, then run the main job on the embedded demo (SQLite + offline providers)
#   make test   install the test dependencies, then run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DAGSTER_HOME ?= $(CURDIR)/.dagster_home
DEMO_CONFIG := $(CURDIR)/backfill_pipeline/config/demo_config.yaml
PORT ?= 3000

.PHONY: demo test install install-test dev lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(DAGSTER_HOME)/dagster.yaml:
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

demo: install $(DAGSTER_HOME)/dagster.yaml
	DAGSTER_HOME=$(DAGSTER_HOME) $(BIN)/backfill-pipeline demo

test: install-test
	$(BIN)/python -m pytest

# The UI on the demo (created by `make demo`); set BACKFILL_CONFIG to browse your own config instead.
dev: install $(DAGSTER_HOME)/dagster.yaml
	BACKFILL_CONFIG=$${BACKFILL_CONFIG:-$(DEMO_CONFIG)} DAGSTER_HOME=$(DAGSTER_HOME) $(BIN)/dagster dev -w workspace.yaml -p $(PORT)

lint: install-test
	$(BIN)/ruff check backfill_pipeline backfill_pipeline_tests bench
	$(BIN)/ruff format --check backfill_pipeline backfill_pipeline_tests bench
	$(BIN)/mypy

clean:
	rm -rf .backfill .dagster_home
