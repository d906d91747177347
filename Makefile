# The README's two commands: `make demo` (main job on the shipped synthetic benchmark) and `make test`.
# Both create the virtual environment on first use, so a fresh clone needs nothing else.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The lmms-eval harness lives in a second environment: lmms-eval 0.7.3 pins av<16 (the kit's own takes the
# newest av), so it is kept apart from .venv; tests/test_lmms_eval.py runs its `lmms-eval` and `ep-kit`.
LMMS_VENV ?= .venv-lmms
LMMS_STAMP := $(LMMS_VENV)/.installed-stamp
# torch/torchvision are pinned to the pair this machine kind installs from local disk (see README).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint ablation toy-base lmms-env clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

$(LMMS_STAMP): pyproject.toml
	$(PY) -m venv $(LMMS_VENV)
	$(LMMS_VENV)/bin/python -m pip install -q --upgrade pip
	$(LMMS_VENV)/bin/python -m pip install -q $(TORCH_PINS)
	$(LMMS_VENV)/bin/python -m pip install -q -e ".[lmms-eval]"
	touch $(LMMS_STAMP)

# The lmms-eval environment alone (make test builds it too).
lmms-env: $(LMMS_STAMP)

# Fine-tunes CS2 from the toy base shipped in ep_kit/assets/toy_base (nothing is pretrained first).
demo: $(STAMP)
	$(BIN)/ep-kit fit --config recipes/toy/cs2_ste_20.yaml

lint: $(STAMP)
	$(BIN)/ruff check ep_kit tests benchmarks notebooks

test: lint $(LMMS_STAMP)
	$(BIN)/python -m pytest -q --durations=10

ablation: $(STAMP)
	$(BIN)/python benchmarks/ablation.py --scale toy

# Rebuilds the shipped toy base in place (recipes/toy/pretrain.yaml, about 18 min on 2 cores) and records its digest.
toy-base: $(STAMP)
	$(BIN)/python -m ep_kit.toy_base build

clean:
	rm -rf $(VENV) $(LMMS_VENV) runs .cache
