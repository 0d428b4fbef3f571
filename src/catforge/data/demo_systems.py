"""OC20-like adslabs labelled with ASE's EMT: slabs, adsorbates, gas references and relaxations.

This module imports only numpy and ASE (no torch), so the demo generator's worker processes start
fast. Randomness comes only from a ``numpy.random.Generator``; relaxations are deterministic.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache

import numpy as np
from ase import Atoms
from ase.build import add_adsorbate, fcc100, fcc110, fcc111, molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from ase.optimize import LBFGS

from catforge.data.demo_anomalies import classify

log = logging.getLogger(__name__)

METALS = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
"""The fcc metals ASE's EMT has parameters for."""

FACETS = {
    "fcc111": (fcc111, ("ontop", "bridge", "fcc", "hcp"), ((2, 2, 4), (3, 3, 3), (3, 3, 4))),
    "fcc100": (fcc100, ("ontop", "bridge", "hollow"), ((2, 2, 4), (3, 3, 3), (3, 3, 4))),
    "fcc110": (fcc110, ("ontop", "longbridge", "shortbridge", "hollow"), ((2, 2, 5), (3, 2, 5))),
}
"""Facet name -> (ASE builder, adsorption sites, surface cells (nx, ny, layers))."""

ADSORBATES: dict[str, tuple[str, tuple[tuple[float, float, float], ...]]] = {
    "H": ("H", ((0.0, 0.0, 0.0),)),
    "O": ("O", ((0.0, 0.0, 0.0),)),
    "N": ("N", ((0.0, 0.0, 0.0),)),
    "C": ("C", ((0.0, 0.0, 0.0),)),
    "OH": ("OH", ((0.0, 0.0, 0.0), (0.0, 0.0, 0.97))),
    "CO": ("CO", ((0.0, 0.0, 0.0), (0.0, 0.0, 1.15))),
    "CH": ("CH", ((0.0, 0.0, 0.0), (0.0, 0.0, 1.09))),
    "NH": ("NH", ((0.0, 0.0, 0.0), (0.0, 0.0, 1.03))),
}
"""Adsorbate name -> (formula, positions in A with the binding atom first at the origin, +z up)."""

VACUUM = 8.0  # A on each side of the slab, so 16 A between periodic images along z
_ONTOP, _BRIDGE, _HOLLOW = (1.8, 2.2), (1.4, 1.9), (1.1, 1.7)
SITE_HEIGHTS = {
    "ontop": _ONTOP,
    "bridge": _BRIDGE,
    "longbridge": _BRIDGE,
    "shortbridge": _BRIDGE,
    "fcc": _HOLLOW,
    "hcp": _HOLLOW,
    "hollow": _HOLLOW,
}
"""Site -> range (A) of the binding atom's height above the top layer, drawn uniformly."""
JITTER = 0.2  # A, lateral random offset from the ideal site (uniform in a square)
MAX_TILT = np.radians(20.0)
FMAX = 0.05  # eV/A
MAX_STEPS = 200
TAG_SUBSURFACE, TAG_SURFACE, TAG_ADSORBATE = 0, 1, 2


@dataclass(frozen=True)
class SlabSpec:
    """A clean slab: metal, facet, surface cell ``(nx, ny, layers)``; the bottom half is fixed."""

    metal: str
    facet: str
    size: tuple[int, int, int]

    @property
    def n_fixed_layers(self) -> int:
        return self.size[2] // 2


def build_slab(spec: SlabSpec) -> Atoms:
    """The unrelaxed slab, periodic on all three axes, fixed bottom layers tagged 0, top ones 1."""
    builder = FACETS[spec.facet][0]
    slab = builder(spec.metal, size=spec.size, vacuum=VACUUM)
    layer_from_top = slab.get_tags()  # ASE numbers layers 1 (top) .. n (bottom)
    fixed = layer_from_top > spec.size[2] - spec.n_fixed_layers
    slab.set_tags(np.where(fixed, TAG_SUBSURFACE, TAG_SURFACE))
    slab.set_constraint(FixAtoms(mask=fixed))
    slab.pbc = True
    return slab


def build_adsorbate(name: str, rng: np.random.Generator) -> Atoms:
    """An adsorbate, binding atom at the origin, randomly tilted and turned about z."""
    formula, positions = ADSORBATES[name]
    adsorbate = Atoms(formula, positions=positions)
    if len(adsorbate) > 1:
        adsorbate.rotate(np.degrees(rng.uniform(0.0, MAX_TILT)), "x", center=(0, 0, 0))
        adsorbate.rotate(rng.uniform(0.0, 360.0), "z", center=(0, 0, 0))
    adsorbate.set_tags(TAG_ADSORBATE)
    return adsorbate


def make_system(rng: np.random.Generator, sid: int = 0) -> Atoms:
    """One random initial adslab (unrelaxed) with tags, FixAtoms and its recipe in ``info``."""
    metal = METALS[rng.integers(len(METALS))]
    facet = list(FACETS)[rng.integers(len(FACETS))]
    _, sites, cells = FACETS[facet]
    spec = SlabSpec(metal, facet, cells[rng.integers(len(cells))])
    site = sites[rng.integers(len(sites))]
    name = list(ADSORBATES)[rng.integers(len(ADSORBATES))]
    adsorbate = build_adsorbate(name, rng)
    height = float(rng.uniform(*SITE_HEIGHTS[site]))
    jitter = rng.uniform(-JITTER, JITTER, size=2)
    slab = build_slab(spec)
    add_adsorbate(slab, adsorbate, height, position=site, mol_index=0)
    slab.positions[-len(adsorbate) :, :2] += jitter
    slab.info = {
        "sid": sid,
        "metal": metal,
        "facet": facet,
        "size": spec.size,
        "site": site,
        "adsorbate": name,
        "height": height,
    }
    return slab


