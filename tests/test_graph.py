"""AtomicGraph construction and validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from catforge.data import keys
from catforge.data.graph import AtomicGraph
from catforge.errors import DataError
from tests.factories import graphs


def minimal_fields(n_atoms: int = 3) -> dict[str, object]:
    rng = np.random.default_rng(0)
    return {
        "pos": rng.random((n_atoms, 3)) * 3,
        "atomic_numbers": np.array([8, 1, 1][:n_atoms]),
        "cell": np.eye(3) * 10,
    }


def test_from_fields_fills_defaults_and_dtypes() -> None:
    graph = AtomicGraph.from_fields(minimal_fields())
    assert graph.n_graphs == 1 and graph.n_atoms == 3
    assert graph.pos.dtype == torch.float32 and graph.atomic_numbers.dtype == torch.long
    assert graph.cell.shape == (1, 3, 3) and graph.pbc.tolist() == [[True, True, True]]
    assert graph.tags.tolist() == [0, 0, 0] and graph.fixed.dtype == torch.bool
    assert graph.present() == keys.REQUIRED


def test_ocp_legacy_dtypes_are_converted() -> None:
    fields = minimal_fields() | {
        "atomic_numbers": np.array([8.0, 1.0, 1.0], dtype=np.float32),
        "fixed": np.array([1.0, 0.0, 0.0], dtype=np.float32),
        "cell": np.eye(3, dtype=np.float32)[None] * 10,
        "natoms": 3,
        "y": -1.5,
        "sid": 7,
    }
    graph = AtomicGraph.from_fields(fields)
    assert graph.atomic_numbers.tolist() == [8, 1, 1]
    assert graph.fixed.tolist() == [True, False, False]
    assert graph.y.tolist() == [-1.5] and graph.sid.tolist() == [7]


def test_zero_cell_means_not_periodic() -> None:
    graph = AtomicGraph.from_fields(minimal_fields() | {"cell": np.zeros((3, 3))})
    assert graph.pbc.tolist() == [[False, False, False]]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pos": np.full((3, 3), np.nan)}, "'pos' contains NaN"),
        ({"force": np.zeros((2, 3))}, "'force' has shape (2, 3)"),
        ({"tags": np.zeros(4)}, "'tags' has shape (4,)"),
        (
            {"atomic_numbers": np.array([8, 0, 1])},
            "'atomic_numbers' holds 0 at atom 1; atomic numbers must lie in 1..118",
        ),
        (
            {"atomic_numbers": np.array([8, 1, 200])},
            "'atomic_numbers' holds 200 at atom 2; atomic numbers must lie in 1..118",
        ),
        (
            {"pos": np.zeros((0, 3)), "atomic_numbers": np.zeros(0, dtype=np.int64)},
            "structure has no atoms; every structure needs at least one atom",
        ),
        ({"atomic_numbers": np.array([8.5, 1, 1])}, "'atomic_numbers' must hold integers"),
        ({"edge_index": np.array([[0, 5], [1, 0]])}, "'edge_index' refers to atoms outside"),
        ({"pos": "abc"}, "'pos' cannot be read as an array"),
    ],
)
def test_bad_fields_name_source_and_field(change: dict[str, object], message: str) -> None:
    with pytest.raises(DataError) as error:
        AtomicGraph.from_fields(minimal_fields() | change, source="file.lmdb entry 4")
    assert str(error.value).startswith("file.lmdb entry 4: ")
    assert message in str(error.value)


def test_missing_required_field() -> None:
    fields = minimal_fields()
    del fields["atomic_numbers"]
    with pytest.raises(DataError, match="required field 'atomic_numbers' is missing"):
        AtomicGraph.from_fields(fields, source="x")


def test_validate_catches_inconsistent_batch() -> None:
    graph = graphs()[0]
    with pytest.raises(DataError, match="'natoms' sums to"):
        graph.replace(natoms=graph.natoms + 1).validate()
    with pytest.raises(DataError, match="'batch' does not match"):
        graph.replace(batch=torch.ones_like(graph.batch)).validate()


def test_to_fields_round_trip_and_float64() -> None:
    graph = graphs()[1]
    again = AtomicGraph.from_fields(graph.to_fields())
    for name in graph.present():
        assert torch.equal(getattr(graph, name), getattr(again, name)), name
    double = AtomicGraph.from_fields(graph.to_fields(), float_dtype=torch.float64)
    assert double.pos.dtype == torch.float64 and double.y.dtype == torch.float64


def test_to_moves_and_casts() -> None:
    graph = graphs()[0].to("cpu", float_dtype=torch.float64)
    assert graph.pos.dtype == torch.float64 and graph.force.dtype == torch.float64
    assert graph.atomic_numbers.dtype == torch.long
