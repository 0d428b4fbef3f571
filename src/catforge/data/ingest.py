"""Convert ASE files and OC20's raw S2EF layout to catforge LMDBs (OCP's preprocessing scripts).

Which inputs are read, and the sid, fid and ASE db grouping rules: :mod:`catforge.data.sources`.

Layouts: ``s2ef`` writes one frame per entry (``y``, ``force``, ``tags``, ``fixed``, ``sid``,
``fid``) to ``out/data.NNNN.lmdb``, one shard per worker, each worker converting an even share
(``np.array_split``) of the input files. ``is2re``/``is2rs`` write one relaxation per entry (the
first frame's structure, ``tags``, ``fixed``, ``y_init``, ``y_relaxed``, the last frame's
positions as ``pos_relaxed``, ``sid``) to ``out/data.lmdb``. For is2re/is2rs each db group (each
other file; raw layout: each txt sid) is one relaxation from its lowest to its highest ``fid``;
frames with different atoms in one relaxation are an error. Everything is written to a hidden
``.out.tmp-*`` folder that is renamed into place at the end (:mod:`catforge.data.staging`).

Every frame is validated before it is written (finite positions, energies and forces, atomic
numbers in 1..118, at least one atom): a bad one is a DataError naming its input file and frame,
and nothing is written.

Reference energies (``ref_energy=True``) come from the txt's third column, else from
``atoms.info["ref_energy"]`` (extxyz comment ``ref_energy=...``, db key-value pair).
"""

from __future__ import annotations

import logging
import pickle
import queue as queue_module
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from catforge.data.atoms import atoms_to_graph
from catforge.data.graph import AtomicGraph
from catforge.data.lmdb import LmdbWriter, shard_path
from catforge.data.sources import Frame, Source, collect_sources, one_line, read_frames
from catforge.data.staging import staged_output
from catforge.data.stats import Moments, normalization_lines, s2ef_stats, target_stats
from catforge.data.workers import init_worker, single_threaded_env, spawn_context
from catforge.errors import ConfigError, DataError
from catforge.runtime.progress import ProgressCounter

log = logging.getLogger(__name__)

__all__ = ["TASKS", "IngestSummary", "format_stats_yaml", "ingest"]

TASKS = ("s2ef", "is2re", "is2rs")
_reporter: Callable[[int], None] | None = None


@dataclass(frozen=True)
class _Options:
    task: str
    ref_energy: bool
    get_edges: bool
    cutoff: float
    max_neighbors: int


@dataclass
class _ShardResult:
    path: Path
    energies: np.ndarray
    ids: np.ndarray
    forces: Moments


@dataclass
class IngestSummary:
    """What :func:`ingest` did: entries written, files read, output paths, skips and statistics."""

    task: str
    out: Path
    entries: int
    files_read: int
    outputs: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    stats: dict[str, float | None] = field(default_factory=dict)

    def format(self) -> str:
        """Human-readable report ending with the YAML normalisation lines."""
        head = f"{self.task}: wrote {self.entries} entries from {self.files_read} file(s)"
        lines = [f"{head} to {self.out}", *(f"  {path}" for path in self.outputs)]
        lines += [f"skipped {path}: {reason}" for path, reason in self.skipped]
        return "\n".join([*lines, format_stats_yaml(self.stats)])


def format_stats_yaml(stats: Mapping[str, float | None]) -> str:
    """Normalisation statistics as YAML lines for an OCP/catforge config's dataset entry."""
    lines = [
        "# label statistics of this dataset (paste into the train dataset entry of the config)",
        *normalization_lines(stats),
    ]
    if not stats["target_std"]:
        lines.append("# WARNING: target_std is 0 (one entry or equal energies); use 1.0 instead")
    if "grad_target_std" in stats:
        lines.append(
            "# grad_target_std = target_std, as in OCP's S2EF configs: forces are -dE/dpos, so "
            "denormalising them by target_std gives -dE/dpos exactly (force component std here: "
            f"{stats.get('force_std')!r})"
        )
    return "\n".join(lines)


def _energy(frame: Frame, ref_energy: bool) -> float:
    calc = frame.atoms.calc
    if calc is None or "energy" not in getattr(calc, "results", {}):
        raise DataError(
            f"{frame.where}: no energy; every frame needs its DFT energy (store the calculator "
            "results with the structure, e.g. write the file after computing them)"
        )
    energy = float(frame.atoms.get_potential_energy())
    if not np.isfinite(energy):
        raise DataError(f"{frame.where}: energy is NaN or infinite; remove or repair this frame")
    if not ref_energy:
        return energy
    if frame.ref is None:
        raise DataError(
            f"{frame.where}: --ref-energy needs a reference energy; store it as "
            "atoms.info['ref_energy'] (extxyz comment 'ref_energy=...', db key-value pair "
            "'ref_energy'), use OC20's <k>.extxyz + <k>.txt layout, or drop --ref-energy"
        )
    if not np.isfinite(frame.ref):
        raise DataError(f"{frame.where}: reference energy is NaN or infinite; repair it")
    return energy - frame.ref


