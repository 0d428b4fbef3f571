"""Training and validation end to end on a tiny generated demo dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from catforge.cli.modes import run
from catforge.config import RunOptions, load_config
from catforge.data.lmdb import LmdbDataset
from catforge.potential.checkpoint import load_checkpoint
from tests.factories import SMALL_MODEL, data_overrides

ROOT = Path(__file__).resolve().parents[1]
S2EF_CONFIG = ROOT / "configs" / "demo" / "s2ef_schnet.yml"
IS2RE_CONFIG = ROOT / "configs" / "demo" / "is2re_schnet.yml"


def only_run(folder: Path) -> Path:
    (run_folder,) = folder.iterdir()
    return run_folder


@pytest.mark.slow
def test_tutorial_train_then_validate_commands(demo: Path, tmp_path: Path) -> None:
    base = [sys.executable, str(ROOT / "main.py"), "--config-yml", str(S2EF_CONFIG)]
    overrides = [*data_overrides(demo, "s2ef"), *SMALL_MODEL, "--optim.max_epochs=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    train = subprocess.run(
        [*base, "--mode", "train", "--identifier", "demo", "--print-every", "5", *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    run_id = only_run(tmp_path / "checkpoints").name
    assert run_id.endswith("-demo")
    checkpoint = tmp_path / "checkpoints" / run_id / "checkpoint.pt"
    assert checkpoint.is_file()
    assert list((tmp_path / "logs" / "tensorboard" / run_id).glob("events.out.tfevents.*"))
    lines = (tmp_path / "results" / run_id / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert {"train", "val"} <= {record["split"] for record in records}

    validate = subprocess.run(
        [*base, "--mode", "validate", "--checkpoint", str(checkpoint), *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert validate.returncode == 0, validate.stderr[-3000:]
    (metrics_file,) = (tmp_path / "results").glob("*/metrics_val.json")
    metrics = json.loads(metrics_file.read_text())
    assert set(metrics) >= {
        "forces_mae",
        "forces_cos",
        "energy_mae",
        "energy_force_within_threshold",
    }
    last_val = [record for record in records if record["split"] == "val"][-1]
    assert metrics["forces_mae"] == pytest.approx(last_val["forces_mae"], rel=1e-6)


def train_in_process(config_path: Path, overrides: list[str], run_dir: Path) -> dict[str, float]:
    options = RunOptions(mode="train", run_dir=run_dir, print_every=2)
    return run(load_config(config_path, overrides, options))


def test_statistics_are_computed_when_missing_and_stored(demo: Path, tmp_path: Path) -> None:
    overrides = [*data_overrides(demo, "s2ef"), *SMALL_MODEL, "--optim.max_steps=2"]
    train_in_process(S2EF_CONFIG, overrides, tmp_path)
    state = load_checkpoint(only_run(tmp_path / "checkpoints") / "checkpoint.pt")
    train = LmdbDataset(demo / "s2ef" / "train")
    energies = np.array([train.fields(i)["y"] for i in range(len(train))], dtype=np.float64)
    target = state["normalizers"]["target"]
    assert float(target["mean"]) == pytest.approx(energies.mean(), rel=1e-5)
    assert float(target["std"]) == pytest.approx(energies.std(), rel=1e-4)
    assert torch.equal(state["normalizers"]["grad_target"]["std"], target["std"])
    assert state["step"] == 2 and state["config"]["trainer"] == "forces"


def test_tensorboard_events_hold_the_logged_scalars(demo: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = [*data_overrides(demo, "s2ef"), *SMALL_MODEL, "--optim.max_steps=4"]
    train_in_process(S2EF_CONFIG, overrides, tmp_path)
    events = EventAccumulator(str(only_run(tmp_path / "logs" / "tensorboard"))).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/structures_per_s"} <= tags
    assert {"val/forces_mae", "val/energy_mae"} <= tags
    assert [event.step for event in events.Scalars("train/loss")] == [2, 4]
    records = [
        json.loads(line)
        for line in (only_run(tmp_path / "results") / "metrics.jsonl").read_text().splitlines()
    ]
    val = [record for record in records if record["split"] == "val"][-1]
    assert events.Scalars("val/forces_mae")[-1].value == pytest.approx(val["forces_mae"], rel=1e-6)


def test_is2re_energy_trainer(demo: Path, tmp_path: Path) -> None:
    overrides = [*data_overrides(demo, "is2re"), *SMALL_MODEL, "--optim.max_steps=3"]
    metrics = train_in_process(IS2RE_CONFIG, overrides, tmp_path)
    assert set(metrics) == {"energy_mae", "energy_mse", "energy_within_threshold"}
    assert (only_run(tmp_path / "checkpoints") / "best_checkpoint.pt").is_file()


def test_validate_needs_a_checkpoint(demo: Path, tmp_path: Path) -> None:
    from catforge.errors import ConfigError

    options = RunOptions(mode="validate", run_dir=tmp_path)
    config = load_config(S2EF_CONFIG, data_overrides(demo, "s2ef"), options)
    with pytest.raises(ConfigError, match="--checkpoint"):
        run(config)
