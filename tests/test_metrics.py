"""OC20 metrics against plain numpy references (loops over systems) and hand-worked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from catforge.errors import ConfigError
from catforge.potential.metrics import (
    ADWT_THRESHOLDS,
    METRIC_DIRECTIONS,
    PRIMARY_METRICS,
    TASK_METRICS,
    MetricTotals,
    energy_totals,
    force_totals,
    format_metrics_table,
    is_better,
    metric_direction,
    minimum_image,
    primary_metric,
    relaxation_totals,
    task_metrics,
)

F64 = torch.float64


def t(values, dtype=F64) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values), dtype=dtype)


def batch_of(sizes: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


# ---------------------------------------------------------------- independent numpy references


def ref_energy(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    err = np.abs(pred - target)
    return {
        "energy_mae": err.mean(),
        "energy_mse": (err**2).mean(),
        "energy_within_threshold": (err < 0.02).mean(),
    }


def ref_cos(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> float:
    return float(a @ b / (max(np.linalg.norm(a), eps) * max(np.linalg.norm(b), eps)))


def ref_forces(pred_f, target_f, sizes, free, pred_e, target_e) -> dict[str, float]:
    """OCP's evaluator written out: mask free atoms, then loop over systems for EFwT."""
    p, q = pred_f[free], target_f[free]
    err = np.abs(p - q)
    cos = [ref_cos(p[i], q[i]) for i in range(len(p))]
    mag = np.abs(np.linalg.norm(p, axis=1) - np.linalg.norm(q, axis=1))
    success, start = 0, 0
    for s, n in enumerate(sizes):
        sys_err = np.abs(pred_f[start : start + n] - target_f[start : start + n])
        sys_err = sys_err[free[start : start + n]]
        max_f = sys_err.max() if sys_err.size else 0.0  # no free atoms: force test passes
        success += abs(pred_e[s] - target_e[s]) < 0.02 and max_f < 0.03
        start += n
    return {
        "forcesx_mae": err[:, 0].mean(),
        "forcesy_mae": err[:, 1].mean(),
        "forcesz_mae": err[:, 2].mean(),
        "forces_mae": err.mean(),
        "forces_cos": float(np.mean(cos)),
        "forces_magnitude": mag.mean(),
        "energy_mae": np.abs(pred_e - target_e).mean(),
        "energy_force_within_threshold": success / len(sizes),
    }


