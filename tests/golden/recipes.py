"""The runs behind the golden numbers, through the command line only (``main.py`` subprocesses).

Each recipe returns plain JSON values. ``tests/golden/regenerate.py`` stores them with their
provenance in ``tests/golden/<name>.json``; ``tests/test_golden.py`` reruns the same recipes and
compares. Labels are read from the LMDB files directly (keys ``b"0".."N-1"``, each a pickled
dict of numpy arrays, as the README documents), independently of catforge's readers.
"""

from __future__ import annotations

import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
GOLDEN_DIR = Path(__file__).resolve().parent
S2EF_CONFIG = "configs/demo/s2ef_schnet.yml"
IS2RS_CONFIG = "configs/demo/is2rs_schnet.yml"
DEMO_OPTIONS = ("--size", "tiny", "--seed", "1", "--workers", "1")
"""The tiny demo data, as the session fixture ``demo`` of tests/conftest.py builds it."""
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
"""One thread per run: float32 sums in one fixed order, whatever the machine's core count."""
TRAIN_STEPS = 20
"""The loss curve's run."""
RELAX_TRAIN_STEPS = 36
"""The relaxation checkpoint's run: two epochs of the tiny demo's 18 batches. With it both IS2RE
val structures converge (15 and 20 LBFGS steps), and a 1e-7 relative perturbation of its
weights moves the end state by under 1e-5 A. After 20 steps one structure never converges: it
slides for all 300 steps, and the same perturbation moves its end state by 0.09 A."""
RUN_ID = "golden"
DEMO_PLACEHOLDER = Path("$DEMO")
RUN_PLACEHOLDER = Path("$RUN")


def demo_argv(out: Path) -> list[str]:
    """``main.py data demo`` building the tiny demo data in ``out``."""
    return ["main.py", "data", "demo", "--out", str(out), *DEMO_OPTIONS]


def _dataset_overrides(demo: Path) -> list[str]:
    return [f"--dataset.{split}.src={demo / 's2ef' / split}" for split in ("train", "val", "test")]


def train_argv(
    demo: Path, run_dir: Path, steps: int, *extra: str, print_every: int = 1
) -> list[str]:
    """``main.py --mode train`` of the demo S2EF SchNet for ``steps`` steps on the CPU."""
    flags = [f"--config-yml={S2EF_CONFIG}", "--cpu", f"--run-dir={run_dir}"]
    flags += [f"--timestamp-id={RUN_ID}", f"--print-every={print_every}"]
    return [
        "main.py",
        "--mode=train",
        *flags,
        *_dataset_overrides(demo),
        f"--optim.max_steps={steps}",
        *extra,
    ]


def relax_argv(demo: Path, run_dir: Path) -> list[str]:
    """``main.py --mode run-relaxations`` of the IS2RE val structures with the run's checkpoint."""
    checkpoint = run_dir / "checkpoints" / RUN_ID / "checkpoint.pt"
    flags = [f"--config-yml={IS2RS_CONFIG}", "--cpu", f"--run-dir={run_dir}"]
    flags += [f"--timestamp-id={RUN_ID}-relax", f"--checkpoint={checkpoint}"]
    relax = [
        f"--task.relax_dataset.src={demo / 'is2re' / 'val' / 'data.lmdb'}",
        f"--task.relax_opt.traj_dir={run_dir / 'trajectories'}",
    ]
    return ["main.py", "--mode=run-relaxations", *flags, *_dataset_overrides(demo), *relax]


def shown(argv: list[str]) -> str:
    """A command as one shell line, with its environment (placeholders stay unquoted)."""
    env = " ".join(f"{key}={value}" for key, value in CHILD_ENV.items())
    return f"{env} python {' '.join(argv)}"


