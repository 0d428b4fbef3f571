"""Checkpoint files: atomic writes, weight-mismatch errors, and the resume helpers."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from catforge.data.samplers import ShardedBatchSampler
from catforge.errors import CheckpointError
from catforge.potential import checkpoint as checkpoint_module
from catforge.potential.checkpoint import load_checkpoint, load_weights, save_checkpoint
from catforge.training.resume import (
    better_of,
    config_diff,
    rng_state,
    set_rng_state,
)


def test_a_kill_during_the_write_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"state_dict": {"w": torch.ones(3)}, "step": 1}, path)

    def torn_save(obj: Any, handle: Any) -> None:
        handle.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt  # the process dies in the middle of torch.save

    monkeypatch.setattr(checkpoint_module.torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "step": 2}, path)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no partial file left


def test_a_torn_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"weight": torch.zeros(2, 3)}, r"parameter 'bias' is missing"),
        (
            {"weight": torch.zeros(2, 3), "bias": torch.zeros(2), "extra": torch.zeros(1)},
            r"unexpected parameter 'extra'",
        ),
        (
            {"module.weight": torch.zeros(4, 3), "module.bias": torch.zeros(2)},
            r"parameter 'weight' has shape \(4, 3\) in the checkpoint but \(2, 3\) in the model",
        ),
    ],
)
def test_mismatched_weights_name_the_parameter(state: dict[str, Any], message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        load_weights(torch.nn.Linear(3, 2), state, "ckpt.pt")


def test_matching_weights_load_without_module_prefix() -> None:
    source, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    load_weights(target, {f"module.{k}": v for k, v in source.state_dict().items()}, "ckpt.pt")
    assert torch.equal(source.weight, target.weight)


def test_epoch_batches_resume_at_an_offset_of_the_same_permutation() -> None:
    sampler = ShardedBatchSampler(size=23, batch_size=5, seed=7)
    sampler.set_epoch(3)
    full = list(sampler)
    assert len(sampler) == len(full) == 5
    assert sorted(i for batch in full for i in batch) == list(range(23))
    sampler.set_epoch(3, start=2)
    assert list(sampler) == full[2:] and len(sampler) == 5
    sampler.set_epoch(4)
    assert list(sampler) != full


def test_rng_states_round_trip() -> None:
    state = rng_state()
    drawn = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(2), random.random()
    set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(drawn[0], again[0]) and np.array_equal(drawn[1], again[1])
    assert drawn[2] == again[2]


def test_config_diff_lists_dotted_keys_and_skips_run_keys() -> None:
    old = {"optim": {"max_epochs": 1, "lr_initial": 0.1}, "options": {"checkpoint": None}}
    new = {"optim": {"max_epochs": 3, "lr_initial": 0.1, "ema_decay": 0.99},
           "options": {"checkpoint": "a.pt"}}  # fmt: skip
    assert config_diff(old, new) == [
        ("optim.ema_decay", "<unset>", 0.99),
        ("optim.max_epochs", 1, 3),
    ]


@pytest.mark.parametrize(
    ("metric", "worse", "better"),
    [("energy_mae", 0.5, 0.1), ("forces_mae", 0.2, 0.05), ("energy_within_threshold", 0.1, 0.3)],
)
def test_better_of_follows_the_metric_direction(metric: str, worse: float, better: float) -> None:
    assert better_of(metric, worse, better) == better
    assert better_of(metric, better, worse) == better
    assert better_of(metric, None, worse) == worse
