# bigvit: `make train` (set-up + the embedded digits run) and `make test` are all a new machine needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
NPROC ?= 2
# Pinned and installed first: an unpinned torch (or any range admitting a newer release) pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
TIMM := timm==1.0.31
ARGS ?=

.PHONY: venv train test test-fast lint bench scaling-study clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev,deepspeed,slurm]"
	# timm is a test-time reference only; its declared deps would replace the pinned torch.
	$(BIN)/pip install -q --no-deps $(TIMM)
	touch $@

data/digits/index.json: | venv
	$(BIN)/bigvit-shards digits --out data/digits

train: venv data/digits/index.json
	$(BIN)/torchrun --standalone --nproc_per_node=$(NPROC) -m bigvit.train experiment=digits $(ARGS)

test: venv
	$(BIN)/pytest $(ARGS)

test-fast: venv
	$(BIN)/pytest -m "not slow" $(ARGS)

lint: venv
	$(BIN)/ruff check src tests bench
	if [ -x $(BIN)/hadolint ]; then $(BIN)/hadolint docker/Dockerfile; fi

bench: venv
	$(BIN)/python bench/step_throughput.py --models vit_s16 --steps 4

# The embedded scaling study (not in CI): a WSD-branched star sweep, full-length runs to compare, fits, plots.
scaling-study: venv
	$(BIN)/python bench/scaling_digits.py $(ARGS)

clean:
	rm -rf outputs multirun wandb .pytest_cache
