"""BatchedLBFGS: step for step equal to ase.optimize.LBFGS, no cross-talk in a batch, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import add_adsorbate, fcc111
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.optimize import LBFGS

from catforge.relax.lbfgs import BatchedLBFGS, LBFGSSettings

OCP = LBFGSSettings(maxstep=0.04, memory=50, damping=1.0, alpha=70.0)
WRAPS = LBFGSSettings(maxstep=0.1, memory=3, damping=0.8, alpha=100.0)  # ring buffer wraps


def make_slab(metal: str, size: tuple[int, int, int], ads: str, site: str, seed: int) -> Atoms:
    """EMT slab (bottom layer fixed) with one adsorbate, rattled so every atom feels a force."""
    slab = fcc111(metal, size=size, vacuum=6.0)
    bottom = slab.get_tags() == slab.get_tags().max()
    add_adsorbate(slab, ads, 1.6, site)
    slab.rattle(stdev=0.05, seed=seed)
    slab.set_constraint(FixAtoms(mask=np.append(bottom, False)))
    slab.calc = EMT()
    return slab


def systems() -> list[Atoms]:
    """Three different systems: 13, 17 and 19 atoms."""
    return [
        make_slab("Cu", (2, 2, 3), "O", "fcc", seed=1),
        make_slab("Pt", (2, 2, 4), "H", "hcp", seed=2),
        make_slab("Au", (3, 2, 3), "C", "ontop", seed=3),
    ]


def fixed_mask(atoms: Atoms) -> torch.Tensor:
    """(n_atoms,) bool: atoms held by FixAtoms."""
    mask = np.zeros(len(atoms), dtype=bool)
    mask[atoms.constraints[0].index] = True
    return torch.from_numpy(mask)


def emt_forces(batch: list[Atoms], pos: torch.Tensor) -> torch.Tensor:
    """(n_atoms, 3) float64 EMT forces (eV/A) of the systems in batch at pos (n_atoms, 3) A."""
    out, start = [], 0
    for atoms in batch:
        atoms.set_positions(pos[start : start + len(atoms)].numpy(), apply_constraint=False)
        out.append(torch.from_numpy(atoms.get_forces()))
        start += len(atoms)
    return torch.cat(out)


def initial(batch: list[Atoms]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated positions (n_atoms, 3) and fixed mask (n_atoms,) of batch."""
    pos = torch.cat([torch.from_numpy(a.get_positions()) for a in batch])
    return pos, torch.cat([fixed_mask(a) for a in batch])


def solo_run(atoms: Atoms, settings: LBFGSSettings, steps: int) -> list[torch.Tensor]:
    """Positions after each of `steps` steps of our optimizer on atoms alone."""
    opt = BatchedLBFGS(settings)
    opt.add_systems(torch.tensor([len(atoms)]))
    pos, fixed = initial([atoms])
    traj = []
    for _ in range(steps):
        pos = opt.step(pos, emt_forces([atoms], pos), fixed)
        traj.append(pos)
    return traj


@pytest.mark.parametrize("settings", [OCP, WRAPS], ids=["ocp", "wraps"])
def test_matches_ase_lbfgs_step_by_step(settings: LBFGSSettings) -> None:
    ref = make_slab("Cu", (2, 2, 3), "O", "fcc", seed=1)
    ase_opt = LBFGS(
        ref,
        maxstep=settings.maxstep,
        memory=settings.memory,
        damping=settings.damping,
        alpha=settings.alpha,
        logfile=None,
    )
    expected = [ref.get_positions().copy() for _ in ase_opt.irun(fmax=0.0, steps=20)]
    assert len(expected) == 21  # the initial structure, then one entry per step

    ours = solo_run(make_slab("Cu", (2, 2, 3), "O", "fcc", seed=1), settings, steps=20)
    for k, pos in enumerate(ours, start=1):
        np.testing.assert_allclose(pos.numpy(), expected[k], rtol=0, atol=1e-6, err_msg=f"{k}")
    assert not np.allclose(expected[20], expected[0], atol=0.05)  # the structure really moved


def test_batched_equals_one_by_one() -> None:
    batch = systems()
    opt = BatchedLBFGS(WRAPS)
    opt.add_systems(torch.tensor([len(a) for a in batch]))
    pos, fixed = initial(batch)
    for _ in range(15):
        pos = opt.step(pos, emt_forces(batch, pos), fixed)
    assert opt.iterations.tolist() == [15, 15, 15]

    solo = torch.cat([solo_run(a, WRAPS, steps=15)[-1] for a in systems()])
    torch.testing.assert_close(pos, solo, rtol=0, atol=1e-10)


@pytest.mark.parametrize("settings", [OCP, WRAPS], ids=["ocp", "wraps"])
def test_keep_and_add_systems_continue_exactly(settings: LBFGSSettings) -> None:
    batch = systems()
    opt = BatchedLBFGS(settings)
    opt.add_systems(torch.tensor([len(a) for a in batch]))
    pos, fixed = initial(batch)
    for _ in range(5):
        pos = opt.step(pos, emt_forces(batch, pos), fixed)

    keep = torch.tensor([True, False, True])
    opt.keep_systems(keep)
    atom_keep = keep.repeat_interleave(torch.tensor([len(a) for a in batch]))
    pos, fixed = pos[atom_keep], fixed[atom_keep]
    new = make_slab("Cu", (3, 3, 3), "N", "hcp", seed=4)
    batch = [batch[0], batch[2], new]
    opt.add_systems(torch.tensor([len(new)]))
    new_pos, new_fixed = initial([new])
    pos, fixed = torch.cat([pos, new_pos]), torch.cat([fixed, new_fixed])
    assert opt.natoms.tolist() == [len(a) for a in batch]
    assert opt.iterations.tolist() == [5, 5, 0]

    for _ in range(10):
        pos = opt.step(pos, emt_forces(batch, pos), fixed)
    assert opt.iterations.tolist() == [15, 15, 10]

    a, c = systems()[0], systems()[2]
    fresh = make_slab("Cu", (3, 3, 3), "N", "hcp", seed=4)
    expected = [solo_run(a, settings, 15)[-1], solo_run(c, settings, 15)[-1]]
    expected.append(solo_run(fresh, settings, 10)[-1])
    torch.testing.assert_close(pos, torch.cat(expected), rtol=0, atol=1e-10)


