# Every target creates .venv on first use, so each works on a fresh clone.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint format bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[$*]"
	touch $@

# The main job on the embedded default: train the tiny DGA model on the sample corpus.
run: $(VENV)/.installed-test
	$(BIN)/python -m train --config=configs/tiny_dga.py --workdir=runs/tiny_dga

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n 2 -q

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed-test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/attention.py
	$(BIN)/python benchmarks/model_forward.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/decode.py

clean:
	rm -rf $(VENV) build *.egg-info