def ref_min_diff(delta: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """OCP ``min_diff`` for one system, wrapping only the periodic axes."""
    frac = np.linalg.solve(cell.T, delta.T).T
    for axis, periodic in enumerate(pbc):
        if periodic:
            frac[:, axis] %= 1.0
            frac[:, axis] %= 1.0
            frac[frac[:, axis] > 0.5, axis] -= 1.0
    return frac @ cell


def ref_relaxation(pred, target, cells, pbcs, sizes, free) -> dict[str, float]:
    distances, components, start = [], [], 0
    for s, n in enumerate(sizes):
        mask = free[start : start + n]
        delta = ref_min_diff(pred[start : start + n] - target[start : start + n], cells[s], pbcs[s])
        delta = delta[mask]
        components.append(delta)
        distances.append(np.linalg.norm(delta, axis=1).mean() if len(delta) else 0.0)
        start += n
    success = sum(int(np.sum(np.array(distances) < thr)) for thr in ADWT_THRESHOLDS)
    comp = np.concatenate(components)
    return {
        "average_distance_within_threshold": success / (len(sizes) * len(ADWT_THRESHOLDS)),
        "positions_mae": np.abs(comp).mean(),
        "positions_mse": (comp**2).mean(),
    }


def random_forces(seed: int, sizes: list[int]):
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    target = rng.normal(size=(n, 3))
    scale = np.repeat(rng.choice([0.002, 0.01, 0.05], size=len(sizes)), sizes)[:, None]
    pred = target + scale * rng.normal(size=(n, 3))
    pred[0] = 0.0  # a zero force exercises the cosine eps
    free = rng.random(n) > 0.3
    target_e = rng.normal(size=len(sizes))
    pred_e = target_e + rng.uniform(-0.04, 0.04, size=len(sizes))
    return pred, target, free, pred_e, target_e


def random_relaxation(seed: int, sizes: list[int]):
    rng = np.random.default_rng(seed)
    n_graphs, n = len(sizes), sum(sizes)
    cells = np.stack([np.diag(rng.uniform(6, 10, 3)) + rng.uniform(-2, 2, (3, 3)) for _ in sizes])
    pbcs = rng.random((n_graphs, 3)) > 0.3
    target = rng.uniform(0, 8, (n, 3))
    scale = np.repeat(rng.uniform(0.005, 0.4, n_graphs), sizes)[:, None]
    pred = target + scale * rng.normal(size=(n, 3)) / np.sqrt(3)
    # Whole lattice translations along periodic axes must not count as displacement.
    shifts = rng.integers(-2, 3, (n, 3)) * np.repeat(pbcs, sizes, axis=0)
    pred = pred + np.einsum("ni,nij->nj", shifts, np.repeat(cells, sizes, axis=0))
    free = rng.random(n) > 0.25
    return pred, target, cells, pbcs, free


def assert_metrics(got: dict[str, float], expected: dict[str, float]) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name


# ---------------------------------------------------------------- agreement with numpy


def test_energy_totals_match_numpy():
    rng = np.random.default_rng(0)
    target = rng.normal(size=41)
    pred = target + rng.uniform(-0.05, 0.05, size=41)
    assert_metrics(energy_totals(t(pred), t(target)).compute(), ref_energy(pred, target))


def test_force_totals_match_numpy():
    sizes = [5, 1, 9, 3, 12, 7, 2]
    pred, target, free, pred_e, target_e = random_forces(1, sizes)
    free[5] = False  # system 1 (one atom) has no free atoms
    totals = force_totals(
        t(pred), t(target), batch_of(sizes), len(sizes), t(free, torch.bool), t(pred_e), t(target_e)
    )
    expected = ref_forces(pred, target, sizes, free, pred_e, target_e)
    assert 0 < expected["energy_force_within_threshold"] < 1
    assert_metrics(totals.compute(), expected)
    assert totals.names == TASK_METRICS["s2ef"]


def test_relaxation_totals_match_numpy():
    sizes = [4, 7, 1, 10, 3, 6]
    pred, target, cells, pbcs, free = random_relaxation(2, sizes)
    free[4] = True  # system 1 keeps a free atom
    totals = relaxation_totals(
        t(pred), t(target), t(cells), t(pbcs, torch.bool), batch_of(sizes), 6, t(free, torch.bool)
    )
    expected = ref_relaxation(pred, target, cells, pbcs, sizes, free)
    assert 0 < expected["average_distance_within_threshold"] < 1
    assert_metrics(totals.compute(), expected)
    assert totals.names == TASK_METRICS["is2rs"]


def test_minimum_image_matches_numpy_min_diff():
    sizes = [6, 5, 8]
    pred, target, cells, pbcs, _ = random_relaxation(3, sizes)
    # Large moves along non-periodic axes must stay unwrapped.
    far = np.random.default_rng(3).uniform(-8, 8, pred.shape) * ~np.repeat(pbcs, sizes, axis=0)
    pred = pred + far
    got = minimum_image(t(pred - target), t(cells), t(pbcs, torch.bool), batch_of(sizes)).numpy()
    starts = np.cumsum([0, *sizes])
    for s in range(len(sizes)):
        a, b = starts[s], starts[s + 1]
        np.testing.assert_allclose(
            got[a:b], ref_min_diff(pred[a:b] - target[a:b], cells[s], pbcs[s]), atol=1e-12
        )


# ---------------------------------------------------------------- hand-worked cases


def test_energy_hand_worked():
    # dE = 0.01, 0.5, 0.0 -> MAE 0.51/3 = 0.17, MSE (1e-4 + 0.25)/3, EwT 2/3 (0.5 fails).
    metrics = energy_totals(t([1.0, 2.0, 3.0]), t([1.01, 2.5, 3.0])).compute()
    assert metrics["energy_mae"] == pytest.approx(0.17)
    assert metrics["energy_mse"] == pytest.approx(0.2501 / 3)
    assert metrics["energy_within_threshold"] == pytest.approx(2 / 3)


def test_efwt_hand_worked():
    # System 0 (2 atoms): dE = 0.01, worst force component 0.02 -> success.
    # System 1 (1 atom): dE = 0.01 but one component is off by 0.05 -> failure. EFwT = 1/2.
    target = torch.zeros(3, 3, dtype=F64)
    pred = t([[0.02, 0.0, 0.0], [0.0, -0.01, 0.0], [0.0, 0.0, 0.05]])
    metrics = force_totals(pred, target, batch_of([2, 1]), 2, None, t([1.01, 2.01]), t([1.0, 2.0]))
    values = metrics.compute()
    assert values["energy_force_within_threshold"] == pytest.approx(0.5)
    assert values["forces_mae"] == pytest.approx(0.08 / 9)
    assert values["forcesz_mae"] == pytest.approx(0.05 / 3)
    # forces_magnitude: | |F_pred| - 0 | = 0.02, 0.01, 0.05 -> 0.08 / 3; cos of zero targets is 0.
    assert values["forces_magnitude"] == pytest.approx(0.08 / 3)
    assert values["forces_cos"] == 0.0


def test_efwt_uses_component_max_not_norm():
    # dF = (0.02, 0.02, 0.02): every component < 0.03 but the norm is 0.0346 > 0.03.
    pred, target = t([[0.02, 0.02, 0.02]]), torch.zeros(1, 3, dtype=F64)
    values = force_totals(pred, target, batch_of([1]), 1, None, t([0.0]), t([0.0])).compute()
    assert values["energy_force_within_threshold"] == 1.0


def test_adwt_hand_worked():
    # Non-periodic, one free atom each: d = 0.1234 passes thresholds 0.124..0.499 (376 of 490);
    # d = 0.6 passes none; system 2's moved atom is fixed, d = 0.0025 passes all 490.
    pred = t([[0.1234, 0, 0], [0, 0.6, 0], [0, 0, 0.0025], [5.0, 5.0, 5.0]])
    target = torch.zeros(4, 3, dtype=F64)
    free = t([True, True, True, False], torch.bool)
    cell, pbc = torch.zeros(3, 3, 3, dtype=F64), torch.zeros(3, 3, dtype=torch.bool)
    totals = relaxation_totals(pred, target, cell, pbc, batch_of([1, 1, 2]), 3, free)
    assert totals.total("average_distance_within_threshold").item() == 376 + 0 + 490
    assert totals.numel("average_distance_within_threshold").item() == 3 * 490
    assert totals.compute()["positions_mae"] == pytest.approx((0.1234 + 0.6 + 0.0025) / 9)


def test_thresholds_are_strict():
    # |dE| == 0.02 exactly (0.02 - 0.0 in float64) is not within; 0.0199 is.
    values = energy_totals(t([0.02, -0.02, 0.0199]), t([0.0, 0.0, 0.0])).compute()
    assert values["energy_within_threshold"] == pytest.approx(1 / 3)
    # A force component error of exactly 0.03 fails EFwT.
    forces = force_totals(
        t([[0.03, 0.0, 0.0]]), torch.zeros(1, 3, dtype=F64), batch_of([1]), 1, None,
        t([0.0]), t([0.0]),
    )  # fmt: skip
    assert forces.compute()["energy_force_within_threshold"] == 0.0
    # d equal to threshold k passes only the thresholds strictly above it: 490 - k - 1.
    k = 100
    pred = t([[ADWT_THRESHOLDS[k], 0.0, 0.0]])
    zero_cell, no_pbc = torch.zeros(1, 3, 3, dtype=F64), torch.zeros(1, 3, dtype=torch.bool)
    totals = relaxation_totals(pred, torch.zeros(1, 3, dtype=F64), zero_cell, no_pbc,
                               batch_of([1]), 1, None)  # fmt: skip
    assert totals.total("average_distance_within_threshold").item() == 490 - k - 1


# ---------------------------------------------------------------- masking and edge cases


def test_fixed_atoms_are_ignored():
    sizes = [3, 4]
    pred, target, free, pred_e, target_e = random_forces(4, sizes)
    free = np.array([True, False, True, True, False, False, True])
    wild_pred, wild_target = pred.copy(), target.copy()
    wild_pred[~free] = 1e6
    wild_target[np.flatnonzero(~free)[0]] = np.nan
    args = (batch_of(sizes), 2, t(free, torch.bool), t(pred_e), t(target_e))
    clean = force_totals(t(pred), t(target), *args).compute()
    wild = force_totals(t(wild_pred), t(wild_target), *args).compute()
    assert clean == wild
    cell = t(np.stack([np.eye(3) * 10] * 2))
    pbc = torch.ones(2, 3, dtype=torch.bool)
    relax = [
        relaxation_totals(t(p), t(target), cell, pbc, *args[:3]).compute()
        for p in (target + 0.01, np.where(free[:, None], target + 0.01, 3.3))
    ]
    assert relax[0] == pytest.approx(relax[1], rel=1e-12)


def test_system_without_free_atoms():
    # System 0 is all fixed (huge errors ignored): EFwT passes on energy alone; ADwT d = 0.
    pred = t([[9.0, 9.0, 9.0], [0.01, 0.0, 0.0]])
    target = torch.zeros(2, 3, dtype=F64)
    free = t([False, True], torch.bool)
    forces = force_totals(pred, target, batch_of([1, 1]), 2, free, t([0.0, 0.0]), t([0.0, 0.0]))
    values = forces.compute()
    assert values["energy_force_within_threshold"] == 1.0
    assert forces.numel("forces_mae").item() == 3
    assert values["forces_mae"] == pytest.approx(0.01 / 3)
    cell, pbc = t(np.stack([np.eye(3) * 10] * 2)), torch.ones(2, 3, dtype=torch.bool)
    relax = relaxation_totals(pred, target, cell, pbc, batch_of([1, 1]), 2, free)
    # d = (0, 0.01): 490 + 490 (0.01 == threshold 0 fails, then 489 pass) -> 979.
    assert relax.total("average_distance_within_threshold").item() == 490 + 489
    only_fixed = relaxation_totals(
        pred[:1], target[:1], cell[:1], pbc[:1], batch_of([1]), 1, free[:1]
    )
    assert math.isnan(only_fixed.compute()["positions_mae"])  # no free components at all


def test_forces_cos_eps_follows_torch():
    a = t([[0.0, 0.0, 0.0], [1e-9, 0.0, 0.0], [1.0, 2.0, 3.0]])
    b = t([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 1.0, 0.0]])
    totals = force_totals(a, b, batch_of([3]), 1)
    # |a_1| = 1e-9 is clamped to eps = 1e-8: cos = 1e-9 / 1e-8 = 0.1; a zero vector gives 0.
    expected = (0.0 + 0.1 + ref_cos(a[2].numpy(), b[2].numpy())) / 3
    assert totals.compute()["forces_cos"] == pytest.approx(expected, rel=1e-12)
    torch_cos = torch.nn.functional.cosine_similarity(a, b, dim=1).mean().item()
    assert totals.compute()["forces_cos"] == pytest.approx(torch_cos, rel=1e-12)


