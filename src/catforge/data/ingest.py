"""Convert ASE files and OC20's raw S2EF layout to catforge LMDBs (OCP's preprocessing scripts).

Inputs are files or folders; a folder is searched recursively and its supported files are taken
(other files are reported as skipped). Supported: anything ``ase.io.read(path, index=":")`` reads
(``.extxyz``/``.xyz``, also ``.xz``/``.gz``, ``.traj``, ``.cif``), ASE databases (``.db``,
``.json``) and OC20's raw S2EF pairs ``<k>.extxyz[.xz]`` + ``<k>.txt[.xz]``, where txt line i is
``random<sid>,frame<fid>,<reference_energy>`` for extxyz frame i.

Layouts: ``s2ef`` writes one frame per entry (``y``, ``force``, ``tags``, ``fixed``, ``sid``,
``fid``) to ``out/data.NNNN.lmdb``, one shard per worker, each worker converting an even share
(``np.array_split``) of the input files. ``is2re``/``is2rs`` write one relaxation per entry (the
first frame's structure, ``tags``, ``fixed``, ``y_init``, ``y_relaxed``, the last frame's
positions as ``pos_relaxed``, ``sid``) to ``out/data.lmdb``. Everything is written to
``out.tmp-*`` and renamed into place at the end.

sid rule. Raw OC20 layout: from the txt lines. ASE databases: from the grouping key (below).
Other files: the digits of an OC20 file name ``random<digits>.<ext>``, else the 0-based position
of the file in the sorted list of all input files (by resolved path): stable for the same inputs
and unique among them. ``fid`` (S2EF): the txt's ``frame<fid>``, a db row's ``fid`` key-value
pair, else the frame's index in its file (db: in its group, in row-id order).

ASE db grouping rule: rows are grouped by the first of :data:`GROUP_KEYS` (``relaxation_id``,
then ``sid``) that any row has as a key-value pair, and then every row must have it. An integer
or ``random<digits>`` value is the sid (another string: its crc32). A db without such a key is
one trajectory in row-id order, like a ``.traj``. For is2re/is2rs each group (each other file;
raw layout: each txt sid) is one relaxation from its lowest to its highest ``fid``; frames with
different atoms in one relaxation are an error.

Reference energies (``ref_energy=True``) come from the txt's third column, else from
``atoms.info["ref_energy"]`` (extxyz comment ``ref_energy=...``, db key-value pair).
"""

from __future__ import annotations

import logging
import lzma
import multiprocessing as mp
import os
import pickle
import queue as queue_module
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import ase.db
import ase.io
import numpy as np
import torch
from ase import Atoms

from catforge.data.atoms import atoms_to_graph
from catforge.data.graph import AtomicGraph
from catforge.data.info import Moments
from catforge.data.lmdb import LmdbWriter, shard_path
from catforge.data.pickles import normalize_id
from catforge.errors import ConfigError, DataError
from catforge.progress import progress_enabled

log = logging.getLogger(__name__)

__all__ = [
    "GROUP_KEYS",
    "TASKS",
    "Frame",
    "IngestSummary",
    "Source",
    "collect_sources",
    "format_stats_yaml",
    "ingest",
    "read_frames",
]

TASKS = ("s2ef", "is2re", "is2rs")
GROUP_KEYS = ("relaxation_id", "sid")
"""ASE db key-value pairs that group rows into trajectories/relaxations, in order of preference."""
_ASE_SUFFIXES = (".extxyz", ".xyz", ".traj", ".db", ".json", ".cif")
_TEXT_SUFFIXES = tuple(f"{s}{c}" for s in (".extxyz", ".xyz") for c in (".xz", ".gz", ".bz2"))
_OC20_NAME = re.compile(r"random(\d+)")
_XYZ, _TXT = (".extxyz", ".extxyz.xz"), (".txt", ".txt.xz")
_TXT_LINE = re.compile(r"random(\d+),frame(\d+),([^,]+)")
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_reporter: Callable[[int], None] | None = None


@dataclass(frozen=True)
class Source:
    """One input file: ``kind`` is "raw" (extxyz + txt), "db" (ASE database) or "ase"."""

    path: Path
    kind: str
    sid: int
    txt: Path | None = None


