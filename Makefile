# m3d-lit: `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export NLTK_DATA := $(CURDIR)/$(VENV)/nltk_data
STAMP := $(VENV)/.setup-done

DATA ?=
TRAINER ?= stages/trainer/cpu.yaml
ARGS ?=
CKPT ?= runs/stage3
EVAL_DATA ?= data/cq500
EVAL_OUT ?= eval/cq500
CLIP_CKPT ?= runs/stage1
BENCH_DATA ?= data/M3D-Data data/cq500 data/physionet
BENCH_OUT ?= eval/bench
EXPORT_OUT ?= export/stage3
APP_CKPT ?= runs/demo/runs/stage3
APP_DATA ?= runs/demo/data/cq500 runs/demo/data/physionet
M3D := $(BIN)/m3d-lit
fit = $(M3D) fit -c stages/$(1).yaml -c $(TRAINER) $(if $(DATA),--data $(DATA)) $(ARGS)

.PHONY: help setup test lint demo stage1 stage2 stage3 eval m3d-bench export perf tensorboard app

help:  ## list the targets
	@grep -E '^[a-z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml scripts/setup_wordnet.sh scripts/setup_chromium.sh
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,app]'
# the `stream` extra without litdata's torchvision requirement (pyproject.toml says why)
	$(BIN)/pip install --quiet --no-deps 'litdata>=0.2.76,<0.3'
	$(BIN)/pip install --quiet 'boto3>=1.28' 'obstore>=0.4' 'filelock>=3.12' 'tifffile>=2023.1' 'requests>=2.28' 'urllib3>=1.26'
	bash scripts/setup_wordnet.sh $(NLTK_DATA)
	bash scripts/setup_chromium.sh
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv and install m3d-lit with dev and app extras, offline WordNet, Chromium for the app test

test: setup  ## run the test suite (CPU, offline)
	$(BIN)/pytest -q tests

lint: setup  ## ruff, and the import layers of pyproject.toml's [tool.importlinter] (lint-imports)
	$(BIN)/ruff check src tests perf
	$(BIN)/lint-imports

demo: setup  ## the whole pipeline on synthetic brain CT, on a CPU (about 9 minutes on 2 cores)
	$(BIN)/python -m m3d_lit.commands.demo $(ARGS)

stage1: setup  ## stage 1, contrastive ViT pretraining, a new run in runs/stage1/ (DATA=, TRAINER=, ARGS=)
	$(call fit,stage1_clip)

stage2: setup  ## stage 2, perceiver alignment, from stage 1's latest run; a new run in runs/stage2/
	$(call fit,stage2_align)

stage3: setup  ## stage 3, LoRA + segmentation fine-tune, from stage 2's latest run; a new run in runs/stage3/
	$(call fit,stage3_finetune)

eval: setup  ## generate + score + report: CKPT= (a stage or run folder, or a .ckpt), EVAL_DATA=, EVAL_OUT=
	$(M3D) eval --checkpoint $(CKPT) --data $(EVAL_DATA) --out $(EVAL_OUT) $(ARGS)

m3d-bench: setup  ## the eight M3D-Bench tasks: CKPT=, CLIP_CKPT=, BENCH_DATA=, BENCH_OUT=
	$(M3D) bench --checkpoint $(CKPT) --clip-checkpoint $(CLIP_CKPT) --data $(BENCH_DATA) --tasks all --out $(BENCH_OUT) $(ARGS)

export: setup  ## stage-3 checkpoint -> LoRA adapter, weights and a merged HF model: CKPT=, EXPORT_OUT=
	$(M3D) export --checkpoint $(CKPT) --out $(EXPORT_OUT) --merge $(ARGS)

perf: setup  ## CPU timings -> perf/results.json (not part of make test; M3D-Bench is make m3d-bench)
	$(BIN)/python perf/run_all.py

app: setup  ## the local web app on http://127.0.0.1:7860 (after make demo; APP_CKPT=, APP_DATA=, ARGS="--port N")
	$(M3D) app --checkpoint $(APP_CKPT) --data $(APP_DATA) $(ARGS)

tensorboard: setup  ## serve the TensorBoard logs of every run under runs/
	$(BIN)/tensorboard --logdir runs --bind_all
