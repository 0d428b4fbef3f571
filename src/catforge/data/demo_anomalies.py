"""OC20-style anomaly detection for relaxed adslabs: desorption, dissociation, intercalation.

Bonds are judged with ASE covalent radii: atoms i and j are bonded when their minimum-image
distance is below ``factor * (r_i + r_j)`` (OC20's anomaly checks use the same idea with natural
cutoffs). Adsorbate atoms carry tag 2, slab atoms tags 0 (fixed subsurface) and 1 (surface).
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.data import covalent_radii
from ase.geometry import get_distances

TAG_ADSORBATE = 2
DESORPTION_FACTOR = 1.5
BOND_FACTOR = 1.5
TOP_LAYER_WINDOW = 0.5  # A: slab atoms this close to the highest one form the top layer
ENERGY_LIMIT = 10.0  # eV: OC20 drops IS2RE systems with |y_relaxed| above this

ANOMALY_KINDS = (
    "failed",
    "not_converged",
    "desorbed",
    "dissociated",
    "intercalated",
    "energy_outlier",
)
"""Every kind :func:`classify` can return, in the order they are checked."""


def _bonded(atoms: Atoms, first: np.ndarray, second: np.ndarray, factor: float) -> np.ndarray:
    """Boolean matrix: is atom ``first[a]`` bonded to atom ``second[b]`` (minimum image)."""
    positions = atoms.get_positions()
    _, distances = get_distances(
        positions[first], positions[second], cell=atoms.cell, pbc=atoms.pbc
    )
    radii = covalent_radii[atoms.get_atomic_numbers()]
    cutoffs = factor * (radii[first][:, None] + radii[second][None, :])
    return distances < cutoffs


def _adsorbate_and_slab(atoms: Atoms) -> tuple[np.ndarray, np.ndarray]:
    tags = atoms.get_tags()
    return np.flatnonzero(tags == TAG_ADSORBATE), np.flatnonzero(tags != TAG_ADSORBATE)


def is_desorbed(atoms: Atoms, factor: float = DESORPTION_FACTOR) -> bool:
    """True when no adsorbate atom is bonded to any slab atom."""
    adsorbate, slab = _adsorbate_and_slab(atoms)
    if not len(adsorbate):
        return False
    return not bool(_bonded(atoms, adsorbate, slab, factor).any())


def adsorbate_bonds(atoms: Atoms, factor: float = BOND_FACTOR) -> np.ndarray:
    """The adsorbate's own connectivity (boolean matrix over its atoms, no self bonds)."""
    adsorbate, _ = _adsorbate_and_slab(atoms)
    bonds = _bonded(atoms, adsorbate, adsorbate, factor)
    np.fill_diagonal(bonds, False)
    return bonds


def is_dissociated(initial: Atoms, final: Atoms, factor: float = BOND_FACTOR) -> bool:
    """True when the adsorbate's bond graph differs between the initial and final structures."""
    return not np.array_equal(adsorbate_bonds(initial, factor), adsorbate_bonds(final, factor))


def top_layer(atoms: Atoms, window: float = TOP_LAYER_WINDOW) -> np.ndarray:
    """Indices of the slab atoms in the top layer (within ``window`` of the highest slab atom)."""
    _, slab = _adsorbate_and_slab(atoms)
    z = atoms.positions[slab, 2]
    return slab[z > z.max() - window]


def is_intercalated(initial: Atoms, final: Atoms) -> bool:
    """True when an adsorbate atom ends below the top layer (its mean height in ``final``).

    The top layer is found in ``initial`` (an ideal, flat slab), then followed to ``final``.
    """
    adsorbate, _ = _adsorbate_and_slab(final)
    if not len(adsorbate):
        return False
    surface_z = float(final.positions[top_layer(initial), 2].mean())
    return bool((final.positions[adsorbate, 2] < surface_z).any())


def classify(
    initial: Atoms,
    final: Atoms,
    *,
    converged: bool = True,
    adsorption_energy: float | None = None,
) -> str | None:
    """The first kind of :data:`ANOMALY_KINDS` that applies (``None``: a good system)."""
    if not converged:
        return "not_converged"
    if is_desorbed(final):
        return "desorbed"
    if is_dissociated(initial, final):
        return "dissociated"
    if is_intercalated(initial, final):
        return "intercalated"
    if adsorption_energy is not None and abs(adsorption_energy) > ENERGY_LIMIT:
        return "energy_outlier"
    return None
