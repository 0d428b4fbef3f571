"""Evaluation of a force model over a data loader: OC20 metrics accumulated as totals."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from catforge.data.graph import AtomicGraph
from catforge.models.forces import ForceModel
from catforge.potential.metrics import MetricTotals, energy_totals, force_totals
from catforge.potential.targets import TargetTransform
from catforge.runtime.distributed import (
    all_reduce_sum,
    broadcast_object,
    gather_objects,
    get_world_size,
)
from catforge.runtime.progress import progress


def batch_totals(
    model: ForceModel,
    batch: AtomicGraph,
    transform: TargetTransform,
    *,
    with_forces: bool,
    eval_on_free_atoms: bool = True,
) -> MetricTotals:
    """Metric totals of one batch: S2EF metrics ``with_forces``, else IS2RE energy metrics."""
    output = model(batch, training=False)
    return output_totals(
        output.energy,
        output.forces,
        batch,
        transform,
        with_forces=with_forces,
        eval_on_free_atoms=eval_on_free_atoms,
    )


def output_totals(
    energy_norm: Tensor,
    forces_norm: Tensor | None,
    batch: AtomicGraph,
    transform: TargetTransform,
    *,
    with_forces: bool,
    eval_on_free_atoms: bool = True,
) -> MetricTotals:
    """Metric totals of normalised model outputs (n_graphs,), (n_atoms, 3) against ``batch``."""
    if forces_norm is not None:
        forces_norm = forces_norm.detach().float()
    energy, forces = transform.denormalize(energy_norm.detach().float(), forces_norm, batch)
    target_energy = getattr(batch, transform.field)
    if not with_forces:
        return energy_totals(energy, target_energy)
    if forces is None or batch.force is None:
        raise ValueError("S2EF metrics need predicted and reference forces")
    return force_totals(
        forces,
        batch.force,
        batch.batch,
        batch.n_graphs,
        ~batch.fixed if eval_on_free_atoms else None,
        pred_energy=energy,
        target_energy=target_energy,
    )


def evaluate(
    model: ForceModel,
    batches: Iterable[AtomicGraph],
    transform: TargetTransform,
    device: torch.device,
    *,
    with_forces: bool,
    eval_on_free_atoms: bool = True,
) -> MetricTotals:
    """Totals over every batch, summed over all processes under DDP."""
    was_training = model.training
    model.eval()
    totals = MetricTotals()
    try:
        for batch in progress(batches, desc="validate"):
            batch = batch.to(device)
            totals = totals + batch_totals(
                model,
                batch,
                transform,
                with_forces=with_forces,
                eval_on_free_atoms=eval_on_free_atoms,
            )
    finally:
        model.train(was_training)
    return all_reduce_totals(totals, device)


def all_reduce_totals(totals: MetricTotals, device: torch.device) -> MetricTotals:
    """``totals`` summed over every rank (itself on one process).

    Ranks agree on the metric names first, so a rank without batches still takes part.
    """
    if get_world_size() == 1:
        return totals
    gathered = gather_objects(totals.names)
    names = broadcast_object(sorted(set().union(*gathered)) if gathered is not None else [])
    flat = all_reduce_sum(totals.as_tensor(names, device=device))
    return MetricTotals.from_tensor(names, flat)
