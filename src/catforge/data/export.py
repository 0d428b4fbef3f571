"""Export an LMDB dataset as OCP writes it: values are pickled torch_geometric ``Data`` objects.

OCP's datasets unpickle every value as a ``Data``, so they cannot read catforge's dicts of arrays;
:func:`export_ocp` rewrites a dataset (catforge's or OCP's own) the way OCP's preprocessing does.

Fields, as OCP's AtomsToGraphs and preprocessing scripts store them: ``pos``, ``cell`` (1, 3, 3),
``atomic_numbers``, ``fixed`` (1.0 = fixed), ``force`` and ``pos_relaxed`` float32; ``tags``,
``edge_index`` and ``cell_offsets`` int64; ``natoms``, ``sid`` and ``fid`` Python ints; ``y``,
``y_init`` and ``y_relaxed`` Python floats; and ``pbc`` bool (1, 3) (fairchem's ``r_pbc`` field).
``neighbors`` is not stored: OCP's collater counts each entry's edges itself.

Layout. A single-file source becomes one file holding only the entry keys ``b"0"..``: OCP's
IS2RE layout, whose ``SinglePointLmdbDataset`` takes the key count as the length, so any other
key would be read as an entry. A folder becomes a folder of files with the same names, each also
holding OCP's pickled-int ``b"length"`` key (``TrajectoryLmdbDataset`` requires it), plus OCP's
``metadata.npz`` (``natoms``, and ``neighbors`` when every entry has edges) for load balancing. A
folder whose only file is ``data.lmdb`` (catforge's IS2RE layout) keeps that file single-point.

The pickles (protocol 4) name no torch_geometric class but ``Data`` and ``GlobalStorage``: the
``DataEdgeAttr``/``DataTensorAttr`` references of newer releases are left out, since older
releases cannot resolve them. torch_geometric is imported only here, when an export runs.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch

from catforge.data import keys
from catforge.data.graph import AtomicGraph
from catforge.data.lmdb import LENGTH_KEY, LmdbDataset, lmdb_files
from catforge.data.staging import staged_file, staged_output
from catforge.errors import ConfigError, DataError
from catforge.runtime.progress import progress as progress_bar

__all__ = ["ExportSummary", "ExportedFile", "export_ocp", "ocp_fields"]

SINGLE_POINT_NAME = "data.lmdb"
METADATA_NAME = "metadata.npz"
PROTOCOL = 4
_MAP_SIZE = 1 << 40
_COMMIT_EVERY = 1000
_NEWER_PYG_ATTRS = ("_edge_attr_cls", "_tensor_attr_cls")
DataClass = Callable[..., Any]
"""``torch_geometric.data.Data``, imported when an export runs."""

_TENSOR_DTYPES = {
    keys.POS: torch.float32,
    keys.ATOMIC_NUMBERS: torch.float32,
    keys.CELL: torch.float32,
    keys.PBC: torch.bool,
    keys.TAGS: torch.long,
    keys.FIXED: torch.float32,
    keys.EDGE_INDEX: torch.long,
    keys.CELL_OFFSETS: torch.long,
    keys.FORCES: torch.float32,
    keys.POS_RELAXED: torch.float32,
}
_SCALARS: dict[str, Callable[[Any], int | float]] = {
    keys.NATOMS: int,
    keys.ENERGY: float,
    keys.SID: int,
    keys.FID: int,
    keys.ENERGY_INIT: float,
    keys.ENERGY_RELAXED: float,
}


@dataclass(frozen=True)
class ExportedFile:
    """One written file: its path, entry count and whether it holds the ``length`` key."""

    path: Path
    entries: int
    length_key: bool


@dataclass(frozen=True)
class ExportSummary:
    """What :func:`export_ocp` wrote."""

    src: Path
    out: Path
    files: tuple[ExportedFile, ...]
    metadata: Path | None

    @property
    def entries(self) -> int:
        return sum(file.entries for file in self.files)

    @property
    def ocp_src(self) -> Path:
        """The path to give OCP's dataset ``src``."""
        single = len(self.files) == 1 and not self.files[0].length_key
        return self.files[0].path if single else self.out

    def format(self) -> str:
        head = f"ocp: wrote {self.entries} entries (torch_geometric Data pickles) from {self.src}"
        lines = [f"{head} to {self.out}"]
        for file in self.files:
            extra = "+ 'length' key" if file.length_key else "(single-point file: no other keys)"
            lines.append(f"  {file.path}: {file.entries} entries {extra}")
        if self.metadata is not None:
            lines.append(f"  {self.metadata}: entry sizes for OCP's load balancing")
        lines.append(f"OCP config: dataset src: {self.ocp_src}")
        return "\n".join(lines)


