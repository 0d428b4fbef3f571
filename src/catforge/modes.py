"""The run modes of ``main.py --mode``: short functions over objects built from the config."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from catforge.checkpoint import load_checkpoint
from catforge.config import Config
from catforge.errors import CheckpointError, ConfigError
from catforge.evaluate import evaluate
from catforge.metrics import format_metrics_table
from catforge.runs import RunPaths
from catforge.training.build import (
    build_dataset,
    build_loader,
    build_model,
    build_transform,
    pick_device,
    with_forces,
)
from catforge.training.loggers import RunLogger
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
    raise ConfigError(
        f"--mode {mode} is not available in this version of catforge; use train or validate"
    )


def _paths(config: Config) -> RunPaths:
    options = config.options
    return RunPaths.create(
        options.run_dir,
        logger=config.logger.name,
        identifier=options.identifier,
        timestamp_id=options.timestamp_id,
    )


def train(config: Config) -> dict[str, float]:
    """``--mode train``: fit the model, evaluate on val, write checkpoints, logs and metrics."""
    paths = _paths(config)
    debug = config.options.debug
    if not debug:
        paths.make()
    train_set = build_dataset(config, config.dataset.split("train"))
    val_entry = config.dataset.val
    val_set = None if val_entry is None else build_dataset(config, val_entry)
    model = build_model(config)
    if config.optim.init_from is not None:
        model.load_state_dict(load_checkpoint(config.optim.init_from)["state_dict"])
    logger = (
        RunLogger.disabled()
        if debug
        else RunLogger(paths.logs_dir, paths.results_dir / "metrics.jsonl")
    )
    device = pick_device(config.options.cpu)
    with logger:
        trainer = Trainer(config, model, train_set, val_set, paths, device, logger)
        metrics = trainer.train()
    if metrics:
        print(format_metrics_table(metrics))
    if not debug:
        print(f"checkpoint: {paths.checkpoint_dir / 'checkpoint.pt'}")
        print(f"tensorboard logs: {paths.logs_dir}")
        print(f"metrics log: {paths.results_dir / 'metrics.jsonl'}")
    return metrics


def validate(config: Config) -> dict[str, float]:
    """``--mode validate --checkpoint CKPT``: metrics of the val set, printed and saved as JSON."""
    if config.options.checkpoint is None:
        raise ConfigError("--mode validate needs --checkpoint CKPT")
    checkpoint = load_checkpoint(config.options.checkpoint)
    model = build_model(config)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise CheckpointError(
            f"{config.options.checkpoint}: weights do not fit model '{config.model.name}' "
            f"as configured: {str(error).splitlines()[0]}"
        ) from error
    transform = build_transform(config, None) if "normalizers" not in checkpoint else None
    if transform is None:
        from catforge.training.build import energy_field
        from catforge.training.normalizer import TargetTransform

        transform = TargetTransform(field=energy_field(config))
        transform.load_state_dict(checkpoint["normalizers"])
    val_set = build_dataset(config, config.dataset.split("val"))
    optim = config.optim
    loader = build_loader(
        val_set, optim.eval_batch_size or optim.batch_size, shuffle=False,
        num_workers=optim.num_workers, seed=config.options.seed,
    )  # fmt: skip
    device = pick_device(config.options.cpu)
    totals = evaluate(
        model.to(device), loader, transform, device, with_forces=with_forces(config),
        eval_on_free_atoms=config.task.eval_on_free_atoms,
    )  # fmt: skip
    metrics = totals.compute()
    print(format_metrics_table(metrics))
    if not config.options.debug:
        results = _paths(config).results_dir
        results.mkdir(parents=True, exist_ok=True)
        path = results / "metrics_val.json"
        _write_json_atomic(path, metrics)
        print(f"metrics: {path}")
    return metrics


def _write_json_atomic(path: Path, data: dict[str, float]) -> None:
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)