# ---------------------------------------------------------------- periodic boundaries


def test_displacement_across_periodic_boundary():
    # An atom at 0.01 A predicted at L - 0.01 A moved 0.02 A, not L.
    length = 12.0
    pred, target = t([[length - 0.01, 3.0, 3.0]]), t([[0.01, 3.0, 3.0]])
    cell, pbc = t([np.eye(3) * length]), torch.ones(1, 3, dtype=torch.bool)
    delta = minimum_image(pred - target, cell, pbc)
    np.testing.assert_allclose(delta.numpy(), [[-0.02, 0.0, 0.0]], atol=1e-12)
    totals = relaxation_totals(pred, target, cell, pbc, batch_of([1]), 1, None)
    assert totals.compute()["positions_mae"] == pytest.approx(0.02 / 3)
    raw = relaxation_totals(pred, target, cell, pbc, batch_of([1]), 1, None, False)
    assert raw.compute()["positions_mae"] == pytest.approx((length - 0.02) / 3)
    assert (
        raw.compute()["average_distance_within_threshold"]
        == totals.compute()["average_distance_within_threshold"]
    )


def test_minimum_image_triclinic_cell():
    cell = t([[[5.0, 0.0, 0.0], [2.5, 4.33, 0.0], [1.0, 1.5, 7.0]]])
    small = t([[0.1, -0.2, 0.05], [-0.3, 0.1, 0.2]])
    lattice = t([[1, -1, 2], [-2, 0, 1]]) @ cell[0]  # whole lattice translations
    delta = minimum_image(small + lattice, cell, torch.ones(1, 3, dtype=torch.bool))
    np.testing.assert_allclose(delta.numpy(), small.numpy(), atol=1e-12)


