"""Models, label transforms and trained potentials from the config and checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from catforge.config import Config, parse_config
from catforge.data.edges import EdgeBuilder
from catforge.data.graph import AtomicGraph
from catforge.data.graph_spec import GraphSpec
from catforge.errors import CheckpointError, ConfigError
from catforge.models.forces import ForceModel
from catforge.potential.checkpoint import load_checkpoint, load_weights
from catforge.potential.label_stats import fit_statistics
from catforge.potential.targets import ElementReferences, Normalizer, TargetTransform
from catforge.potential.trained import Potential, check_checkpoint_task
from catforge.registry import MODELS

log = logging.getLogger(__name__)


def choose_device(cpu: bool) -> torch.device:
    """The one device decision: the current CUDA device (``LOCAL_RANK``'s under DDP, set when
    the process group starts) when CUDA is available and not ``--cpu``, else the CPU."""
    if cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def energy_field(config: Config) -> str:
    """The energy label: ``y_relaxed`` for the IS2RE ``energy`` trainer, ``y`` for S2EF."""
    return "y_relaxed" if config.trainer == "energy" else "y"


def with_forces(config: Config) -> bool:
    """Whether the run trains and evaluates forces (the ``forces`` trainer)."""
    return config.trainer == "forces"


def force_model(energy_model: nn.Module, regress_forces: bool = True) -> ForceModel:
    """``energy_model`` behind the graph step its ``graph_spec`` declares, with forces by
    autograd when ``regress_forces``."""
    spec = getattr(energy_model, "graph_spec", None)
    if not isinstance(spec, GraphSpec):
        raise ConfigError(f"{type(energy_model).__name__} declares no graph_spec (a GraphSpec)")
    return ForceModel(energy_model, regress_forces, edges=EdgeBuilder(spec))  # type: ignore[arg-type]


def build_model(config: Config) -> ForceModel:
    """The energy model ``model.name`` with its attributes, behind the graph step it declares
    (:class:`~catforge.data.edges.EdgeBuilder`) and forces by autograd (``regress_forces``)."""
    attributes = dict(config.model.attributes)
    regress_forces = bool(attributes.pop("regress_forces", True))
    energy_model = MODELS.load(config.model.name)(**attributes)
    if with_forces(config) and not regress_forces:
        raise ConfigError("trainer 'forces' needs model.regress_forces: true")
    return force_model(energy_model, regress_forces)


def element_references(config: Config) -> ElementReferences | None:
    """The references of ``task.element_references`` when it names a file (not None or fit)."""
    setting = config.task.element_references
    if setting is None or setting == "fit":
        return None
    return ElementReferences.from_file(setting)


def config_transform(config: Config) -> TargetTransform:
    """The normalisers written in the config (``dataset.train``), without fitting anything."""
    field = energy_field(config)
    if config.task.element_references == "fit":
        raise ConfigError(
            "task.element_references: fit needs the training set; give a file of references"
        )
    references = element_references(config)
    entry = config.dataset.train
    if entry is None or not entry.normalize_labels:
        return TargetTransform(None, None, references, field)
    if entry.target_mean is None or entry.target_std is None:
        raise ConfigError(
            "dataset.train.target_mean/target_std are missing and nothing holds the normalisers; "
            "give them in the config (catforge data info prints them) or train a model first"
        )
    target = Normalizer(entry.target_mean, entry.target_std)
    grad = None
    if entry.grad_target_std is not None:
        grad = Normalizer(entry.grad_target_mean or 0.0, entry.grad_target_std)
    return TargetTransform(target, grad, references, field)


def checkpoint_transform(config: Config, checkpoint: dict[str, Any]) -> TargetTransform:
    """The checkpoint's normalisers, or the config's when it has none (OCP weights-only files)."""
    if not checkpoint.get("normalizers"):
        return config_transform(config)
    transform = TargetTransform(field=energy_field(config))
    transform.load_state_dict(checkpoint["normalizers"])
    return transform


def fitted_transform(config: Config, train: Dataset[AtomicGraph]) -> TargetTransform:
    """Label normalisers and element references from the config, fitted on ``train`` where the
    config lacks them (``target_mean`` missing, or ``element_references: fit``)."""
    entry = config.dataset.train
    normalize = entry is not None and entry.normalize_labels
    fit_references = config.task.element_references == "fit"
    if not fit_references and not (normalize and entry is not None and entry.target_mean is None):
        return config_transform(config)
    field = energy_field(config)
    stats = fit_statistics(
        train,
        field,
        with_forces=with_forces(config),
        element_references=element_references(config),
        fit_references=fit_references,
    )
    log.info(
        "label statistics from %d training structures: target_mean %.6g, target_std %.6g",
        stats.count,
        stats.target_mean,
        stats.target_std,
    )
    target = Normalizer(stats.target_mean, stats.target_std) if normalize else Normalizer()
    return TargetTransform(target, None, stats.element_references, field)


def checkpoint_config(checkpoint: dict[str, Any], source: str | Path) -> Config:
    """The resolved config stored in a catforge checkpoint."""
    raw = checkpoint.get("config")
    if not isinstance(raw, dict) or "model" not in raw:
        raise CheckpointError(
            f"{source}: the checkpoint stores no model config (an OCP checkpoint?); give the "
            "config of its model: --config-yml on the command line, or "
            "load_potential(path, config=load_config(YAML)) in Python"
        )
    return parse_config(raw, f"{source} (stored config)")


def load_potential(
    path: str | Path,
    *,
    config: Config | None = None,
    device: torch.device | str = "cpu",
    purpose: str | None = None,
) -> Potential:
    """The trained model of checkpoint ``path`` in physical units.

    The model config is the checkpoint's own unless ``config`` is given. With ``purpose`` (what
    the model is for, for the message), a checkpoint trained for another task than
    ``config.trainer`` is refused.
    """
    checkpoint = load_checkpoint(path)
    config = config or checkpoint_config(checkpoint, path)
    if purpose is not None:
        check_checkpoint_task(checkpoint, path, config.trainer, purpose)
    model = build_model(config)
    load_weights(model, checkpoint["state_dict"], path, strict=config.task.strict_load)
    return Potential(model, checkpoint_transform(config, checkpoint), device)
