"""Losses by name (``mae``/``l1``, ``mse``, ``l2mae``) as (sum, count) pairs; the weighted
energy + force loss of S2EF and IS2RE.

Normalisation (documented once, here):

- ``mae``/``l1`` and ``mse`` are **per-component means**, as OCP T0/V3's ``nn.L1Loss``/``MSELoss``:
  for forces ``sum |dF_xyz| / (3 * n_atoms)``, for energies ``sum |dE| / n_graphs``.
- ``l2mae`` is the mean over rows of the row's L2 norm: ``sum_i ||dF_i||_2 / n_atoms`` (OCP
  ``L2MAELoss``). For a 1-D energy each row is one number, so ``l2mae`` equals ``mae``.

Every loss is computed as a :class:`LossTerm` ``(sum, count)``: ``sum`` is differentiable,
``count`` is the number of elements (mae/mse) or rows (l2mae) that went into it. One process uses
``sum / count``. Under DDP with ``world_size`` processes of per-process batch ``B``, to equal one
process with batch ``world_size * B``, each rank must use

    loss_rank = sum_rank * world_size / all_reduce_sum(count)

because DDP *averages* gradients over ranks: the averaged gradient is then
``grad(sum_all) / count_all``, the gradient of the global per-component mean. Dividing by the
local count instead (mean of per-rank means) is wrong when ranks hold different numbers of atoms
(free atoms, variable-size slabs). Unlike OCP V10's ``DDPLoss`` (which divides the *element* sum
by the *row* count, 3x the per-component mean for forces and so silently rescales
``force_coefficient``), ``count`` here always matches the per-component mean of T0/V3.

``atomwisel2`` (forces only; OCP V10's ``AtomwiseL2Loss`` in ``DDPLoss``, the OC22 configs'
choice) weighs each atom's ``||dF_i||_2`` by the number of atoms of its structure and divides by
the number of structures: ``sum_i natoms(i) ||dF_i||_2 / n_graphs`` over the (free) atoms.

Tag-specific force weights (``task.tag_specific_weights: [w0, w1, w2]``, as OCP's
``forces_trainer`` for ForceNet): the force term becomes ``sum_i w_tag(i) * sum_xyz |dF_i| /
(3 * sum_i w_tag(i))`` over all atoms, a weighted per-component mean; under DDP the weight sum is
all-reduced and the result multiplied by ``world_size`` like any other count. As in OCP it
replaces the configured force loss: the absolute error, every atom (the weights decide), and no
``force_coefficient``. Atoms whose tag is not 0, 1 or 2 weigh 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from catforge.registry import FORCE_ONLY_LOSSES, LOSSES

__all__ = [
    "LossResult",
    "LossTerm",
    "abs_error",
    "atomwise_l2_term",
    "energy_force_loss",
    "energy_loss",
    "loss_names",
    "loss_term",
    "row_l2_error",
    "squared_error",
    "tag_weighted_term",
]

CountReducer = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class LossTerm:
    """A loss as a differentiable scalar ``sum`` over ``count`` elements or rows (scalar float)."""

    sum: Tensor
    count: Tensor

    def value(self, count: Tensor | None = None, world_size: int = 1) -> Tensor:
        """``sum * world_size / count`` (count defaults to the local one; 0 gives a zero loss;
        a count may be fractional, e.g. a sum of tag weights).

        Pass the all-reduced ``count`` and the ``world_size`` under DDP (see the module docstring).
        """
        denominator = self.count if count is None else count
        safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
        return self.sum * world_size / safe


def abs_error(diff: Tensor) -> tuple[Tensor, int]:
    return diff.abs().sum(), diff.numel()


def squared_error(diff: Tensor) -> tuple[Tensor, int]:
    return diff.square().sum(), diff.numel()


def row_l2_error(diff: Tensor) -> tuple[Tensor, int]:
    if diff.dim() <= 1:
        return diff.abs().sum(), diff.numel()
    rows = diff.reshape(diff.shape[0], -1)
    return torch.linalg.vector_norm(rows, dim=1).sum(), rows.shape[0]


def loss_names() -> tuple[str, ...]:
    """The loss names of energies and forces alike (``atomwisel2`` is for forces only)."""
    return tuple(sorted(name for name in LOSSES if name not in FORCE_ONLY_LOSSES))


def loss_term(name: str, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> LossTerm:
    """The (sum, count) of loss ``name`` between ``pred`` and ``target`` (same shape).

    ``mask`` (n_rows,) bool keeps only the selected rows (e.g. free atoms). An unknown ``name``
    raises ConfigError with the closest valid name.
    """
    if name in FORCE_ONLY_LOSSES:
        raise ValueError(f"loss '{name}' needs the atoms per structure: use atomwise_l2_term")
    reduce: Callable[[Tensor], tuple[Tensor, int]] = LOSSES.load(name)
    if pred.shape != target.shape:
        raise ValueError(
            f"loss '{name}': prediction {tuple(pred.shape)} vs target {tuple(target.shape)}"
        )
    dtype = torch.promote_types(pred.dtype, torch.float32)  # no half-precision sums (AMP)
    diff = pred.to(dtype) - target.to(dtype)
    if mask is not None:
        diff = diff[mask]
    total, count = reduce(diff)
    return LossTerm(total, torch.tensor(float(count), device=pred.device, dtype=dtype))


def atomwise_l2_term(
    pred: Tensor, target: Tensor, natoms: Tensor, mask: Tensor | None = None
) -> LossTerm:
    """OCP's ``atomwisel2`` of forces (n_atoms, 3): ``(sum_i natoms(i) ||dF_i||_2, n_graphs)``
    with ``natoms`` (n_graphs,) the atoms per structure (all atoms, as OCP) and ``mask``
    (n_atoms,) the atoms that count."""
    if pred.shape != target.shape or int(natoms.sum()) != pred.shape[0]:
        raise ValueError(
            f"atomwisel2: prediction {tuple(pred.shape)}, target {tuple(target.shape)}, "
            f"{int(natoms.sum())} atoms in natoms"
        )
    dtype = torch.promote_types(pred.dtype, torch.float32)
    size = natoms.to(dtype).repeat_interleave(natoms.long())
    norms = torch.linalg.vector_norm(pred.to(dtype) - target.to(dtype), dim=-1)
    if mask is not None:
        size, norms = size[mask], norms[mask]
    count = torch.tensor(float(natoms.numel()), device=pred.device, dtype=dtype)
    return LossTerm((size * norms).sum(), count)


def tag_weighted_term(
    pred: Tensor, target: Tensor, tags: Tensor, weights: Sequence[float]
) -> LossTerm:
    """Forces ``pred``/``target`` (n_atoms, 3) weighted per atom by ``weights[tag]``:
    ``(sum_i w_i * sum_xyz |dF_i|, 3 * sum_i w_i)`` (module docs; OCP's ``forces_trainer``)."""
    if len(weights) != 3:
        raise ValueError(f"tag weights must be [w0, w1, w2], got {list(weights)}")
    if pred.shape != target.shape or tags.shape != pred.shape[:1]:
        raise ValueError(
            f"tag-weighted loss: prediction {tuple(pred.shape)}, target {tuple(target.shape)}, "
            f"tags {tuple(tags.shape)}"
        )
    dtype = torch.promote_types(pred.dtype, torch.float32)
    table = torch.tensor([*weights, 0.0], dtype=dtype, device=pred.device)
    index = torch.where((tags >= 0) & (tags <= 2), tags, torch.full_like(tags, 3))
    weight = table[index.long()]
    error = (pred.to(dtype) - target.to(dtype)).abs().sum(dim=-1)
    return LossTerm((error * weight).sum(), 3.0 * weight.sum())


@dataclass(frozen=True)
class LossResult:
    """The loss to backpropagate and its parts for logging.

    ``total`` scalar = ``energy_coefficient * energy + force_coefficient * forces``; ``parts``
    maps ``"energy"``/``"forces"`` to the unweighted, detached loss of each term: on one process
    its mean; under DDP this rank's share ``sum_rank / count_global``, so an all-reduce sum of
    ``parts`` gives the global mean. ``terms`` keeps the local (sum, count) pairs.
    """

    total: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)
    terms: dict[str, LossTerm] = field(default_factory=dict)