def test_non_periodic_axis_is_not_wrapped():
    # pbc (T, T, F): a 9.9 A move along z stays 9.9 A (with z periodic it would be -0.1 A).
    cell = t([np.diag([10.0, 10.0, 10.0])])
    move = t([[9.9, 0.0, 9.9]])
    slab = minimum_image(move, cell, t([[True, True, False]], torch.bool))
    np.testing.assert_allclose(slab.numpy(), [[-0.1, 0.0, 9.9]], atol=1e-12)
    bulk = minimum_image(move, cell, torch.ones(1, 3, dtype=torch.bool))
    np.testing.assert_allclose(bulk.numpy(), [[-0.1, 0.0, -0.1]], atol=1e-12)
    # A zero-length cell row on a non-periodic axis (2D cell, or a molecule) is allowed.
    flat = t([np.diag([10.0, 10.0, 0.0])])
    np.testing.assert_allclose(
        minimum_image(move, flat, t([[True, True, False]], torch.bool)).numpy(),
        [[-0.1, 0.0, 9.9]],
        atol=1e-12,
    )
    molecule = minimum_image(move, torch.zeros(1, 3, 3), torch.zeros(1, 3, dtype=torch.bool))
    np.testing.assert_allclose(molecule.numpy(), move.numpy(), atol=1e-15)


