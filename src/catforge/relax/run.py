"""``--mode run-relaxations``: relax ``task.relax_dataset`` with a checkpoint's model.

Structures whose trajectory in ``task.relax_opt.traj_dir`` is already complete (same checkpoint,
same settings) are not relaxed again: their results are read back, so an interrupted run resumes
where it stopped. A ``traj_dir`` holding trajectories of another model or other settings is
refused rather than overwritten (see :mod:`catforge.relax.trajectory`). Results go to
``results/<timestamp_id>/`` (see :mod:`catforge.relax.results`), metrics also to TensorBoard and
``metrics.jsonl``.

A stop signal (SIGTERM, SIGINT, SIGUSR1/2: :mod:`catforge.runtime.preemption`) ends the
relaxations after the current optimizer step: finished trajectories stay, unfinished ones are
deleted, no result files are written, and :class:`~catforge.runtime.preemption.Preempted` says
to rerun the same command. Off a terminal (no progress bar) a line of progress is logged at least
every :data:`~catforge.runtime.progress.HEARTBEAT_SECONDS` (by rank 0, for its share under DDP).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from catforge.data.graph import AtomicGraph
from catforge.data.samplers import shard_start
from catforge.errors import ConfigError, DataError
from catforge.models.forces import ModelOutput
from catforge.potential.metrics import format_metrics_table
from catforge.potential.trained import Potential
from catforge.relax.driver import RelaxResult, RelaxSettings, relax, without_edges
from catforge.relax.results import (
    convergence_summary,
    relaxation_metrics,
    system_id,
    write_relaxation_files,
)
from catforge.relax.trajectory import TrajectoryWriter
from catforge.runtime.atomic import write_json
from catforge.runtime.distributed import (
    all_reduce_sum,
    broadcast_object,
    gather_objects,
    get_rank,
    get_world_size,
)
from catforge.runtime.loggers import RunLogger
from catforge.runtime.preemption import Preempted, StopRequest, signal_name, stop_requests
from catforge.runtime.progress import Heartbeat, progress, progress_enabled

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RelaxJob:
    """One ``run-relaxations`` run: the ``checkpoint`` file (its bytes tag the trajectories),
    the driver ``settings``, where trajectories go (``traj_dir``: None for none; all frames with
    ``save_full_traj``, else the last), and where results go (``results_dir``/``logs_dir``: None
    under ``--debug``, which writes nothing); ``write_pos`` adds ``relaxed_pos_<rank>.json``."""

    checkpoint: Path
    settings: RelaxSettings
    traj_dir: Path | None = None
    save_full_traj: bool = True
    write_pos: bool = False
    results_dir: Path | None = None
    logs_dir: Path | None = None


def run_relaxations(
    job: RelaxJob, potential: Potential, dataset: Dataset[AtomicGraph], count: int
) -> dict[str, float]:
    """Relax the first ``count`` structures of ``dataset``, write the results and, when the set
    has labels, the metrics; return them."""
    settings = job.settings
    # Under DDP each rank relaxes a contiguous shard; rank 0 gathers and writes everything.
    rank, world_size = get_rank(), get_world_size()
    shard = range(shard_start(count, rank, world_size), shard_start(count, rank + 1, world_size))
    with stop_requests() as stop:  # a signal from here on stops at the first or next step
        writer = _trajectory_writer(job)
        try:
            results, stopped = _relax_all(potential, stop, dataset, shard, settings, writer)
        finally:
            if writer is not None:
                writer.close()
        totals = all_reduce_sum(torch.tensor([len(results), int(stopped)], dtype=torch.int64))
        finished, stops = totals.tolist()
        if stops:
            raise _preempted(stop.signal_number, finished, count, job.traj_dir)
    gathered = gather_objects(results)
    if gathered is None:
        return {}
    return _report(job, [result for part in gathered for result in part])


def _trajectory_writer(job: RelaxJob) -> TrajectoryWriter | None:
    """The writer of ``job.traj_dir`` with the folder checked and cleared of the unfinished
    files of a killed run; None without a ``traj_dir``."""
    if job.traj_dir is None:
        return None
    writer = TrajectoryWriter(
        job.traj_dir,
        full=job.save_full_traj,
        relax_tag=relax_tag(job.checkpoint, job.settings),
        checkpoint=str(job.checkpoint),
    )
    writer.scan()
    problem: ConfigError | None = None
    if get_rank() == 0:
        try:
            writer.lock()
            writer.remove_partial()  # safe: no other run writes here while the lock is held
        except ConfigError as error:
            problem = error
    # No rank starts a trajectory before rank 0 holds the folder and cleared the old files.
    problem = broadcast_object(problem)
    if problem is not None:
        raise problem
    return writer


def relax_tag(checkpoint: Path, settings: RelaxSettings) -> str:
    """A short hash of the checkpoint's bytes and the relaxation settings."""
    digest = hashlib.sha256()
    with checkpoint.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    # Results do not depend on how many structures are in flight: resume after an OOM works.
    digest.update(repr(dataclasses.replace(settings, batch_size=1)).encode())
    return digest.hexdigest()[:16]


