"""The batched relaxation driver: ASE equivalence, independence, refill, fixed atoms, stopping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.emt import EMT
from ase.optimize import LBFGS

from catforge.assemble.models import force_model
from catforge.data.atoms import atoms_to_graph, graph_to_atoms
from catforge.data.graph import AtomicGraph
from catforge.data.lmdb import LmdbDataset
from catforge.models.forces import ModelOutput
from catforge.models.schnet import SchNet
from catforge.potential.targets import TargetTransform
from catforge.potential.trained import Potential
from catforge.relax.driver import Frame, FrameObserver, RelaxResult, RelaxSettings, relax
from catforge.relax.forcefields import AseForceField, ForceField
from catforge.relax.lbfgs import LBFGSSettings
from catforge.relax.results import relaxation_metrics
from tests.factories import emt_slab

OCP_LBFGS = LBFGSSettings(maxstep=0.04, memory=50, damping=1.0, alpha=70.0)
ASE_LBFGS = LBFGSSettings(maxstep=0.2, memory=100, damping=1.0, alpha=70.0)  # ase defaults


def slabs() -> list[AtomicGraph]:
    """Four differently sized EMT slabs, rattled, bottom layer fixed."""
    atoms = [
        emt_slab("Cu", "O", seed=1, labelled=False),
        emt_slab("Pt", "CO", facet="100", seed=2, labelled=False),
        emt_slab("Au", "H", size=(3, 2, 3), seed=3, labelled=False),
        emt_slab("Ni", "N", seed=4, labelled=False),
    ]
    for item in atoms:
        item.rattle(0.15, seed=5)
    return [atoms_to_graph(item, sid=index) for index, item in enumerate(atoms)]


def emt() -> AseForceField:
    return AseForceField(EMT)


def run(
    force_field: ForceField,
    graphs: list[AtomicGraph],
    settings: RelaxSettings,
    observer: FrameObserver | None = None,
) -> list[RelaxResult]:
    return sorted(relax(force_field, graphs, settings, observer), key=lambda item: item.index)


def ase_relax(
    graph: AtomicGraph, lbfgs: LBFGSSettings, fmax: float, steps: int
) -> tuple[Atoms, int, bool]:
    atoms = graph_to_atoms(graph)
    atoms.calc = EMT()
    optimizer = LBFGS(atoms, logfile=None, maxstep=lbfgs.maxstep, memory=lbfgs.memory,
                      damping=lbfgs.damping, alpha=lbfgs.alpha)  # fmt: skip
    converged = optimizer.run(fmax=fmax, steps=steps)
    return atoms, optimizer.nsteps, bool(converged)


@pytest.mark.parametrize("lbfgs", [OCP_LBFGS, ASE_LBFGS], ids=["ocp", "ase"])
def test_matches_ase_lbfgs_run_per_system(lbfgs: LBFGSSettings) -> None:
    graphs = slabs()
    results = run(emt(), graphs, RelaxSettings(steps=60, fmax=0.05, batch_size=3, lbfgs=lbfgs))
    for graph, result in zip(graphs, results, strict=True):
        atoms, nsteps, converged = ase_relax(graph, lbfgs, 0.05, 60)
        np.testing.assert_allclose(result.final.positions, atoms.positions, atol=1e-6)
        assert (result.steps, result.converged) == (nsteps, converged)
        assert result.final.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-6)


def test_batched_with_refill_equals_one_by_one() -> None:
    graphs = slabs()
    settings = RelaxSettings(steps=40, fmax=0.03, batch_size=1, lbfgs=OCP_LBFGS)
    alone = run(emt(), graphs, settings)
    for batch_size in (2, 4):
        together = run(emt(), graphs, RelaxSettings(40, 0.03, batch_size, OCP_LBFGS))
        for one, other in zip(alone, together, strict=True):
            np.testing.assert_allclose(other.final.positions, one.final.positions, atol=1e-10)
            assert (other.steps, other.converged) == (one.steps, one.converged)


def small_potential(seed: int = 0) -> Potential:
    torch.manual_seed(seed)
    model = SchNet(
        hidden_channels=16,
        num_filters=16,
        num_interactions=2,
        num_gaussians=20,
        cutoff=5.0,
        otf_graph=True,
    )
    return Potential(force_model(model).double(), TargetTransform())


def test_trained_model_batched_equals_alone() -> None:
    potential, graphs = small_potential(), slabs()
    settings = RelaxSettings(steps=10, fmax=0.0, batch_size=4, lbfgs=OCP_LBFGS)
    together = run(potential, graphs, settings)
    for graph, result in zip(graphs, together, strict=True):
        (alone,) = run(potential, [graph], settings)
        np.testing.assert_allclose(result.final.positions, alone.final.positions, atol=1e-8)
        assert result.final.energy == pytest.approx(alone.final.energy, abs=1e-8)


def test_fixed_atoms_never_move_and_positions_are_not_wrapped() -> None:
    graphs = slabs()
    results = run(small_potential(), graphs, RelaxSettings(20, 0.0, 4, OCP_LBFGS))
    for graph, result in zip(graphs, results, strict=True):
        fixed = graph.fixed.numpy()
        assert fixed.any()
        assert np.array_equal(result.final.positions[fixed], graph.pos.double().numpy()[fixed])
        assert not np.allclose(result.final.positions[~fixed], graph.pos.numpy()[~fixed])


class Recorder:
    """Frame observer keeping every frame per structure."""

    def __init__(self) -> None:
        self.frames: dict[int, list[Frame]] = {}

    def __call__(self, frame: Frame) -> None:
        self.frames.setdefault(frame.index, []).append(frame)


def test_a_converged_system_stops_and_frames_are_consistent() -> None:
    graphs, recorder = slabs(), Recorder()
    results = run(emt(), graphs, RelaxSettings(200, 0.05, 2, ASE_LBFGS), recorder)
    calculator = EMT()
    for graph, result in zip(graphs, results, strict=True):
        frames = recorder.frames[result.index]
        assert [frame.step for frame in frames] == list(range(result.steps + 1))
        assert result.converged and frames[-1] == result.final
        assert all(frame.fmax >= 0.05 for frame in frames[:-1]) and frames[-1].fmax < 0.05
        np.testing.assert_array_equal(frames[0].positions, graph.pos.double().numpy())
        # Each frame's energy belongs to its own positions.
        atoms = graph_to_atoms(graph)
        atoms.calc = calculator
        for frame in (frames[0], frames[len(frames) // 2], frames[-1]):
            atoms.set_positions(frame.positions, apply_constraint=False)
            assert frame.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-10)


class ZeroForces:
    device, dtype = torch.device("cpu"), torch.float64

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, graph: AtomicGraph) -> ModelOutput:
        self.calls += 1
        return ModelOutput(torch.zeros(graph.n_graphs), torch.zeros(graph.n_atoms, 3))


def test_zero_forces_converge_at_step_zero() -> None:
    graphs, field = slabs(), ZeroForces()
    results = run(field, graphs, RelaxSettings(50, 0.05, 2, OCP_LBFGS))
    assert [(r.steps, r.converged) for r in results] == [(0, True)] * 4
    assert field.calls == 2
    # fmax 0 never converges: every step is a zero step, which must stay finite.
    results = run(ZeroForces(), graphs, RelaxSettings(5, 0.0, 4, OCP_LBFGS))
    for graph, result in zip(graphs, results, strict=True):
        assert (result.steps, result.converged) == (5, False)
        np.testing.assert_array_equal(result.final.positions, graph.pos.double().numpy())


def test_steps_cap_and_zero_steps() -> None:
    graphs = slabs()[:2]
    field = ZeroForces()
    capped = run(small_potential(), graphs, RelaxSettings(3, 0.0, 2, OCP_LBFGS))
    assert [(r.steps, r.converged) for r in capped] == [(3, False), (3, False)]
    run(field, graphs, RelaxSettings(0, 0.0, 2, OCP_LBFGS))
    assert field.calls == 1


def test_energy_only_model_is_refused() -> None:
    torch.manual_seed(0)
    model = force_model(SchNet(hidden_channels=8, num_filters=8, num_gaussians=10), False)
    with pytest.raises(ValueError, match="forces"):
        run(Potential(model, TargetTransform()), slabs()[:1], RelaxSettings(3, 0.0, 1))


def test_emt_reproduces_the_demo_relaxations(demo: Path) -> None:
    dataset = LmdbDataset(demo / "is2re" / "val" / "data.lmdb")
    graphs = [dataset[index] for index in range(len(dataset))]
    results = run(emt(), graphs, RelaxSettings(300, 0.05, 8, ASE_LBFGS))
    totals = relaxation_metrics(results)
    assert totals is not None
    metrics = totals.compute()
    assert metrics["average_distance_within_threshold"] > 0.95
    assert all(result.converged for result in results)


def test_trained_model_steps_equal_ase_lbfgs_through_the_calculator() -> None:
    from catforge.calculator import CatforgeCalculator

    potential, graph = small_potential(seed=3), slabs()[1]
    recorder = Recorder()
    run(potential, [graph], RelaxSettings(20, 0.0, 1, OCP_LBFGS), recorder)
    atoms = graph_to_atoms(graph)
    atoms.calc = CatforgeCalculator(potential=potential)
    optimizer = LBFGS(atoms, logfile=None, maxstep=0.04, memory=50, damping=1.0, alpha=70.0)
    ase_positions = [atoms.positions.copy() for _ in optimizer.irun(fmax=0.0, steps=20)]
    ours = [frame.positions for frame in recorder.frames[0]]
    assert len(ours) == len(ase_positions) == 21
    for step, (mine, theirs) in enumerate(zip(ours, ase_positions, strict=True)):
        np.testing.assert_allclose(mine, theirs, atol=1e-6, err_msg=f"step {step}")
    assert not np.allclose(ours[-1], ours[0])


def test_relaxation_and_calculator_never_import_training() -> None:
    import subprocess
    import sys

    code = (
        "import sys, catforge.relax.run, catforge.calculator; "
        "print([m for m in sys.modules if m.startswith('catforge.training')])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
