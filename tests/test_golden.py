"""Golden numbers: current results against the stored ones in ``tests/golden/*.json``.

Three records, each with the command that regenerates it (``python tests/golden/regenerate.py
--only NAME``) and the torch version it was made with:

- ``model_outputs``: energy and forces of the seeded, untrained demo SchNet on a fixed Cu(111)+CO;
- ``loss_curve``: the per-step train loss of a 20-step ``main.py --mode train`` on the tiny demo;
- ``relaxation``: the end state of ``main.py --mode run-relaxations`` of the IS2RE val structures
  with the checkpoint of a 36-step run (``recipes.RELAX_TRAIN_STEPS`` says why 36).

A failure after an intended change of the numbers: check the change, then regenerate and review
the diff of the JSON files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import add_adsorbate, fcc111
from ase.constraints import FixAtoms

from tests.golden import recipes

MODEL_SEED = 0


# The library calls these numbers go through, in one place: update here when they move.
def seeded_model(seed: int = MODEL_SEED) -> torch.nn.Module:
    """The demo S2EF SchNet (``configs/demo/s2ef_schnet.yml``) initialised after manual_seed."""
    from catforge.assemble.models import build_model
    from catforge.config import load_config

    config = load_config(recipes.ROOT / recipes.S2EF_CONFIG)
    torch.manual_seed(seed)
    return build_model(config).eval()


def energy_and_forces(model: torch.nn.Module, atoms: Atoms) -> tuple[float, np.ndarray]:
    """The model's raw energy and forces (n_atoms, 3) for one structure (no label normaliser)."""
    from catforge.data.atoms import atoms_to_graph
    from catforge.data.collate import collate

    output = model(collate([atoms_to_graph(atoms, with_labels=False)]), training=False)
    assert output.forces is not None
    return float(output.energy.reshape(-1)[0]), output.forces.detach().numpy()


TOLERANCES: dict[str, dict[str, Any]] = {
    "model_outputs": {
        "rtol": 1e-5,
        "atol_fraction_of_max_force": 1e-5,
        "note": "float32 CPU. Reordering the atoms moves the energy by ~2e-7 relative and the "
        "forces by ~1e-6 * max |F|, a rigid translation by up to 5e-6 * max |F|; components "
        "near zero carry the absolute error of the largest, hence atol = 1e-5 * max |F|",
    },
    "loss_curve": {
        "rtol": 1e-4,
        "note": "20 optimizer steps amplify float32 rounding; steps must match exactly",
    },
    "relaxation": {
        "positions_atol_A": 1e-4,
        "energy_atol_eV": 1e-4,
        "note": "both structures converge; a 1e-7 relative weight perturbation moved positions "
        "by <= 6.5e-6 A and energies by <= 2.2e-5 eV. Steps and convergence must match exactly",
    },
}
"""How closely each record must be reproduced; regenerate.py stores these with the numbers."""


def fixed_structure() -> Atoms:
    """Cu(111) 2x2x3 with a tilted CO off the ontop site, bottom layer fixed; no randomness.

    The adsorbate sits off every symmetry element, so no force component vanishes by symmetry.
    """
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=7.0, periodic=True)
    layer = slab.get_tags()  # 1 = top ... 3 = bottom
    add_adsorbate(slab, "C", 1.85, position=(0.35, 0.25))
    add_adsorbate(slab, "O", 2.95, position=(0.75, 0.45))
    slab.set_tags(np.r_[np.where(layer == 3, 0, 1), [2, 2]])
    slab.set_constraint(FixAtoms(mask=np.r_[layer == 3, [False, False]]))
    return slab


def model_outputs() -> dict[str, Any]:
    """Energy and forces of :func:`seeded_model` on :func:`fixed_structure`."""
    energy, forces = energy_and_forces(seeded_model(), fixed_structure())
    return {"energy": energy, "forces": forces.tolist()}


def train_for_golden(demo: Path, run_dir: Path, steps: int) -> None:
    """A ``steps``-step training run: the loss curve's, or the relaxation checkpoint's."""
    recipes.run_main(recipes.train_argv(demo, run_dir, steps))


def relax_for_golden(demo: Path, run_dir: Path) -> dict[str, Any]:
    """Relax the IS2RE val structures with ``run_dir``'s checkpoint; the end state."""
    recipes.run_main(recipes.relax_argv(demo, run_dir))
    return recipes.relaxation_end_state(run_dir)


@pytest.fixture(scope="module")
def loss_run(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run folder of the 20-step training on the tiny demo data."""
    run_dir = tmp_path_factory.mktemp("loss_run")
    train_for_golden(demo, run_dir, recipes.TRAIN_STEPS)
    return run_dir


def test_model_outputs_match_golden() -> None:
    golden, tolerance = recipes.read_golden("model_outputs"), TOLERANCES["model_outputs"]
    current = model_outputs()
    stored_forces = np.array(golden["values"]["forces"])
    assert np.abs(stored_forces).min() > 1e-6  # every component is a real check
    np.testing.assert_allclose(
        current["energy"], golden["values"]["energy"], rtol=tolerance["rtol"]
    )
    atol = tolerance["atol_fraction_of_max_force"] * np.abs(stored_forces).max()
    np.testing.assert_allclose(current["forces"], stored_forces, rtol=tolerance["rtol"], atol=atol)


def test_demo_data_matches_golden_fingerprint(demo: Path) -> None:
    # When this fails, the demo generator changed and every run below differs for that reason.
    for name in ("loss_curve", "relaxation"):
        stored = recipes.read_golden(name)["data_fingerprint"]
        current = recipes.data_fingerprint(demo)
        assert current.keys() == stored.keys()
        for split, values in stored.items():
            for key, value in values.items():
                assert current[split][key] == pytest.approx(value, rel=1e-12), (name, split, key)


def test_loss_curve_matches_golden(loss_run: Path) -> None:
    golden, rtol = recipes.read_golden("loss_curve"), TOLERANCES["loss_curve"]["rtol"]
    current = recipes.loss_curve(loss_run)
    assert current["step"] == golden["values"]["step"] == list(range(1, recipes.TRAIN_STEPS + 1))
    np.testing.assert_allclose(current["loss"], golden["values"]["loss"], rtol=rtol)
    assert current["val"].keys() == golden["values"]["val"].keys()
    for key, value in golden["values"]["val"].items():
        np.testing.assert_allclose(current["val"][key], value, rtol=rtol, err_msg=key)


def test_relaxation_end_state_matches_golden(demo: Path, tmp_path: Path) -> None:
    golden, tolerance = recipes.read_golden("relaxation"), TOLERANCES["relaxation"]
    train_for_golden(demo, tmp_path, recipes.RELAX_TRAIN_STEPS)
    current = relax_for_golden(demo, tmp_path)
    stored = golden["values"]
    assert (current["ids"], current["steps"], current["converged"]) == (
        stored["ids"],
        stored["steps"],
        stored["converged"],
    )
    for sid, now, then in zip(
        stored["ids"], current["positions"], stored["positions"], strict=True
    ):
        np.testing.assert_allclose(
            now, then, rtol=0, atol=tolerance["positions_atol_A"], err_msg=sid
        )
    np.testing.assert_allclose(
        current["energy"], stored["energy"], rtol=0, atol=tolerance["energy_atol_eV"]
    )