# ---------------------------------------------------------------- totals, merging, round trips


def test_merged_batches_equal_concatenated_batch():
    sizes_a, sizes_b = [3], [2, 6, 4, 5]
    sizes = sizes_a + sizes_b
    pred, target, free, pred_e, target_e = random_forces(5, sizes)
    cut, gcut = sum(sizes_a), len(sizes_a)

    def forces(atoms: slice, graphs: slice, sz: list[int]) -> MetricTotals:
        return force_totals(
            t(pred[atoms]), t(target[atoms]), batch_of(sz), len(sz),
            t(free[atoms], torch.bool), t(pred_e[graphs]), t(target_e[graphs]),
        )  # fmt: skip

    part_a = forces(slice(0, cut), slice(0, gcut), sizes_a)
    part_b = forces(slice(cut, None), slice(gcut, None), sizes_b)
    whole = forces(slice(None), slice(None), sizes).compute()
    merged = (part_a + part_b).compute()
    assert merged == pytest.approx(whole, rel=1e-12)
    assert MetricTotals.merge([part_a, part_b]).compute() == pytest.approx(whole, rel=1e-12)
    a, b = part_a.compute(), part_b.compute()
    naive = (a["forces_mae"] + b["forces_mae"]) / 2
    assert abs(naive - whole["forces_mae"]) > 1e-4  # an average of averages would be wrong

    e_whole = energy_totals(t(pred_e), t(target_e)).compute()
    e_parts = energy_totals(t(pred_e[:gcut]), t(target_e[:gcut])) + energy_totals(
        t(pred_e[gcut:]), t(target_e[gcut:])
    )
    assert e_parts.compute() == pytest.approx(e_whole, rel=1e-12)


