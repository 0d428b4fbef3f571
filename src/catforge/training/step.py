"""One optimizer step as a free function over the parts of a training run.

:func:`train_step` takes :class:`TrainParts` (model, optimizer, schedule, loss, label transform,
EMA, AMP scaler) and one batch, and returns a :class:`StepResult`: the loss terms, the gradient
norm before clipping and the batch's metric totals. It knows nothing of epochs, evaluation,
checkpoints or configs; :class:`~catforge.training.trainer.Trainer` owns those.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from catforge.data.graph import AtomicGraph
from catforge.models.forces import ForceModel, ModelOutput
from catforge.potential.evaluate import output_totals
from catforge.potential.metrics import MetricTotals
from catforge.potential.targets import TargetTransform
from catforge.runtime.distributed import all_reduce_sum
from catforge.training.losses import LossResult, energy_force_loss
from catforge.training.optim import ExponentialMovingAverage, LRSchedule, clip_gradients


@dataclass(frozen=True)
class LossSettings:
    """What the loss is made of (``optim.loss_*``, the coefficients, ``task`` flags).

    ``with_forces``: the S2EF loss of energies and forces, else IS2RE's energy loss.
    """

    with_forces: bool
    loss_energy: str = "mae"
    loss_force: str = "mae"
    energy_coefficient: float = 1.0
    force_coefficient: float = 30.0
    train_on_free_atoms: bool = False
    tag_weights: tuple[float, ...] = ()

    def compute(
        self,
        output: ModelOutput,
        batch: AtomicGraph,
        transform: TargetTransform,
        world_size: int = 1,
    ) -> LossResult:
        """The loss of normalised ``output`` against ``batch``'s normalised labels.

        Under DDP (``world_size > 1``) local sums are divided by the global counts (see
        :mod:`catforge.training.losses`).
        """
        energy_target, forces_target = transform.normalize_batch(batch)
        reduce = all_reduce_sum if world_size > 1 else None
        forces = output.forces if self.with_forces else None
        return energy_force_loss(
            output.energy.float(),
            energy_target,
            None if forces is None else forces.float(),
            forces_target if self.with_forces else None,
            fixed=batch.fixed,
            loss_energy=self.loss_energy,
            loss_force=self.loss_force,
            energy_coefficient=self.energy_coefficient,
            force_coefficient=self.force_coefficient,
            train_on_free_atoms=self.train_on_free_atoms,
            tag_weights=self.tag_weights or None,
            tags=batch.tags,
            natoms=batch.natoms,
            reduce_count=reduce,
            world_size=world_size,
        )


@dataclass
class TrainParts:
    """The objects one optimizer step uses, built by :mod:`catforge.assemble`.

    ``train_model`` is what the step calls (the DDP wrapper under DDP, else ``model``).
    ``amp``: float16 autocast with a gradient scaler (CUDA only).
    """

    model: ForceModel
    optimizer: Optimizer
    schedule: LRSchedule
    transform: TargetTransform
    loss: LossSettings
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ema: ExponentialMovingAverage | None = None
    amp: bool = False
    clip_grad_norm: float | None = None
    eval_on_free_atoms: bool = True
    world_size: int = 1
    train_model: nn.Module | None = None
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self) -> None:
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

    @property
    def forward_model(self) -> nn.Module:
        """The module the step calls: the DDP wrapper when there is one."""
        return self.model if self.train_model is None else self.train_model

    def averaged(self) -> contextlib.AbstractContextManager[None]:
        """The EMA weights in the model while inside (no-op without EMA)."""
        return self.ema.average_parameters() if self.ema is not None else contextlib.nullcontext()


@dataclass(frozen=True)
class StepResult:
    """One step's loss (terms and total), gradient norm before clipping, and metric totals."""

    loss: LossResult
    grad_norm: float
    totals: MetricTotals


def train_step(parts: TrainParts, batch: AtomicGraph) -> StepResult:
    """Forward, loss, backward, clip, optimizer/scaler/EMA/schedule step on one batch."""
    batch = batch.to(parts.device)
    parts.model.train()
    parts.optimizer.zero_grad(set_to_none=True)
    autocast = (
        torch.autocast("cuda", dtype=torch.float16) if parts.amp else contextlib.nullcontext()
    )
    with autocast:
        output: ModelOutput = parts.forward_model(batch, training=True)
        loss = parts.loss.compute(output, batch, parts.transform, parts.world_size)
    parts.scaler.scale(loss.total).backward()
    parts.scaler.unscale_(parts.optimizer)
    grad_norm = clip_gradients(parts.model.parameters(), parts.clip_grad_norm)
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    if parts.ema is not None:
        parts.ema.update()
    parts.schedule.step_batch()
    return StepResult(loss, float(grad_norm), _totals(parts, output, batch))


def _totals(parts: TrainParts, output: ModelOutput, batch: AtomicGraph) -> MetricTotals:
    with torch.no_grad():
        forces: Tensor | None = output.forces if parts.loss.with_forces else None
        return output_totals(
            output.energy,
            forces,
            batch,
            parts.transform,
            with_forces=parts.loss.with_forces,
            eval_on_free_atoms=parts.eval_on_free_atoms,
        )
