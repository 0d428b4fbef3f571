"""Tiny deterministic test data: EMT-labelled slabs with adsorbates, molecules and bulk cells."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc100, fcc111, molecule
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms

from catforge.data.atoms import atoms_to_graph
from catforge.data.graph import AtomicGraph

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SMALL_MODEL = ["--model.hidden_channels=16", "--model.num_filters=16", "--model.num_gaussians=20"]
"""Config overrides that shrink the demo SchNet for fast tests."""


def emt_slab(
    metal: str = "Cu",
    adsorbate: str = "O",
    *,
    facet: str = "111",
    size: tuple[int, int, int] = (2, 2, 3),
    seed: int = 0,
    labelled: bool = True,
) -> Atoms:
    """A slab with an adsorbate, bottom layer fixed, OC20 tags, randomly rattled, EMT-labelled."""
    build = fcc111 if facet == "111" else fcc100
    slab = build(metal, size=size, vacuum=6.0, periodic=True)
    layer_tags = slab.get_tags()  # ase: 1 = top layer ... size[2] = bottom layer
    n_slab = len(slab)
    # Adsorbates as vertical chains, first atom down: "CO" binds through C.
    chain = Atoms(adsorbate, positions=[(0.0, 0.0, 1.2 * i) for i in range(len(Atoms(adsorbate)))])
    add_adsorbate(slab, chain, 1.8, "ontop")
    tags = np.full(len(slab), 2)
    tags[:n_slab] = np.where(layer_tags == size[2], 0, 1)
    slab.set_tags(tags)
    slab.set_constraint(
        FixAtoms(mask=np.r_[layer_tags == size[2], np.zeros(len(slab) - n_slab, dtype=bool)])
    )
    slab.rattle(0.05, seed=seed)
    if labelled:
        slab.calc = EMT()
        slab.get_forces()
    return slab


def structures(seed: int = 0) -> list[Atoms]:
    """A varied, labelled set: slabs of several metals/facets/adsorbates, a bulk and a molecule."""
    systems = [
        emt_slab("Cu", "O", seed=seed),
        emt_slab("Pt", "CO", facet="100", seed=seed + 1),
        emt_slab("Ag", "H", size=(3, 2, 2), seed=seed + 2),
    ]
    crystal = bulk("Ni", "fcc", a=3.52, cubic=True) * (2, 1, 1)
    crystal.rattle(0.05, seed=seed)
    crystal.calc = EMT()
    crystal.get_forces()
    gas = molecule("CO")
    gas.calc = EMT()
    gas.get_forces()
    return [*systems, crystal, gas]


def graphs(seed: int = 0) -> list[AtomicGraph]:
    """:func:`structures` as AtomicGraphs with sid = position in the list."""
    return [atoms_to_graph(atoms, sid=index) for index, atoms in enumerate(structures(seed))]


def data_overrides(demo: Path, task: str) -> list[str]:
    """``--dataset.<split>.src=`` overrides pointing a demo config at the demo data in ``demo``."""

    def src(split: str) -> str:
        return str(demo / task / split / ("data.lmdb" if task == "is2re" else ""))

    return [f"--dataset.{split}.src={src(split)}" for split in ("train", "val", "test")]
