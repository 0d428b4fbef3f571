"""Regenerate the golden numbers in ``tests/golden/*.json``.

    python tests/golden/regenerate.py [--only NAME]

``model_outputs`` builds the seeded demo SchNet in this process; ``loss_curve`` and
``relaxation`` build the tiny demo data, train 20 steps and relax through ``main.py``
subprocesses in a temporary folder (each record lists those commands, with ``$DEMO`` and ``$RUN``
for the folders). The same recipes run in ``tests/test_golden.py``. Run it twice: the files must
not change.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: tests.*

from tests import test_golden
from tests.golden import recipes

NAMES = ("model_outputs", "loss_curve", "relaxation")


def record(name: str, values: dict[str, Any], steps: list[str], **extra: Any) -> dict[str, Any]:
    """A golden record: values with their command, recipe, versions and tolerances."""
    return {
        "command": f"python tests/golden/regenerate.py --only {name}",
        "recipe": steps,
        **recipes.environment(),
        "values": values,
        "tolerance": test_golden.TOLERANCES[name],
        **extra,
    }


def model_outputs_record() -> dict[str, Any]:
    steps = [
        f"tests/test_golden.py: seeded_model(seed={test_golden.MODEL_SEED}) "
        f"({recipes.S2EF_CONFIG}, torch.manual_seed before building), float32, CPU",
        "energy_and_forces(model, fixed_structure()): Cu fcc111 2x2x3 + CO, fixed positions",
    ]
    return record("model_outputs", test_golden.model_outputs(), steps)


def train_line(steps: int) -> str:
    """The training command of a ``steps``-step golden run, as recorded."""
    argv = recipes.train_argv(recipes.DEMO_PLACEHOLDER, recipes.RUN_PLACEHOLDER, steps)
    return recipes.shown(argv)


def run_records(names: list[str], work: Path) -> dict[str, dict[str, Any]]:
    """``loss_curve`` and/or ``relaxation``, on one build of the tiny demo data."""
    demo = work / "demo_data"
    recipes.run_main(recipes.demo_argv(demo))
    extra = {"data_fingerprint": recipes.data_fingerprint(demo)}
    demo_line = recipes.shown(recipes.demo_argv(recipes.DEMO_PLACEHOLDER))
    records = {}
    if "loss_curve" in names:
        test_golden.train_for_golden(demo, work / "loss", recipes.TRAIN_STEPS)
        steps = [
            demo_line,
            train_line(recipes.TRAIN_STEPS),
            "read $RUN/results/golden/metrics.jsonl",
        ]
        values = recipes.loss_curve(work / "loss")
        records["loss_curve"] = record("loss_curve", values, steps, **extra)
    if "relaxation" in names:
        test_golden.train_for_golden(demo, work / "relax", recipes.RELAX_TRAIN_STEPS)
        relax_argv = recipes.relax_argv(recipes.DEMO_PLACEHOLDER, recipes.RUN_PLACEHOLDER)
        steps = [
            demo_line,
            train_line(recipes.RELAX_TRAIN_STEPS),
            recipes.shown(relax_argv),
            "read $RUN/results/golden-relax/relaxed_pos_0.json and relaxed_energies.npz",
        ]
        values = test_golden.relax_for_golden(demo, work / "relax")
        records["relaxation"] = record("relaxation", values, steps, **extra)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=NAMES, help="regenerate one record")
    args = parser.parse_args(argv)
    names = [args.only] if args.only else list(NAMES)
    records = {}
    if "model_outputs" in names:
        records["model_outputs"] = model_outputs_record()
    run_names = [name for name in names if name != "model_outputs"]
    if run_names:
        with tempfile.TemporaryDirectory(prefix="catforge-golden-") as work:
            records |= run_records(run_names, Path(work))
    for name, content in records.items():
        print(f"wrote {recipes.write_golden(name, content)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