def test_merged_relaxation_batches_equal_concatenated_batch():
    sizes = [5, 2, 7, 3]
    pred, target, cells, pbcs, free = random_relaxation(6, sizes)
    args = [t(pred), t(target), t(cells), t(pbcs, torch.bool)]
    whole = relaxation_totals(*args, batch_of(sizes), 4, t(free, torch.bool)).compute()
    cut = 5
    first = relaxation_totals(
        *(x[:cut] for x in args[:2]), *(x[:1] for x in args[2:]),
        batch_of(sizes[:1]), 1, t(free[:cut], torch.bool),
    )  # fmt: skip
    rest = relaxation_totals(
        *(x[cut:] for x in args[:2]), *(x[1:] for x in args[2:]),
        batch_of(sizes[1:]), 3, t(free[cut:], torch.bool),
    )  # fmt: skip
    assert (first + rest).compute() == pytest.approx(whole, rel=1e-12)


def test_tensor_round_trip_and_missing_names():
    totals = energy_totals(t([1.0, 2.0]), t([1.5, 2.0])) + MetricTotals({"loss": (3.0, 4)})
    flat = totals.as_tensor()
    assert flat.dtype == F64 and flat.shape == (8,)
    back = MetricTotals.from_tensor(totals.names, flat)
    assert back.compute() == totals.compute()
    # Reducing two "ranks" = adding their flat tensors, then rebuilding.
    names = ("energy_mae", "forces_mae")
    summed = MetricTotals.from_tensor(names, totals.as_tensor(names) + totals.as_tensor(names))
    assert summed.compute()["energy_mae"] == pytest.approx(0.25)
    assert summed.numel("energy_mae").item() == 4
    assert math.isnan(summed.compute()["forces_mae"])  # missing everywhere: count 0
    assert MetricTotals().as_tensor().shape == (0,)
    with pytest.raises(ValueError, match="shape"):
        MetricTotals.from_tensor(names, flat)


def test_float32_inputs_give_float64_totals():
    sizes = [4, 6]
    pred, target, free, pred_e, target_e = random_forces(7, sizes)
    f32 = [t(x, torch.float32) for x in (pred, target)]
    e32 = [t(x, torch.float32) for x in (pred_e, target_e)]
    totals = force_totals(*f32, batch_of(sizes), 2, t(free, torch.bool), *e32)
    assert all(totals.total(n).dtype == F64 for n in totals.names)
    as64 = [x.double() for x in (*f32, *e32)]
    expected = force_totals(*as64[:2], batch_of(sizes), 2, t(free, torch.bool), *as64[2:])
    assert torch.equal(totals.as_tensor(), expected.as_tensor())
    energy = energy_totals(*e32)
    assert all(energy.total(n).dtype == F64 for n in energy.names)
    cell32 = torch.eye(3).expand(2, 3, 3) * 10
    relax = relaxation_totals(*f32, cell32, torch.ones(2, 3, dtype=torch.bool), batch_of(sizes), 2,
                              None)  # fmt: skip
    assert relax.total("positions_mae").dtype == F64


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="target_energy"):
        energy_totals(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="n_graphs"):
        energy_totals(torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="free_mask must be bool"):
        force_totals(torch.zeros(2, 3), torch.zeros(2, 3), batch_of([2]), 1, torch.ones(2))
    with pytest.raises(ValueError, match="both"):
        force_totals(torch.zeros(2, 3), torch.zeros(2, 3), batch_of([2]), 1, None, torch.zeros(1))


