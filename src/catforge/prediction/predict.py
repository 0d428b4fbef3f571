"""``--mode predict``: energies (and forces) of the test set, written as JSON and OC20 npz.

Files, in ``results/<timestamp_id>/``:

- ``predictions.json``: the tutorial's list of ``{"id", "energy"}`` (IS2RE) or
  ``{"id", "energy", "forces"}`` (S2EF; forces of the free atoms only, one ``[fx, fy, fz]`` per
  atom, as OCP after #127).
- ``is2re_predictions.npz`` (``ids``, ``energy``) or ``s2ef_predictions.npz`` (``ids``,
  ``energy``, ``forces`` of the free atoms concatenated, ``chunk_idx = cumsum(free_counts)[:-1]``
  so that ``np.split(forces, chunk_idx)`` gives each system's block), the OC20 submission layout.

Ids are ``str(sid)`` (IS2RE) or ``f"{sid}_{fid}"`` (S2EF); a missing ``sid`` or ``fid`` is replaced
by the entry's index in the dataset. Every system appears exactly once, **in dataset order**:
unlike OCP V2+, which sorts the ids lexicographically (``np.unique``), nothing is reordered.

Energies and forces are written as float32 by default. ``task.prediction_dtype: float16`` halves
the files but quantises: float16 keeps 10 mantissa bits, so a value in [2^e, 2^(e+1)) is rounded
to steps of 2^(e-10): 2^-7 eV (0.0078 eV) for |E| in 8-16 eV and 2^-6 eV (0.0156 eV) for 16-32 eV,
the steps reported in fairchem#542; values above 65504 cannot be written (a DataError says so).
Both files hold the same (rounded) values.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from catforge.data.graph import AtomicGraph
from catforge.data.samplers import shard_start
from catforge.errors import ConfigError, DataError
from catforge.potential.trained import Potential
from catforge.runtime.atomic import write_json, write_npz
from catforge.runtime.distributed import gather_objects, get_rank, get_world_size
from catforge.runtime.progress import progress

Task = Literal["is2re", "s2ef"]
Dtype = Literal["float32", "float16"]


@dataclass(frozen=True)
class Predictions:
    """Predictions of a dataset, in dataset order.

    ``ids`` (n,) str; ``energy`` (n,) float64 eV, denormalised. For S2EF: ``forces``
    (n_free_total, 3) float64 eV/A of the free atoms, concatenated; ``chunk_idx`` (n - 1,) int64
    block boundaries for ``np.split(forces, chunk_idx)``; ``system_forces`` the all-atom forces
    (n_atoms_i, 3) of each system. All three are None without forces (IS2RE).
    """

    ids: list[str]
    energy: np.ndarray
    forces: np.ndarray | None = None
    chunk_idx: np.ndarray | None = None
    system_forces: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def concatenate(cls, parts: Sequence[Predictions]) -> Predictions:
        """Predictions of consecutive shards, in order (one set, as if predicted at once)."""
        ids = [item for part in parts for item in part.ids]
        energy = np.concatenate([part.energy for part in parts])
        if any(part.forces is None for part in parts):
            return cls(ids, energy)
        system_forces = [block for part in parts for block in part.system_forces or []]
        free = [block for part in parts for block in part.free_forces()]
        return cls.with_free_forces(ids, energy, system_forces, free)

    @classmethod
    def with_free_forces(
        cls,
        ids: list[str],
        energy: np.ndarray,
        system_forces: list[np.ndarray],
        free: list[np.ndarray],
    ) -> Predictions:
        """S2EF predictions from each system's all-atom and free-atom force blocks."""
        counts = np.array([len(block) for block in free], dtype=np.int64)
        return cls(
            ids,
            energy,
            forces=np.concatenate(free) if free else np.zeros((0, 3)),
            chunk_idx=np.cumsum(counts)[:-1],
            system_forces=system_forces,
        )

    def free_forces(self) -> list[np.ndarray]:
        """Each system's free-atom forces (n_free_i, 3)."""
        if self.forces is None or self.chunk_idx is None:
            raise ValueError("these predictions have no forces")
        return np.split(self.forces, self.chunk_idx) if self.ids else []


def _graph_ids(batch: AtomicGraph, start: int, with_fid: bool) -> list[str]:
    """Ids of the structures of ``batch`` whose first dataset index is ``start``."""
    ids = []
    for offset in range(batch.n_graphs):
        index = start + offset
        sid = index if batch.sid is None else int(batch.sid[offset])
        if not with_fid:
            ids.append(str(sid))
            continue
        fid = index if batch.fid is None else int(batch.fid[offset])
        ids.append(f"{sid}_{fid}")
    return ids


def predict(
    potential: Potential, batches: Iterable[AtomicGraph], *, with_forces: bool, start: int = 0
) -> Predictions:
    """Run ``potential`` over ``batches`` (not shuffled) and collect its predictions.

    Labels are never read, so unlabelled test sets work. ``with_forces`` (S2EF) needs a model
    that regresses forces. ``start`` is the dataset index of the first structure (a rank's
    shard), used for ids when the data has no sid/fid.
    """
    parts = _Parts(start)
    for batch in progress(batches, desc="predict"):
        parts.add(potential, batch, with_forces=with_forces)
    return parts.finish(with_forces=with_forces)


