"""What a relaxation needs from a model: energies and forces of a batch of structures.

A trained :class:`~catforge.potential.Potential` is a :class:`ForceField` as it is.
:class:`AseForceField` drives any ASE calculator through the same interface (one structure at a
time), so the batched optimizer can be checked against reference physics such as EMT.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from ase.calculators.calculator import Calculator

from catforge.data.atoms import graph_to_atoms
from catforge.data.collate import split
from catforge.data.graph import AtomicGraph
from catforge.models.forces import ModelOutput


class ForceField(Protocol):
    """Energies (n_graphs,) eV and forces (n_atoms, 3) eV/A of every structure of a batch.

    ``device`` and ``dtype`` are where and in what precision it wants positions.
    """

    device: torch.device

    @property
    def dtype(self) -> torch.dtype: ...

    def __call__(self, graph: AtomicGraph) -> ModelOutput: ...


class AseForceField:
    """An ASE calculator as a :class:`ForceField` (float64, on the CPU).

    ``make_calculator`` is called once; the calculator is reused for every structure.
    """

    device = torch.device("cpu")
    dtype = torch.float64

    def __init__(self, make_calculator: Callable[[], Calculator]) -> None:
        self.calculator = make_calculator()

    def __call__(self, graph: AtomicGraph) -> ModelOutput:
        energies, forces = [], []
        for structure in split(graph):
            atoms = graph_to_atoms(structure)
            atoms.calc = self.calculator
            energies.append(atoms.get_potential_energy())
            forces.append(atoms.get_forces(apply_constraint=False))
        return ModelOutput(
            torch.tensor(energies, dtype=torch.float64),
            torch.from_numpy(np.concatenate(forces)).to(torch.float64),
        )
