"""The embedded demo dataset: small OC20-like S2EF and IS2RE/IS2RS data labelled with ASE's EMT.

``generate_demo`` builds random fcc metal slabs with small adsorbates (see
:mod:`catforge.data.demo_systems`), relaxes each with EMT + LBFGS recording every frame, drops
anomalous systems as OC20 does (:mod:`catforge.data.demo_anomalies`), splits the rest by system
into train/val/test and writes::

    s2ef/{train,val,test}/data.NNNN.lmdb  every frame: y (adsorption energy), force, sid, fid
    is2re/{train,val,test}/data.lmdb      initial structures: y_init, y_relaxed, pos_relaxed, sid
    stats.yml                             normalisation statistics and counts (OCP config YAML)

Everything is written into a hidden temporary folder that is renamed into place at the end
(:mod:`catforge.data.staging`).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from catforge.data.atoms import atoms_to_graph
from catforge.data.demo_anomalies import ANOMALY_KINDS
from catforge.data.demo_systems import (
    SystemResult,
    label_system,
    make_systems,
    relax_system,
)
from catforge.data.graph import AtomicGraph
from catforge.data.lmdb import write_lmdb, write_shards
from catforge.data.staging import staged_output
from catforge.data.stats import Moments, normalization_lines, s2ef_stats, target_stats, yaml_float
from catforge.data.workers import init_worker, single_threaded_env, spawn_context
from catforge.errors import ConfigError, DataError
from catforge.runtime.progress import progress as progress_bar

__all__ = [
    "SIZES",
    "SPLITS",
    "DemoSummary",
    "generate_demo",
    "label_systems",
    "make_systems",
    "relax_system",
    "split_systems",
]

log = logging.getLogger(__name__)

SIZES = {"tiny": 16, "small": 200, "medium": 1000, "large": 5000}
"""Named sizes -> number of generated systems (before anomalous ones are dropped)."""
SPLITS = ("train", "val", "test")
VAL_FRACTION = TEST_FRACTION = 0.15
_SPLIT_STREAM = (
    1  # the split generator is default_rng([seed, 1]); make_systems uses default_rng(seed)
)


@dataclass
class DemoSummary:
    """What :func:`generate_demo` wrote: counts, anomalies and normalisation statistics."""

    out_dir: Path
    size: str | int
    seed: int
    generated: int
    systems: dict[str, int]
    frames: dict[str, int]
    anomalies: dict[str, int]
    stats: dict[str, dict[str, float | None]]
    seconds: float = field(default=0.0, compare=False)

    def to_yaml(self) -> str:
        """``stats.yml``: OCP ``dataset:`` entries with statistics from train, then the counts."""
        s2ef, is2re = self.stats["s2ef"], self.stats["is2re"]
        root = self.out_dir.resolve()
        lines = [
            "# catforge demo dataset: OC20-like adslabs labelled with ASE's EMT calculator.",
            f"# size: {self.size}, seed: {self.seed}. Energies are adsorption energies (eV),",
            "# E(adslab) - E(clean slab) - gas references; forces are raw (eV/A).",
            "# Paste a task's `dataset:` list into an OCP config; statistics come from train.",
            "s2ef:",
            "  dataset:",
            f"    - src: {root / 's2ef' / 'train'}",
            *normalization_lines(s2ef, indent=" " * 6),
            f"    - src: {root / 's2ef' / 'val'}",
            f"  force_std: {yaml_float(s2ef['force_std'])}  # actual std of train force components",
            "  # grad_target_std = target_std, as in OCP's S2EF configs",
            "is2re:",
            "  dataset:",
            f"    - src: {root / 'is2re' / 'train' / 'data.lmdb'}",
            *normalization_lines(is2re, indent=" " * 6),
            f"    - src: {root / 'is2re' / 'val' / 'data.lmdb'}",
            "  # IS2RS: put `relax_dataset: {src: <is2re/val/data.lmdb>}` inside `task:`.",
            f"generated: {self.generated}",
            f"systems: {_flow(self.systems)}",
            f"frames: {_flow(self.frames)}",
            f"anomalies: {_flow(self.anomalies)}",
        ]
        return "\n".join(lines) + "\n"

    def format(self) -> str:
        """A short human summary followed by the YAML."""
        kept = sum(self.systems.values())
        head = (
            f"demo dataset in {self.out_dir}: {kept} of {self.generated} systems kept, "
            f"{sum(self.frames.values())} S2EF frames, built in {self.seconds:.1f} s"
        )
        return head + "\n" + self.to_yaml()


def _flow(counts: dict[str, int]) -> str:
    return "{" + ", ".join(f"{key}: {value}" for key, value in counts.items()) + "}"


def resolve_size(size: str | int) -> int:
    """Number of systems for a named size or an int."""
    if isinstance(size, str) and size in SIZES:
        return SIZES[size]
    if isinstance(size, str) and size.isdigit():  # --size 32 on the command line
        size = int(size)
    if isinstance(size, int) and not isinstance(size, bool) and size >= 3:
        return size
    raise ConfigError(f"demo size {size!r}: use one of {', '.join(SIZES)} or an int >= 3")


def shard_count(n_systems: int) -> int:
    """S2EF shards per split: one per 50 generated systems, 2..16."""
    return max(2, min(16, n_systems // 50))


def label_systems(
    systems: Sequence[Atoms], *, workers: int = 1, progress: bool = True
) -> list[SystemResult]:
    """Relax and classify every system, in order, with ``workers`` spawned processes."""

    def collect(results: Iterable[SystemResult]) -> list[SystemResult]:
        bar = progress_bar(results, total=len(systems), desc="relaxing systems", enabled=progress)
        return list(bar)

    if workers <= 1:
        return collect(map(label_system, systems))
    chunksize = max(1, min(8, len(systems) // (4 * workers)))
    with single_threaded_env():
        pool = spawn_context().Pool(workers, initializer=init_worker)
    with pool:
        results = pool.imap(label_system, systems, chunksize=chunksize)
        return collect(results)


def split_systems(sids: Sequence[int], rng: np.random.Generator) -> dict[str, list[int]]:
    """Random 70/15/15 split by system (each split non-empty, sorted sids)."""
    if len(sids) < len(SPLITS):
        raise DataError(f"only {len(sids)} good systems; need at least 3 (use a larger size)")
    order = rng.permutation(np.asarray(sids, dtype=np.int64))
    n_val = max(1, round(VAL_FRACTION * len(order)))
    n_test = max(1, round(TEST_FRACTION * len(order)))
    n_train = len(order) - n_val - n_test
    parts = (order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :])
    return {
        name: sorted(int(sid) for sid in part) for name, part in zip(SPLITS, parts, strict=True)
    }


def s2ef_graphs(initial: Atoms, result: SystemResult) -> Iterator[AtomicGraph]:
    """Every frame of one trajectory: positions, adsorption energy y, raw forces, sid, fid."""
    base = atoms_to_graph(initial, sid=result.sid, with_labels=False)
    energies = result.adsorption_energies
    for fid, (positions, forces) in enumerate(zip(result.positions, result.forces, strict=True)):
        yield base.replace(
            pos=torch.as_tensor(positions, dtype=torch.float32),
            force=torch.as_tensor(forces, dtype=torch.float32),
            y=torch.tensor([energies[fid]], dtype=torch.float32),
            fid=torch.tensor([fid]),
        )


def is2re_graph(initial: Atoms, result: SystemResult) -> AtomicGraph:
    """The initial structure with y_init, y_relaxed (adsorption energies) and pos_relaxed."""
    energies = result.adsorption_energies
    graph = atoms_to_graph(initial, sid=result.sid, with_labels=False).replace(
        y_init=torch.tensor([energies[0]], dtype=torch.float32),
        y_relaxed=torch.tensor([energies[-1]], dtype=torch.float32),
        pos_relaxed=torch.as_tensor(result.positions[-1], dtype=torch.float32),
    )
    return graph.validate(f"demo system {result.sid}")


def _watch(
    graphs: Iterator[AtomicGraph], energies: list[float], forces: Moments
) -> Iterator[AtomicGraph]:
    """Pass ``graphs`` through, collecting their stored energies and force components."""
    for graph in graphs:
        if graph.y is None or graph.force is None:
            raise DataError("demo S2EF frame without 'y' or 'force'")
        energies.append(float(graph.y.item()))
        forces.add(graph.force.numpy())
        yield graph


def _write_split(
    root: Path,
    split: str,
    sids: list[int],
    systems: dict[int, Atoms],
    results: dict[int, SystemResult],
    n_shards: int,
) -> tuple[int, dict[str, dict[str, float | None]]]:
    """Write one split's S2EF shards and IS2RE file; return its frame count and statistics."""
    energies: list[float] = []
    forces = Moments()
    frames = (graph for sid in sids for graph in s2ef_graphs(systems[sid], results[sid]))
    write_shards(_watch(frames, energies, forces), root / "s2ef" / split, n_shards)
    entries = [is2re_graph(systems[sid], results[sid]) for sid in sids]
    write_lmdb(entries, root / "is2re" / split / "data.lmdb")
    relaxed = [_relaxed_energy(entry) for entry in entries]
    return len(energies), {"s2ef": s2ef_stats(energies, forces), "is2re": target_stats(relaxed)}


