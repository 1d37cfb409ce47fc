# m3d-lit: `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export NLTK_DATA := $(CURDIR)/$(VENV)/nltk_data
STAMP := $(VENV)/.setup-done

.PHONY: help setup test lint

help:  ## list the targets
	@grep -E '^[a-z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml scripts/setup_wordnet.sh
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	bash scripts/setup_wordnet.sh $(NLTK_DATA)
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv and install m3d-lit with dev extras and offline WordNet (safe to re-run)

test: setup  ## run the test suite (CPU, offline)
	$(BIN)/pytest -q tests

lint: setup  ## ruff
	$(BIN)/ruff check src tests bench
