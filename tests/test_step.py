"""``train_step`` on a hand-made batch against a hand computation: loss, gradient, AdamW update."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from catforge.data.collate import collate
from catforge.data.graph import AtomicGraph
from catforge.models.forces import ForceModel
from catforge.potential.targets import TargetTransform
from catforge.training.optim import LRSchedule
from catforge.training.step import LossSettings, TrainParts, train_step


class Harmonic(nn.Module):
    """``E = e[Z] summed + k/2 sum |pos|^2``: forces ``-k pos``; two parameters, e and k."""

    cutoff = 6.0
    max_neighbors = None

    def __init__(self) -> None:
        super().__init__()
        self.element_energy = nn.Parameter(torch.tensor([0.0, -1.0, 0.0, 0.0], dtype=torch.float64))
        self.k = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, graph: AtomicGraph) -> Tensor:
        per_atom = self.element_energy[graph.atomic_numbers] + 0.5 * self.k * (graph.pos**2).sum(1)
        return torch.zeros(graph.n_graphs, dtype=per_atom.dtype).index_add(0, graph.batch, per_atom)


def _graph(
    pos: list[list[float]], z: list[int], energy: float, force: list[list[float]]
) -> AtomicGraph:
    n = len(z)
    return AtomicGraph(
        pos=torch.tensor(pos, dtype=torch.float64),
        atomic_numbers=torch.tensor(z),
        cell=torch.eye(3, dtype=torch.float64).unsqueeze(0) * 10,
        pbc=torch.zeros(1, 3, dtype=torch.bool),
        natoms=torch.tensor([n]),
        tags=torch.ones(n, dtype=torch.long),
        fixed=torch.zeros(n, dtype=torch.bool),
        batch=torch.zeros(n, dtype=torch.long),
        y=torch.tensor([energy], dtype=torch.float64),
        force=torch.tensor(force, dtype=torch.float64),
    )


@pytest.fixture
def batch() -> AtomicGraph:
    first = _graph(
        [[0.5, 0.0, 0.0], [0.0, 1.0, 0.0]], [1, 2], -0.5, [[-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    )
    second = _graph([[0.0, 0.0, 1.5]], [1], 1.0, [[0.0, 0.0, -2.0]])
    return collate([first, second])


def _parts(lr: float, weight_decay: float, **loss: float) -> tuple[TrainParts, Harmonic]:
    energy_model = Harmonic()
    model = ForceModel(energy_model, regress_forces=True, edges=lambda graph: graph)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    parts = TrainParts(
        model=model,
        optimizer=optimizer,
        schedule=LRSchedule(optimizer, None, "constant"),
        transform=TargetTransform(),
        loss=LossSettings(with_forces=True, **loss),  # type: ignore[arg-type]
    )
    return parts, energy_model


def test_loss_gradient_and_adamw_update_match_a_hand_computation(batch: AtomicGraph) -> None:
    lr, wd, ce, cf = 0.1, 0.01, 1.0, 30.0
    parts, model = _parts(lr, wd, energy_coefficient=ce, force_coefficient=cf)
    e0 = model.element_energy.detach().clone()
    k0 = float(model.k.detach())

    result = train_step(parts, batch)

    # By hand. Energies: E1 = e[1] + e[2] + k/2 (0.25 + 1) = -1 + 1.25 = 0.25 (target -0.5);
    # E2 = e[1] + k/2 * 2.25 = -1 + 2.25 = 1.25 (target 1.0). Energy MAE = (0.75 + 0.25) / 2.
    energy_mae = (0.75 + 0.25) / 2
    # Forces -k pos: (-1, 0, 0), (0, -2, 0), (0, 0, -3) vs targets (-1,0,0), (0,0,0), (0,0,-2):
    # errors 0,0,0 | 0,-2,0 | 0,0,-1 -> per-component MAE over 9 components = 3 / 9.
    force_mae = 3 / 9
    assert float(result.loss.parts["energy"]) == pytest.approx(energy_mae)
    assert float(result.loss.parts["forces"]) == pytest.approx(force_mae)
    assert float(result.loss.total) == pytest.approx(ce * energy_mae + cf * force_mae)

    # Gradients. d|E1 - t1|/d e[1] = +1 (E1 above), likewise E2: dL/de[1] = ce (1 + 1) / 2 = 1;
    # dL/de[2] = ce * 1 / 2 = 0.5. dE1/dk = 1.25/2... : E = sum e + k/2 sum |pos|^2, so
    # dE1/dk = 0.625, dE2/dk = 1.125; energy part: ce (0.625 + 1.125) / 2 = 0.875.
    # Forces F = -k pos: dF/dk = -pos; error signs: atom 2 y: F=-2 < 0 (sign -1), d/dk = -1.0 * -1;
    # atom 3 z: F=-3 < -2 (sign -1), dF/dk = -1.5 -> contribution (+1.0 + 1.5) / 9 * cf.
    grad_k = 0.875 + cf * (1.0 + 1.5) / 9
    grad_e = torch.tensor([0.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    assert result.grad_norm == pytest.approx(math.sqrt(grad_k**2 + 1.0**2 + 0.5**2))

    # AdamW's first step: p <- p (1 - lr wd) - lr g / (|g| + eps) (bias-corrected m / sqrt(v)).
    eps = 1e-8
    expected_e = e0 * (1 - lr * wd) - lr * grad_e / (grad_e.abs() + eps)
    expected_k = k0 * (1 - lr * wd) - lr * grad_k / (abs(grad_k) + eps)
    torch.testing.assert_close(model.element_energy.detach(), expected_e)
    assert float(model.k.detach()) == pytest.approx(expected_k)
    # The metric totals are those of the forward pass before the update.
    metrics = result.totals.compute()
    assert metrics["energy_mae"] == pytest.approx(energy_mae)
    assert metrics["forces_mae"] == pytest.approx(force_mae)


def test_free_atom_mask_and_zero_coefficient(batch: AtomicGraph) -> None:
    fixed = batch.replace(fixed=torch.tensor([False, True, False]))
    parts, _ = _parts(0.0, 0.0, energy_coefficient=0.0, train_on_free_atoms=True)
    result = train_step(parts, fixed)
    assert "energy" not in result.loss.parts
    # Free atoms 1 and 3: errors 0,0,0 and 0,0,-1 -> 1 / 6.
    assert float(result.loss.parts["forces"]) == pytest.approx(1 / 6)