def energy_force_loss(
    energy_pred: Tensor,
    energy_target: Tensor,
    forces_pred: Tensor | None = None,
    forces_target: Tensor | None = None,
    *,
    fixed: Tensor | None = None,
    loss_energy: str = "mae",
    loss_force: str = "mae",
    energy_coefficient: float = 1.0,
    force_coefficient: float = 30.0,
    train_on_free_atoms: bool = True,
    tag_weights: Sequence[float] | None = None,
    tags: Tensor | None = None,
    natoms: Tensor | None = None,
    reduce_count: CountReducer | None = None,
    world_size: int = 1,
) -> LossResult:
    """Weighted energy + force loss in normalised units (OCP ``ForcesTrainer._compute_loss``).

    ``energy_*`` (n_graphs,), ``forces_*`` (n_atoms, 3) (omit both for energy only), ``fixed``
    (n_atoms,) bool. With ``train_on_free_atoms`` the force loss covers atoms with
    ``fixed == False`` only. A zero coefficient drops that term. ``tag_weights`` ``[w0, w1, w2]``
    with ``tags`` (n_atoms,) make the force term the tag-weighted one of the module docs
    (replacing ``loss_force``, ``force_coefficient`` and the free-atom mask, as OCP does).
    ``loss_force="atomwisel2"`` needs ``natoms`` (n_graphs,), the atoms per structure.
    Under DDP pass ``reduce_count`` (an all-reduce sum of a tensor across ranks) and
    ``world_size``; see the module docstring for why.
    """
    terms: dict[str, LossTerm] = {}
    weights: dict[str, float] = {}
    if energy_coefficient:
        terms["energy"] = loss_term(loss_energy, energy_pred.reshape(-1), energy_target.reshape(-1))
        weights["energy"] = energy_coefficient
    if forces_pred is not None and tag_weights:
        if forces_target is None or tags is None:
            raise ValueError("tag-weighted force loss needs forces_target and tags")
        terms["forces"] = tag_weighted_term(forces_pred, forces_target, tags, tag_weights)
        weights["forces"] = 1.0
    elif forces_pred is not None and force_coefficient:
        if forces_target is None:
            raise ValueError("forces_pred given without forces_target")
        mask = None
        if train_on_free_atoms and fixed is not None:
            mask = ~fixed.to(torch.bool)
        if loss_force == "atomwisel2":
            if natoms is None:
                raise ValueError("loss 'atomwisel2' needs natoms, the atoms per structure")
            terms["forces"] = atomwise_l2_term(forces_pred, forces_target, natoms, mask)
        else:
            terms["forces"] = loss_term(loss_force, forces_pred, forces_target, mask)
        weights["forces"] = force_coefficient
    if not terms:
        raise ValueError("both loss coefficients are zero: nothing to train on")
    total = energy_pred.new_zeros(())
    parts: dict[str, Tensor] = {}
    for name, term in terms.items():
        count = term.count if reduce_count is None else reduce_count(term.count.detach().clone())
        value = term.value(count, world_size)
        total = total + weights[name] * value
        parts[name] = value.detach() / world_size
    return LossResult(total=total, parts=parts, terms=terms)


def energy_loss(
    energy_pred: Tensor,
    energy_target: Tensor,
    *,
    loss_energy: str = "mae",
    energy_coefficient: float = 1.0,
    reduce_count: CountReducer | None = None,
    world_size: int = 1,
) -> LossResult:
    """IS2RE loss: ``energy_coefficient * loss(energy_pred, energy_target)``, both (n_graphs,)."""
    return energy_force_loss(
        energy_pred,
        energy_target,
        loss_energy=loss_energy,
        energy_coefficient=energy_coefficient,
        reduce_count=reduce_count,
        world_size=world_size,
    )
