"""Input discovery and frame reading for ingest: ASE files, ASE databases and raw OC20 S2EF pairs.

Inputs are files or folders; a folder is searched recursively and its supported files are taken
(other files are reported as skipped). Supported: anything ``ase.io.read(path, index=":")`` reads
(``.extxyz``/``.xyz``, also ``.xz``/``.gz``, ``.traj``, ``.cif``), ASE databases (``.db``,
``.json``) and OC20's raw S2EF pairs ``<k>.extxyz[.xz]`` + ``<k>.txt[.xz]``, where txt line i is
``random<sid>,frame<fid>,<reference_energy>`` for extxyz frame i.

sid rule. Raw OC20 layout: from the txt lines. ASE databases: from the grouping key (below).
Other files: the digits of an OC20 file name ``random<digits>.<ext>``, else the 0-based position
of the file in the sorted list of all input files (by resolved path): stable for the same inputs
and unique among them. ``fid``: the txt's ``frame<fid>``, a db row's ``fid`` key-value pair, else
the frame's index in its file (db: in its group, in row-id order).

ASE db grouping rule: rows are grouped by the first of :data:`GROUP_KEYS` (``relaxation_id``,
then ``sid``) that any row has as a key-value pair, and then every row must have it. An integer
or ``random<digits>`` value is the sid (another string: its crc32). A db without such a key is
one trajectory in row-id order, like a ``.traj``.

Reference energies (:attr:`Frame.ref`) come from the txt's third column, else from
``atoms.info["ref_energy"]`` (extxyz comment ``ref_energy=...``, db key-value pair).
"""

from __future__ import annotations

import lzma
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ase.db
import ase.io
import numpy as np
from ase import Atoms

from catforge.data.pickles import normalize_id
from catforge.errors import DataError

__all__ = ["GROUP_KEYS", "Frame", "Source", "collect_sources", "one_line", "read_frames"]

GROUP_KEYS = ("relaxation_id", "sid")
"""ASE db key-value pairs that group rows into trajectories/relaxations, in order of preference."""
_ASE_SUFFIXES = (".extxyz", ".xyz", ".traj", ".db", ".json", ".cif")
_TEXT_SUFFIXES = tuple(f"{s}{c}" for s in (".extxyz", ".xyz") for c in (".xz", ".gz", ".bz2"))
_OC20_NAME = re.compile(r"random(\d+)")
_XYZ, _TXT = (".extxyz", ".extxyz.xz"), (".txt", ".txt.xz")
_TXT_LINE = re.compile(r"random(\d+),frame(\d+),([^,]+)")


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


def one_line(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
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
            f"{path}: cannot be read by ASE after {count} frame(s) ({one_line(error)}); check "
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
        raise DataError(f"{txt}: cannot be read ({one_line(error)})") from error
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
            f"{source.path}: cannot be read as an ASE database ({one_line(error)}); check that "
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
