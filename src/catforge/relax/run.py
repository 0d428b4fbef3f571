"""``--mode run-relaxations``: relax ``task.relax_dataset`` with a checkpoint's model.

Structures whose trajectory in ``task.relax_opt.traj_dir`` is already complete (same checkpoint,
same settings) are not relaxed again: their results are read back, so an interrupted run resumes
where it stopped. Results go to ``results/<timestamp_id>/`` (see :mod:`catforge.relax.results`),
metrics also to TensorBoard and ``metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

from torch.utils.data import Dataset

from catforge.atomic import write_json
from catforge.config import Config
from catforge.data.graph import AtomicGraph
from catforge.data.samplers import shard_start
from catforge.distributed import gather_objects, get_rank, get_world_size
from catforge.errors import ConfigError, DataError
from catforge.loggers import RunLogger
from catforge.metrics import format_metrics_table
from catforge.potential import Potential, pick_device
from catforge.progress import progress
from catforge.registry import dataset_factories, lookup
from catforge.relax.driver import RelaxResult, RelaxSettings, relax, without_edges
from catforge.relax.lbfgs import LBFGSSettings
from catforge.relax.results import (
    convergence_summary,
    relaxation_metrics,
    system_id,
    write_relaxation_files,
)
from catforge.relax.trajectory import TrajectoryWriter
from catforge.runs import RunPaths

log = logging.getLogger(__name__)


def relax_settings(config: Config) -> RelaxSettings:
    """The driver settings of ``task`` (steps, fmax, relax_opt) and ``optim.eval_batch_size``."""
    task, opt = config.task, config.task.relax_opt
    try:
        return RelaxSettings(
            steps=task.relaxation_steps,
            fmax=task.relaxation_fmax,
            batch_size=config.optim.eval_batch_size,
            lbfgs=LBFGSSettings(opt.maxstep, opt.memory, opt.damping, opt.alpha),
        )
    except ValueError as error:
        raise ConfigError(f"task.relax_opt / task.relaxation_*: {error}") from error


def run_relaxations(config: Config) -> dict[str, float]:
    """Relax, write the results and, when the set has labels, the metrics; return them."""
    options, task = config.options, config.task
    if options.checkpoint is None:
        raise ConfigError("--mode run-relaxations needs --checkpoint CKPT (a forces model)")
    if task.relax_dataset is None:
        raise ConfigError("run-relaxations needs task.relax_dataset: {src: ...}")
    settings = relax_settings(config)
    potential = Potential.from_checkpoint(
        options.checkpoint, config=config, device=pick_device(options.cpu)
    )
    if not potential.regress_forces:
        raise ConfigError(
            f"{options.checkpoint}: its model predicts no forces; relaxations need them"
        )
    factory = lookup(dataset_factories(), task.dataset, "dataset (task.dataset)")
    dataset: Dataset[AtomicGraph] = factory(task.relax_dataset.src)  # type: ignore[assignment]
    count = len(dataset)  # type: ignore[arg-type]
    if task.num_relaxation_batches is not None:
        count = min(count, task.num_relaxation_batches * settings.batch_size)
    writer = None
    if task.relax_opt.traj_dir is not None:
        tag = relax_tag(Path(options.checkpoint), settings)
        writer = TrajectoryWriter(task.relax_opt.traj_dir, full=task.save_full_traj, relax_tag=tag)
    # Under DDP each rank relaxes a contiguous shard; rank 0 gathers and writes everything.
    rank, world_size = get_rank(), get_world_size()
    shard = range(shard_start(count, rank, world_size), shard_start(count, rank + 1, world_size))
    gathered = gather_objects(_relax_all(potential, dataset, shard, settings, writer))
    paths = RunPaths.for_config(config)  # on every rank: they agree on the run id
    if gathered is None:
        return {}
    return _report(config, paths, [result for part in gathered for result in part])


def relax_tag(checkpoint: Path, settings: RelaxSettings) -> str:
    """A short hash of the checkpoint's bytes and the relaxation settings."""
    digest = hashlib.sha256()
    with checkpoint.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    # Results do not depend on how many structures are in flight: resume after an OOM works.
    digest.update(repr(dataclasses.replace(settings, batch_size=1)).encode())
    return digest.hexdigest()[:16]


def _relax_all(
    potential: Potential,
    dataset: Dataset[AtomicGraph],
    indices: range,
    settings: RelaxSettings,
    writer: TrajectoryWriter | None,
) -> list[RelaxResult]:
    """Results of the structures at ``indices``, in dataset order."""
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

    def structures() -> Iterator[AtomicGraph]:
        for position, index in enumerate(pending):
            graph = dataset[index]
            if writer is not None:
                writer.register(position, system_id(graph, index), graph)
            yield graph

    relaxations = relax(potential, structures(), settings, observer=writer)
    try:
        for result in progress(relaxations, total=len(pending), desc="relaxing"):
            if writer is not None:
                writer.finish(result)
            index = pending[result.index]
            results[index] = dataclasses.replace(
                result, index=index, final=dataclasses.replace(result.final, index=index)
            )
    finally:
        if writer is not None:
            writer.close()
    return [results[index] for index in indices]


def _report(config: Config, paths: RunPaths, results: Sequence[RelaxResult]) -> dict[str, float]:
    files = write_relaxation_files(results, paths.results_dir, write_pos=config.task.write_pos)
    totals = relaxation_metrics(results)
    metrics = {} if totals is None else totals.compute()
    metrics |= convergence_summary(results)
    print(f"relaxed {len(results)} systems")
    print(format_metrics_table(metrics))
    if totals is not None:
        files.append(write_json(paths.results_dir / "metrics_relax.json", metrics, indent=2))
    if not config.options.debug:
        with RunLogger(paths.logs_dir, paths.results_dir / "metrics.jsonl") as logger:
            logger.log(metrics, step=0, split="relax", epoch=0.0)
    for path in files:
        print(f"  {path}")
    return metrics