@dataclass
class Frame:
    """One structure read from a source, with its ids and reference energy."""

    atoms: Atoms
    sid: int
    fid: int
    ref: float | None
    where: str


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
        "normalize_labels: true",
        f"target_mean: {stats['target_mean']!r}",
        f"target_std: {stats['target_std']!r}",
    ]
    if not stats["target_std"]:
        lines.append("# WARNING: target_std is 0 (one entry or equal energies); use 1.0 instead")
    if "grad_target_std" in stats:
        lines += [
            "grad_target_mean: 0.0",
            "# grad_target_std = target_std, as in OCP's S2EF configs: forces are -dE/dpos, so "
            "denormalising them by target_std gives -dE/dpos exactly (force component std here: "
            f"{stats.get('force_std')!r})",
            f"grad_target_std: {stats['grad_target_std']!r}",
        ]
    return "\n".join(lines)


def _supported(name: str) -> bool:
    return name.lower().endswith(_ASE_SUFFIXES + _TEXT_SUFFIXES)


def _partner(path: Path, own: tuple[str, ...], other: tuple[str, ...]) -> Path | None:
    """The existing sibling ``<k><other suffix>`` of ``<k><own suffix>`` (raw OC20 pairs)."""
    for suffix in own:
        if path.name.endswith(suffix):
            stem = path.name[: -len(suffix)]
            return next((p for s in other if (p := path.with_name(stem + s)).is_file()), None)
    return None


def collect_sources(inputs: Sequence[str | Path]) -> tuple[list[Source], list[tuple[Path, str]]]:
    """Expand files and folders into sorted, de-duplicated sources and the skipped files."""
    if not inputs:
        raise DataError("no INPUT given; pass .extxyz/.traj/.db/.json files or folders")
    files: dict[Path, Path] = {}
    skipped: list[tuple[Path, str]] = []
    for item in map(Path, inputs):
        if not item.exists():
            raise DataError(f"{item}: no such file or folder; check the INPUT path")
        if item.is_file():
            found = [_partner(item, _TXT, _XYZ) or item]
        else:
            found = []
            for path in sorted(p for p in item.rglob("*") if p.is_file()):
                if _supported(path.name):
                    found.append(path)
                elif _partner(path, _TXT, _XYZ) is None:
                    skipped.append((path, "not a supported file type"))
            if not found:
                raise DataError(
                    f"{item}: folder holds no supported files ({', '.join(_ASE_SUFFIXES)} or "
                    "OC20 <k>.extxyz + <k>.txt); point INPUT at the data files"
                )
        files.update((path.resolve(), path) for path in found)
    ordered = [files[key] for key in sorted(files, key=str)]
    return [_make_source(path, index) for index, path in enumerate(ordered)], skipped


def _make_source(path: Path, index: int) -> Source:
    txt = _partner(path, _XYZ, _TXT)
    kind = "raw" if txt else "db" if path.suffix.lower() in (".db", ".json") else "ase"
    match = _OC20_NAME.fullmatch(path.name.split(".")[0])
    return Source(path, kind, int(match.group(1)) if match else index, txt)


def read_frames(source: Source) -> Iterator[Frame]:
    """Every frame of a source, checked for finite positions."""
    reader = {"raw": _raw_frames, "db": _db_frames, "ase": _ase_frames}[source.kind]
    for frame in reader(source):
        if not np.isfinite(frame.atoms.positions).all():
            raise DataError(
                f"{frame.where}: positions contain NaN or inf; remove or repair this frame"
            )
        yield frame


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _iread(path: Path) -> Iterator[Atoms]:
    count = 0
    try:
        for atoms in ase.io.iread(path, index=":"):
            count += 1
            yield atoms
    except DataError:
        raise
    except Exception as error:
        raise DataError(
            f"{path}: cannot be read by ASE after {count} frame(s) ({_one_line(error)}); check "
            "that the file is complete and in a format ase.io.read knows"
        ) from error
    if count == 0:
        raise DataError(f"{path}: holds no structures; remove it from the inputs")


def _info_ref(atoms: Atoms) -> float | None:
    value = atoms.info.get("ref_energy")
    return None if value is None else float(value)


