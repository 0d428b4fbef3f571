"""The run modes of ``main.py --mode``: short functions over objects built from the config."""

from __future__ import annotations

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
from catforge.potential import build_model, load_model, load_transform, pick_device, with_forces
from catforge.predict import run_predict
from catforge.preemption import stop_requests
from catforge.relax.run import run_relaxations
from catforge.runs import RunPaths
from catforge.training.build import build_dataset, build_eval_loader
from catforge.training.resume import report_config_diff
from catforge.training.trainer import Trainer

log = logging.getLogger(__name__)


def run(config: Config) -> dict[str, float]:
    """Dispatch on ``config.options.mode``; returns the metrics the mode produced."""
    mode = config.options.mode
    torch.manual_seed(config.options.seed)
    if mode == "train":
        return train(config)
    if mode == "validate":
        return validate(config)
    if mode == "predict":
        run_predict(config)
        return {}
    if mode == "run-relaxations":
        return run_relaxations(config)
    raise ConfigError(f"unknown --mode {mode}; use train, validate, predict or run-relaxations")


def train(config: Config) -> dict[str, float]:
    """``--mode train``: fit the model, evaluate on val, write checkpoints, logs and metrics.

    With ``--checkpoint CKPT`` the run continues exactly where CKPT stopped, in the same run
    folders; ``optim.init_from`` starts a new run from a checkpoint's weights only.
    """
    resume = _resume_state(config)
    paths = _train_paths(config, resume)
    writes = not config.options.debug and is_main()
    if writes:
        paths.make()
    train_set = build_dataset(config, config.dataset.split("train"))
    val_entry = config.dataset.val
    val_set = None if val_entry is None else build_dataset(config, val_entry)
    model = build_model(config)
    if resume is not None:
        load_weights(model, resume["state_dict"], str(config.options.checkpoint))
    elif config.optim.init_from is not None:
        init = load_checkpoint(config.optim.init_from)
        load_weights(model, init["state_dict"], str(config.optim.init_from))
        log.info("fine-tuning from the weights of %s", config.optim.init_from)
    logger = (
        RunLogger(paths.logs_dir, paths.results_dir / "metrics.jsonl")
        if writes
        else RunLogger.disabled()
    )
    device = pick_device(config.options.cpu)
    with logger, stop_requests() as stop:
        trainer = Trainer(config, model, train_set, val_set, paths, device, logger, resume, stop)
        metrics = trainer.train()
    if not is_main():
        return metrics
    if metrics:
        print(format_metrics_table(metrics))
    if writes:
        print(f"checkpoint: {paths.checkpoint_dir / 'checkpoint.pt'}")
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
    report_config_diff(state.get("config"), config.to_dict())
    return state


def _train_paths(config: Config, resume: dict[str, Any] | None) -> RunPaths:
    """The run folders: ``--timestamp-id``, else the resumed run's own id, else a new one."""
    options = config.options
    timestamp_id = options.timestamp_id
    if timestamp_id is None and resume is not None:
        timestamp_id = resume.get("run_id") or Path(str(options.checkpoint)).resolve().parent.name
    return RunPaths.for_config(config, timestamp_id)


def validate(config: Config) -> dict[str, float]:
    """``--mode validate --checkpoint CKPT``: metrics of the val set, printed and saved as JSON."""
    if config.options.checkpoint is None:
        raise ConfigError("--mode validate needs --checkpoint CKPT")
    checkpoint = load_checkpoint(config.options.checkpoint)
    model = load_model(config, checkpoint, config.options.checkpoint)
    transform = load_transform(config, checkpoint)
    val_set = build_dataset(config, config.dataset.split("val"))
    loader = build_eval_loader(config, val_set)
    device = pick_device(config.options.cpu)
    totals = evaluate(
        model.to(device), loader, transform, device, with_forces=with_forces(config),
        eval_on_free_atoms=config.task.eval_on_free_atoms,
    )  # fmt: skip
    metrics = totals.compute()
    results = RunPaths.for_config(config).results_dir  # on every rank: they agree on the id
    if not is_main():
        return metrics
    print(format_metrics_table(metrics))
    if not config.options.debug:
        results.mkdir(parents=True, exist_ok=True)
        path = results / "metrics_val.json"
        write_json(path, metrics, indent=2)
        print(f"metrics: {path}")
    return metrics
