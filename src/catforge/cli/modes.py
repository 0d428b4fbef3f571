"""The run modes of ``main.py --mode``: short functions over objects the assembly builds.

:func:`run` reserves the run folders first (:meth:`catforge.runtime.runs.RunPaths.reserve`: a unique
id taken at the start), stores the id in ``config.options.timestamp_id``, decides the device once,
and calls the mode named in :data:`catforge.registry.MODES`; a mode that fails before writing
anything removes the folders it created.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from catforge.assemble.data import evaluation_loader, open_split
from catforge.assemble.models import choose_device, load_potential, with_forces
from catforge.assemble.relax import relax_job, relax_potential, relax_structures
from catforge.assemble.training import training_run
from catforge.config import Config
from catforge.errors import CheckpointError, ConfigError
from catforge.potential.checkpoint import load_checkpoint
from catforge.potential.evaluate import evaluate
from catforge.potential.metrics import format_metrics_table
from catforge.potential.trained import check_checkpoint_task
from catforge.prediction.predict import predict_to_files
from catforge.registry import MODES
from catforge.relax.run import run_relaxations
from catforge.runtime.atomic import write_json
from catforge.runtime.distributed import is_main
from catforge.runtime.preemption import stop_requests
from catforge.runtime.runs import RunPaths
from catforge.training.resume import report_config_diff

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunContext:
    """What every mode gets besides the config: its folders, its device and, when training
    resumes, the ``checkpoint.pt`` dict."""

    paths: RunPaths
    device: torch.device
    resume: dict[str, Any] | None = None


def run(config: Config) -> dict[str, float]:
    """Run ``config.options.mode``; returns the metrics the mode produced."""
    mode: Callable[[Config, RunContext], dict[str, float]] = MODES.load(config.options.mode)
    torch.manual_seed(config.options.seed)
    resume = _resume_state(config) if config.options.mode == "train" else None
    paths = _reserve(config, resume)
    config = dataclasses.replace(
        config, options=dataclasses.replace(config.options, timestamp_id=paths.timestamp_id)
    )
    try:
        return mode(config, RunContext(paths, choose_device(config.options.cpu), resume))
    except BaseException:
        paths.remove_empty(config.options.run_dir)
        raise


def train(config: Config, context: RunContext) -> dict[str, float]:
    """``--mode train``: fit the model, evaluate on val, write checkpoints, logs and metrics.

    With ``--checkpoint CKPT`` (``context.resume``) the run continues exactly where CKPT
    stopped, in the same run folders; ``optim.init_from`` starts a new run from a checkpoint's
    weights only. Ctrl-C or a cluster's stop signal ends training after the current step with a
    checkpoint (:mod:`catforge.runtime.preemption`).
    """
    paths = context.paths
    run = training_run(config, paths, context.device, context.resume)
    with run.logger, stop_requests() as stop:
        metrics = run.trainer.train(stop)
    if not config.options.debug and is_main():
        best = paths.checkpoint_dir / "best_checkpoint.pt"
        print(f"checkpoint: {paths.checkpoint_dir / 'checkpoint.pt'}")
        if best.is_file():
            print(f"best checkpoint ({run.trainer.primary}): {best}")
        print(f"{config.logger.name} logs: {paths.logs_dir}")
        print(f"metrics log: {paths.results_dir / 'metrics.jsonl'}")
    return metrics


def validate(config: Config, context: RunContext) -> dict[str, float]:
    """``--mode validate --checkpoint CKPT``: metrics of the val set, printed and saved as JSON."""
    checkpoint = _needs_checkpoint(config, "validate")
    purpose = f"{config.task_name.upper()} metrics"
    potential = load_potential(checkpoint, config=config, device=context.device, purpose=purpose)
    loader = evaluation_loader(config, open_split(config, "val", labelled=True))
    totals = evaluate(
        potential.model,
        loader,
        potential.transform,
        context.device,
        with_forces=with_forces(config),
        eval_on_free_atoms=config.task.eval_on_free_atoms,
    )
    metrics = totals.compute()
    if not is_main():
        return metrics
    print(format_metrics_table(metrics))
    if not config.options.debug:
        path = write_json(context.paths.results_dir / "metrics_val.json", metrics, indent=2)
        print(f"metrics: {path}")
    return metrics


def predict(config: Config, context: RunContext) -> dict[str, float]:
    """``--mode predict --checkpoint CKPT``: predictions of the test set, written as files."""
    checkpoint = _needs_checkpoint(config, "predict")
    task = config.task_name
    purpose = f"{task.upper()} predictions"
    potential = load_potential(checkpoint, config=config, device=context.device, purpose=purpose)
    test_set = open_split(config, "test")
    predict_to_files(
        potential,
        evaluation_loader(config, test_set),
        size=len(test_set),  # type: ignore[arg-type]
        task=task,
        results_dir=None if config.options.debug else context.paths.results_dir,
        dtype=config.task.prediction_dtype,
    )
    return {}


def relax(config: Config, context: RunContext) -> dict[str, float]:
    """``--mode run-relaxations --checkpoint CKPT``: batched LBFGS over ``task.relax_dataset``."""
    job = relax_job(config, context.paths)
    potential = relax_potential(config, job.checkpoint, context.device)
    dataset, count = relax_structures(config)
    return run_relaxations(job, potential, dataset, count)


def _needs_checkpoint(config: Config, mode: str) -> Path:
    if config.options.checkpoint is None:
        raise ConfigError(f"--mode {mode} needs --checkpoint CKPT")
    return config.options.checkpoint


def _resume_state(config: Config) -> dict[str, Any] | None:
    """The checkpoint to resume from (``--checkpoint``), its config differences reported."""
    if config.options.checkpoint is None:
        return None
    state = load_checkpoint(config.options.checkpoint)
    if "optimizer" not in state:
        raise CheckpointError(
            f"{config.options.checkpoint}: holds weights only (no optimizer state), so training "
            "cannot resume from it; use optim.init_from to fine-tune from these weights"
        )
    check_checkpoint_task(
        state, config.options.checkpoint, config.trainer, "resuming this training"
    )
    report_config_diff(state.get("config"), config.to_dict())
    return state


def _reserve(config: Config, resume: dict[str, Any] | None) -> RunPaths:
    """The run folders: a resumed run's own id (or ``--timestamp-id``), else a new run's."""
    options = config.options
    if resume is None:
        return RunPaths.reserve(config, fresh=options.mode == "train")
    run_id = options.timestamp_id
    if run_id is None:
        run_id = resume.get("run_id") or Path(str(options.checkpoint)).resolve().parent.name
    return RunPaths.reserve(config, run_id)