def _ase_frames(source: Source) -> Iterator[Frame]:
    for fid, atoms in enumerate(_iread(source.path)):
        yield Frame(atoms, source.sid, fid, _info_ref(atoms), f"{source.path} frame {fid}")


def _read_txt(txt: Path) -> list[tuple[int, int, float]]:
    """Parse ``random<sid>,frame<fid>,<reference_energy>`` lines."""
    try:
        opener = lzma.open if txt.name.endswith(".xz") else open
        with opener(txt, "rt") as handle:
            lines = handle.read().rstrip().splitlines()
    except (OSError, lzma.LZMAError, UnicodeDecodeError) as error:
        raise DataError(f"{txt}: cannot be read ({_one_line(error)})") from error
    parsed = []
    for number, line in enumerate(lines, start=1):
        match = _TXT_LINE.fullmatch(line.strip())
        try:
            parsed.append((int(match[1]), int(match[2]), float(match[3])))  # type: ignore[index]
        except (TypeError, ValueError):
            raise DataError(
                f"{txt} line {number}: expected 'random<sid>,frame<fid>,<reference_energy>', "
                f"got {line.strip()[:80]!r}; repair or regenerate the txt"
            ) from None
    return parsed


def _raw_frames(source: Source) -> Iterator[Frame]:
    assert source.txt is not None
    lines = _read_txt(source.txt)
    count = 0
    for index, atoms in enumerate(_iread(source.path)):
        if index == len(lines):
            count = -1
            break
        where = f"{source.path} frame {index} ({source.txt.name} line {index + 1})"
        yield Frame(atoms, *lines[index], where)
        count = index + 1
    if count != len(lines):
        frames = "more" if count < 0 else count
        raise DataError(
            f"{source.txt}: has {len(lines)} lines but {source.path} has {frames} frames; line i "
            "must describe frame i, so regenerate the txt together with the extxyz"
        )


def _db_frames(source: Source) -> Iterator[Frame]:
    try:
        rows = list(ase.db.connect(source.path, use_lock_file=False).select())
    except Exception as error:
        raise DataError(
            f"{source.path}: cannot be read as an ASE database ({_one_line(error)}); check that "
            "it is a complete ase.db .db/.json file"
        ) from error
    if not rows:
        raise DataError(f"{source.path}: ASE database has no rows; remove it from the inputs")
    key = next((k for k in GROUP_KEYS if any(k in row.key_value_pairs for row in rows)), None)
    groups: dict[Any, list[Any]] = {}
    for row in rows:
        if key is not None and key not in row.key_value_pairs:
            raise DataError(
                f"{source.path} row id {row.id}: has no '{key}' key-value pair although other rows "
                f"do; give every row a '{key}' to group rows into relaxations"
            )
        groups.setdefault(row.key_value_pairs.get(key) if key else None, []).append(row)
    for value, group in groups.items():
        sid = source.sid if key is None else _group_sid(value)
        for position, row in enumerate(group):
            atoms = row.toatoms()
            atoms.info.update(row.key_value_pairs)
            fid = int(row.key_value_pairs.get("fid", position))
            where = f"{source.path} row id {row.id}"
            yield Frame(atoms, sid, fid, _info_ref(atoms), where)


def _group_sid(value: Any) -> int:
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return int(value)
    return normalize_id(str(value))


def _energy(frame: Frame, ref_energy: bool) -> float:
    calc = frame.atoms.calc
    if calc is None or "energy" not in getattr(calc, "results", {}):
        raise DataError(
            f"{frame.where}: no energy; every frame needs its DFT energy (store the calculator "
            "results with the structure, e.g. write the file after computing them)"
        )
    energy = float(frame.atoms.get_potential_energy())
    if not ref_energy:
        return energy
    if frame.ref is None:
        raise DataError(
            f"{frame.where}: --ref-energy needs a reference energy; store it as "
            "atoms.info['ref_energy'] (extxyz comment 'ref_energy=...', db key-value pair "
            "'ref_energy'), use OC20's <k>.extxyz + <k>.txt layout, or drop --ref-energy"
        )
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
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Skipping unhashable information")
    if queue is not None:
        _reporter = partial(_put_progress, queue)


def _put_progress(queue: Any, files: int) -> None:
    queue.put(("progress", -1, files))


