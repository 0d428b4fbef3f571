"""AtomicGraph: one typed container for a single structure or a batch of structures."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from catforge.data import keys
from catforge.data.keys import FIELDS, Level
from catforge.errors import DataError


@dataclass(frozen=True, eq=False)
class AtomicGraph:
    """Structures as tensors with OCP field names; see :mod:`catforge.data.keys` for shapes/units.

    A single structure is a batch of one (``n_graphs == 1``). Optional fields are ``None`` when
    absent. Instances are immutable: use :meth:`replace` to change fields.
    """

    pos: Tensor
    atomic_numbers: Tensor
    cell: Tensor
    pbc: Tensor
    natoms: Tensor
    tags: Tensor
    fixed: Tensor
    batch: Tensor
    edge_index: Tensor | None = None
    cell_offsets: Tensor | None = None
    neighbors: Tensor | None = None
    y: Tensor | None = None
    force: Tensor | None = None
    sid: Tensor | None = None
    fid: Tensor | None = None
    y_init: Tensor | None = None
    y_relaxed: Tensor | None = None
    pos_relaxed: Tensor | None = None

    @property
    def n_graphs(self) -> int:
        return int(self.natoms.shape[0])

    @property
    def n_atoms(self) -> int:
        return int(self.pos.shape[0])

    @property
    def n_edges(self) -> int:
        return 0 if self.edge_index is None else int(self.edge_index.shape[1])

    @property
    def has_edges(self) -> bool:
        return self.edge_index is not None

    def present(self) -> tuple[str, ...]:
        """Names of the fields that are set, in canonical order."""
        return tuple(name for name in FIELDS if getattr(self, name) is not None)

    def replace(self, **changes: Tensor | None) -> AtomicGraph:
        """A copy with some fields replaced (use ``None`` to drop an optional field)."""
        unknown = changes.keys() - FIELDS.keys()
        if unknown:
            raise TypeError(f"AtomicGraph has no field(s) {sorted(unknown)}")
        fields: dict[str, Tensor] = {name: getattr(self, name) for name in self.present()}
        for name, value in changes.items():
            if value is None:
                fields.pop(name, None)
            else:
                fields[name] = value
        return AtomicGraph(**fields)

    def to(self, device: torch.device | str, float_dtype: torch.dtype | None = None) -> AtomicGraph:
        """Move every tensor to ``device`` (and floats to ``float_dtype`` if given)."""
        moved: dict[str, Tensor] = {}
        for name in self.present():
            value: Tensor = getattr(self, name)
            if float_dtype is not None and value.is_floating_point():
                value = value.to(device=device, dtype=float_dtype)
            else:
                value = value.to(device)
            moved[name] = value
        return AtomicGraph(**moved)

    @classmethod
    def from_fields(
        cls,
        fields: Mapping[str, Any],
        source: str = "structure",
        float_dtype: torch.dtype = torch.float32,
    ) -> AtomicGraph:
        """Build one validated structure from a mapping of arrays, tensors or scalars.

        Floats become ``float_dtype``. Missing ``tags``/``fixed`` default to zeros/False, a
        missing ``pbc`` to periodic along every non-zero cell vector, and ``natoms`` is always
        ``len(pos)``. Unknown keys are ignored. Works on numpy arrays (this is the hot path of
        every dataset read) and shares their memory with the returned tensors.
        """
        for name in (keys.POS, keys.ATOMIC_NUMBERS):
            if fields.get(name) is None:
                raise DataError(f"{source}: required field '{name}' is missing")
        np_float = torch.empty(0, dtype=float_dtype).numpy().dtype
        arrays: dict[str, np.ndarray] = {}
        for name, spec in FIELDS.items():
            if name != keys.BATCH and fields.get(name) is not None:
                arrays[name] = _as_array(fields[name], spec, source, np_float)
        n_atoms = arrays[keys.POS].size // 3
        for name, spec in FIELDS.items():
            if name in arrays and name != keys.EDGE_INDEX:
                level_count = n_atoms if spec.level is Level.ATOM else -1
                arrays[name] = _reshape(
                    arrays[name], (level_count, *spec.trailing_shape), name, source
                )
        cell = arrays.setdefault(keys.CELL, np.zeros((1, 3, 3), dtype=np_float))
        arrays.setdefault(keys.PBC, np.abs(cell[0]).sum(axis=1)[None] > 0)
        arrays[keys.NATOMS] = np.array([n_atoms], dtype=np.int64)
        arrays.setdefault(keys.TAGS, np.zeros(n_atoms, dtype=np.int64))
        arrays.setdefault(keys.FIXED, np.zeros(n_atoms, dtype=bool))
        arrays[keys.BATCH] = np.zeros(n_atoms, dtype=np.int64)
        if keys.EDGE_INDEX in arrays:
            edges = _reshape(arrays[keys.EDGE_INDEX], (2, -1), keys.EDGE_INDEX, source)
            arrays[keys.EDGE_INDEX] = edges
            arrays.setdefault(keys.CELL_OFFSETS, np.zeros((edges.shape[1], 3), dtype=np.int64))
            arrays[keys.NEIGHBORS] = np.array([edges.shape[1]], dtype=np.int64)
        else:
            arrays.pop(keys.CELL_OFFSETS, None)
            arrays.pop(keys.NEIGHBORS, None)
        check_arrays(arrays, source)
        return cls(**{name: torch.from_numpy(array) for name, array in arrays.items()})

    def to_fields(self) -> dict[str, np.ndarray]:
        """The fields of a single structure as numpy arrays (the LMDB storage layout)."""
        if self.n_graphs != 1:
            raise ValueError(f"to_fields needs a single structure, got a batch of {self.n_graphs}")
        return {
            name: getattr(self, name).detach().cpu().numpy()
            for name in self.present()
            if name not in (keys.BATCH, keys.NEIGHBORS)
        }

    def validate(self, source: str = "structure") -> AtomicGraph:
        """Check shapes, dtypes, counts, finiteness, Z in 1..118 and that every structure has
        atoms; raise DataError naming ``source`` and the bad field."""
        check_arrays(
            {name: getattr(self, name).detach().cpu().numpy() for name in self.present()}, source
        )
        return self


def check_arrays(arrays: Mapping[str, np.ndarray], source: str) -> None:
    """Validate the fields of a graph given as numpy arrays (see :meth:`AtomicGraph.validate`)."""
    natoms = arrays[keys.NATOMS]
    n_atoms = len(arrays[keys.POS])
    edge_index = arrays.get(keys.EDGE_INDEX)
    n_edges = 0 if edge_index is None or edge_index.ndim != 2 else edge_index.shape[1]
    counts = {Level.ATOM: n_atoms, Level.GRAPH: len(natoms), Level.EDGE: n_edges}
    for name, array in arrays.items():
        spec = FIELDS[name]
        if name == keys.EDGE_INDEX:
            expected: tuple[int, ...] = (2, n_edges)
        else:
            expected = (counts[spec.level], *spec.trailing_shape)
        if array.shape != expected:
            raise DataError(
                f"{source}: field '{name}' has shape {array.shape}, expected {expected}: {spec.doc}"
            )
        if _KINDS.get(array.dtype.kind) != spec.kind:
            raise DataError(
                f"{source}: field '{name}' has dtype {array.dtype}, expected {spec.kind}"
            )
        if spec.kind == "float" and not np.isfinite(array).all():
            raise DataError(f"{source}: field '{name}' contains NaN or infinite values")
    if natoms.size and natoms.min() < 1:
        empty = int(np.flatnonzero(natoms < 1)[0])
        which = "" if len(natoms) == 1 else f" (structure {empty} of the batch)"
        raise DataError(
            f"{source}: structure has no atoms{which}; every structure needs at least one atom "
            "(remove it from the input)"
        )
    if natoms.sum() != n_atoms:
        total = int(natoms.sum())
        raise DataError(f"{source}: 'natoms' sums to {total} but 'pos' has {n_atoms} atoms")
    check_atomic_numbers(arrays[keys.ATOMIC_NUMBERS], source)
    if not np.array_equal(arrays[keys.BATCH], np.repeat(np.arange(len(natoms)), natoms)):
        raise DataError(f"{source}: 'batch' does not match 'natoms'")
    _validate_edges(arrays, n_atoms, source)


def check_atomic_numbers(numbers: np.ndarray, source: str) -> None:
    """Raise DataError naming the first atomic number outside 1..118 and its atom index."""
    if numbers.size and (numbers.min() < 1 or numbers.max() > 118):
        atom = int(np.flatnonzero((numbers < 1) | (numbers > 118))[0])
        raise DataError(
            f"{source}: 'atomic_numbers' holds {int(numbers[atom])} at atom {atom}; "
            "atomic numbers must lie in 1..118"
        )


def _validate_edges(arrays: Mapping[str, np.ndarray], n_atoms: int, source: str) -> None:
    edge_index = arrays.get(keys.EDGE_INDEX)
    if edge_index is None:
        if keys.CELL_OFFSETS in arrays or keys.NEIGHBORS in arrays:
            raise DataError(f"{source}: 'cell_offsets'/'neighbors' given without 'edge_index'")
        return
    if keys.CELL_OFFSETS not in arrays or keys.NEIGHBORS not in arrays:
        raise DataError(f"{source}: 'edge_index' needs 'cell_offsets' and 'neighbors'")
    if edge_index.size and (edge_index.min() < 0 or edge_index.max() >= n_atoms):
        raise DataError(f"{source}: 'edge_index' refers to atoms outside 0..{n_atoms - 1}")
    if arrays[keys.NEIGHBORS].sum() != edge_index.shape[1]:
        raise DataError(f"{source}: 'neighbors' does not sum to the number of edges")


_KINDS = {"b": "bool", "f": "float", "i": "long", "u": "long"}


def _as_array(value: Any, spec: keys.FieldSpec, source: str, np_float: np.dtype) -> np.ndarray:
    """Convert an array, tensor or scalar to a writable numpy array of the field's dtype."""
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
        if spec.kind == "float":
            array = array.astype(np_float, copy=False)
        elif spec.kind == "bool":
            array = array != 0 if array.dtype != np.bool_ else array
        else:
            if np.issubdtype(array.dtype, np.floating) and not np.array_equal(
                np.round(array), array
            ):
                raise DataError(f"{source}: field '{spec.name}' must hold integers")
            array = array.astype(np.int64, copy=False)
    except (TypeError, ValueError) as error:
        message = f"{source}: field '{spec.name}' cannot be read as an array: {error}"
        raise DataError(message) from error
    return array if array.flags.writeable else array.copy()


def _reshape(array: np.ndarray, shape: tuple[int, ...], name: str, source: str) -> np.ndarray:
    try:
        return array.reshape(shape)
    except ValueError as error:
        expected = FIELDS[name].doc
        raise DataError(f"{source}: field '{name}' has shape {array.shape}; {expected}") from error
