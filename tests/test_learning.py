"""The demo SchNet learns: trained briefly, it predicts val forces far better than zeros.

The data is the demo at 32 systems (seed 1: 21 train, 4 val systems), not the tiny one of the
``demo`` fixture: the tiny val split holds Ni, absent from its 10 train systems, and on it the
val force MAE never went below 1.1 x the zero-force MAE in 360 steps (its test split, whose
elements train does cover, 1.35 x after 270). With 21 train systems the model generalises.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.golden import recipes

DEMO_SYSTEMS = 32
LEARN_STEPS = 270
"""About 6.6 epochs of 41 batches of 16 frames; 45-60 s on one thread."""
SETTINGS = ("--optim.lr_initial=0.005", "--optim.energy_coefficient=0.1")
"""A higher LR and less weight on energies than the 30-epoch demo run: forces learn faster."""
MAX_FORCE_MAE_RATIO = 0.8
"""Bound on val force MAE / zero-force MAE. Measured (demo seed 1, 32 systems, one thread):
zero-force MAE 0.0482 eV/A; after LEARN_STEPS with SETTINGS, 0.0307 eV/A (ratio 0.636); the
same run with lr_initial 1e-9 (0 is refused) gives 2.24 (the untrained model's forces are
large), and a model that only learnt to predict small forces would give about 1. 360 steps
gave 0.648: the ratio has levelled off by 270."""


@pytest.fixture(scope="module")
def demo32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo dataset at 32 systems, seed 1 (about 10 s)."""
    from catforge.data.demo import generate_demo

    out = tmp_path_factory.mktemp("demo32") / "demo_data"
    generate_demo(out, size=DEMO_SYSTEMS, seed=1, workers=1, progress=False)
    return out


def zero_force_mae(demo: Path) -> float:
    """MAE (eV/A) of predicting zero forces on the val split: mean |F| over free components."""
    entries = recipes.read_entries(demo / "s2ef" / "val")
    return float(np.abs(recipes.free_force_components(entries)).mean())


@pytest.mark.slow
def test_trained_model_beats_the_zero_force_baseline(demo32: Path, tmp_path: Path) -> None:
    argv = recipes.train_argv(demo32, tmp_path, LEARN_STEPS, *SETTINGS, print_every=50)
    recipes.run_main(argv)
    val = [record for record in recipes.metrics_records(tmp_path) if record["split"] == "val"]
    final = max(val, key=lambda record: record["step"])
    assert final["step"] == LEARN_STEPS
    baseline = zero_force_mae(demo32)
    assert baseline > 0.01  # the val frames are not all relaxed: there is something to learn
    ratio = final["forces_mae"] / baseline
    assert ratio < MAX_FORCE_MAE_RATIO, f"val force MAE {final['forces_mae']:.4f} eV/A"
