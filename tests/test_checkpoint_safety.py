"""Checkpoints load without running code: only tensors, plain values and numeric numpy arrays."""

from __future__ import annotations

import io
import logging
import os
import pathlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from catforge.errors import CheckpointError
from catforge.potential.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from catforge.training.resume import rng_state, set_rng_state, stored_best

NOT_ALLOWED = "holds an object that is not allowed in a checkpoint"


def _write_marker(path: str) -> None:
    Path(path).write_text("ran")


class _CallsFunction:
    """Unpickling this calls ``_write_marker(marker)``: code a checkpoint must not run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_write_marker, (self.marker,))


class _CallsShell(_CallsFunction):
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class _CallsExec(_CallsFunction):
    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _checkpoint(**extra: Any) -> dict[str, Any]:
    return {"state_dict": {"w": torch.arange(3.0)}, "step": 4, **extra}


def _draws() -> tuple[torch.Tensor, np.ndarray, float, float]:
    """One draw of every RNG, the Gaussian caches included."""
    return torch.rand(4), np.random.standard_normal(3), random.random(), random.gauss(0, 1)


def _assert_same_draws(first: tuple[Any, ...], second: tuple[Any, ...]) -> None:
    assert torch.equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])
    assert first[2:] == second[2:]


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        (_CallsFunction, "tests.test_checkpoint_safety._write_marker"),
        (_CallsShell, "posix.system"),
        (_CallsExec, "exec"),
    ],
)
def test_a_pickle_that_runs_code_is_refused_unrun(
    tmp_path: Path, payload: type[_CallsFunction], named: str
) -> None:
    path, marker = tmp_path / "evil.pt", tmp_path / "marker"
    torch.save(_checkpoint(config={"hook": payload(marker)}), path)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    assert not marker.exists()
    message = str(caught.value)
    assert message.startswith(f"{path}: {NOT_ALLOWED} ({named})")
    assert "\n" not in message
    torch.load(path, weights_only=False)  # the unrestricted loader does run it
    assert marker.exists()


@pytest.mark.parametrize(
    ("value", "named"),
    [
        (pathlib.PurePosixPath("/data/train"), r"\(pathlib\.PurePosixPath\)"),
        (np.float64(0.5), r"\(numpy\.(_core|core)\.multiarray\.scalar\)"),
        (np.array(["a", 1], dtype=object), "ObjectDType"),
        (np.array([1 + 2j]), "Complex128DType"),
    ],
)
def test_an_unexpected_object_is_refused(tmp_path: Path, value: Any, named: str) -> None:
    """Not code, but not a type catforge or OCP writes either (numpy: numeric arrays only)."""
    path = tmp_path / "odd.pt"
    torch.save(_checkpoint(val_metrics={"energy_mae": value}), path)
    with pytest.raises(CheckpointError, match=f"^{path}: {NOT_ALLOWED} .*{named}"):
        load_checkpoint(path)


def test_the_allowed_globals_are_scoped_to_the_load(tmp_path: Path) -> None:
    before = set(map(repr, torch.serialization.get_safe_globals()))
    path = tmp_path / "old.pt"
    torch.save(_checkpoint(rng={"numpy": np.random.get_state()}), path)
    assert isinstance(load_checkpoint(path)["rng"]["numpy"][1], np.ndarray)
    # a set: torch keeps them in one, whose order may change as entries come and go
    assert set(map(repr, torch.serialization.get_safe_globals())) == before
    with pytest.raises(Exception, match="numpy"):
        torch.load(path, weights_only=True)  # outside load_checkpoint nothing extra is allowed


def test_the_rng_state_is_plain_and_restores_bit_identically(tmp_path: Path) -> None:
    np.random.standard_normal()  # leaves numpy's second Gaussian cached (has_gauss 1)
    random.gauss(0, 1)  # and Python's gauss_next
    state = rng_state()
    assert state["numpy"]["has_gauss"] == 1 and state["python"]["gauss_next"] is not None
    expected = _draws()
    path = save_checkpoint(_checkpoint(rng=state), tmp_path / "checkpoint.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    _draws()
    loaded = load_checkpoint(path)
    assert loaded["format_version"] == FORMAT_VERSION
    set_rng_state(loaded["rng"])
    _assert_same_draws(_draws(), expected)


def test_a_format_1_checkpoint_still_loads_and_resumes_bit_identically(tmp_path: Path) -> None:
    """As the trainer wrote ``rng`` before: numpy's ``get_state()`` tuple (a uint32 array) and
    Python's ``getstate()`` tuple, saved with ``torch.save``."""
    np.random.standard_normal()
    random.gauss(0, 1)
    old_rng = {
        "torch": torch.get_rng_state(),
        "cuda": None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    expected = _draws()
    path = tmp_path / "checkpoint.pt"
    torch.save(_checkpoint(rng=old_rng, format_version=1, config={"optim": {"lr": 1e-3}}), path)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    assert {"numpy.ndarray", "numpy.dtype"} <= set(unsafe)
    _draws()
    loaded = load_checkpoint(path)
    assert loaded["format_version"] == 1 and loaded["config"] == {"optim": {"lr": 1e-3}}
    assert loaded["rng"]["numpy"][1].dtype == np.uint32
    set_rng_state(loaded["rng"])
    _assert_same_draws(_draws(), expected)


def test_numpy_1_pickle_names_and_the_legacy_torch_format_load(tmp_path: Path) -> None:
    """Files written under numpy 1.x name ``numpy.core.multiarray._reconstruct`` (OCP's
    fixtures do); older torch wrote the non-zip format (OCP's released checkpoints)."""
    arrays = {
        "pos": np.arange(6.0).reshape(2, 3),
        "tags": np.array([0, 2]),
        "pbc": np.ones(3, bool),
    }
    buffer = io.BytesIO()
    torch.save(_checkpoint(inputs=[arrays]), buffer, _use_new_zipfile_serialization=False)
    data = buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\n_reconstruct" in data
    path = tmp_path / "legacy.pt"
    path.write_bytes(data)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(3.0))
    for key, array in arrays.items():
        assert loaded["inputs"][0][key].dtype == array.dtype
        assert np.array_equal(loaded["inputs"][0][key], array)


