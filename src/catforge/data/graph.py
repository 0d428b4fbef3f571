"""AtomicGraph: one typed container for a single structure or a batch of structures."""

from __future__ import annotations

import dataclasses
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
        return dataclasses.replace(self, **changes)

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

        Floats become ``float_dtype``. Missing ``tags``/``fixed`` default to zeros/False, a missing ``pbc`` to periodic along
        every non-zero cell vector, a missing ``natoms`` to ``len(pos)``. Unknown keys are ignored.
        """
        if keys.POS not in fields or keys.ATOMIC_NUMBERS not in fields:
            missing = keys.POS if keys.POS not in fields else keys.ATOMIC_NUMBERS
            raise DataError(f"{source}: required field '{missing}' is missing")
        values: dict[str, Tensor] = {}
        for name, spec in FIELDS.items():
            if name == keys.BATCH or fields.get(name) is None:
                continue
            values[name] = _as_tensor(fields[name], spec, source, float_dtype)
        pos = values[keys.POS].reshape(-1, 3) if values[keys.POS].numel() else values[keys.POS]
        n_atoms = int(pos.shape[0])
        values[keys.POS] = pos
        values[keys.ATOMIC_NUMBERS] = values[keys.ATOMIC_NUMBERS].reshape(-1)
        if keys.CELL not in values:
            values[keys.CELL] = torch.zeros(3, 3, dtype=float_dtype)
        values[keys.CELL] = values[keys.CELL].reshape(1, 3, 3)
        if keys.PBC not in values:
            values[keys.PBC] = values[keys.CELL][0].abs().sum(dim=1) > 0
        values[keys.PBC] = values[keys.PBC].reshape(1, 3)
        values[keys.NATOMS] = torch.tensor([n_atoms], dtype=torch.long)
        values.setdefault(keys.TAGS, torch.zeros(n_atoms, dtype=torch.long))
        values.setdefault(keys.FIXED, torch.zeros(n_atoms, dtype=torch.bool))
        values[keys.BATCH] = torch.zeros(n_atoms, dtype=torch.long)
        for name in (keys.TAGS, keys.FIXED):
            values[name] = values[name].reshape(-1)
        for name in (keys.FORCES, keys.POS_RELAXED):
            if name in values:
                values[name] = values[name].reshape(-1, 3)
        for name, spec in FIELDS.items():
            if spec.level is Level.GRAPH and spec.trailing_shape == () and name in values:
                values[name] = values[name].reshape(-1)
        if keys.EDGE_INDEX in values:
            values[keys.EDGE_INDEX] = values[keys.EDGE_INDEX].reshape(2, -1)
            n_edges = values[keys.EDGE_INDEX].shape[1]
            if keys.CELL_OFFSETS not in values:
                values[keys.CELL_OFFSETS] = torch.zeros(n_edges, 3, dtype=torch.long)
            values[keys.CELL_OFFSETS] = values[keys.CELL_OFFSETS].reshape(-1, 3)
            values[keys.NEIGHBORS] = torch.tensor([n_edges], dtype=torch.long)
        else:
            values.pop(keys.CELL_OFFSETS, None)
            values.pop(keys.NEIGHBORS, None)
        return cls(**values).validate(source)

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
        """Check shapes, dtypes, counts and finiteness; raise DataError naming the bad field."""
        counts = {Level.ATOM: self.n_atoms, Level.GRAPH: self.n_graphs, Level.EDGE: self.n_edges}
        for name in self.present():
            spec = FIELDS[name]
            value: Tensor = getattr(self, name)
            if name == keys.EDGE_INDEX:
                expected: tuple[int, ...] = (2, self.n_edges)
            else:
                expected = (counts[spec.level], *spec.trailing_shape)
            if tuple(value.shape) != expected:
                raise DataError(
                    f"{source}: field '{name}' has shape {tuple(value.shape)}, expected {expected} "
                    f"({spec.doc})"
                )
            if _kind(value) != spec.kind:
                raise DataError(
                    f"{source}: field '{name}' has dtype {value.dtype}, expected a {spec.kind} tensor"
                )
            if spec.kind == "float" and not bool(torch.isfinite(value).all()):
                raise DataError(f"{source}: field '{name}' contains NaN or infinite values")
        if int(self.natoms.sum()) != self.n_atoms:
            raise DataError(
                f"{source}: 'natoms' sums to {int(self.natoms.sum())} but 'pos' has {self.n_atoms} atoms"
            )
        if (self.atomic_numbers < 1).any() or (self.atomic_numbers > 118).any():
            raise DataError(f"{source}: 'atomic_numbers' must lie in 1..118")
        expected_batch = torch.repeat_interleave(
            torch.arange(self.n_graphs, device=self.natoms.device), self.natoms
        )
        if not torch.equal(self.batch, expected_batch):
            raise DataError(f"{source}: 'batch' does not match 'natoms'")
        self._validate_edges(source)
        return self

    def _validate_edges(self, source: str) -> None:
        if self.edge_index is None:
            if self.cell_offsets is not None or self.neighbors is not None:
                raise DataError(f"{source}: 'cell_offsets'/'neighbors' given without 'edge_index'")
            return
        if self.cell_offsets is None or self.neighbors is None:
            raise DataError(f"{source}: 'edge_index' needs 'cell_offsets' and 'neighbors'")
        if self.n_edges and (self.edge_index.min() < 0 or self.edge_index.max() >= self.n_atoms):
            raise DataError(f"{source}: 'edge_index' refers to atoms outside 0..{self.n_atoms - 1}")
        if int(self.neighbors.sum()) != self.n_edges:
            raise DataError(f"{source}: 'neighbors' does not sum to the number of edges")


def _kind(value: Tensor) -> str:
    if value.dtype == torch.bool:
        return "bool"
    return "float" if value.is_floating_point() else "long"


def _as_tensor(value: Any, spec: keys.FieldSpec, source: str, float_dtype: torch.dtype) -> Tensor:
    """Convert an array, tensor or scalar to the dtype the field's spec asks for."""
    try:
        tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, Tensor) else value)
    except (TypeError, ValueError) as error:
        raise DataError(f"{source}: field '{spec.name}' cannot be read as an array: {error}") from error
    if spec.kind == "float":
        return tensor.to(float_dtype)
    if spec.kind == "bool":
        return tensor != 0 if tensor.dtype != torch.bool else tensor
    if tensor.is_floating_point():
        rounded = tensor.round()
        if not torch.equal(rounded, tensor):
            raise DataError(f"{source}: field '{spec.name}' must hold integers")
        tensor = rounded
    return tensor.long()