def run_main(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``python <argv>`` in the repository root; RuntimeError with its stderr on failure."""
    env = dict(os.environ, **CHILD_ENV)
    done = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done


def metrics_records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``results/<RUN_ID>/metrics.jsonl``."""
    lines = (run_dir / "results" / RUN_ID / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def loss_curve(run_dir: Path) -> dict[str, Any]:
    """Per-step train loss of a finished run, and its final validation metrics."""
    records = metrics_records(run_dir)
    train = [record for record in records if record["split"] == "train"]
    val = [record for record in records if record["split"] == "val"]
    final_val = max(val, key=lambda record: record["step"]) if val else {}
    return {
        "step": [record["step"] for record in train],
        "loss": [record["loss"] for record in train],
        "val": {key: final_val[key] for key in ("energy_mae", "forces_mae") if key in final_val},
    }


def relaxation_end_state(run_dir: Path) -> dict[str, Any]:
    """Relaxed positions (A), energies (eV), steps and convergence of ``relax_argv``'s run."""
    results = run_dir / "results" / f"{RUN_ID}-relax"
    records = json.loads((results / "relaxed_pos_0.json").read_text())
    with np.load(results / "relaxed_energies.npz") as energies:
        by_id = {str(sid): k for k, sid in enumerate(energies["ids"])}
        rows = [by_id[str(record["ids"])] for record in records]
        return {
            "ids": [str(record["ids"]) for record in records],
            "positions": [record["positions"] for record in records],
            "energy": [float(energies["energy"][k]) for k in rows],
            "steps": [int(energies["steps"][k]) for k in rows],
            "converged": [bool(energies["converged"][k]) for k in rows],
        }


def read_entries(path: Path) -> list[dict[str, np.ndarray]]:
    """Every entry of an LMDB file, or of a folder of ``*.lmdb`` shards, in key order."""
    files = sorted(path.glob("*.lmdb")) if path.is_dir() else [path]
    entries = []
    with tempfile.TemporaryDirectory() as scratch:
        for file in files:
            # A copy: LMDB refuses a second open of a file this process already has open
            # (the dataset readers of other tests in the same worker may hold it).
            copy = Path(scratch) / file.name
            shutil.copyfile(file, copy)
            env = lmdb.open(str(copy), subdir=False, readonly=True, lock=False)
            try:
                with env.begin() as txn:
                    values = {int(key): value for key, value in txn.cursor() if key.isdigit()}
                    entries += [pickle.loads(values[index]) for index in sorted(values)]
            finally:
                env.close()
    return entries


def free_force_components(entries: list[dict[str, np.ndarray]]) -> np.ndarray:
    """The force components (eV/A) of every free (not fixed) atom, flattened."""
    parts = [entry["force"][~entry["fixed"].astype(bool)] for entry in entries]
    return np.concatenate(parts).reshape(-1)


def data_fingerprint(demo: Path) -> dict[str, dict[str, float]]:
    """Entry counts and label means of the demo splits the golden runs read."""
    train, val = (read_entries(demo / "s2ef" / split) for split in ("train", "val"))
    relax = read_entries(demo / "is2re" / "val" / "data.lmdb")
    return {
        f"s2ef/{name}": {
            "entries": len(entries),
            "energy_mean": float(np.mean([float(entry["y"][0]) for entry in entries])),
            "free_force_abs_mean": float(np.abs(free_force_components(entries)).mean()),
        }
        for name, entries in (("train", train), ("val", val))
    } | {"is2re/val": {"entries": len(relax)}}


def environment() -> dict[str, str]:
    """Versions a golden number depends on."""
    return {
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
    }


def golden_path(name: str) -> Path:
    return GOLDEN_DIR / f"{name}.json"


def read_golden(name: str) -> dict[str, Any]:
    """The stored record ``tests/golden/<name>.json``."""
    return json.loads(golden_path(name).read_text())


def write_golden(name: str, record: dict[str, Any]) -> Path:
    """Write ``tests/golden/<name>.json`` (sorted keys, so reruns give identical bytes)."""
    path = golden_path(name)
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path
