# Quickstart: `make train` then `make test`. Both set up the environment first: the active virtualenv if
# there is one, else .venv (created here). torch comes from the CPU wheel pip finds on this kind of
# machine; an open torch range would pull a multi-GB CUDA build.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON_BOOT ?= python3
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pararnn-$(shell cat requirements.txt requirements-dev.txt .ci/constraints.txt | sha256sum | cut -c1-12)

export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export WANDB_MODE ?= disabled

.PHONY: setup train test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt .ci/constraints.txt
	@test -x $(PY) || { echo "== creating the virtualenv $(VENV) ($(PYTHON_BOOT) -m venv)"; $(PYTHON_BOOT) -m venv $(VENV); }
	@echo "== installing torch into $(VENV) (the CPU wheel unless a torch is installed)"
	@$(PY) -m pip install --disable-pip-version-check "torch>=2.11,<2.14" 2>&1 | { grep --line-buffered -v "is ignored" || true; }
	@echo "== installing requirements.txt and requirements-dev.txt into $(VENV) (a few minutes the first time)"
	@$(PY) -m pip install --disable-pip-version-check -r requirements.txt -r requirements-dev.txt -c .ci/constraints.txt 2>&1 | { grep --line-buffered -v "is ignored" || true; }
	@echo "== checking the installed packages (pip check)"
	@$(PY) -m pip check
	@rm -f $(VENV)/.pararnn-* && touch $@ && echo "== environment ready: $(VENV)"

RUN_DIR ?= runs/paragru_tiny

# Train the default model (or `make train ARGS="model=paralstm_tiny" RUN_DIR=runs/lstm`), then score the
# export on the shipped downstream slices through lm-eval. A run stopped by SIGTERM/SIGUSR1 (train.py
# exits 75 after a checkpoint) is not an error here: train.py's last line says how to resume (re-run
# `make train`), and the evaluation is skipped.
train: setup
	@echo "== training: $(PY) train.py run_dir=$(RUN_DIR) $(ARGS)"
	@TRAIN_COMMAND="make train" $(PY) train.py run_dir=$(RUN_DIR) $(ARGS); status=$$?; \
	if [ $$status -eq 75 ]; then exit 0; elif [ $$status -ne 0 ]; then exit $$status; fi; \
	echo "== scoring $(RUN_DIR)/hf on the shipped downstream slices: $(PY) -m eval.main checkpoints=[$(RUN_DIR)] tasks=smoke"; \
	$(PY) -m eval.main checkpoints=[$(RUN_DIR)] tasks=smoke

PYTEST := TRITON_INTERPRET=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider -n 2 --timeout 900

# The whole CPU suite (Triton through its interpreter); tests marked `gpu` skip themselves without CUDA.
test: setup
	$(PYTEST) tests $(ARGS)

# Everything but the `slow` tests (training jobs, multi-process launches): a quick check while editing.
test-fast: setup
	$(PYTEST) -m "not slow" tests $(ARGS)

lint: setup
	$(PY) -m ruff check .

bench: setup
	$(PY) benchmarks/bench_cells_cpu.py

clean:
	rm -rf runs outputs
