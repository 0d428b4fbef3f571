# Set-up and everyday commands. Each target creates .venv on first use and installs catforge
# with its dev extras, pinned by constraints.txt (a CPU build of PyTorch).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo_data
PYTEST_ARGS ?=

.PHONY: demo test lint format benchmarks clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/catforge data demo --out $(DEMO_DIR) --overwrite

test: $(BIN)/.installed
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(BIN)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

benchmarks: $(BIN)/.installed
	$(BIN)/python benchmarks/neighbors.py
	$(BIN)/python benchmarks/lmdb_read.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) build src/*.egg-info .pytest_cache .ruff_cache .mypy_cache
