"""Relaxation trajectories: one ASE ``.traj`` file per structure, complete or absent.

Frames go to ``<folder>/<name>.traj_tmp`` while a structure relaxes; the file is renamed to
``<name>.traj`` when it finishes, so a ``.traj`` file is always a whole relaxation. Every frame
carries the energy and forces of its own positions (a SinglePointCalculator; forces as the model
gives them, ASE applies FixAtoms on ``get_forces()``), and ``atoms.info`` holds ``sid``, ``step``,
``fmax`` (eV/A, free atoms) and ``relax_tag``. With ``full=False`` only the first and the last
frames are written.

``relax_tag`` identifies the model and the settings; :meth:`TrajectoryWriter.completed` reads
back the results of finished files with the same tag, which is how a re-run resumes (files with
another tag are relaxed again and replaced).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io.trajectory import Trajectory
from ase.io.trajectory import TrajectoryWriter as AseTrajectoryWriter

from catforge.data.atoms import graph_to_atoms
from catforge.data.graph import AtomicGraph
from catforge.relax.driver import Frame, RelaxResult

log = logging.getLogger(__name__)

SUFFIX = ".traj"
PARTIAL_SUFFIX = ".traj_tmp"


class TrajectoryWriter:
    """Frame observer of :func:`~catforge.relax.driver.relax` writing one file per structure.

    Call :meth:`register` for a structure before its first frame (index as the driver sees it),
    pass the writer as the driver's observer, and :meth:`finish` each result.
    """

    def __init__(self, folder: Path, *, full: bool, relax_tag: str) -> None:
        self.folder = folder
        self.full = full
        self.relax_tag = relax_tag
        self._open: dict[int, _Open] = {}

    def path(self, name: str) -> Path:
        return self.folder / f"{name}{SUFFIX}"

    def register(self, index: int, name: str, graph: AtomicGraph) -> None:
        """Start the file of structure ``index`` (``name`` is usually its sid)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.folder / f"{name}{PARTIAL_SUFFIX}"
        writer = Trajectory(str(partial), mode="w")
        self._open[index] = _Open(name, graph, partial, writer)

    def __call__(self, frame: Frame) -> None:
        entry = self._open[frame.index]
        if self.full or entry.frames_written == 0:
            entry.write(frame, self.relax_tag)
        else:
            entry.last = frame

    def finish(self, result: RelaxResult) -> Path:
        """Write the last frame if it is pending, close the file and rename it into place."""
        entry = self._open.pop(result.index)
        if entry.last is not None and entry.last.step > 0:
            entry.write(entry.last, self.relax_tag)
        entry.writer.close()
        final = self.path(entry.name)
        os.replace(entry.partial, final)
        return final

    def close(self) -> None:
        """Close files of unfinished structures (left as ``.traj_tmp``)."""
        for entry in self._open.values():
            entry.writer.close()
        self._open.clear()

    def completed(self, name: str, graph: AtomicGraph) -> Frame | None:
        """The last frame of ``name``'s finished trajectory, if it has this writer's tag and
        starts from ``graph`` (same elements and initial positions); else None."""
        path = self.path(name)
        if not path.is_file():
            return None
        try:
            with Trajectory(str(path)) as frames:
                first, atoms = frames[0], frames[-1]
        except Exception as error:  # a damaged file is relaxed again, not fatal
            log.warning("%s: unreadable trajectory (%s); relaxing it again", path, error)
            return None
        assert isinstance(first, Atoms) and isinstance(atoms, Atoms)
        if atoms.info.get("relax_tag") != self.relax_tag:
            log.warning("%s: written by another model or settings; relaxing it again", path)
            return None
        if not _starts_from(first, graph):
            log.warning("%s: starts from another structure; relaxing it again", path)
            return None
        return Frame(
            index=-1,
            step=int(atoms.info["step"]),
            positions=atoms.get_positions(),
            energy=float(atoms.get_potential_energy()),
            forces=atoms.get_forces(apply_constraint=False),
            fmax=float(atoms.info["fmax"]),
        )


class _Open:
    """A trajectory being written: its structure, files and the pending last frame."""

    def __init__(
        self, name: str, graph: AtomicGraph, partial: Path, writer: AseTrajectoryWriter
    ) -> None:
        self.name = name
        self.partial = partial
        self.writer = writer
        self.template = _atoms_template(graph)
        self.frames_written = 0
        self.last: Frame | None = None

    def write(self, frame: Frame, relax_tag: str) -> None:
        atoms = self.template.copy()
        atoms.set_positions(frame.positions, apply_constraint=False)
        atoms.info.update(step=frame.step, fmax=frame.fmax, relax_tag=relax_tag)
        atoms.calc = SinglePointCalculator(atoms, energy=frame.energy, forces=frame.forces)
        self.writer.write(atoms)
        self.frames_written += 1


def _starts_from(first: Atoms, graph: AtomicGraph) -> bool:
    """Whether a trajectory's first frame is ``graph`` (elements and positions to 1e-5 A)."""
    numbers = graph.atomic_numbers.cpu().numpy()
    if len(first) != len(numbers) or not np.array_equal(first.numbers, numbers):
        return False
    return bool(np.allclose(first.positions, graph.pos.detach().cpu().double().numpy(), atol=1e-5))


def _atoms_template(graph: AtomicGraph) -> Atoms:
    """The structure as ``ase.Atoms`` (FixAtoms, tags, sid and labels in ``info``), no results."""
    atoms = graph_to_atoms(graph)
    atoms.calc = None
    return atoms