class _Stopped(Exception):
    """Raised by :class:`_Watched` to end the relaxations after the current step."""


class _Watched:
    """The potential as the driver's force field, called once per optimizer step: it ends the
    relaxations (:class:`_Stopped`) on a stop request and logs progress every
    :data:`~catforge.runtime.progress.HEARTBEAT_SECONDS` when no progress bar is shown."""

    def __init__(
        self, potential: Potential, stop: StopRequest, total: int, resumed: Sequence[RelaxResult]
    ) -> None:
        """``total`` structures to relax, of which ``resumed`` were found already relaxed."""
        self.potential = potential
        self.device = potential.device
        self.stop = stop
        self.total, self.resumed = total, len(resumed)
        self.done = len(resumed)
        self.converged = sum(result.converged for result in resumed)
        self._log = not progress_enabled()
        self._heartbeat = Heartbeat()

    @property
    def dtype(self) -> torch.dtype:
        return self.potential.dtype

    def finished(self, result: RelaxResult) -> None:
        self.done += 1
        self.converged += result.converged

    def __call__(self, graph: AtomicGraph) -> ModelOutput:
        if self.stop.requested:
            raise _Stopped
        if self._log and self._heartbeat.due():
            rate = self._heartbeat.rate(self.done - self.resumed)
            log.info(
                "relaxed %d of %d structures (%d converged), %.1f structures/s",
                self.done,
                self.total,
                self.converged,
                rate,
            )
        return self.potential(graph)


def _relax_all(
    potential: Potential,
    stop: StopRequest,
    dataset: Dataset[AtomicGraph],
    indices: range,
    settings: RelaxSettings,
    writer: TrajectoryWriter | None,
) -> tuple[list[RelaxResult], bool]:
    """Results of the structures at ``indices`` finished, in dataset order, and whether a stop
    request ended the relaxations early (then some are missing)."""
    results: dict[int, RelaxResult] = {}
    pending: list[int] = []
    names: set[str] = set()
    for index in indices:
        graph = without_edges(dataset[index])
        name = system_id(graph, index)
        if name in names:
            raise DataError(
                f"structure {index} repeats sid {name}: relaxations need one sid per structure "
                "(an S2EF LMDB repeats sids across frames; relax IS2RE initial structures)"
            )
        names.add(name)
        frame = None if writer is None else writer.completed(name, graph)
        if frame is None:
            pending.append(index)
        else:
            frame = dataclasses.replace(frame, index=index)
            results[index] = RelaxResult(index, graph, frame, frame.fmax < settings.fmax)
    if results:
        log.info(
            "%d of %d structures already relaxed (trajectories found)", len(results), len(indices)
        )
    force_field = _Watched(potential, stop, len(indices), list(results.values()))

    def structures() -> Iterator[AtomicGraph]:
        for position, index in enumerate(pending):
            graph = dataset[index]
            if writer is not None:
                writer.register(position, system_id(graph, index), graph)
            yield graph

    relaxations = relax(force_field, structures(), settings, observer=writer)
    stopped = False
    try:
        # The bar on a terminal; elsewhere the force field logs progress (also between results).
        bar = progress(relaxations, total=len(pending), desc="relaxing", enabled=progress_enabled())
        for result in bar:
            if writer is not None:
                writer.finish(result)
            index = pending[result.index]
            results[index] = dataclasses.replace(
                result, index=index, final=dataclasses.replace(result.final, index=index)
            )
            force_field.finished(result)
    except _Stopped:
        stopped = True
    return [results[index] for index in indices if index in results], stopped


def _preempted(
    signal_number: int | None, finished: int, total: int, traj_dir: Path | None
) -> Preempted:
    """The stop after ``finished`` of ``total`` structures, with how to continue."""
    stopped = f"relaxations stopped by {signal_name(signal_number)} after {finished} of {total}"
    if traj_dir is None:
        return Preempted(
            f"{stopped} structures; without task.relax_opt.traj_dir none of them was kept",
            "rerun the same command to start over (set task.relax_opt.traj_dir to resume instead)",
            signal_number,
        )
    return Preempted(
        f"{stopped} structures; finished trajectories are in {traj_dir}",
        "rerun the same command to continue (finished structures are skipped)",
        signal_number,
    )


def _report(job: RelaxJob, results: Sequence[RelaxResult]) -> dict[str, float]:
    totals = relaxation_metrics(results)
    metrics = {} if totals is None else totals.compute()
    metrics |= convergence_summary(results)
    print(f"relaxed {len(results)} systems")
    print(format_metrics_table(metrics))
    if job.results_dir is None:  # --debug: nothing is written
        return metrics
    files = write_relaxation_files(results, job.results_dir, write_pos=job.write_pos)
    if totals is not None:
        files.append(write_json(job.results_dir / "metrics_relax.json", metrics, indent=2))
    if job.logs_dir is not None:
        with RunLogger(job.logs_dir, job.results_dir / "metrics.jsonl") as logger:
            logger.log(metrics, step=0, split="relax", epoch=0.0)
    for path in files:
        print(f"  {path}")
    return metrics