def _relaxed_energy(entry: AtomicGraph) -> float:
    """The relaxed adsorption energy stored on an entry made by :func:`is2re_graph`."""
    if entry.y_relaxed is None:
        raise DataError("demo IS2RE entry without 'y_relaxed'")
    return float(entry.y_relaxed.item())


def _write_dataset(
    root: Path,
    splits: dict[str, list[int]],
    systems: dict[int, Atoms],
    results: dict[int, SystemResult],
    n_shards: int,
) -> tuple[dict[str, int], dict[str, dict[str, float | None]]]:
    """Write every split into ``root``; return frames per split and the train statistics."""
    frames: dict[str, int] = {}
    stats: dict[str, dict[str, float | None]] = {}
    for split in SPLITS:
        frames[split], split_stats = _write_split(
            root, split, splits[split], systems, results, n_shards
        )
        if split == "train":
            stats = split_stats
    return frames, stats


def _previous_demo(out_dir: Path) -> str | None:
    """Why ``out_dir`` must not be replaced: it is not a demo dataset (else None)."""
    if (out_dir / "stats.yml").is_file():
        return None
    return f"{out_dir} is not a demo dataset (no stats.yml); refusing to replace it"


def generate_demo(
    out_dir: str | Path,
    *,
    size: str | int = "small",
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> DemoSummary:
    """Generate, label and write the demo dataset; see the module docstring for the layout.

    The same ``seed`` and ``size`` give identical structures and labels for any ``workers``.
    ``out_dir`` either ends up complete or is left untouched.
    """
    out_dir = Path(out_dir).resolve()
    n_systems = resolve_size(size)
    start = time.perf_counter()
    with staged_output(out_dir, overwrite=overwrite, may_replace=_previous_demo) as tmp:
        systems = make_systems(n_systems, seed)
        results = label_systems(systems, workers=workers, progress=progress)
        anomalies = dict.fromkeys(ANOMALY_KINDS, 0)
        for result in results:
            if result.anomaly is not None:
                anomalies[result.anomaly] += 1
        good = {result.sid: result for result in results if result.anomaly is None}
        splits = split_systems(list(good), np.random.default_rng([seed, _SPLIT_STREAM]))
        by_sid = {int(atoms.info["sid"]): atoms for atoms in systems}
        frames, stats = _write_dataset(tmp, splits, by_sid, good, shard_count(n_systems))
        summary = DemoSummary(
            out_dir=out_dir,
            size=size,
            seed=seed,
            generated=n_systems,
            systems={split: len(sids) for split, sids in splits.items()},
            frames=frames,
            anomalies=anomalies,
            stats=stats,
        )
        (tmp / "stats.yml").write_text(summary.to_yaml())
    summary.seconds = time.perf_counter() - start
    log.debug("%s", summary.format())  # the CLI prints it; library callers get the summary
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m catforge.data.demo OUT_DIR [--size small] [--seed 0] [--workers 1]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--size", default="small", help=f"{', '.join(SIZES)} or a number")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    size = int(args.size) if args.size.isdigit() else args.size
    summary = generate_demo(
        args.out_dir, size=size, seed=args.seed, workers=args.workers, overwrite=args.overwrite
    )
    print(summary.format(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
