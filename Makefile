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

.PHONY: install train test test-all bench bench-quality ui mlflow-server slurm-up slurm-down lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

## The main job: train the tiny VQGAN on the embedded `shapes` dataset (CPU, ~10 min).
train: install
	$(PY) train.py $(ARGS)

## The test suite (fast + end-to-end; slurm tests run when a cluster is reachable).
test: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

## Everything, including tests marked slow.
test-all: install
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

## Speed benchmarks: prints a table, writes bench/results/*.json.
bench: install
	$(PY) -m vqtransformer.bench $(ARGS)

## Codebook quality at a fixed budget (CIFAR-10 from ../shared, minutes).
bench-quality: install
	$(PY) -m vqtransformer.bench.quality $(ARGS)

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
