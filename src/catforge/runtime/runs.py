"""Where a run writes: OCP's ``checkpoints/``, ``results/`` and ``logs/<logger>/`` folders.

A run's id is ``<time>[-<identifier>]`` (``%Y-%m-%d-%H-%M-%S``, the start time). A new run never
shares folders with another: :meth:`RunPaths.reserve` creates its folders with ``mkdir``, which
fails when another process made the same folder first, and then tries ``<id>-2``, ``<id>-3``,
... (two runs started in the same second get different ids). ``--timestamp-id`` names the id
instead: training refuses an id whose folders hold files unless it resumes (``--checkpoint``);
the other modes write their own files into a training run's folders on purpose (``make demo``).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from catforge.errors import CatforgeError, ConfigError, OutputError
from catforge.runtime.distributed import broadcast_object, is_main

if TYPE_CHECKING:
    from catforge.config import Config

Folder = Literal["checkpoint_dir", "results_dir", "logs_dir"]
FOLDERS: tuple[Folder, ...] = ("checkpoint_dir", "results_dir", "logs_dir")
MODE_FOLDERS: dict[str, tuple[Folder, ...]] = {
    "train": FOLDERS,
    "validate": ("results_dir",),
    "predict": ("results_dir",),
    "run-relaxations": ("results_dir", "logs_dir"),
}
"""The folders each ``--mode`` writes to."""


@dataclass(frozen=True)
class RunPaths:
    """The folders of one run, all named by its timestamp id (``<time>[-<identifier>]``).

    ``created`` lists the folders :meth:`reserve` made for this process (the only ones
    :meth:`remove_empty` may remove).
    """

    timestamp_id: str
    checkpoint_dir: Path
    results_dir: Path
    logs_dir: Path
    created: tuple[Path, ...] = ()

    @classmethod
    def create(
        cls,
        run_dir: Path,
        *,
        logger: str = "tensorboard",
        identifier: str = "",
        timestamp_id: str | None = None,
        now: datetime | None = None,
    ) -> RunPaths:
        """Paths of run ``timestamp_id`` (default: a new id from ``now``); nothing is created."""
        if timestamp_id is None:
            timestamp_id = (now or datetime.now()).strftime("%Y-%m-%d-%H-%M-%S")
            if identifier:
                timestamp_id = f"{timestamp_id}-{identifier}"
        return cls(
            timestamp_id=timestamp_id,
            checkpoint_dir=run_dir / "checkpoints" / timestamp_id,
            results_dir=run_dir / "results" / timestamp_id,
            logs_dir=run_dir / "logs" / logger / timestamp_id,
        )

    @classmethod
    def for_config(cls, config: Config, timestamp_id: str | None = None) -> RunPaths:
        """The folders of run ``timestamp_id`` (default ``--timestamp-id``) of ``config``; nothing
        is created. The modes reserve their run first (:meth:`reserve`, the one place the id is
        decided and shared between ranks) and store its id as ``config.options.timestamp_id``.
        """
        options = config.options
        run_id = timestamp_id or options.timestamp_id
        if run_id is None:
            raise ValueError("RunPaths.for_config needs a run id: reserve the run first")
        return cls.create(options.run_dir, logger=config.logger.name, timestamp_id=run_id)

    @classmethod
    def reserve(
        cls,
        config: Config,
        timestamp_id: str | None = None,
        *,
        fresh: bool = False,
        now: datetime | None = None,
    ) -> RunPaths:
        """The folders of ``config``'s run, created for its mode (not under ``--debug``).

        ``timestamp_id`` (or ``--timestamp-id``) names an existing or new run; with ``fresh``
        (a new training run) its folders must hold no files. Without an id, a new unique one
        is made from ``now``. Rank 0 decides; every rank gets the same paths (or error).
        """
        options = config.options
        run_id = timestamp_id or options.timestamp_id
        folders = () if options.debug else MODE_FOLDERS.get(options.mode, FOLDERS)
        outcome: tuple[RunPaths | None, CatforgeError | None] = (None, None)
        if is_main():
            try:
                if run_id is None:
                    made = cls.claim_new(
                        options.run_dir,
                        identifier=options.identifier,
                        folders=folders,
                        logger=config.logger.name,
                        now=now,
                    )
                else:
                    made = cls._reserve_named(config, run_id, folders, fresh)
                outcome = (made, None)
            except (ConfigError, OutputError) as error:
                outcome = (None, error)
        reserved, problem = broadcast_object(outcome)
        if problem is not None:
            raise problem
        assert reserved is not None
        return reserved if is_main() else dataclasses.replace(reserved, created=())

    @classmethod
    def _reserve_named(
        cls, config: Config, run_id: str, folders: Sequence[Folder], fresh: bool
    ) -> RunPaths:
        paths = cls.for_config(config, run_id)
        busy = paths.files()
        if fresh and busy:
            shown = ", ".join(str(path) for path in busy[:3])
            more = f" and {len(busy) - 3} more" if len(busy) > 3 else ""
            checkpoint = paths.checkpoint_dir / "checkpoint.pt"
            way = (
                f"resume it with --checkpoint {checkpoint}"
                if checkpoint.is_file()
                else "it wrote no checkpoint to resume from: remove its folders"
            )
            raise ConfigError(
                f"--timestamp-id {run_id}: run {run_id} already has files ({shown}{more}); "
                f"{way}, or leave out --timestamp-id for a new run"
            )
        created = []
        for name in folders:
            folder: Path = getattr(paths, name)
            if not folder.is_dir():
                _make_folder(folder)
                created.append(folder)
        return dataclasses.replace(paths, created=tuple(created))

    @classmethod
    def claim_new(
        cls,
        run_dir: Path,
        *,
        identifier: str,
        folders: Sequence[Folder],
        logger: str = "tensorboard",
        now: datetime | None = None,
    ) -> RunPaths:
        """A new run's paths, its ``folders`` created: the id of ``now`` (and ``identifier``),
        with ``-2``, ``-3``, ... when another run has a folder of that id."""
        base = cls.create(run_dir, identifier=identifier, now=now or datetime.now()).timestamp_id
        for number in itertools.count(1):
            candidate = base if number == 1 else f"{base}-{number}"
            paths = cls.create(run_dir, logger=logger, timestamp_id=candidate)
            created = paths._claim(folders)
            if created is not None:
                return dataclasses.replace(paths, created=created)
        raise AssertionError("unreachable")

    def _claim(self, folders: Sequence[Folder]) -> tuple[Path, ...] | None:
        """Create ``folders`` if no folder of this id exists; None when another run has one.

        ``mkdir`` without ``exist_ok`` is atomic: of two processes, one gets FileExistsError.
        """
        if any(getattr(self, name).exists() for name in FOLDERS):
            return None
        made: list[Path] = []
        try:
            for name in folders:
                folder: Path = getattr(self, name)
                _make_folder(folder.parent, exist_ok=True)
                _make_folder(folder)
                made.append(folder)
        except FileExistsError:
            for folder in made:
                folder.rmdir()
            return None
        return tuple(made)

    def files(self) -> list[Path]:
        """Every file under this run's folders."""
        found: list[Path] = []
        for name in FOLDERS:
            folder: Path = getattr(self, name)
            if folder.is_dir():
                found += sorted(path for path in folder.rglob("*") if not path.is_dir())
        return found

    def remove_empty(self, run_dir: Path) -> None:
        """Remove the folders :meth:`reserve` created that still hold no file (after a run
        failed before writing), and the parents up to ``run_dir`` left empty by that."""
        for folder in self.created:
            if not folder.is_dir() or any(not path.is_dir() for path in folder.rglob("*")):
                continue
            for child in sorted(folder.rglob("*"), reverse=True):  # deepest first
                child.rmdir()
            folder.rmdir()
            for parent in folder.parents:
                if parent == run_dir or not parent.is_dir() or any(parent.iterdir()):
                    break
                parent.rmdir()


def _make_folder(folder: Path, exist_ok: bool = False) -> None:
    """``mkdir`` (parents included); errors other than an existing folder are OutputErrors."""
    try:
        folder.mkdir(parents=True, exist_ok=exist_ok)
    except FileExistsError:
        raise
    except OSError as error:
        raise OutputError(
            f"{folder}: cannot create the run folder: {error.strerror or error}; check --run-dir"
        ) from None
