"""Conversion between ``ase.Atoms`` and AtomicGraph (tags, FixAtoms, energy and forces)."""

from __future__ import annotations

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from catforge.data import keys
from catforge.data.collate import split
from catforge.data.graph import AtomicGraph


def fixed_mask(atoms: Atoms) -> np.ndarray:
    """Boolean mask (n_atoms,) of atoms held by any FixAtoms constraint."""
    mask = np.zeros(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            mask[constraint.get_indices()] = True
    return mask


def atoms_to_graph(
    atoms: Atoms,
    *,
    sid: int | None = None,
    fid: int | None = None,
    with_labels: bool = True,
    float_dtype: torch.dtype = torch.float32,
    source: str = "atoms",
) -> AtomicGraph:
    """One structure as an AtomicGraph.

    With ``with_labels`` the calculator's energy (``y``) and unconstrained forces (``force``) are
    copied when it has them; no calculation is triggered on a calculator without results.
    """
    fields: dict[str, object] = {
        keys.POS: atoms.get_positions(),
        keys.ATOMIC_NUMBERS: atoms.get_atomic_numbers(),
        keys.CELL: atoms.get_cell().array,
        keys.PBC: atoms.get_pbc(),
        keys.TAGS: atoms.get_tags(),
        keys.FIXED: fixed_mask(atoms),
        keys.SID: sid,
        keys.FID: fid,
    }
    if with_labels and atoms.calc is not None:
        fields[keys.ENERGY] = _stored_result(atoms, "energy")
        fields[keys.FORCES] = _stored_result(atoms, "forces")
    return AtomicGraph.from_fields(fields, source=source, float_dtype=float_dtype)


def _stored_result(atoms: Atoms, name: str) -> np.ndarray | float | None:
    """A result the calculator already holds (forces without constraints applied), else None."""
    calc = atoms.calc
    if name not in getattr(calc, "results", {}):
        return None
    try:
        if name == "forces":
            return atoms.get_forces(apply_constraint=False)
        return atoms.get_potential_energy()
    except PropertyNotImplementedError:
        return None


def graph_to_atoms(graph: AtomicGraph) -> Atoms:
    """One structure back to ``ase.Atoms`` with FixAtoms, tags and a SinglePointCalculator.

    ``sid``, ``fid``, ``y_init``, ``y_relaxed`` go to ``atoms.info``.
    """
    if graph.n_graphs != 1:
        raise ValueError(
            f"graph_to_atoms needs one structure, got {graph.n_graphs}; use batch_to_atoms"
        )
    atoms = Atoms(
        numbers=graph.atomic_numbers.cpu().numpy(),
        positions=graph.pos.detach().cpu().double().numpy(),
        cell=graph.cell[0].detach().cpu().double().numpy(),
        pbc=graph.pbc[0].cpu().numpy(),
        tags=graph.tags.cpu().numpy(),
    )
    if bool(graph.fixed.any()):
        atoms.set_constraint(FixAtoms(mask=graph.fixed.cpu().numpy()))
    for name in (keys.SID, keys.FID, keys.ENERGY_INIT, keys.ENERGY_RELAXED):
        value = getattr(graph, name)
        if value is not None:
            atoms.info[name] = value.item()
    if graph.y is not None or graph.force is not None:
        results: dict[str, object] = {}
        if graph.y is not None:
            results["energy"] = float(graph.y.item())
        if graph.force is not None:
            results["forces"] = graph.force.detach().cpu().double().numpy()
        atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def batch_to_atoms(batch: AtomicGraph) -> list[Atoms]:
    """Every structure of a batch as ``ase.Atoms``."""
    return [graph_to_atoms(graph) for graph in split(batch)]
