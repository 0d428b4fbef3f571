"""Losses vs hand-written numpy values, free-atom masking, coefficients and DDP normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from catforge.errors import ConfigError
from catforge.training.losses import LossTerm, energy_force_loss, energy_loss, loss_names, loss_term


def _data(seed: int = 0, n_atoms: int = 7, n_graphs: int = 3):
    gen = torch.Generator().manual_seed(seed)
    f_pred = torch.randn(n_atoms, 3, generator=gen, dtype=torch.float64)
    f_true = torch.randn(n_atoms, 3, generator=gen, dtype=torch.float64)
    e_pred = torch.randn(n_graphs, generator=gen, dtype=torch.float64)
    e_true = torch.randn(n_graphs, generator=gen, dtype=torch.float64)
    fixed = torch.tensor([True, False, False, True, False, False, False])[:n_atoms]
    return e_pred, e_true, f_pred, f_true, fixed


def _numpy_loss(name: str, pred: np.ndarray, true: np.ndarray) -> float:
    diff = pred - true
    if name in ("mae", "l1"):
        return float(np.mean(np.abs(diff)))
    if name == "mse":
        return float(np.mean(diff**2))
    if diff.ndim == 1:
        return float(np.mean(np.abs(diff)))
    return float(np.mean(np.sqrt((diff**2).sum(axis=1))))


@pytest.mark.parametrize("name", ["mae", "l1", "mse", "l2mae"])
def test_each_loss_matches_numpy(name: str) -> None:
    e_pred, e_true, f_pred, f_true, _ = _data()
    for pred, true in ((f_pred, f_true), (e_pred, e_true)):
        term = loss_term(name, pred, true)
        expected = _numpy_loss(name, pred.numpy(), true.numpy())
        assert term.value().item() == pytest.approx(expected, rel=1e-12)
    # torch's own per-component means agree for mae/mse (OCP T0/V3 nn.L1Loss / nn.MSELoss)
    if name == "mse":
        assert loss_term(name, f_pred, f_true).value().item() == pytest.approx(
            torch.nn.functional.mse_loss(f_pred, f_true).item()
        )


def test_counts_are_elements_for_mae_and_rows_for_l2mae() -> None:
    _, _, f_pred, f_true, _ = _data()
    assert loss_term("mae", f_pred, f_true).count.item() == 21
    assert loss_term("l2mae", f_pred, f_true).count.item() == 7


def test_unknown_loss_name_suggests() -> None:
    e_pred, e_true, *_ = _data()
    with pytest.raises(ConfigError, match="l2mae"):
        loss_term("l2mea", e_pred, e_true)
    assert set(loss_names()) == {"mae", "l1", "mse", "l2mae"}


def test_free_atom_mask_and_coefficients() -> None:
    e_pred, e_true, f_pred, f_true, fixed = _data()
    result = energy_force_loss(
        e_pred, e_true, f_pred, f_true, fixed=fixed, energy_coefficient=2.0, force_coefficient=30.0
    )
    free = ~fixed.numpy()
    energy = np.mean(np.abs(e_pred.numpy() - e_true.numpy()))
    forces = np.mean(np.abs(f_pred.numpy()[free] - f_true.numpy()[free]))
    assert result.parts["energy"].item() == pytest.approx(energy)
    assert result.parts["forces"].item() == pytest.approx(forces)
    assert result.total.item() == pytest.approx(2.0 * energy + 30.0 * forces)
    all_atoms = energy_force_loss(
        e_pred, e_true, f_pred, f_true, fixed=fixed, train_on_free_atoms=False
    )
    expected = np.mean(np.abs(f_pred.numpy() - f_true.numpy()))
    assert all_atoms.parts["forces"].item() == pytest.approx(expected)


def test_loss_has_gradient_and_zero_coefficient_drops_term() -> None:
    e_pred, e_true, f_pred, f_true, fixed = _data()
    f_pred.requires_grad_(True)
    result = energy_force_loss(e_pred, e_true, f_pred, f_true, fixed=fixed, energy_coefficient=0.0)
    assert set(result.parts) == {"forces"}
    result.total.backward()
    assert f_pred.grad is not None
    assert torch.all(f_pred.grad[fixed] == 0)  # fixed atoms do not contribute


def test_energy_loss_is2re() -> None:
    e_pred, e_true, *_ = _data()
    result = energy_loss(e_pred, e_true, loss_energy="mse", energy_coefficient=3.0)
    expected = 3.0 * np.mean((e_pred.numpy() - e_true.numpy()) ** 2)
    assert result.total.item() == pytest.approx(expected)


def test_all_atoms_fixed_gives_zero_force_loss() -> None:
    e_pred, e_true, f_pred, f_true, _ = _data()
    fixed = torch.ones(7, dtype=torch.bool)
    result = energy_force_loss(e_pred, e_true, f_pred, f_true, fixed=fixed)
    assert result.parts["forces"].item() == 0.0


@pytest.mark.parametrize("name", ["mae", "mse", "l2mae"])
def test_two_half_batches_with_global_count_equal_full_batch(name: str) -> None:
    """Emulates 2-rank DDP: per-rank loss sum*world/global_count, gradients averaged by DDP."""
    e_pred, e_true, f_pred, f_true, fixed = _data(n_atoms=7, n_graphs=3)
    weights = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    # uneven split: rank 0 holds graph 0 (2 atoms), rank 1 graphs 1-2 (5 atoms)
    ranks = [(slice(0, 1), slice(0, 2)), (slice(1, 3), slice(2, 7))]

    def grads(graph_slice: slice | None, atom_slice: slice | None, **kwargs):
        w = weights.clone().requires_grad_(True)
        gs, ats = graph_slice or slice(None), atom_slice or slice(None)
        result = energy_force_loss(
            e_pred[gs], e_true[gs], (f_pred * w)[ats], f_true[ats], fixed=fixed[ats],
            loss_energy=name, loss_force=name, **kwargs,
        )  # fmt: skip
        result.total.backward()
        return result, w.grad

    full, full_grad = grads(None, None)
    # pass 1: each rank's local (sum, count); the all-reduce of the counts is their sum
    locals_ = [grads(g, a)[0] for g, a in ranks]
    totals = {k: sum(r.terms[k].count for r in locals_) for k in ("energy", "forces")}
    # pass 2: each rank divides by the global counts (energy_force_loss reduces energy, then forces)
    results, grad_sum = [], torch.zeros_like(weights)
    for g, a in ranks:
        pending = [totals["energy"], totals["forces"]]
        result, grad = grads(g, a, reduce_count=lambda _c, q=pending: q.pop(0), world_size=2)
        results.append(result)
        grad_sum += grad
    ddp_grad = grad_sum / 2  # DDP averages gradients
    torch.testing.assert_close(ddp_grad, full_grad)
    for key in ("energy", "forces"):
        torch.testing.assert_close(sum(r.parts[key] for r in results), full.parts[key])
    # the naive mean of per-rank means differs on this uneven split
    naive = sum(r.terms["forces"].value() for r in locals_) / 2
    assert not torch.allclose(naive, full.parts["forces"])


def test_half_precision_inputs_sum_in_float32() -> None:
    pred = torch.full((30000, 3), 1.0, dtype=torch.float16)
    term = loss_term("mae", pred, torch.zeros_like(pred))
    assert term.sum.dtype == torch.float32 and term.count.item() == 90000
    assert term.value().item() == 1.0


def test_loss_term_value_with_global_count() -> None:
    term = LossTerm(torch.tensor(6.0), torch.tensor(3.0))
    assert term.value().item() == 2.0
    assert term.value(torch.tensor(6.0), world_size=2).item() == 2.0