@dataclass
class _Parts:
    """Per-batch results gathered by :func:`predict`."""

    start: int = 0
    ids: list[str] = field(default_factory=list)
    energies: list[np.ndarray] = field(default_factory=list)
    system_forces: list[np.ndarray] = field(default_factory=list)
    free_masks: list[np.ndarray] = field(default_factory=list)

    def add(self, potential: Potential, batch: AtomicGraph, *, with_forces: bool) -> None:
        output = potential(batch)
        energy, forces = output.energy, output.forces
        self.ids.extend(_graph_ids(batch, self.start + len(self.ids), with_forces))
        self.energies.append(energy.detach().cpu().double().numpy().reshape(-1))
        if with_forces:
            if forces is None:
                raise ConfigError("S2EF predictions need a model with regress_forces: true")
            self.system_forces.extend(_per_system(forces, batch))
            self.free_masks.extend(_per_system(~batch.fixed, batch))

    def finish(self, *, with_forces: bool) -> Predictions:
        energy = np.concatenate(self.energies) if self.energies else np.zeros(0)
        if not with_forces:
            return Predictions(self.ids, energy)
        free = [f[mask] for f, mask in zip(self.system_forces, self.free_masks, strict=True)]
        return Predictions.with_free_forces(self.ids, energy, self.system_forces, free)


def _per_system(values: torch.Tensor, batch: AtomicGraph) -> list[np.ndarray]:
    """Split an atom-level tensor of ``batch`` into one numpy array per structure."""
    array = values.detach().cpu().numpy()
    if array.dtype.kind == "f":
        array = array.astype(np.float64)
    return np.split(array, np.cumsum(batch.natoms.cpu().numpy())[:-1])


def write_predictions(
    predictions: Predictions, results_dir: Path, task: Task, dtype: Dtype = "float32"
) -> list[Path]:
    """Write ``predictions.json`` and ``{task}_predictions.npz`` atomically; return their paths.

    Raises a DataError when an id occurs twice (every system must appear exactly once).
    """
    if dtype not in ("float32", "float16"):
        raise ConfigError(f"task.prediction_dtype must be float32 or float16, got '{dtype}'")
    if task == "s2ef" and predictions.forces is None:
        raise ValueError("S2EF predictions need forces")
    _check_unique(predictions.ids)
    results_dir.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "ids": np.array(predictions.ids, dtype=str),
        "energy": predictions.energy.astype(dtype),
    }
    if task == "s2ef":
        assert predictions.forces is not None and predictions.chunk_idx is not None
        arrays["forces"] = predictions.forces.astype(dtype)
        arrays["chunk_idx"] = predictions.chunk_idx.astype(np.int64)
    for name in ("energy", "forces"):
        if name in arrays and not np.isfinite(arrays[name]).all():
            raise DataError(f"predicted {name} are not finite as {dtype}; use float32")
    json_path = results_dir / "predictions.json"
    npz_path = results_dir / f"{task}_predictions.npz"
    write_json(json_path, _json_records(arrays))
    write_npz(npz_path, **arrays)
    return [json_path, npz_path]


def _check_unique(ids: list[str]) -> None:
    seen: set[str] = set()
    for item in ids:
        if item in seen:
            raise DataError(f"prediction id '{item}' occurs twice; sid/fid must be unique")
        seen.add(item)


def _json_records(arrays: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """The tutorial's records, from the arrays written to the npz (same rounded values)."""
    records: list[dict[str, Any]] = [
        {"id": str(item), "energy": float(energy)}
        for item, energy in zip(arrays["ids"], arrays["energy"], strict=True)
    ]
    if "forces" in arrays:
        blocks = np.split(arrays["forces"], arrays["chunk_idx"]) if records else []
        for record, block in zip(records, blocks, strict=True):
            record["forces"] = block.astype(np.float64).tolist()
    return records


def predict_to_files(
    potential: Potential,
    loader: Iterable[AtomicGraph],
    *,
    size: int,
    task: Task,
    results_dir: Path | None,
    dtype: Literal["float32", "float16"] = "float32",
) -> list[Path]:
    """Predict every batch of ``loader`` (this rank's shard of ``size`` structures), gather on
    rank 0, write and print the files there (``task`` s2ef: energies and forces; is2re:
    energies). ``results_dir`` None (``--debug``) writes nothing."""
    start = shard_start(size, get_rank(), get_world_size())
    shard = predict(potential, loader, with_forces=task == "s2ef", start=start)
    gathered = gather_objects(shard)
    if gathered is None:  # not rank 0: rank 0 writes every rank's predictions
        return []
    predictions = Predictions.concatenate(gathered)
    if results_dir is None:
        print(f"predictions of {len(predictions)} systems (--debug: not written)")
        return []
    paths = write_predictions(predictions, results_dir, task, dtype)
    print(f"predictions of {len(predictions)} systems:")
    for path in paths:
        print(f"  {path}")
    return paths
