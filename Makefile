# Every target creates .venv on first use, so each works on a fresh clone.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

VENV_AOT := .venv-aot

.PHONY: run test test-aot aot lint format bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# What training, the library and the benchmarks need.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# The test extra (pytest, ruff, torch and transformers for the HF parity tests) on top. A venv
# that `make run` made gets it the first time a target below needs it.
$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[test]"
	touch $@

# The main job on the embedded default: train the tiny DGA model on the sample corpus.
run: $(VENV)/.installed
	$(BIN)/python -m train --config=configs/tiny_dga.py --workdir=runs/tiny_dga

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n 2 -q

# The real TPU and GPU compilers on this host (dga_jax.aot), in a venv of their own: the CUDA
# plugin would make every JAX process on a GPU-less machine look for a GPU.
$(VENV_AOT)/.installed: pyproject.toml
	$(PY) -m venv $(VENV_AOT)
	$(VENV_AOT)/bin/pip install -q --upgrade pip
	$(VENV_AOT)/bin/pip install -q -e ".[aot]"
	touch $@

test-aot: $(VENV_AOT)/.installed
	JAX_PLATFORMS=cpu $(VENV_AOT)/bin/python -m pytest -n 2 -q -m aot tests/aot

# What compiles where, memory per device, registers: benchmarks/results/aot_compile.{json,md}.
aot: $(VENV_AOT)/.installed
	JAX_PLATFORMS=cpu $(VENV_AOT)/bin/python benchmarks/aot_compile.py

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed-test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/attention.py
	$(BIN)/python benchmarks/model_forward.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/decode.py
	$(BIN)/python benchmarks/generate.py

clean:
	rm -rf $(VENV) $(VENV_AOT) build *.egg-info
