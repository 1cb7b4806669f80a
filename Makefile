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

# A path as one shell word ('...', a ' inside closed, escaped and reopened) and as one Hydra override value (quoted,
# with ' and ${ escaped), so paths with spaces, quotes or non-ASCII letters reach mimlab unchanged.
shell_word     = '$(subst ','\'',$(1))'
hydra_value    = '$(subst $${,\$${,$(subst ',\',$(1)))'
path_override  = $(call shell_word,$(1)=$(call hydra_value,$(2)))

EXPERIMENT_ARG = $(if $(findstring experiment=,$(ARGS)),,experiment=$(EXPERIMENT))
DATA_ARGS      = $(if $(DATA),data=imagenet $(call path_override,data.root,$(DATA)),)

.PHONY: help install data pretrain check finetune linear-probe detect segment sweep report bench gpu-check shards lint format test test-full clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e ".[dev,all]"
	touch $@

install: $(VENV)/.installed  ## create .venv and install mimlab with every extra (slurm, shards, coco) and the mimlab-* commands

data: $(VENV)/.installed  ## write the embedded synthetic data sets (ImageNet, COCO and ADE20K layouts) to data/synthetic
	$(PY) -m mimlab.data.synthetic --root data/synthetic/imagenet
	$(PY) -m mimlab.data.synthetic_dense --root data/synthetic

pretrain: $(VENV)/.installed  ## short MAE pre-training on the embedded data (CPU, a few minutes)
	$(PY) -m mimlab.train $(EXPERIMENT_ARG) $(DATA_ARGS) $(ARGS)

check: $(VENV)/.installed  ## validate data (DATA=...) and config (ARGS=...) without training; lists every bad file
	$(PY) -m mimlab.check $(EXPERIMENT_ARG) $(DATA_ARGS) $(ARGS)

# The newest `make pretrain` checkpoint (override: CKPT=/path/to/last.ckpt); empty if there is none.
PRETRAIN_EXPERIMENT ?= mae_vit_tiny_synthetic
CKPT        ?= $(lastword $(sort $(wildcard outputs/$(PRETRAIN_EXPERIMENT)/*/checkpoints/last.ckpt)))
NEED_CKPT    = @test -n $(call shell_word,$(CKPT)) || { echo "no checkpoint under outputs/$(PRETRAIN_EXPERIMENT)/*/checkpoints/last.ckpt: run make pretrain first (or pass CKPT=/path/to/last.ckpt)"; exit 2; }

finetune: $(VENV)/.installed  ## fine-tune the newest pretrain checkpoint on the embedded data (CPU, minutes)
	$(NEED_CKPT)
	$(PY) -m mimlab.train experiment=$(if $(findstring experiment=,$(ARGS)),,finetune_vit_tiny_synthetic) $(call path_override,task.pretrained,$(CKPT)) $(DATA_ARGS) $(ARGS)

linear-probe: $(VENV)/.installed  ## linear probe of the newest pretrain checkpoint on the embedded data (CPU, minutes)
	$(NEED_CKPT)
	$(PY) -m mimlab.train experiment=$(if $(findstring experiment=,$(ARGS)),,linprobe_vit_tiny_synthetic) $(call path_override,task.pretrained,$(CKPT)) $(DATA_ARGS) $(ARGS)

detect: $(VENV)/.installed  ## Mask R-CNN on the embedded COCO-format set from the newest pretrain checkpoint (CPU)
	$(NEED_CKPT)
	$(PY) -m mimlab.train experiment=$(if $(findstring experiment=,$(ARGS)),,detect_mae_vit_tiny_synthetic) $(call path_override,task.pretrained,$(CKPT)) $(ARGS)

segment: $(VENV)/.installed  ## UperNet on the embedded ADE20K-format set from the newest pretrain checkpoint (CPU)
	$(NEED_CKPT)
	$(PY) -m mimlab.train experiment=$(if $(findstring experiment=,$(ARGS)),,segment_mae_vit_tiny_synthetic) $(call path_override,task.pretrained,$(CKPT)) $(ARGS)

sweep: $(VENV)/.installed  ## Hydra multirun of a sweep file: make sweep SWEEP=conf/sweep/mae_mask_ratio.yaml [ARGS=...]
	@test -n "$(SWEEP)" || { echo "make sweep: set SWEEP=conf/sweep/<name>.yaml (files: $$(ls conf/sweep))"; exit 2; }
	@test -f "$(SWEEP)" || { echo "make sweep: $(SWEEP) not found (files: $$(ls conf/sweep))"; exit 2; }
	$(PY) -m mimlab.train -m +sweep=$(basename $(notdir $(SWEEP))) $(ARGS)

report: $(VENV)/.installed  ## table + plot of run folders: make report RUNS=outputs/sweeps/<name>/<time> [ARGS="--x masking.ratio"]
	$(PY) -m mimlab.report $(call shell_word,$(or $(RUNS),outputs)) $(ARGS)

bench: $(VENV)/.installed  ## img/s, ms/step, memory, FLOPs/img, MFU -> outputs/bench/bench.json (tiny on CPU); ARGS="model=mae_vit_b batch=256"
	$(PY) -m mimlab.bench out=outputs/bench/bench.json $(ARGS)

gpu-check: $(VENV)/.installed  ## GPU acceptance run (bench, Trainer path, DDP, loaders; <= 8 min) -> outputs/gpu_check/results.md; CPU smoke mode without CUDA
	$(PY) scripts/gpu_check.py $(ARGS)

shards: $(VENV)/.installed  ## WebDataset shards of an ImageNet folder: make shards SRC=/data/imagenet DST=/data/imagenet-shards
	@if [ -z "$(SRC)" ] || [ -z "$(DST)" ]; then echo "make shards: set SRC=<ImageNet-layout folder> DST=<output folder>"; exit 2; fi
	$(PY) -m mimlab.data.shards --src $(call shell_word,$(SRC)) --dst $(call shell_word,$(DST)) $(ARGS)

LINT_PATHS  := mimlab tests scripts experiments

lint: $(VENV)/.installed  ## ruff check + ruff format --check + mypy (what CI and the pre-commit hooks run)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy

format: $(VENV)/.installed  ## apply ruff's import sorting, safe fixes and formatting
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)
	$(VENV)/bin/ruff format $(LINT_PATHS)

test: $(VENV)/.installed  ## the fast tier (every module, no slow end-to-end runs; ~3 min on 2 cores)
	$(PY) -m pytest -q -m "not slow and not slurm"

test-full: $(VENV)/.installed  ## every test (slow end-to-end runs; slurm ones need scripts/slurm_local.sh start); what CI runs
	$(PY) -m pytest -q

clean:  ## remove outputs, generated data, caches and the virtualenv
	rm -rf outputs data/synthetic .pytest_cache $(VENV) *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
