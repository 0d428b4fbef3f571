# Set-up and everyday commands. Each target creates .venv on first use and installs catforge
# with its dev extras, pinned by constraints.txt (a CPU build of PyTorch).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test lint format benchmarks clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,wandb]'
	touch $@

# The demo: build the EMT dataset if missing, train S2EF SchNet on it, validate the checkpoint,
# predict the test split (predictions.json and s2ef_predictions.npz in results/<run>/) and relax
# the IS2RE validation structures with the trained model (ADwT and relaxed-energy MAE printed).
DEMO_CONFIG := configs/demo/s2ef_schnet.yml
RELAX_CONFIG := configs/demo/is2rs_schnet.yml
demo: $(BIN)/.installed
	test -f demo_data/stats.yml || $(BIN)/catforge data demo --out demo_data
	run=$$(date +%Y-%m-%d-%H-%M-%S)-demo && \
	$(BIN)/python main.py --mode train --config-yml $(DEMO_CONFIG) --timestamp-id $$run && \
	$(BIN)/python main.py --mode validate --config-yml $(DEMO_CONFIG) \
		--checkpoint checkpoints/$$run/checkpoint.pt --timestamp-id $$run && \
	$(BIN)/python main.py --mode predict --config-yml $(DEMO_CONFIG) \
		--checkpoint checkpoints/$$run/checkpoint.pt --timestamp-id $$run && \
	$(BIN)/python main.py --mode run-relaxations --config-yml $(RELAX_CONFIG) \
		--checkpoint checkpoints/$$run/checkpoint.pt --timestamp-id $$run \
		--task.relax_opt.traj_dir=trajectories/$$run

test: $(BIN)/.installed
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(BIN)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

benchmarks: $(BIN)/.installed
	$(BIN)/python benchmarks/neighbors.py
	$(BIN)/python benchmarks/lmdb_read.py
	$(BIN)/python benchmarks/relax.py

clean:
	rm -rf $(VENV) demo_data trajectories build src/*.egg-info .pytest_cache .ruff_cache .mypy_cache
