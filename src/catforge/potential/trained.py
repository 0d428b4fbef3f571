"""A trained model in physical units: what prediction, relaxation and the ASE calculator share.

A :class:`Potential` is a :class:`~catforge.models.forces.ForceModel` plus the label
normalisers it was trained with, so that every consumer gets the same denormalised energies (eV)
and forces (eV/A) from the same checkpoint (loaded by
:func:`catforge.assemble.models.load_potential`). Nothing here depends on the training loop
or the config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from catforge.data.graph import AtomicGraph
from catforge.errors import CheckpointError
from catforge.models.forces import ForceModel, ModelOutput
from catforge.potential.targets import TargetTransform

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