def export_ocp(
    src: str | Path, out: str | Path, *, overwrite: bool = False, progress: bool = True
) -> ExportSummary:
    """Write the LMDB file or folder ``src`` to ``out`` as OCP's LMDB files (module docstring).

    Every entry is validated as it is read (DataError naming the file and entry). The output
    is staged beside ``out`` and renamed into place, so it is complete or absent; an existing
    non-empty ``out`` is replaced only with ``overwrite``, and never when it is or holds ``src``.
    """
    data_class = _pyg_data_class()
    src, out = Path(src), Path(out)
    files = lmdb_files(src)
    _refuse_replacing_input(src, out)
    parts = [LmdbDataset(path, float_dtype=torch.float64) for path in files]
    graphs = progress_bar(
        (part[index] for part in parts for index in range(len(part))),
        total=sum(len(part) for part in parts),
        desc="export ocp",
        enabled=progress,
    )
    if src.is_file():
        _refuse_folder(out)
        with staged_file(out, overwrite=overwrite) as tmp:
            entries = _write_file(tmp, graphs, data_class, length_key=False)
        return ExportSummary(src, out, (ExportedFile(out, entries, False),), None)
    length_key = [path.name for path in files] != [SINGLE_POINT_NAME]
    written: list[ExportedFile] = []
    natoms: list[int] = []
    neighbors: list[int | None] = []
    with staged_output(out, overwrite=overwrite) as tmp:
        for path, part in zip(files, parts, strict=True):
            counted = _counting(islice(graphs, len(part)), natoms, neighbors)
            entries = _write_file(tmp / path.name, counted, data_class, length_key=length_key)
            written.append(ExportedFile(out / path.name, entries, length_key))
        _write_metadata(tmp / METADATA_NAME, natoms, neighbors)
    return ExportSummary(src, out, tuple(written), out / METADATA_NAME)


def ocp_fields(graph: AtomicGraph) -> dict[str, Any]:
    """One structure's fields with OCP's names, dtypes and Python scalars (module docstring)."""
    if graph.n_graphs != 1:
        raise ValueError(f"ocp_fields needs a single structure, got a batch of {graph.n_graphs}")
    fields: dict[str, Any] = {}
    for name in graph.present():
        value: torch.Tensor = getattr(graph, name)
        if name in _TENSOR_DTYPES:
            fields[name] = value.detach().cpu().to(_TENSOR_DTYPES[name], copy=True)
        elif name in _SCALARS:
            fields[name] = _SCALARS[name](value.item())
    fields[keys.CELL] = fields[keys.CELL].reshape(1, 3, 3)
    fields[keys.PBC] = fields[keys.PBC].reshape(1, 3)
    return fields


def _pyg_data_class() -> DataClass:
    try:
        from torch_geometric.data import Data
    except ImportError:
        raise ConfigError(
            "'data export --format ocp' writes torch_geometric Data objects and needs "
            "torch_geometric: pip install torch_geometric"
        ) from None
    return Data


def _dumps_data(graph: AtomicGraph, data_class: DataClass) -> bytes:
    data = data_class(**ocp_fields(graph))
    for name in _NEWER_PYG_ATTRS:
        data.__dict__.pop(name, None)
    return pickle.dumps(data, protocol=PROTOCOL)


def _write_file(
    path: Path, graphs: Iterable[AtomicGraph], data_class: DataClass, *, length_key: bool
) -> int:
    """Write ``graphs`` to a new LMDB file at ``path`` (keys ``b"0"..``); return the count."""
    env = lmdb.open(str(path), map_size=_MAP_SIZE, subdir=False, meminit=False, lock=False)
    try:
        count = 0
        txn = env.begin(write=True)
        try:
            for count, graph in enumerate(graphs, start=1):
                txn.put(str(count - 1).encode("ascii"), _dumps_data(graph, data_class))
                if count % _COMMIT_EVERY == 0:
                    txn.commit()
                    txn = env.begin(write=True)
            if length_key:
                txn.put(LENGTH_KEY, pickle.dumps(count, protocol=PROTOCOL))
        except BaseException:
            txn.abort()
            raise
        txn.commit()
        env.sync()
    finally:
        env.close()
    return count


def _counting(
    graphs: Iterable[AtomicGraph], natoms: list[int], neighbors: list[int | None]
) -> Iterator[AtomicGraph]:
    """Pass ``graphs`` through, recording each one's atom and edge counts."""
    for graph in graphs:
        natoms.append(graph.n_atoms)
        neighbors.append(graph.n_edges if graph.has_edges else None)
        yield graph


def _write_metadata(path: Path, natoms: list[int], neighbors: list[int | None]) -> None:
    """OCP's ``metadata.npz`` (as its ``make_lmdb_sizes.py`` writes it)."""
    arrays = {"natoms": np.asarray(natoms, dtype=np.int32)}
    if None not in neighbors:
        arrays["neighbors"] = np.asarray(neighbors, dtype=np.int32)
    with path.open("wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]


def _refuse_replacing_input(src: Path, out: Path) -> None:
    source, target = src.resolve(), out.resolve()
    if target == source or target in source.parents:
        raise DataError(f"{out}: output would replace the input {src}; choose another --out")
    if source.is_dir() and source in target.parents:
        raise DataError(f"{out}: output lies inside the input folder {src}; choose another --out")


def _refuse_folder(out: Path) -> None:
    """A single .lmdb file exports to a file: ``out`` must not be a folder."""
    if out.is_dir():
        raise DataError(
            f"{out}: is a folder, but a single .lmdb file exports to one file; "
            f"give a file path such as --out {out / SINGLE_POINT_NAME}"
        )
