"""Names, shapes, dtypes and units of every field of an atomic graph, documented once.

Field names follow the Open Catalyst Project (OCP) LMDB layout so that OC20 files map one to one.
Each field lives on one *level*: per atom, per graph (structure), or per edge. In a batch of
``n_graphs`` structures the per-atom fields are concatenated and ``batch`` maps atoms to graphs.
Units: positions and cells in Angstrom, energies in eV, forces in eV/Angstrom.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch


class Level(Enum):
    """Which count a field's first dimension follows."""

    ATOM = "atom"
    GRAPH = "graph"
    EDGE = "edge"


@dataclass(frozen=True)
class FieldSpec:
    """How one field is stored: its level, trailing shape, dtype kind, unit and meaning."""

    name: str
    level: Level
    trailing_shape: tuple[int, ...]
    kind: str  # "float", "long" or "bool"
    unit: str
    doc: str

    def dtype(self, float_dtype: torch.dtype = torch.float32) -> torch.dtype:
        """The torch dtype of this field (floats follow ``float_dtype``)."""
        return {"float": float_dtype, "long": torch.long, "bool": torch.bool}[self.kind]


POS = "pos"
ATOMIC_NUMBERS = "atomic_numbers"
CELL = "cell"
PBC = "pbc"
NATOMS = "natoms"
TAGS = "tags"
FIXED = "fixed"
BATCH = "batch"
EDGE_INDEX = "edge_index"
CELL_OFFSETS = "cell_offsets"
NEIGHBORS = "neighbors"
ENERGY = "y"
FORCES = "force"
SID = "sid"
FID = "fid"
ENERGY_INIT = "y_init"
ENERGY_RELAXED = "y_relaxed"
POS_RELAXED = "pos_relaxed"

_SPECS = (
    FieldSpec(POS, Level.ATOM, (3,), "float", "A", "Cartesian positions (n_atoms, 3)."),
    FieldSpec(ATOMIC_NUMBERS, Level.ATOM, (), "long", "", "Atomic numbers Z (n_atoms,)."),
    FieldSpec(
        CELL, Level.GRAPH, (3, 3), "float", "A", "Cell, rows are lattice vectors (n_graphs, 3, 3)."
    ),
    FieldSpec(PBC, Level.GRAPH, (3,), "bool", "", "Periodic along each cell vector (n_graphs, 3)."),
    FieldSpec(NATOMS, Level.GRAPH, (), "long", "", "Atoms per structure (n_graphs,)."),
    FieldSpec(TAGS, Level.ATOM, (), "long", "", "OC20 tags: 0 subsurface, 1 surface, 2 adsorbate."),
    FieldSpec(FIXED, Level.ATOM, (), "bool", "", "True where an atom is fixed (FixAtoms)."),
    FieldSpec(BATCH, Level.ATOM, (), "long", "", "Index of the structure each atom belongs to."),
    FieldSpec(
        EDGE_INDEX, Level.EDGE, (), "long", "", "(2, n_edges): row 0 neighbour j, row 1 centre i."
    ),
    FieldSpec(CELL_OFFSETS, Level.EDGE, (3,), "long", "", "Cell image of j per edge (n_edges, 3)."),
    FieldSpec(NEIGHBORS, Level.GRAPH, (), "long", "", "Edges per structure (n_graphs,)."),
    FieldSpec(ENERGY, Level.GRAPH, (), "float", "eV", "Energy of the structure (n_graphs,)."),
    FieldSpec(
        FORCES, Level.ATOM, (3,), "float", "eV/A", "Forces, fixed atoms included (n_atoms, 3)."
    ),
    FieldSpec(SID, Level.GRAPH, (), "long", "", "System id (OC20 random<sid>) (n_graphs,)."),
    FieldSpec(FID, Level.GRAPH, (), "long", "", "Frame index within a trajectory (n_graphs,)."),
    FieldSpec(ENERGY_INIT, Level.GRAPH, (), "float", "eV", "Energy of the initial structure."),
    FieldSpec(ENERGY_RELAXED, Level.GRAPH, (), "float", "eV", "Energy of the relaxed structure."),
    FieldSpec(POS_RELAXED, Level.ATOM, (3,), "float", "A", "Relaxed positions (n_atoms, 3)."),
)

FIELDS: dict[str, FieldSpec] = {spec.name: spec for spec in _SPECS}
"""Every field by name, in canonical order."""

REQUIRED = (POS, ATOMIC_NUMBERS, CELL, PBC, NATOMS, TAGS, FIXED, BATCH)
"""Fields every graph has; all others are optional."""

FLOAT_FIELDS = tuple(name for name, spec in FIELDS.items() if spec.kind == "float")
