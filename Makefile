# Set-up and checks. `make install` is idempotent: a second run only re-checks the venv.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision pinned to the builds on this machine's disk (see DEVELOPERS.md).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install test lint format bench clean

install:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>/dev/null || true
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[fast,serve,dev]'
	$(BIN)/stackvision --version

test:
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format:
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

bench:
	$(BIN)/python benchmarks/accuracy.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