def _maybe_edges(graph: AtomicGraph, options: _Options) -> AtomicGraph:
    if not options.get_edges:
        return graph
    from catforge.data.neighbors import with_edges

    return with_edges(graph, options.cutoff, options.max_neighbors)


def _s2ef_graph(frame: Frame, options: _Options) -> tuple[AtomicGraph, float]:
    energy = _energy(frame, options.ref_energy)
    graph = atoms_to_graph(frame.atoms, sid=frame.sid, fid=frame.fid, source=frame.where)
    if graph.force is None:
        raise DataError(
            f"{frame.where}: no forces; S2EF needs energy and forces on every frame (store the "
            "calculator's forces with the structure, or use --task is2re for energies only)"
        )
    graph = graph.replace(y=torch.tensor([energy], dtype=graph.pos.dtype))
    return _maybe_edges(graph, options), energy


def _relaxation_graph(first: Frame, last: Frame, options: _Options) -> tuple[AtomicGraph, float]:
    y_init = _energy(first, options.ref_energy)
    y_relaxed = _energy(last, options.ref_energy)
    graph = atoms_to_graph(first.atoms, sid=first.sid, with_labels=False, source=first.where)
    dtype = graph.pos.dtype
    graph = graph.replace(
        y_init=torch.tensor([y_init], dtype=dtype),
        y_relaxed=torch.tensor([y_relaxed], dtype=dtype),
        pos_relaxed=torch.as_tensor(last.atoms.get_positions(), dtype=dtype),
    ).validate(first.where)
    return _maybe_edges(graph, options), y_relaxed


def _source_relaxations(source: Source, options: _Options) -> list[tuple[AtomicGraph, float]]:
    """One entry per relaxation (per sid) in a source, from its lowest to its highest fid."""
    ends: dict[int, list[Frame]] = {}
    for frame in read_frames(source):
        pair = ends.setdefault(frame.sid, [frame, frame])
        first = pair[0]
        if not np.array_equal(frame.atoms.numbers, first.atoms.numbers):
            raise DataError(
                f"{frame.where}: atoms differ from {first.where} of the same relaxation (sid "
                f"{frame.sid}); give one relaxation per file, or group ASE db rows with a "
                "'relaxation_id' or 'sid' key-value pair"
            )
        if frame.fid < first.fid:
            pair[0] = frame
        if frame.fid >= pair[1].fid:
            pair[1] = frame
    _report(1)
    return [_relaxation_graph(first, last, options) for first, last in ends.values()]


def _write_shard(sources: list[Source], path: Path, options: _Options) -> _ShardResult:
    """Convert every frame of ``sources`` to one S2EF shard (runs in a worker process)."""
    energies: list[float] = []
    ids: list[tuple[int, int]] = []
    forces = Moments()
    with LmdbWriter(path) as writer:
        for source in sources:
            for frame in read_frames(source):
                graph, energy = _s2ef_graph(frame, options)
                writer.write(graph)
                energies.append(energy)
                ids.append((frame.sid, frame.fid))
                forces.add(graph.force.numpy())  # type: ignore[union-attr]
            _report(1)
    return _ShardResult(path, np.asarray(energies), np.asarray(ids).reshape(-1, 2), forces)


def _report(files: int) -> None:
    if _reporter is not None:
        _reporter(files)


def _init_worker(queue: Any = None) -> None:
    """Set up a child process: one torch thread, quiet ASE, progress through ``queue``."""
    global _reporter
    init_worker()
    warnings.filterwarnings("ignore", message="Skipping unhashable information")
    if queue is not None:
        _reporter = partial(_put_progress, queue)


def _put_progress(queue: Any, files: int) -> None:
    queue.put(("progress", -1, files))


def _shard_worker(index: int, args: tuple[Any, ...], queue: Any) -> None:
    """Child process: write one shard and send back its result or its exception."""
    _init_worker(queue)
    try:
        message: tuple[str, int, Any] = ("done", index, _write_shard(*args))
    except BaseException as error:
        try:
            pickle.dumps(error)
        except Exception:
            error = RuntimeError(one_line(error))
        message = ("error", index, error)
    queue.put(message)


def _run_shards(args: list[tuple[Any, ...]], workers: int) -> list[_ShardResult]:
    """One process per shard; a worker's exception is re-raised, a crashed worker reported."""
    if workers == 1:
        return [_write_shard(*args[0])]
    ctx = spawn_context()
    queue = ctx.Queue()
    procs = [ctx.Process(target=_shard_worker, args=(i, a, queue)) for i, a in enumerate(args)]
    results: dict[int, _ShardResult] = {}
    try:
        with single_threaded_env():
            for proc in procs:
                proc.start()
        while len(results) < len(procs):
            try:
                kind, index, value = queue.get(timeout=0.2)
            except queue_module.Empty:
                for index, proc in enumerate(procs):
                    if proc.exitcode is not None and index not in results:
                        raise DataError(
                            f"ingest worker {index} ({args[index][1].name}) died with exit code "
                            f"{proc.exitcode} (out of memory?); rerun with fewer --workers"
                        ) from None
                continue
            if kind == "error":
                raise value
            if kind == "progress":
                _report(value)
            else:
                results[index] = value
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()
    return [results[index] for index in range(len(procs))]


