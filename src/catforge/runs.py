"""Where a run writes: OCP's ``checkpoints/``, ``results/`` and ``logs/<logger>/`` folders."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from catforge.distributed import broadcast_object

if TYPE_CHECKING:
    from catforge.config import Config


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
        """Paths for a new run (or for ``timestamp_id``, to continue one); nothing is created."""
        if timestamp_id is None:
            timestamp_id = (now or datetime.now()).strftime("%Y-%m-%d-%H-%M-%S")
            if identifier:
                timestamp_id = f"{timestamp_id}-{identifier}"
            timestamp_id = broadcast_object(timestamp_id)  # every rank uses rank 0's folders
        return cls(
            timestamp_id=timestamp_id,
            checkpoint_dir=run_dir / "checkpoints" / timestamp_id,
            results_dir=run_dir / "results" / timestamp_id,
            logs_dir=run_dir / "logs" / logger / timestamp_id,
        )

    @classmethod
    def for_config(cls, config: Config, timestamp_id: str | None = None) -> RunPaths:
        """The folders of ``config``'s run: ``timestamp_id``, else ``--timestamp-id``, else new."""
        options = config.options
        return cls.create(
            options.run_dir,
            logger=config.logger.name,
            identifier=options.identifier,
            timestamp_id=timestamp_id or options.timestamp_id,
        )

    def make(self) -> RunPaths:
        """Create the folders (main process only)."""
        for folder in (self.checkpoint_dir, self.results_dir, self.logs_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return self
