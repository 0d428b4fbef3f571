"""IS2RS outputs: relaxed positions and energies in OCP's files, and the OC20 relaxation metrics.

Files, in ``results/<timestamp_id>/``:

- ``relaxed_pos_0.json`` (with ``task.write_pos``): ``[{"ids": sid, "positions": [[x, y, z],
  ...]}]``, all atoms, as OCP after #127. OCP wrote one ``relaxed_pos_<rank>.json`` per rank;
  catforge gathers every rank's results first, so rank 0's file holds them all.
- ``relaxed_positions.npz``, the OC20 submission layout: ``ids``,
  ``pos`` (all atoms of all systems concatenated, A) and ``chunk_idx = cumsum(natoms)[:-1]``.
- ``relaxed_energies.npz``: ``ids``, ``energy`` (eV, the model's energy at the relaxed
  positions: IS2RE from relaxations), ``converged``, ``steps``.
- ``metrics_relax.json`` when the structures carry ``pos_relaxed`` and ``y_relaxed``.

Systems are written in dataset order (OCP V2+ sorts the ids lexicographically instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from catforge.data.collate import collate
from catforge.data.graph import AtomicGraph
from catforge.errors import DataError
from catforge.potential.metrics import MetricTotals, energy_totals, relaxation_totals
from catforge.relax.driver import RelaxResult
from catforge.runtime.atomic import write_json, write_npz


def system_id(graph: AtomicGraph, index: int) -> str:
    """``str(sid)``, or the dataset ``index`` when the structure has no sid."""
    return str(index if graph.sid is None else int(graph.sid.reshape(-1)[0]))


def write_relaxation_files(
    results: Sequence[RelaxResult], results_dir: Path, *, write_pos: bool = True
) -> list[Path]:
    """Write the files above (``results`` in dataset order) atomically; return their paths."""
    ids = [system_id(result.initial, result.index) for result in results]
    if len(set(ids)) != len(ids):
        raise DataError("relaxed systems have repeated sids; every sid must be unique")
    results_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if write_pos:
        records = [
            {"ids": item, "positions": result.final.positions.tolist()}
            for item, result in zip(ids, results, strict=True)
        ]
        paths.append(write_json(results_dir / "relaxed_pos_0.json", records))
    natoms = np.array([len(result.final.positions) for result in results], dtype=np.int64)
    positions = [result.final.positions for result in results]
    paths.append(
        write_npz(
            results_dir / "relaxed_positions.npz",
            ids=np.array(ids, dtype=str),
            pos=np.concatenate(positions) if positions else np.zeros((0, 3)),
            chunk_idx=np.cumsum(natoms)[:-1],
        )
    )
    paths.append(
        write_npz(
            results_dir / "relaxed_energies.npz",
            ids=np.array(ids, dtype=str),
            energy=np.array([result.final.energy for result in results], dtype=np.float64),
            converged=np.array([result.converged for result in results], dtype=bool),
            steps=np.array([result.steps for result in results], dtype=np.int64),
        )
    )
    return paths


def relaxation_metrics(results: Sequence[RelaxResult]) -> MetricTotals | None:
    """ADwT, positions MAE/MSE (free atoms, minimum image) and the relaxed-energy metrics, as
    totals; None unless every structure has ``pos_relaxed`` and ``y_relaxed``."""
    if not results or any(
        result.initial.pos_relaxed is None or result.initial.y_relaxed is None for result in results
    ):
        return None
    batch = collate([result.initial for result in results])
    predicted = torch.from_numpy(np.concatenate([result.final.positions for result in results]))
    assert batch.pos_relaxed is not None and batch.y_relaxed is not None
    free = None if batch.fixed is None else ~batch.fixed
    energy = torch.tensor([result.final.energy for result in results], dtype=torch.float64)
    totals = relaxation_totals(
        predicted, batch.pos_relaxed, batch.cell, batch.pbc, batch.batch, batch.n_graphs, free
    )
    return totals + energy_totals(energy, batch.y_relaxed.reshape(-1))


def convergence_summary(results: Sequence[RelaxResult]) -> dict[str, float]:
    """``converged_fraction`` and ``mean_steps`` of the relaxations."""
    if not results:
        return {"converged_fraction": 0.0, "mean_steps": 0.0}
    return {
        "converged_fraction": float(np.mean([result.converged for result in results])),
        "mean_steps": float(np.mean([result.steps for result in results])),
    }
