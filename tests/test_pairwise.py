"""The Morse pair potential against its formula (numpy), its smooth cutoff, its config errors and
a small fit. The suite every model passes is ``test_models.py``."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from ase import Atoms

from catforge.data.atoms import atoms_to_graph
from catforge.data.collate import collate
from catforge.data.edges import EdgeBuilder
from catforge.data.graph import AtomicGraph
from catforge.data.graph_spec import GraphSpec
from catforge.errors import ConfigError
from catforge.models import ForceModel, ModelOutput, Morse
from catforge.models.pairwise import smooth_switch

CU, O = 29, 8
PARAMETERS = {CU: (0.7, 1.3, 2.6, -3.5), O: (0.2, 2.1, 1.4, -1.1)}
"""Hand-set ``(D eV, a 1/A, r_e A, e_Z eV)`` per element."""


def wrap(energy_model: Morse) -> ForceModel:
    return ForceModel(energy_model, edges=EdgeBuilder(energy_model.graph_spec))


def morse(**options: Any) -> ForceModel:
    """A float64 Morse model with the hand-set parameters of Cu and O."""
    energy_model = Morse(**options).double()
    with torch.no_grad():
        for z, (depth, stiffness, distance, energy) in PARAMETERS.items():
            energy_model.log_well_depth[z] = math.log(depth)
            energy_model.log_stiffness[z] = math.log(stiffness)
            energy_model.log_equilibrium_distance[z] = math.log(distance)
            energy_model.atom_energy[z] = energy
    return wrap(energy_model)


def dimer(symbols: str, distance: float) -> AtomicGraph:
    atoms = Atoms(symbols, positions=[[0.0, 0.0, 0.0], [distance, 0.0, 0.0]])
    return atoms_to_graph(atoms, float_dtype=torch.float64)


def predict(model: ForceModel, graph: AtomicGraph) -> ModelOutput:
    return model(graph, training=False)


def reference_pair(z_i: int, z_j: int, r: float, cutoff: float, width: float) -> float:
    """The pair energy (eV) written out from the formula, in numpy."""
    d_i, a_i, r_i, _ = PARAMETERS[z_i]
    d_j, a_j, r_j, _ = PARAMETERS[z_j]
    depth, stiffness, minimum = np.sqrt(d_i * d_j), (a_i + a_j) / 2, (r_i + r_j) / 2
    x = np.clip((r - cutoff + width) / width, 0.0, 1.0)
    switch = 1 - 10 * x**3 + 15 * x**4 - 6 * x**5
    return float(switch * (depth * (1 - np.exp(-stiffness * (r - minimum))) ** 2 - depth))


@pytest.mark.parametrize("distance", [1.2, 2.0, 3.3, 5.4, 5.95, 6.5])  # 5.4, 5.95: switching
def test_dimer_energy_is_the_formula_with_mixing_rules(distance: float) -> None:
    out = predict(morse(), dimer("CuO", distance))
    expected = PARAMETERS[CU][3] + PARAMETERS[O][3] + reference_pair(CU, O, distance, 6.0, 1.0)
    assert out.energy.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_a_periodic_chain_sums_every_image_pair_once() -> None:
    """One Cu per 2.4 A along x: each atom sees images at 2.4 and 4.8 A on both sides."""
    atoms = Atoms("Cu", positions=[[0.0, 0.0, 0.0]], cell=[2.4, 0.0, 0.0], pbc=[True, False, False])
    out = predict(morse(), atoms_to_graph(atoms, float_dtype=torch.float64))
    pairs = sum(reference_pair(CU, CU, r, 6.0, 1.0) for r in (2.4, 4.8))  # 2 neighbours each / 2
    assert out.energy.item() == pytest.approx(PARAMETERS[CU][3] + pairs, rel=1e-12)


def test_the_well_bottom_is_at_the_mixed_equilibrium_distance() -> None:
    minimum = (PARAMETERS[CU][2] + PARAMETERS[O][2]) / 2
    out = predict(morse(), dimer("CuO", minimum))
    assert out.forces is not None and out.forces.abs().max().item() < 1e-12
    depth = math.sqrt(PARAMETERS[CU][0] * PARAMETERS[O][0])
    assert out.energy.item() == pytest.approx(sum(p[3] for p in PARAMETERS.values()) - depth)


def test_energy_and_force_go_smoothly_to_zero_at_the_cutoff() -> None:
    model = morse(cutoff=5.0, switch_width=1.5)
    distances = np.linspace(3.4, 5.2, 181)  # the switching region and beyond, 0.01 A apart
    graph = collate([dimer("CuCu", float(r)) for r in distances])
    out = predict(model, graph)
    assert out.forces is not None
    pair = out.energy.numpy() - 2 * PARAMETERS[CU][3]
    force = out.forces[1::2, 0].numpy()  # on the second atom, along the bond
    beyond = distances >= 5.0
    assert np.abs(pair[beyond]).max() == 0 and np.abs(force[beyond]).max() == 0
    last = force[distances < 5.0][-1]  # 0.01 A inside: the force has all but vanished
    assert 0 < abs(last) < 1e-4
    numeric = -np.gradient(pair, distances)  # force = -dE/dr, compare in the interior
    np.testing.assert_allclose(force[1:-1], numeric[1:-1], atol=2e-4)
    assert np.abs(np.diff(force)).max() < 1e-2  # no jump anywhere: |dF/dr| < 1 eV/A^2


def test_smooth_switch_is_c2_at_both_ends() -> None:
    r = torch.tensor([3.0, 3.5, 4.25, 5.0, 5.5], dtype=torch.float64, requires_grad=True)
    s = smooth_switch(r, 5.0, 1.5)
    (first,) = torch.autograd.grad(s.sum(), r, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), r)
    torch.testing.assert_close(s.detach(), torch.tensor([1.0, 1.0, 0.5, 0.0, 0.0]).double())
    assert first[[0, 1, 3, 4]].abs().max() < 1e-12 and second[[0, 1, 3, 4]].abs().max() < 1e-12


def test_defaults_and_graph_spec() -> None:
    model = Morse()
    assert model.graph_spec == GraphSpec(6.0, None, use_pbc=True, otf_graph=False)
    assert list(model.state_dict()) == [
        "log_well_depth",
        "log_stiffness",
        "log_equilibrium_distance",
        "atom_energy",
    ]
    assert torch.allclose(model.log_well_depth.exp(), torch.tensor(0.5))
    assert torch.equal(model.atom_energy, torch.zeros(119))


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"cutoff": 0.0}, r"model\.cutoff must be a distance in A > 0"),
        ({"well_depth": -0.1}, r"model\.well_depth must be an energy in eV > 0"),
        ({"stiffness": 0.0}, r"model\.stiffness must be an inverse length in 1/A > 0"),
        ({"equilibrium_distance": math.nan}, r"model\.equilibrium_distance must be a distance"),
        ({"switch_width": 0.0}, r"model\.switch_width must be a distance in A in \(0, model"),
        ({"switch_width": 7.0}, r"model\.switch_width must be"),
        ({"max_neighbors": 0}, r"model\.max_neighbors must be >= 1"),
    ],
)
def test_values_morse_cannot_use_are_config_errors(block: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Morse(**block)  # type: ignore[arg-type]


def test_fitting_recovers_a_morse_curve() -> None:
    """Adam on a Cu2 curve made with other parameters brings the model onto it."""
    target = morse()
    model = wrap(Morse().double())
    graph = collate([dimer("CuCu", float(r)) for r in np.linspace(2.0, 4.5, 26)])
    with torch.no_grad():
        wanted = predict(target, graph).energy - 2 * PARAMETERS[CU][3]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(300):
        optimizer.zero_grad()
        loss = (model(graph, training=True).energy - wanted).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 1e-3 * losses[0]