@contextmanager
def _single_threaded() -> Iterator[None]:
    """Processes started inside run BLAS/OpenMP with one thread (they copy the environment)."""
    saved = {name: os.environ.get(name) for name in _THREAD_VARS}
    os.environ.update(dict.fromkeys(_THREAD_VARS, "1"))
    try:
        yield
    finally:
        os.environ.update({k: v for k, v in saved.items() if v is not None})
        for name in (k for k, v in saved.items() if v is None):
            del os.environ[name]


def _shard_worker(index: int, args: tuple[Any, ...], queue: Any) -> None:
    """Child process: write one shard and send back its result or its exception."""
    _init_worker(queue)
    try:
        message: tuple[str, int, Any] = ("done", index, _write_shard(*args))
    except BaseException as error:
        try:
            pickle.dumps(error)
        except Exception:
            error = RuntimeError(_one_line(error))
        message = ("error", index, error)
    queue.put(message)


def _run_shards(args: list[tuple[Any, ...]], workers: int) -> list[_ShardResult]:
    """One process per shard; a worker's exception is re-raised, a crashed worker reported."""
    if workers == 1:
        return [_write_shard(*args[0])]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_shard_worker, args=(i, a, queue)) for i, a in enumerate(args)]
    results: dict[int, _ShardResult] = {}
    try:
        with _single_threaded():
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
    ctx = mp.get_context("spawn")
    executor = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker)
    try:
        with _single_threaded():  # the processes start while map submits the tasks
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

    ``task`` is s2ef, is2re or is2rs (layouts, sid and grouping rules: module docstring).
    ``workers`` processes convert in parallel (s2ef: one shard each). ``get_edges`` stores the
    neighbour graph (``cutoff`` A, ``max_neighbors`` per atom). An existing non-empty ``out``
    is replaced only with ``overwrite``. Raises DataError naming the file on bad input.
    """
    global _reporter
    task = task.lower()
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    out = Path(out)
    sources, skipped = collect_sources(inputs)
    _check_output(out, sources, overwrite)
    options = _Options(task, ref_energy, get_edges, cutoff, max_neighbors)
    tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    bar = _bar(len(sources), task, progress)
    try:
        tmp.mkdir(parents=True)
        _reporter = bar.update
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Skipping unhashable information")
            if task == "s2ef":
                names, energies, stats = _ingest_s2ef(sources, tmp, options, workers)
            else:
                names, energies, stats = _ingest_relaxations(sources, tmp, options, workers)
        _move_into_place(tmp, out)
    finally:
        _reporter = None
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    summary = IngestSummary(
        task, out, len(energies), len(sources), [out / name for name in names], skipped, stats
    )
    log.info("%s: wrote %d entries to %s", task, summary.entries, out)
    return summary


def _bar(total: int, task: str, progress: bool) -> Any:
    from tqdm import tqdm

    enabled = progress_enabled(progress)
    return tqdm(total=total, desc=f"ingest {task}", unit="file", disable=not enabled, leave=False)


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
    stats = _target_stats(energies)
    stats.update(grad_target_mean=0.0, grad_target_std=stats["target_std"], force_std=forces.std)
    return [result.path.name for result in results], energies, stats


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
    return [path.name], np.asarray(energies), _target_stats(np.asarray(energies))


def _target_stats(energies: np.ndarray) -> dict[str, float | None]:
    return {"target_mean": float(np.mean(energies)), "target_std": float(np.std(energies))}


def _is_empty(path: Path) -> bool:
    return not any(path.iterdir()) if path.is_dir() else path.stat().st_size == 0


def _check_output(out: Path, sources: list[Source], overwrite: bool) -> None:
    if out.exists() and not _is_empty(out) and not overwrite:
        raise DataError(
            f"{out}: output exists and is not empty; pass --overwrite (overwrite=True) to "
            "replace it, or choose another --out"
        )
    target = out.resolve()
    for source in sources:
        if target == source.path.resolve() or target in source.path.resolve().parents:
            raise DataError(
                f"{out}: output would replace the input {source.path}; choose another --out"
            )


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first and removed after."""
    if out.exists() and out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f"{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(out, old)
    os.replace(tmp, out)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()
