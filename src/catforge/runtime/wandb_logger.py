"""W&B scalars for ``logger: wandb`` (``pip install 'catforge[wandb]'``).

The W&B run is the catforge run: its id and name are the run id (characters W&B refuses become
``-``), its files go to the run's ``logs/wandb/<run id>/`` folder and ``logger.project``
(OCP's ``logger_project``, default ``catforge``) names the project. The scalars are those of
TensorBoard, with the same tags (``train/loss``) and steps. A resumed run continues the same W&B
run (``resume="allow"``) from the step after its checkpoint; steps that W&B already holds (logged
by the interrupted run after its last checkpoint) are not sent again, since W&B keeps a run's
steps increasing. ``WANDB_MODE=offline`` logs locally, for ``wandb sync`` later.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from catforge.errors import ConfigError

if TYPE_CHECKING:
    from wandb import Run

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "catforge"
ID_LENGTH = 64
"""The longest run id sent to W&B."""


def wandb_run_id(run_id: str) -> str:
    """``run_id`` as a W&B run id: characters other than ``A-Za-z0-9._-`` become ``-``."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", run_id.strip())[:ID_LENGTH]
    if not cleaned:
        raise ConfigError(f"logger: wandb needs a run id; got {run_id!r}")
    return cleaned


class WandbBackend:
    """Scalars of one catforge run as one W&B run, started by the first record.

    ``logs_dir``: the run's ``logs/wandb/<run id>`` folder; ``resume_step``: the checkpoint step
    a resumed run continues from (records at or before it are not sent again).
    """

    def __init__(
        self,
        logs_dir: Path,
        *,
        run_id: str,
        project: str | None = None,
        resume_step: int | None = None,
    ) -> None:
        self._logs_dir = logs_dir
        self._id = wandb_run_id(run_id)
        self._project = project or DEFAULT_PROJECT
        self._first_step = 0 if resume_step is None else resume_step + 1
        self._run: Run | None = None
        self._skipped = 0

    def add_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        run = self._start()
        if step < self._first_step:
            self._skipped += 1
            return
        run.log({tag: float(value) for tag, value in scalars.items()}, step=step)

    def _start(self) -> Run:
        if self._run is not None:
            return self._run
        import wandb

        self._logs_dir.mkdir(parents=True, exist_ok=True)
        try:
            run = wandb.init(
                project=self._project,
                id=self._id,
                name=self._id,
                dir=str(self._logs_dir),
                resume="allow",
                reinit="create_new",
            )
        except wandb.errors.Error as error:
            reason = " ".join(str(error).split())  # one line
            raise ConfigError(
                f"logger: wandb could not start run {self._id} in project {self._project}: "
                f"{reason} (WANDB_MODE=offline logs without an account)"
            ) from error
        self._first_step = max(self._first_step, run.step)
        self._run = run
        return run

    def close(self, *, failed: bool = False) -> None:
        """Finish the W&B run (marked failed when the run ended by an exception)."""
        if self._run is None:
            return
        if self._skipped:
            skipped, first = self._skipped, self._first_step
            log.info("W&B run %s: %d records before step %d not sent", self._id, skipped, first)
        self._run.finish(exit_code=1 if failed else 0)
        self._run = None