def _run_relaxations(
    sources: list[Source], options: _Options, workers: int
) -> Iterator[list[tuple[AtomicGraph, float]]]:
    """Relaxations of each source in order, converted in ``workers`` processes."""
    if workers == 1:
        yield from (_source_relaxations(source, options) for source in sources)
        return
    executor = ProcessPoolExecutor(workers, mp_context=spawn_context(), initializer=_init_worker)
    try:
        with single_threaded_env():  # the processes start while map submits the tasks
            results = executor.map(partial(_source_relaxations, options=options), sources)
        for result in results:
            _report(1)
            yield result
    except BrokenProcessPool:
        raise DataError(
            "an ingest worker process died abruptly (out of memory?); rerun with fewer --workers"
        ) from None
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def ingest(
    inputs: Sequence[str | Path],
    out: str | Path,
    task: str,
    *,
    ref_energy: bool = False,
    workers: int = 1,
    get_edges: bool = False,
    cutoff: float = 6.0,
    max_neighbors: int = 50,
    progress: bool = True,
    overwrite: bool = False,
) -> IngestSummary:
    """Convert ``inputs`` (files/folders) to an LMDB dataset in the folder ``out``.

    ``task`` is s2ef, is2re or is2rs (layouts: module docstring; sid and grouping rules:
    :mod:`catforge.data.sources`). ``workers`` processes convert in parallel (s2ef: one shard
    each). ``get_edges`` stores the neighbour graph (``cutoff`` A, ``max_neighbors`` per atom).
    An existing non-empty ``out`` is replaced only with ``overwrite``, and never when it is or
    holds an input. Raises DataError naming the file on bad input.
    """
    global _reporter
    task = task.lower()
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    out = Path(out)
    sources, skipped = collect_sources(inputs)
    options = _Options(task, ref_energy, get_edges, cutoff, max_neighbors)
    may_replace = partial(_replaces_input, sources=sources)
    with staged_output(out, overwrite=overwrite, may_replace=may_replace) as tmp:
        bar = ProgressCounter(len(sources), desc=f"ingest {task}", unit="file", enabled=progress)
        try:
            _reporter = bar.update
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Skipping unhashable information")
                if task == "s2ef":
                    names, energies, stats = _ingest_s2ef(sources, tmp, options, workers)
                else:
                    names, energies, stats = _ingest_relaxations(sources, tmp, options, workers)
        finally:
            _reporter = None
            bar.close()
    summary = IngestSummary(
        task, out, len(energies), len(sources), [out / name for name in names], skipped, stats
    )
    log.debug("%s: wrote %d entries to %s", task, summary.entries, out)  # the CLI prints it
    return summary


def _ingest_s2ef(
    sources: list[Source], tmp: Path, options: _Options, workers: int
) -> tuple[list[str], np.ndarray, dict[str, float | None]]:
    parts = np.array_split(np.arange(len(sources)), workers)
    args = [
        ([sources[i] for i in part], shard_path(tmp, n), options) for n, part in enumerate(parts)
    ]
    results = _run_shards(args, workers)
    energies = np.concatenate([result.energies for result in results])
    ids = np.concatenate([result.ids for result in results])
    unique = np.unique(ids, axis=0)
    if len(unique) < len(ids):
        log.warning("%d entries share a (sid, fid) with another entry", len(ids) - len(unique))
    forces = Moments()
    for result in results:
        forces.merge(result.forces)
    return [result.path.name for result in results], energies, s2ef_stats(energies, forces)


def _ingest_relaxations(
    sources: list[Source], tmp: Path, options: _Options, workers: int
) -> tuple[list[str], np.ndarray, dict[str, float | None]]:
    path = tmp / "data.lmdb"
    energies: list[float] = []
    with LmdbWriter(path) as writer:
        for entries in _run_relaxations(sources, options, workers):
            for graph, y_relaxed in entries:
                writer.write(graph)
                energies.append(y_relaxed)
    return [path.name], np.asarray(energies), target_stats(energies)


def _replaces_input(out: Path, sources: list[Source]) -> str | None:
    """Why ``out`` must not be replaced: it is, or holds, one of the inputs (else None)."""
    target = out.resolve()
    for source in sources:
        if target == source.path.resolve() or target in source.path.resolve().parents:
            return f"{out}: output would replace the input {source.path}; choose another --out"
    return None
