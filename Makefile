# The README's two commands: `make demo` (main job on the shipped synthetic benchmark) and `make test`.
# Both create the virtual environment on first use, so a fresh clone needs nothing else.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# torch/torchvision are pinned to the pair this machine kind installs from local disk (see README).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint ablation toy-base clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Fine-tunes CS2 from the toy base shipped in ep_kit/assets/toy_base (nothing is pretrained first).
demo: $(STAMP)
	$(BIN)/ep-kit fit --config recipes/toy/cs2_ste_20.yaml

lint: $(STAMP)
	$(BIN)/ruff check ep_kit tests benchmarks

test: lint
	$(BIN)/python -m pytest -q

ablation: $(STAMP)
	$(BIN)/python benchmarks/ablation.py --scale toy

# Rebuilds the shipped toy base in place (recipes/toy/pretrain.yaml, about 3 min) and records its digest.
toy-base: $(STAMP)
	$(BIN)/python -m ep_kit.toy_base build

clean:
	rm -rf $(VENV) runs .cache
