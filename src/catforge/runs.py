"""Where a run writes: OCP's ``checkpoints/``, ``results/`` and ``logs/<logger>/`` folders.

A run's id is ``<time>[-<identifier>]`` (``%Y-%m-%d-%H-%M-%S``, the start time). A new run never
shares folders with another: :meth:`RunPaths.reserve` creates its folders with ``mkdir``, which
fails when another process made the same folder first, and then tries ``<id>-2``, ``<id>-3``,
... (two runs started in the same second get different ids). ``--timestamp-id`` names the id
instead: training refuses an id whose folders hold files unless it resumes (``--checkpoint``);
the other modes write their own files into a training run's folders on purpose (``make demo``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from catforge.distributed import broadcast_object, is_main
from catforge.errors import ConfigError

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
    """The folders of one run, all named by its timestamp id (``<time>[-<identifier>]``)."""

    timestamp_id: str
    checkpoint_dir: Path
    results_dir: Path
    logs_dir: Path

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
        """The folders of run ``timestamp_id`` (default ``--timestamp-id``) of ``config``.

        The modes reserve their run first (:meth:`reserve`) and store its id as
        ``config.options.timestamp_id``, so every later call names the same folders; without
        any id, a new run is reserved now.
        """
        options = config.options
        run_id = timestamp_id or options.timestamp_id
        if run_id is None:
            return cls.reserve(config)
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
        outcome: tuple[str | None, str | None] = (None, None)
        if is_main():
            try:
                made = (
                    cls._reserve_new(config, folders, now or datetime.now())
                    if run_id is None
                    else cls._reserve_named(config, run_id, folders, fresh)
                )
                outcome = (made, None)
            except ConfigError as error:
                outcome = (None, str(error))
        chosen, problem = broadcast_object(outcome)
        if problem is not None or chosen is None:
            raise ConfigError(problem or "no run id was chosen")
        return cls.for_config(config, chosen)

    @classmethod
    def _reserve_named(
        cls, config: Config, run_id: str, folders: Sequence[Folder], fresh: bool
    ) -> str:
        paths = cls.for_config(config, run_id)
        busy = paths.files()
        if fresh and busy:
            shown = ", ".join(str(path) for path in busy[:3])
            more = f" and {len(busy) - 3} more" if len(busy) > 3 else ""
            raise ConfigError(
                f"--timestamp-id {run_id}: run {run_id} already has files ({shown}{more}); "
                f"resume it with --checkpoint {paths.checkpoint_dir / 'checkpoint.pt'}, or "
                "leave out --timestamp-id for a new run"
            )
        for name in folders:
            getattr(paths, name).mkdir(parents=True, exist_ok=True)
        return run_id

    @classmethod
    def _reserve_new(cls, config: Config, folders: Sequence[Folder], now: datetime) -> str:
        options = config.options
        base = cls.create(options.run_dir, identifier=options.identifier, now=now).timestamp_id
        for number in itertools.count(1):
            candidate = base if number == 1 else f"{base}-{number}"
            paths = cls.for_config(config, candidate)
            if not folders or paths._claim(folders):
                return candidate
        raise AssertionError("unreachable")

    def _claim(self, folders: Sequence[Folder]) -> bool:
        """Create ``folders`` if no folder of this id exists; False when another run has one.

        ``mkdir`` without ``exist_ok`` is atomic: of two processes, one gets FileExistsError.
        """
        if any(getattr(self, name).exists() for name in FOLDERS):
            return False
        made: list[Path] = []
        try:
            for name in folders:
                folder: Path = getattr(self, name)
                folder.parent.mkdir(parents=True, exist_ok=True)
                folder.mkdir()
                made.append(folder)
        except FileExistsError:
            for folder in made:
                folder.rmdir()
            return False
        return True

    def files(self) -> list[Path]:
        """Every file under this run's folders."""
        found: list[Path] = []
        for name in FOLDERS:
            folder: Path = getattr(self, name)
            if folder.is_dir():
                found += sorted(path for path in folder.rglob("*") if not path.is_dir())
        return found

    def remove_empty(self, run_dir: Path) -> None:
        """Remove this run's folders that hold no file (after a run failed before writing),
        and the parents up to ``run_dir`` (``checkpoints/``, ...) that are left empty."""
        if not is_main():
            return
        for name in FOLDERS:
            folder: Path = getattr(self, name)
            if not folder.is_dir() or any(not path.is_dir() for path in folder.rglob("*")):
                continue
            for child in sorted(folder.rglob("*"), reverse=True):  # deepest first
                child.rmdir()
            folder.rmdir()
            for parent in folder.parents:
                if parent == run_dir or not parent.is_dir() or any(parent.iterdir()):
                    break
                parent.rmdir()
