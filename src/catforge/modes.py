"""The run modes of ``main.py --mode``: short functions over objects built from the config.

Every mode first reserves its run folders (:meth:`catforge.runs.RunPaths.reserve`: a unique id
taken at the start) and stores the id in ``config.options.timestamp_id``; a mode that fails
before writing anything removes the folders it created.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from catforge.atomic import write_json
from catforge.checkpoint import load_checkpoint, load_weights
from catforge.config import Config
from catforge.distributed import is_main
from catforge.errors import CheckpointError, ConfigError
from catforge.evaluate import evaluate
from catforge.loggers import RunLogger
from catforge.metrics import format_metrics_table
from catforge.potential import (
    Potential,
    build_model,
    check_checkpoint_task,
    pick_device,
    with_forces,
)
from catforge.predict import run_predict
from catforge.preemption import stop_requests
from catforge.relax.run import run_relaxations
from catforge.runs import RunPaths
from catforge.training.build import build_dataset, build_eval_loader, check_labels
from catforge.training.resume import report_config_diff
from catforge.training.trainer import Trainer

log = logging.getLogger(__name__)

MODES = ("train", "validate", "predict", "run-relaxations")


def run(config: Config) -> dict[str, float]:
    """Dispatch on ``config.options.mode``; returns the metrics the mode produced."""
    mode = config.options.mode
    if mode not in MODES:
        raise ConfigError(f"unknown --mode {mode}; use {', '.join(MODES)}")
    torch.manual_seed(config.options.seed)
    resume = _resume_state(config) if mode == "train" else None
    paths = _reserve(config, resume)
    config = dataclasses.replace(
        config, options=dataclasses.replace(config.options, timestamp_id=paths.timestamp_id)
    )
    try:
        if mode == "train":
            return train(config, paths, resume)
        if mode == "validate":
            return validate(config)
        if mode == "predict":
            run_predict(config)
            return {}
        return run_relaxations(config)
    except BaseException:
        paths.remove_empty(config.options.run_dir)
        raise


def train(
    config: Config, paths: RunPaths, resume: dict[str, Any] | None = None
) -> dict[str, float]:
    """``--mode train``: fit the model, evaluate on val, write checkpoints, logs and metrics.

    With ``--checkpoint CKPT`` (``resume``, its state) the run continues exactly where CKPT
    stopped, in the same run folders; ``optim.init_from`` starts a new run from a checkpoint's
    weights only. Ctrl-C or a cluster's stop signal ends training after the current step with a
    checkpoint (:mod:`catforge.preemption`).
    """
    writes = not config.options.debug and is_main()
    train_set = build_dataset(config, config.dataset.split("train"), "train")
    val_entry = config.dataset.val
    val_set = None if val_entry is None else build_dataset(config, val_entry, "val")
    check_labels(config, train_set, "train")
    if val_set is not None:
        check_labels(config, val_set, "val")
    model = build_model(config)
    if resume is not None:
        load_weights(model, resume["state_dict"], str(config.options.checkpoint))
    elif config.optim.init_from is not None:
        init = load_checkpoint(config.optim.init_from)
        load_weights(
            model, init["state_dict"], str(config.optim.init_from), strict=config.task.strict_load
        )
        log.info("fine-tuning from the weights of %s", config.optim.init_from)
    resume_step = None if resume is None else int(resume.get("step", 0))
    logger = (
        RunLogger(paths.logs_dir, paths.results_dir / "metrics.jsonl", resume_step=resume_step)
        if writes
        else RunLogger.disabled()
    )
    device = pick_device(config.options.cpu)
    with logger:
        trainer = Trainer(config, model, train_set, val_set, paths, device, logger, resume)
        with stop_requests() as trainer.stop:
            metrics = trainer.train()
    if writes:
        best = paths.checkpoint_dir / "best_checkpoint.pt"
        print(f"checkpoint: {paths.checkpoint_dir / 'checkpoint.pt'}")
        if best.is_file():
            print(f"best checkpoint ({trainer.primary}): {best}")
        print(f"tensorboard logs: {paths.logs_dir}")
        print(f"metrics log: {paths.results_dir / 'metrics.jsonl'}")
    return metrics


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


def validate(config: Config) -> dict[str, float]:
    """``--mode validate --checkpoint CKPT``: metrics of the val set, printed and saved as JSON."""
    if config.options.checkpoint is None:
        raise ConfigError("--mode validate needs --checkpoint CKPT")
    device = pick_device(config.options.cpu)
    purpose = f"{config.task_name.upper()} metrics"
    potential = Potential.from_checkpoint(
        config.options.checkpoint, config=config, device=device, purpose=purpose
    )
    val_set = build_dataset(config, config.dataset.split("val"), "val")
    check_labels(config, val_set, "val")
    loader = build_eval_loader(config, val_set)
    totals = evaluate(
        potential.model, loader, potential.transform, device, with_forces=with_forces(config),
        eval_on_free_atoms=config.task.eval_on_free_atoms,
    )  # fmt: skip
    metrics = totals.compute()
    results = RunPaths.for_config(config).results_dir
    if not is_main():
        return metrics
    print(format_metrics_table(metrics))
    if not config.options.debug:
        path = write_json(results / "metrics_val.json", metrics, indent=2)
        print(f"metrics: {path}")
    return metrics