def test_zero_forces_give_zero_finite_steps() -> None:
    opt = BatchedLBFGS(OCP)
    opt.add_systems(torch.tensor([4, 3]))
    pos = torch.rand(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for _ in range(6):  # s = 0, y = 0 pairs after the first step
        new = opt.step(pos, torch.zeros(7, 3))
        assert torch.isfinite(new).all()
        assert torch.equal(new, pos)

    # The same positions and forces twice: a zero pair (y.s = 0) is ignored, not a NaN.
    opt = BatchedLBFGS(WRAPS)
    opt.add_systems(torch.tensor([7]))
    forces = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    first = opt.step(pos, forces)
    for _ in range(4):
        torch.testing.assert_close(opt.step(pos, forces), first, rtol=0, atol=0)


def test_fixed_atoms_never_move_and_positions_are_not_wrapped() -> None:
    batch = [make_slab("Pt", (2, 2, 4), "H", "hcp", seed=2)]
    opt = BatchedLBFGS(WRAPS)
    opt.add_systems(torch.tensor([len(batch[0])]))
    pos0, fixed = initial(batch)
    assert fixed.sum() == 4
    pos = pos0
    for _ in range(30):
        unconstrained = torch.from_numpy(batch[0].get_forces(apply_constraint=False))
        pos = opt.step(pos, unconstrained, fixed)
        batch[0].set_positions(pos.numpy(), apply_constraint=False)
    assert torch.equal(pos[fixed], pos0[fixed])
    assert not torch.allclose(pos[~fixed], pos0[~fixed])
    # Even if the caller moved them (so their s != 0 in the history), fixed atoms stay put.
    moved = pos.clone()
    moved[fixed] += 0.1
    forces = torch.from_numpy(batch[0].get_forces(apply_constraint=False))
    assert torch.equal(opt.step(moved, forces, fixed)[fixed], moved[fixed])

    # A free atom 0.01 A inside the cell edge, pushed out by a constant force: it leaves the cell.
    atoms = Atoms("Cu2", positions=[[4.99, 1.0, 1.0], [1.0, 1.0, 1.0]], cell=[5, 5, 5], pbc=True)
    opt = BatchedLBFGS(OCP)
    opt.add_systems(torch.tensor([2]))
    pos = torch.from_numpy(atoms.get_positions())
    push = torch.tensor([[10.0, 0.0, 0.0], [-10.0, 0.0, 0.0]])
    for _ in range(10):
        pos = opt.step(pos, push, torch.tensor([False, True]))
    assert pos[0, 0].item() == pytest.approx(4.99 + 10 * OCP.maxstep)
    assert pos[1].tolist() == [1.0, 1.0, 1.0]


def test_step_limit_is_per_system() -> None:
    gen = torch.Generator().manual_seed(2)
    opt = BatchedLBFGS(WRAPS)
    opt.add_systems(torch.tensor([5, 4]))
    tiny_opt = BatchedLBFGS(WRAPS)
    tiny_opt.add_systems(torch.tensor([4]))
    pos = torch.rand(9, 3, dtype=torch.float64, generator=gen) * 5
    for _ in range(4):
        forces = torch.randn(9, 3, dtype=torch.float64, generator=gen)
        forces[:5] *= 1e3  # huge: this system's step is clipped to maxstep
        forces[5:] *= 1e-3  # tiny: this system's step is left alone
        new = opt.step(pos, forces)
        largest = (new - pos)[:5].norm(dim=1).max().item()
        assert largest == pytest.approx(WRAPS.maxstep * WRAPS.damping, rel=1e-12)
        torch.testing.assert_close(new[5:], tiny_opt.step(pos[5:], forces[5:]), rtol=0, atol=0)
        assert (new - pos)[5:].norm(dim=1).max().item() < 1e-3
        pos = new


def test_bad_input_raises_value_error() -> None:
    opt = BatchedLBFGS(OCP)
    opt.add_systems(torch.tensor([5, 7]))
    assert (opt.n_systems, opt.natoms.tolist()) == (2, [5, 7])
    with pytest.raises(ValueError, match=r"pos .*12 atoms"):
        opt.step(torch.zeros(10, 3), torch.zeros(12, 3))
    with pytest.raises(ValueError, match="forces"):
        opt.step(torch.zeros(12, 3), torch.zeros(12, 2))
    with pytest.raises(ValueError, match="fixed"):
        opt.step(torch.zeros(12, 3), torch.zeros(12, 3), torch.zeros(11, dtype=torch.bool))
    with pytest.raises(ValueError, match="keep"):
        opt.keep_systems(torch.tensor([True]))
    with pytest.raises(ValueError, match="natoms"):
        opt.add_systems(torch.tensor([2.0]))
    with pytest.raises(ValueError, match="at least one atom"):
        opt.add_systems(torch.tensor([3, 0]))
    for field, bad in [("memory", 0), ("maxstep", 0.0), ("damping", -1.0), ("alpha", 0.0)]:
        with pytest.raises(ValueError, match=field):
            LBFGSSettings(**{field: bad})
