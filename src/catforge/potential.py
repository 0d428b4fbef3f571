"""A trained model in physical units: what prediction, relaxation and the ASE calculator share.

A :class:`Potential` is a :class:`~catforge.models.forces.ForceModel` plus the label
normalisers it was trained with, so that every consumer gets the same denormalised energies (eV)
and forces (eV/A) from the same checkpoint. Nothing here depends on the training loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from catforge.checkpoint import load_checkpoint, load_weights
from catforge.config import Config, parse_config
from catforge.config.build import model_factory
from catforge.data.graph import AtomicGraph
from catforge.errors import CheckpointError, ConfigError
from catforge.models.forces import ForceModel, ModelOutput
from catforge.targets import ElementReferences, Normalizer, TargetTransform


def energy_field(config: Config) -> str:
    """The energy label: ``y_relaxed`` for the IS2RE ``energy`` trainer, ``y`` for S2EF."""
    return "y_relaxed" if config.trainer == "energy" else "y"


def with_forces(config: Config) -> bool:
    """Whether the run trains and evaluates forces (the ``forces`` trainer)."""
    return config.trainer == "forces"


def pick_device(cpu: bool) -> torch.device:
    """CUDA when available and not ``--cpu``, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")


def build_model(config: Config) -> ForceModel:
    """The model named by ``model.name`` with its attributes (forces for the forces trainer)."""
    model = model_factory(config.model.name)(**config.model.attributes)
    if not isinstance(model, ForceModel):
        raise ConfigError(f"model '{config.model.name}' did not build a ForceModel")
    if with_forces(config) and not model.regress_forces:
        raise ConfigError("trainer 'forces' needs model.regress_forces: true")
    return model


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


def load_model(config: Config, checkpoint: dict[str, Any], source: str | Path) -> ForceModel:
    """The model of ``config`` with the checkpoint's weights; CheckpointError on a mismatch."""
    model = build_model(config)
    load_weights(model, checkpoint["state_dict"], source, strict=config.task.strict_load)
    return model


def load_transform(config: Config, checkpoint: dict[str, Any]) -> TargetTransform:
    """The checkpoint's normalisers, or the config's when it has none (OCP weights-only files)."""
    if "normalizers" not in checkpoint:
        return config_transform(config)
    transform = TargetTransform(field=energy_field(config))
    transform.load_state_dict(checkpoint["normalizers"])
    return transform


TASK_OF_TRAINER = {
    "energy": "IS2RE (relaxed energies, trainer: energy)",
    "forces": "S2EF (energies and forces, trainer: forces)",
}
"""What a checkpoint trained with each ``trainer`` serves, for messages."""


def check_checkpoint_task(
    checkpoint: dict[str, Any], source: str | Path, trainer: str, purpose: str
) -> None:
    """Refuse a checkpoint trained for another task than ``trainer`` (``energy``/``forces``).

    ``purpose`` names what the model is needed for ("relaxations", "S2EF predictions", ...).
    Checkpoints that store no config (OCP weights-only files) are not checked.
    """
    raw = checkpoint.get("config")
    stored = raw.get("trainer") if isinstance(raw, dict) else None
    if stored not in TASK_OF_TRAINER or stored == trainer:
        return
    raise CheckpointError(
        f"{source}: this checkpoint serves {TASK_OF_TRAINER[stored]}; for {purpose} use a "
        f"checkpoint of a {TASK_OF_TRAINER[trainer]} model"
    )


def checkpoint_config(checkpoint: dict[str, Any], source: str | Path) -> Config:
    """The resolved config stored in a catforge checkpoint."""
    raw = checkpoint.get("config")
    if not isinstance(raw, dict) or "model" not in raw:
        raise CheckpointError(
            f"{source}: the checkpoint stores no model config (an OCP checkpoint?); give the "
            "config of its model: --config-yml on the command line, or "
            "Potential.from_checkpoint(path, config=load_config(YAML)) in Python"
        )
    return parse_config(raw, f"{source} (stored config)")


class Potential:
    """Denormalised energies (n_graphs,) eV and forces (n_atoms, 3) eV/A of a trained model.

    The model runs in eval mode on ``device``; outputs are detached and stay on ``device``.
    """

    def __init__(
        self,
        model: ForceModel,
        transform: TargetTransform,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.transform = transform

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        config: Config | None = None,
        device: torch.device | str = "cpu",
        purpose: str | None = None,
    ) -> Potential:
        """Weights and normalisers of ``path``; the model config is the checkpoint's own unless
        ``config`` is given. With ``purpose`` (what the model is for, for the message), a
        checkpoint trained for another task than ``config.trainer`` is refused
        (:func:`check_checkpoint_task`)."""
        checkpoint = load_checkpoint(path)
        config = config or checkpoint_config(checkpoint, path)
        if purpose is not None:
            check_checkpoint_task(checkpoint, path, config.trainer, purpose)
        model = load_model(config, checkpoint, path)
        return cls(model, load_transform(config, checkpoint), device)

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point dtype of the model's parameters (positions are cast to it)."""
        return next(self.model.parameters()).dtype

    @property
    def regress_forces(self) -> bool:
        return self.model.regress_forces

    def __call__(self, graph: AtomicGraph) -> ModelOutput:
        """Energies and forces (None without ``regress_forces``) of every structure of ``graph``."""
        graph = graph.to(self.device, self.dtype)
        with torch.no_grad():  # forces still come out: ForceModel enables gradients locally
            output = self.model(graph, training=False)
        energy, forces = self.transform.denormalize(output.energy, output.forces, graph)
        return ModelOutput(energy, forces)