def make_systems(n: int, seed: int) -> list[Atoms]:
    """``n`` random unrelaxed adslabs with tags and constraints, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    return [make_system(rng, sid) for sid in range(n)]


def slab_spec(atoms: Atoms) -> SlabSpec:
    """The clean-slab recipe of a system made by :func:`make_system`."""
    return SlabSpec(atoms.info["metal"], atoms.info["facet"], tuple(atoms.info["size"]))


def _optimise(atoms: Atoms, fmax: float, steps: int) -> tuple[list[Atoms], bool]:
    """Relax ``atoms`` in place with EMT + LBFGS, recording every frame (initial one included)."""
    atoms.calc = EMT()
    frames: list[Atoms] = []

    def record() -> None:
        frame = atoms.copy()
        frame.calc = SinglePointCalculator(
            frame,
            energy=atoms.get_potential_energy(),
            forces=atoms.get_forces(apply_constraint=False),
        )
        frames.append(frame)

    # LBFGS needs no LAPACK, so a multi-threaded BLAS cannot slow it down (BFGS's eigh can, 10x).
    # logfile=None (no log) is what ASE's Optimizer takes, but LBFGS's annotation omits None.
    optimizer = LBFGS(atoms, logfile=None)  # type: ignore[arg-type]
    optimizer.attach(record, interval=1)
    converged = bool(optimizer.run(fmax=fmax, steps=steps))
    return frames, converged


def relax_system(atoms: Atoms, *, fmax: float = FMAX, steps: int = MAX_STEPS) -> list[Atoms]:
    """Relax a copy of ``atoms`` with EMT; every frame with a SinglePointCalculator (raw forces).

    Each frame's ``info["converged"]`` says whether the relaxation reached ``fmax``.
    """
    frames, converged = _optimise(atoms.copy(), fmax, steps)
    for frame in frames:
        frame.info["converged"] = converged
    return frames


@cache
def clean_slab_energy(spec: SlabSpec) -> float:
    """EMT energy (eV) of the relaxed clean slab (cached per process)."""
    frames, converged = _optimise(build_slab(spec), FMAX / 2, 2 * MAX_STEPS)
    if not converged:
        log.warning("clean slab %s did not converge; using its last frame", spec)
    return float(frames[-1].get_potential_energy())


@cache
def gas_energy(name: str) -> float:
    """EMT energy (eV) of a gas-phase molecule relaxed in a 12 A box (cached per process)."""
    gas = molecule(name)
    gas.cell = (12.0, 12.0, 12.0)
    gas.center()
    frames, _ = _optimise(gas, 0.01, MAX_STEPS)
    return float(frames[-1].get_potential_energy())


def gas_references() -> dict[str, float]:
    """Per-atom gas-phase reference energies (eV) for H, O, C, N.

    As in OC20 (Chanussot et al., ACS Catal. 2021, 11, 6059): H = E(H2)/2, O = E(H2O) - E(H2),
    C = E(CO) - E(H2O) + E(H2), N = E(N2)/2, here with EMT energies of the relaxed molecules.
    """
    h2, h2o, co, n2 = (gas_energy(name) for name in ("H2", "H2O", "CO", "N2"))
    return {"H": h2 / 2, "O": h2o - h2, "C": co - h2o + h2, "N": n2 / 2}


def reference_energy(atoms: Atoms) -> float:
    """E(relaxed clean slab) + sum of gas references of the adsorbate atoms (tag 2).

    Subtracting it from an adslab energy gives the adsorption energy, as in OC20's IS2RE targets
    and S2EF's ``--ref-energy`` option.
    """
    references = gas_references()
    adsorbate = np.asarray(atoms.get_chemical_symbols())[atoms.get_tags() == TAG_ADSORBATE]
    return clean_slab_energy(slab_spec(atoms)) + sum(references[symbol] for symbol in adsorbate)


@dataclass
class SystemResult:
    """One relaxed system: its trajectory as arrays, its reference energy and its anomaly kind."""

    sid: int
    positions: np.ndarray  # (n_frames, n_atoms, 3), A
    energies: np.ndarray  # (n_frames,), raw EMT energies, eV
    forces: np.ndarray  # (n_frames, n_atoms, 3), raw (unconstrained) forces, eV/A
    reference: float  # eV, see reference_energy
    anomaly: str | None  # None for a good system, else a kind of demo_anomalies.ANOMALY_KINDS

    @property
    def adsorption_energies(self) -> np.ndarray:
        """Per-frame adsorption energies (eV): raw energies minus the reference."""
        return self.energies - self.reference


def label_system(atoms: Atoms) -> SystemResult:
    """Relax one system, reference its energies and classify it (the demo's unit of work)."""
    sid = int(atoms.info["sid"])
    try:
        frames = relax_system(atoms)
        reference = reference_energy(atoms)
    except Exception as error:  # a failed relaxation drops the system, as in OC20
        log.warning("system %d: relaxation failed: %s", sid, error)
        empty = np.zeros((0, len(atoms), 3))
        return SystemResult(sid, empty, np.zeros(0), empty, float("nan"), "failed")
    positions = np.stack([frame.positions for frame in frames])
    energies = np.array([frame.get_potential_energy() for frame in frames])
    forces = np.stack([frame.get_forces(apply_constraint=False) for frame in frames])
    if not (np.isfinite(energies).all() and np.isfinite(forces).all()):
        anomaly: str | None = "failed"
    else:
        anomaly = classify(
            frames[0],
            frames[-1],
            converged=bool(frames[-1].info["converged"]),
            adsorption_energy=float(energies[-1] - reference),
        )
    return SystemResult(sid, positions, energies, forces, reference, anomaly)
