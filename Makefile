# Everything runs inside .venv, created on first use (Python 3.10+, CPU-only torch unless a GPU build is present).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU torch from the pinned release (an unpinned torch pulls a multi-GB CUDA build); triton 3.7.1 is the newest
# whose interpreter runs our kernels correctly on CPU (see docs/testing.md).
TORCH_PIN ?= torch==2.13.0
TRITON_PIN ?= triton==3.7.1

.PHONY: install test demo train-tiny lint clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN) $(TRITON_PIN)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/pytest -n 2

demo: install
	$(BIN)/sagesla demo

# The shipped embedded weights from scratch (needs a GPU: about 13 minutes on an H100).
train-tiny: install
	$(BIN)/python scripts/train_tiny.py --out sagesla/embedded/tiny-video.safetensors
	$(BIN)/python scripts/finetune_tiny.py

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