def test_ocp_reference_files_load_with_every_value_equal(shared_data: Path) -> None:
    """The OCP fixtures (numpy 1.26 input arrays, float32/int64 state dicts) load as the
    unrestricted loader reads them."""
    files = sorted((shared_data / "ocp_reference").glob("*.pt"))
    assert len(files) == 9
    for path in files:
        safe = load_checkpoint(path)
        trusted = torch.load(path, map_location="cpu", weights_only=False)
        assert safe.keys() == trusted.keys(), path.name
        _assert_equal(safe, trusted, path.name)


def _assert_equal(first: Any, second: Any, where: str) -> None:
    assert type(first) is type(second), where
    if isinstance(first, dict):
        assert first.keys() == second.keys(), where
        for key in first:
            _assert_equal(first[key], second[key], f"{where}.{key}")
    elif isinstance(first, list | tuple):
        assert len(first) == len(second), where
        for index, (a, b) in enumerate(zip(first, second, strict=True)):
            _assert_equal(a, b, f"{where}[{index}]")
    elif isinstance(first, torch.Tensor):
        assert first.dtype == second.dtype and torch.equal(first, second), where
    elif isinstance(first, np.ndarray):
        assert first.dtype == second.dtype and np.array_equal(first, second), where
    else:
        assert first == second or (first != first and second != second), where  # NaN == NaN


def test_stored_best_reads_through_the_safe_loader(tmp_path: Path, caplog) -> None:
    best = save_checkpoint(_checkpoint(val_metrics={"energy_mae": 0.25}), tmp_path / "best.pt")
    assert stored_best(best, "energy_mae") == 0.25
    assert stored_best(best, "forces_mae") is None
    marker = tmp_path / "marker"
    torch.save(_checkpoint(val_metrics={"energy_mae": _CallsFunction(marker)}), best)
    with caplog.at_level(logging.WARNING, logger="catforge.training.resume"):
        assert stored_best(best, "energy_mae") is None
    assert not marker.exists()
    assert f"{best}: {NOT_ALLOWED}" in caplog.text
    best.write_bytes(b"PK\x03\x04 torn")
    assert stored_best(best, "energy_mae") is None
    assert stored_best(tmp_path / "absent.pt", "energy_mae") is None
