# vqtransformer — the README's two commands are `make train` and `make test`;
# both create .venv and install the project (with dev extras) when needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
UI_PORT ?= 5000
SERVER_PORT ?= 5001
ROOT := $(abspath .)

.PHONY: evaluate shapes-vqgan shapes-seg-vq shapes-transformer shapes-text shapes-report install train test test-all bench bench-quality bench-ablation ui mlflow-server slurm-up slurm-down lint clean

install: $(STAMP)

# The parity tests compare with the original taming-transformers code: a test-only dependency, installed
# without its declared dependencies (pytorch-lightning, ...), which the compared model code does not use.
TAMING_TESTS := taming-transformers-rom1504==0.0.6

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(TAMING_TESTS)
	@touch $(STAMP)

## The main job: train the tiny VQGAN on the embedded `shapes` dataset (CPU, ~10 min).
train: install
	$(PY) train.py $(ARGS)

## Score the newest training run under outputs/ (or CKPT=path/to/last.ckpt) into its MLflow run.
## On data=shapes the feature network is the shapes judge (offline; trained once and cached).
CKPT ?= $(shell find outputs -path '*/checkpoints/last.ckpt' -printf '%T@ %p\n' 2>/dev/null | sort -n | tail -1 | cut -d' ' -f2)
evaluate: install
	@test -n "$(CKPT)" || { echo "make evaluate: no outputs/**/checkpoints/last.ckpt yet; run 'make train' first (or pass CKPT=...)"; exit 2; }
	$(PY) evaluate.py ckpt=$(CKPT) $(ARGS)

## Stage 2 on shapes, end to end: `make shapes-transformer COND=none|class|segmentation`
## trains the tiny VQGAN once (and, for segmentation, a VQ model of the label maps), then a tiny GPT, then samples.
COND ?= class
VQ_STEPS ?= 1500
GPT_STEPS ?= 2000
SHAPES_VQGAN := outputs/shapes/vqgan
SHAPES_SEG_VQ := outputs/shapes/segmentation-vq
SHAPES_GPT := outputs/shapes/transformer-$(COND)

shapes-vqgan: install
	@test -f $(SHAPES_VQGAN)/checkpoints/last.ckpt || \
		$(PY) train.py trainer.max_steps=$(VQ_STEPS) hydra.run.dir=$(SHAPES_VQGAN)

shapes-seg-vq: install
	@test -f $(SHAPES_SEG_VQ)/checkpoints/last.ckpt || \
		$(PY) train.py data.target=segmentation trainer.max_steps=$(VQ_STEPS) hydra.run.dir=$(SHAPES_SEG_VQ)

shapes-transformer: shapes-vqgan $(if $(filter segmentation,$(COND)),shapes-seg-vq)
	$(PY) train.py stage=transformer first_stage.ckpt=$(SHAPES_VQGAN)/checkpoints/last.ckpt conditioning=$(COND) \
		$(if $(filter segmentation,$(COND)),conditioning.ckpt=$(SHAPES_SEG_VQ)/checkpoints/last.ckpt) \
		trainer.max_steps=$(GPT_STEPS) hydra.run.dir=$(SHAPES_GPT) $(ARGS)
	$(PY) sample.py ckpt=$(SHAPES_GPT)/checkpoints/last.ckpt n=36 out_dir=$(SHAPES_GPT)/samples \
		$(if $(filter class,$(COND)),cfg_scale=2.0)

## Every stage on shapes at its preset's budget, judged by the shapes judge (issue-11 targets):
## trains/evaluates/samples each stage (reusing finished ones) and writes outputs/shapes-report/report.{md,html}
## (+ an MLflow run in experiment shapes-report). Plumbing check: make shapes-report ARGS="--steps-scale 0.05"
shapes-report: install
	$(PY) -m vqtransformer.bench.shapes_report $(ARGS)

## Text-to-image on shapes: the tiny VQGAN once, a text-conditional VQ-Diffusion, samples of
## scripts/shapes_prompts.txt (a row per prompt) and the judged scores (caption shape / colour accuracy).
TEXT_STEPS ?= 6000
SHAPES_TEXT := outputs/shapes/vqdiffusion-text
shapes-text: shapes-vqgan
	$(PY) train.py stage=vqdiffusion first_stage.ckpt=$(SHAPES_VQGAN)/checkpoints/last.ckpt conditioning=text \
		trainer.max_steps=$(TEXT_STEPS) hydra.run.dir=$(SHAPES_TEXT) $(ARGS)
	$(PY) sample.py ckpt=$(SHAPES_TEXT)/checkpoints/last.ckpt prompts_file=scripts/shapes_prompts.txt n=8 \
		out_dir=$(SHAPES_TEXT)/samples
	$(PY) evaluate.py ckpt=$(SHAPES_TEXT)/checkpoints/last.ckpt

## The test suite (fast + end-to-end; slurm tests run when a cluster is reachable).
test: install
	$(PY) -m pytest -q -m "not slow" --durations=30 $(PYTEST_ARGS)

## Everything, including tests marked slow.
test-all: install
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

## Speed benchmarks: prints a table, writes bench/results/*.json.
bench: install
	$(PY) -m vqtransformer.bench $(ARGS)

## Codebook quality at a fixed budget (CIFAR-10 from ../shared, minutes).
bench-quality: install
	$(PY) -m vqtransformer.bench.quality $(ARGS)

## Codebook ablation (VQ / FSQ / LFQ x size) as a sweep on CIFAR-10 from ../shared, scored offline;
## the comparison goes to the sweep's parent run and bench/results/ablation.{json,md} (hours on 2 CPU cores).
## Smaller: make bench-ablation ARGS="--steps 300 --presets k1024,fsq_1k,lfq_1k --num-real 1000"
bench-ablation: install
	$(PY) -m vqtransformer.bench.ablation $(ARGS)

## MLflow UI on 127.0.0.1 against the project's default store.
ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///$(ROOT)/mlflow.db}" \
		--default-artifact-root "$(ROOT)/mlartifacts" --host 127.0.0.1 --port $(UI_PORT)

## A tracking server for multi-node sweeps (see README: "MLflow for clusters").
mlflow-server: install
	$(VENV)/bin/mlflow server --backend-store-uri "$${MLFLOW_BACKEND_URI:-sqlite:///$(ROOT)/mlflow.db}" \
		--artifacts-destination "$${MLFLOW_ARTIFACTS:-$(ROOT)/mlartifacts}" --serve-artifacts \
		--host "$${MLFLOW_HOST:-0.0.0.0}" --port $(SERVER_PORT)

slurm-up:
	bash scripts/slurm/slurm-up.sh

slurm-down:
	bash scripts/slurm/slurm-down.sh

lint: install
	$(VENV)/bin/ruff check vqtransformer tests train.py evaluate.py sample.py

clean:
	rm -rf outputs .pytest_cache .ruff_cache
