"""``--mode run-relaxations``: the relaxation job, its force field and its structures."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from catforge.assemble.data import open_dataset
from catforge.assemble.models import load_potential
from catforge.config import Config
from catforge.data.graph import AtomicGraph
from catforge.errors import ConfigError
from catforge.potential.trained import Potential
from catforge.relax.driver import RelaxSettings
from catforge.relax.lbfgs import LBFGSSettings
from catforge.relax.run import RelaxJob
from catforge.runtime.runs import RunPaths


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


def relax_job(config: Config, paths: RunPaths) -> RelaxJob:
    """The job of ``task`` and ``--checkpoint``; results in the run's folders (not ``--debug``)."""
    task, options = config.task, config.options
    if options.checkpoint is None:
        raise ConfigError("--mode run-relaxations needs --checkpoint CKPT (a forces model)")
    if task.relax_dataset is None:
        raise ConfigError("run-relaxations needs task.relax_dataset: {src: ...}")
    writes = not options.debug
    return RelaxJob(
        checkpoint=Path(options.checkpoint),
        settings=relax_settings(config),
        traj_dir=task.relax_opt.traj_dir if writes else None,
        save_full_traj=task.save_full_traj,
        write_pos=task.write_pos,
        results_dir=paths.results_dir if writes else None,
        logs_dir=paths.logs_dir if writes else None,
    )


def relax_potential(config: Config, checkpoint: Path, device: torch.device) -> Potential:
    """The forces model of ``checkpoint`` (the file is read once); refuses energy-only models."""
    potential = load_potential(checkpoint, config=config, device=device, purpose="relaxations")
    if not potential.regress_forces:
        raise ConfigError(f"{checkpoint}: its model predicts no forces; relaxations need them")
    return potential


def relax_structures(config: Config) -> tuple[Dataset[AtomicGraph], int]:
    """``task.relax_dataset`` and how many of its structures to relax; errors name the key."""
    task = config.task
    if task.relax_dataset is None:
        raise ConfigError("run-relaxations needs task.relax_dataset: {src: ...}")
    dataset = open_dataset(task.dataset, task.relax_dataset, "task.relax_dataset.src")
    count = len(dataset)  # type: ignore[arg-type]
    batches = task.num_relaxation_batches
    if batches is not None:
        if batches < 1:
            raise ConfigError(f"task.num_relaxation_batches must be >= 1, got {batches}")
        count = min(count, batches * config.optim.eval_batch_size)
    return dataset, count
