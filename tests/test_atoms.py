"""ASE <-> AtomicGraph conversion."""

from __future__ import annotations

import numpy as np
from ase.calculators.emt import EMT

from catforge.data.atoms import atoms_to_graph, fixed_mask, graph_to_atoms
from tests.factories import emt_slab, structures


def test_atoms_round_trip_keeps_everything() -> None:
    for original in structures():
        atoms = graph_to_atoms(atoms_to_graph(original, float_dtype=__import__("torch").float64))
        np.testing.assert_allclose(atoms.positions, original.positions)
        np.testing.assert_allclose(atoms.cell.array, original.cell.array)
        assert (atoms.numbers == original.numbers).all()
        assert (atoms.pbc == original.pbc).all()
        assert (atoms.get_tags() == original.get_tags()).all()
        assert (fixed_mask(atoms) == fixed_mask(original)).all()
        np.testing.assert_allclose(atoms.get_potential_energy(), original.get_potential_energy())
        np.testing.assert_allclose(
            atoms.get_forces(apply_constraint=False), original.get_forces(apply_constraint=False)
        )


def test_forces_are_stored_without_constraints() -> None:
    slab = emt_slab()
    graph = atoms_to_graph(slab)
    raw = slab.get_forces(apply_constraint=False)
    assert np.abs(raw[fixed_mask(slab)]).max() > 1e-3  # fixed atoms feel forces
    np.testing.assert_allclose(graph.force.numpy(), raw, rtol=1e-6, atol=1e-6)
    assert graph.fixed.sum().item() == fixed_mask(slab).sum()


def test_unlabelled_atoms_trigger_no_calculation() -> None:
    slab = emt_slab(labelled=False)
    slab.calc = EMT()  # attached, never run
    graph = atoms_to_graph(slab)
    assert graph.y is None and graph.force is None
    assert atoms_to_graph(emt_slab(), with_labels=False).y is None


def test_ids_go_to_info() -> None:
    atoms = graph_to_atoms(atoms_to_graph(emt_slab(), sid=12, fid=3))
    assert atoms.info == {"sid": 12, "fid": 3}