# ---------------------------------------------------------------- tables and directions


def test_task_tables_and_directions():
    for task, names in TASK_METRICS.items():
        assert PRIMARY_METRICS[task] in names
        assert task_metrics(task) == names
        assert primary_metric(task) == PRIMARY_METRICS[task]
        for name in names:
            assert name in METRIC_DIRECTIONS
    assert energy_totals(t([0.0]), t([0.0])).names == TASK_METRICS["is2re"]
    with pytest.raises(ConfigError, match="s2ef"):
        task_metrics("s2fe")


def test_is_better_directions():
    assert is_better("energy_mae", 0.1, 0.2) and not is_better("energy_mae", 0.3, 0.2)
    assert is_better("forces_magnitude", 0.1, 0.2) and is_better("loss", 1.0, 2.0)
    assert is_better("energy_force_within_threshold", 0.3, 0.2)
    assert not is_better("energy_force_within_threshold", 0.1, 0.2)
    assert is_better("forces_cos", 0.9, 0.8) and not is_better("forces_cos", 0.7, 0.8)
    assert is_better("average_distance_within_threshold", 0.5, 0.4)
    assert not is_better("energy_mae", 0.2, 0.2)  # ties keep the earlier checkpoint
    assert is_better("energy_mae", 5.0, None) and is_better("energy_mae", 5.0, math.nan)
    assert not is_better("energy_mae", math.nan, 1.0)
    assert metric_direction("custom_mae") == "min"
    assert metric_direction("custom_within_threshold") == "max"
    with pytest.raises(ConfigError, match="energy_mae"):
        is_better("energy_mea", 0.1, 0.2)


def test_format_metrics_table():
    table = format_metrics_table(
        {"energy_mae": 0.123456, "energy_within_threshold": 0.05, "x": 2e-5}
    )
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "value"]
    assert len({len(line) for line in lines}) == 1  # aligned columns
    assert "0.1235" in table and "2.0000e-05" in table
    assert lines[2].startswith("energy_mae ")
    assert format_metrics_table({}) == "(no metrics)"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    sizes = [5, 3, 8]
    pred, target, free, pred_e, target_e = random_forces(8, sizes)
    cpu = [t(x) for x in (pred, target)], t(free, torch.bool), [t(x) for x in (pred_e, target_e)]
    batch = batch_of(sizes)
    on_cpu = force_totals(*cpu[0], batch, 3, cpu[1], *cpu[2])
    on_gpu = force_totals(
        *(x.cuda() for x in cpu[0]), batch.cuda(), 3, cpu[1].cuda(), *(x.cuda() for x in cpu[2])
    )
    assert on_gpu.total("forces_mae").is_cuda
    assert on_gpu.compute() == pytest.approx(on_cpu.compute(), rel=1e-12)
    p, q, cells, pbcs, rfree = random_relaxation(9, sizes)
    args = [t(p), t(q), t(cells), t(pbcs, torch.bool)]
    r_cpu = relaxation_totals(*args, batch, 3, t(rfree, torch.bool))
    r_gpu = relaxation_totals(
        *(x.cuda() for x in args), batch.cuda(), 3, t(rfree, torch.bool).cuda()
    )
    assert r_gpu.compute() == pytest.approx(r_cpu.compute(), rel=1e-12)
    assert (on_gpu + on_cpu).compute() == pytest.approx(on_cpu.compute(), rel=1e-12)
