# mimlab — every target installs a local virtualenv (.venv) on first use.
# Extra Hydra overrides pass through ARGS, e.g.  make pretrain ARGS="experiment=mae_vit_b hardware=gpu data.root=/data/imagenet"
# DATA=/path/to/imagenet-layout-folder points pre-training at real data (sets data=imagenet data.root=...).

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
EXPERIMENT  ?= mae_vit_tiny_synthetic
ARGS        ?=
DATA        ?=
# torch/torchvision are pinned to the releases this machine's registry serves (CPU and CUDA use the same wheels).
TORCH_PINS  ?= torch==2.14.1 torchvision==0.29.1

EXPERIMENT_ARG = $(if $(findstring experiment=,$(ARGS)),,experiment=$(EXPERIMENT))
DATA_ARGS      = $(if $(DATA),data=imagenet data.root=$(DATA),)

.PHONY: help install data pretrain finetune linear-probe test clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed  ## create .venv and install mimlab with its dependencies

data: $(VENV)/.installed  ## write the embedded synthetic data set to data/synthetic
	$(PY) -m mimlab.data.synthetic --root data/synthetic

pretrain: $(VENV)/.installed  ## short MAE pre-training on the embedded data (CPU, a few minutes)
	$(PY) -m mimlab.train $(EXPERIMENT_ARG) $(DATA_ARGS) $(ARGS)

finetune: $(VENV)/.installed  ## ImageNet-style fine-tuning (issue #7)
	@echo "make finetune: not implemented yet — fine-tuning lands with issue #7 (ImageNet fine-tuning and linear probing)."; exit 2

linear-probe: $(VENV)/.installed  ## linear probing of a pre-trained checkpoint (issue #7)
	@echo "make linear-probe: not implemented yet — linear probing lands with issue #7 (ImageNet fine-tuning and linear probing)."; exit 2

test: $(VENV)/.installed  ## run the test suite
	$(PY) -m pytest -q

clean:  ## remove outputs, generated data, caches and the virtualenv
	rm -rf outputs data/synthetic .pytest_cache $(VENV) *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
