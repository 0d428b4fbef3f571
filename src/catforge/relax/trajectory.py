"""Relaxation trajectories: one ASE ``.traj`` file per structure, complete or absent.

Frames go to ``<folder>/<name>.traj_tmp`` while a structure relaxes; the file is renamed to
``<name>.traj`` when it finishes, so a ``.traj`` file is always a whole relaxation. Every frame
carries the energy and forces of its own positions (a SinglePointCalculator; forces as the model
gives them, ASE applies FixAtoms on ``get_forces()``), and ``atoms.info`` holds ``sid``, ``step``,
``fmax`` (eV/A, free atoms), ``relax_tag`` and ``checkpoint``. With ``full=False`` only the first
and the last frames are written.

``relax_tag`` identifies the model and the settings, ``checkpoint`` names the model's file. A
folder holds the trajectories of one tag, at the place OCP's tools and the README name,
``<folder>/<sid>.traj``: :meth:`TrajectoryWriter.scan` refuses (ConfigError) a folder holding
finished trajectories of another tag or of another program instead of replacing them, and keeps
those of its own tag, whose results :meth:`TrajectoryWriter.completed` hands back: that is how a
rerun resumes. (A subfolder per tag would keep models apart too, but would move the files away
from where submission scripts read them.)

``.traj_tmp`` files are never resumed from: the optimizer's L-BFGS history is not in them, so
continuing from their last frame would not retrace an uninterrupted relaxation. Those of
unfinished structures are deleted when the run stops (:meth:`TrajectoryWriter.close`) and those a
killed run left behind when the next one starts (:meth:`TrajectoryWriter.remove_partial`); the
rerun relaxes such structures from their initial positions. A run holds the folder with an
``flock`` on ``<folder>/.catforge.lock`` (:meth:`TrajectoryWriter.lock`), so a second run into a
folder in use is refused rather than having its unfinished files deleted under it.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import IO

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io.trajectory import Trajectory
from ase.io.trajectory import TrajectoryWriter as AseTrajectoryWriter

from catforge.data.atoms import graph_to_atoms
from catforge.data.graph import AtomicGraph
from catforge.errors import ConfigError
from catforge.relax.driver import Frame, RelaxResult

log = logging.getLogger(__name__)

SUFFIX = ".traj"
PARTIAL_SUFFIX = ".traj_tmp"
LOCK_NAME = ".catforge.lock"
"""Held (``flock``) by the run relaxing into the folder; a second run is refused."""


class TrajectoryWriter:
    """Frame observer of :func:`~catforge.relax.driver.relax` writing one file per structure.

    Call :meth:`scan` first, :meth:`register` for a structure before its first frame (index as
    the driver sees it), pass the writer as the driver's observer, and :meth:`finish` each result.
    """

    def __init__(self, folder: Path, *, full: bool, relax_tag: str, checkpoint: str = "") -> None:
        self.folder = folder
        self.full = full
        self.relax_tag = relax_tag
        self.info = {"relax_tag": relax_tag, "checkpoint": checkpoint}
        self._open: dict[int, _Open] = {}
        self._lock: IO[str] | None = None
        self._finished: dict[str, tuple[Atoms, Atoms]] = {}
        self._unreadable: dict[str, str] = {}

    def path(self, name: str) -> Path:
        return self.folder / f"{name}{SUFFIX}"

    def scan(self) -> None:
        """Read the first and last frames of the folder's finished trajectories; ConfigError when
        any was written by another model, other settings or another program."""
        foreign: list[Atoms] = []
        for path in sorted(self.folder.glob(f"*{SUFFIX}")):
            try:
                with Trajectory(str(path)) as frames:
                    first, last = frames[0], frames[-1]
            except Exception as error:  # a damaged file is relaxed again, not fatal
                self._unreadable[path.stem] = str(error)
                continue
            assert isinstance(first, Atoms) and isinstance(last, Atoms)
            if last.info.get("relax_tag") == self.relax_tag:
                self._finished[path.stem] = (first, last)
            else:
                foreign.append(last)
        if foreign:
            raise ConfigError(self._foreign_message(foreign))

    def _foreign_message(self, foreign: list[Atoms]) -> str:
        info = foreign[0].info
        if "relax_tag" in info:
            origin = f"relax tag {info['relax_tag']}"
            if info.get("checkpoint"):
                origin += f", checkpoint {info['checkpoint']}"
        else:
            origin = "no relax tag: written by another program"
        return (
            f"{self.folder}: holds {len(foreign)} finished trajectories of another model or other "
            f"relaxation settings ({origin}; this run's tag is {self.relax_tag}); relaxing here "
            "would replace them: use another task.relax_opt.traj_dir, or delete those .traj files"
        )

    def lock(self) -> None:
        """Hold the folder for this run until :meth:`close` (rank 0 of a run takes it); a
        second run-relaxations into the folder while this one runs is refused."""
        self.folder.mkdir(parents=True, exist_ok=True)
        handle = (self.folder / LOCK_NAME).open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ConfigError(
                f"{self.folder}: another run-relaxations is writing trajectories here; wait for "
                "it to finish or use another task.relax_opt.traj_dir"
            ) from None
        self._lock = handle

    def remove_partial(self) -> None:
        """Delete the ``.traj_tmp`` files of structures a killed run did not finish."""
        removed = 0
        for path in self.folder.glob(f"*{PARTIAL_SUFFIX}"):
            path.unlink(missing_ok=True)
            removed += 1
        if removed:
            log.info("%s: removed %d unfinished trajectories of a killed run", self.folder, removed)

    def register(self, index: int, name: str, graph: AtomicGraph) -> None:
        """Start the file of structure ``index`` (``name`` is usually its sid)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.folder / f"{name}{PARTIAL_SUFFIX}"
        writer = Trajectory(str(partial), mode="w")
        self._open[index] = _Open(name, graph, partial, writer)

    def __call__(self, frame: Frame) -> None:
        entry = self._open[frame.index]
        if self.full or entry.frames_written == 0:
            entry.write(frame, self.info)
        else:
            entry.last = frame

    def finish(self, result: RelaxResult) -> Path:
        """Write the last frame if it is pending, close the file and rename it into place."""
        entry = self._open.pop(result.index)
        if entry.last is not None and entry.last.step > 0:
            entry.write(entry.last, self.info)
        entry.writer.close()
        final = self.path(entry.name)
        os.replace(entry.partial, final)
        return final

    def close(self) -> None:
        """Close and delete the files of unfinished structures (a rerun starts them over)."""
        for entry in self._open.values():
            entry.writer.close()
            entry.partial.unlink(missing_ok=True)
        self._open.clear()
        if self._lock is not None:
            lock = Path(self._lock.name)
            if not any(path != lock for path in self.folder.iterdir()):
                lock.unlink()  # a folder this run left empty goes (before the lock is released)
                self.folder.rmdir()
            self._lock.close()  # releases the flock
            self._lock = None

    def completed(self, name: str, graph: AtomicGraph) -> Frame | None:
        """The last frame of ``name``'s finished trajectory found by :meth:`scan`, if it starts
        from ``graph`` (same elements and initial positions); else None."""
        path = self.path(name)
        if name in self._unreadable:
            log.warning(
                "%s: unreadable trajectory (%s); relaxing it again", path, self._unreadable[name]
            )
            return None
        if name not in self._finished:
            return None
        first, atoms = self._finished[name]
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

    def write(self, frame: Frame, info: dict[str, str]) -> None:
        atoms = self.template.copy()
        atoms.set_positions(frame.positions, apply_constraint=False)
        atoms.info.update(step=frame.step, fmax=frame.fmax, **info)
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
