"""Relaxation throughput: catforge's batched LBFGS vs ASE's LBFGS on the same model, one by one.

Builds ``--systems`` OC20-sized slabs (fcc111 4x4x4 and fcc100 5x5x3 of Pt, Cu, Pd, Au, Ag, Ni, 66
to 84 atoms with the adsorbate, vacuum 10 A, pbc on all three axes as in OC20, OC20 tags, the
bottom two metal layers fixed with FixAtoms, free atoms rattled by 0.05 A) and relaxes
every one of them with one SchNet force model (random seeded weights with the sizes of
configs/demo/s2ef_schnet.yml, or of configs/ocp_s2ef/schnet.yml with ``--size ocp``, or a trained
``--checkpoint``; the graph is rebuilt on every call) in these ways:

- ``ase.optimize.LBFGS`` driving catforge's ASE calculator (``CatforgeCalculator``), one system
  after the other, always on the CPU: the reference;
- ``catforge.relax.driver.relax`` with ``batch_size=1`` (the same one-by-one work through
  catforge's loop: separates the gain of batching from per-step overhead);
- ``catforge.relax.driver.relax`` with each ``--batch-size`` (default 32), on ``--device``.

Both optimizers use the same LBFGS settings (OCP's: maxstep 0.04 A, memory 50, damping 1, alpha
70) with ``fmax=0`` and a fixed ``--steps``, so every system takes exactly ``steps`` steps and
``steps + 1`` force calls on each side (the counted calls are printed). Timings are medians over
``--repeats`` interleaved rounds after a short warm-up round. The table gives systems/s, ms per
model call (one call evaluates a whole batch), ms per force evaluation of one system and the
speed-up over ASE in the same run. Then the first system's final positions from catforge (batch 1)
and ASE are compared, and each batched run with batch 1 (max |diff|, A). ``--profile`` runs every
method once more and splits its time into neighbour search, the rest of the model call, the
optimizer step and everything else. Run (about 2 minutes on 2 CPU cores):

    python benchmarks/relax.py [--systems 32] [--batch-size 32 [8 ...]] [--steps 50]
        [--threads 2] [--size demo|ocp | --checkpoint PATH] [--device cuda] [--profile]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.build import add_adsorbate, fcc100, fcc111, molecule
from ase.constraints import FixAtoms
from ase.optimize import LBFGS

import catforge.data.neighbors
from catforge.assemble.models import force_model, load_potential
from catforge.calculator import CatforgeCalculator
from catforge.data.atoms import atoms_to_graph
from catforge.data.graph import AtomicGraph
from catforge.models.forces import ModelOutput
from catforge.models.schnet import SchNet
from catforge.potential.targets import TargetTransform
from catforge.potential.trained import Potential
from catforge.relax.driver import RelaxSettings, relax
from catforge.relax.lbfgs import BatchedLBFGS, LBFGSSettings

METALS = ("Pt", "Cu", "Pd", "Au", "Ag", "Ni")
ADSORBATES = ("CH3OH", "CO", "OH", "H2O", "NH3", "CH3CH2OH", "CH4", "NO")
# Model blocks: configs/demo/s2ef_schnet.yml and configs/ocp_s2ef/schnet.yml (graph built on the
# fly in both, as a relaxation must: the driver and the calculator pass graphs without edges).
SIZES = {
    "demo": {"hidden_channels": 64, "num_filters": 64, "num_gaussians": 50},
    "ocp": {"hidden_channels": 1024, "num_filters": 256, "num_gaussians": 200},
}
COMMON = {"num_interactions": 3, "cutoff": 6.0, "use_pbc": True, "otf_graph": True}


def build_slabs(count: int, seed: int) -> list[Atoms]:
    """``count`` different OC20-sized slabs (66-84 atoms), bottom two layers fixed, rattled."""
    rng = np.random.default_rng(seed)
    slabs = []
    for index in range(count):
        metal = METALS[index % len(METALS)]
        if index % 2 == 0:
            slab = fcc111(metal, (4, 4, 4), vacuum=10.0)
        else:
            slab = fcc100(metal, (5, 5, 3), vacuum=10.0)
        layers = int(slab.get_tags().max())  # ase.build tags layers 1 (top) .. layers (bottom)
        fixed = slab.get_tags() > layers // 2
        tags = np.where(fixed, 0, 1)  # OC20: 0 fixed subsurface, 1 surface, 2 adsorbate
        slab.set_tags(tags)
        adsorbate = molecule(ADSORBATES[index % len(ADSORBATES)])
        adsorbate.set_tags(2)
        add_adsorbate(slab, adsorbate, 2.0, "ontop")
        slab.set_constraint(FixAtoms(mask=np.r_[fixed, np.zeros(len(adsorbate), bool)]))
        slab.rattle(0.05, seed=int(rng.integers(1 << 31)))  # moves the free atoms only
        slab.pbc = True
        slabs.append(slab)
    return slabs


class CountingForceField:
    """A force field that counts how many structures it evaluated (and its calls)."""

    def __init__(self, potential: Potential) -> None:
        self.potential = potential
        self.device = potential.device
        self.systems = 0
        self.calls = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.potential.dtype

    def __call__(self, graph: AtomicGraph) -> ModelOutput:
        self.calls += 1
        self.systems += graph.n_graphs
        return self.potential(graph)


class CountingCalculator(CatforgeCalculator):
    """catforge's ASE calculator, counting the model evaluations it runs."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls = 0

    def calculate(self, *args: Any, **kwargs: Any) -> None:
        self.calls += 1
        super().calculate(*args, **kwargs)


class Method:
    """One way to relax all systems: ``run(steps)`` returns (model calls, system evaluations,
    final positions of every system in input order)."""

    def __init__(self, name: str, run: Callable[[int], tuple[int, int, list[np.ndarray]]]) -> None:
        self.name = name
        self.run = run
        self.times: list[float] = []
        self.calls = 0
        self.evaluations = 0
        self.positions: list[np.ndarray] = []


def ase_method(slabs: list[Atoms], potential: Potential, lbfgs: LBFGSSettings) -> Method:
    def run(steps: int) -> tuple[int, int, list[np.ndarray]]:
        calls, positions = 0, []
        for slab in slabs:
            atoms = slab.copy()
            calculator = CountingCalculator(potential=potential)
            atoms.calc = calculator
            optimizer = LBFGS(
                atoms,
                logfile=None,  # type: ignore[arg-type]  # ASE accepts None (no log)
                maxstep=lbfgs.maxstep,
                memory=lbfgs.memory,
                damping=lbfgs.damping,
                alpha=lbfgs.alpha,
            )
            optimizer.run(fmax=0.0, steps=steps)
            calls += calculator.calls
            positions.append(atoms.positions.copy())
        return calls, calls, positions

    return Method("ASE LBFGS + CatforgeCalculator, 1 by 1 (cpu)", run)


def catforge_method(
    graphs: list[AtomicGraph], potential: Potential, lbfgs: LBFGSSettings, batch_size: int
) -> Method:
    synchronize = torch.cuda.synchronize if potential.device.type == "cuda" else lambda: None

    def run(steps: int) -> tuple[int, int, list[np.ndarray]]:
        force_field = CountingForceField(potential)
        settings = RelaxSettings(steps=steps, fmax=0.0, batch_size=batch_size, lbfgs=lbfgs)
        results = sorted(relax(force_field, graphs, settings), key=lambda result: result.index)
        synchronize()
        positions = [result.final.positions for result in results]
        return force_field.calls, force_field.systems, positions

    name = f"catforge relax, batch {batch_size} ({potential.device.type})"
    return Method(name, run)


def load_potentials(args: argparse.Namespace) -> tuple[Potential, Potential]:
    """The model on the CPU (for ASE) and on ``--device`` (for catforge): the same weights, random
    (seeded) or the checkpoint's."""
    if args.checkpoint:
        cpu = load_potential(args.checkpoint, device="cpu")
        if torch.device(args.device) == cpu.device:
            return cpu, cpu
        return cpu, load_potential(args.checkpoint, device=args.device)
    torch.manual_seed(args.seed)
    model = force_model(SchNet(**SIZES[args.size], **COMMON))
    cpu = Potential(model, TargetTransform(), "cpu")
    if torch.device(args.device) == cpu.device:
        return cpu, cpu
    # A copy: Potential moves the model it is given.
    return cpu, Potential(copy.deepcopy(model), TargetTransform(), args.device)


@contextmanager
def timed(owner: object, name: str, totals: dict[str, float], key: str) -> Iterator[None]:
    """Patch ``owner.name`` to add its wall time to ``totals[key]`` while inside the block
    (synchronising CUDA first, so the time of its kernels is counted)."""
    original = getattr(owner, name)

    def wrapper(*args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            if torch.cuda.is_initialized():
                torch.cuda.synchronize()
            totals[key] += time.perf_counter() - start

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


def profile(methods: list[Method], steps: int) -> None:
    """Where one run of each method spends its time, as a table with one column per method."""
    parts = {
        "neighbour search (radius_graph_pbc)": "neighbours",
        "model forward + forces (rest of Potential call)": "model",
        "optimizer step (BatchedLBFGS / ase LBFGS)": "optimizer",
        "everything else (driver or ASE, graph building)": "other",
    }
    columns = []
    for method in methods:
        totals = dict.fromkeys(("neighbours", "model", "optimizer"), 0.0)
        with (
            timed(catforge.data.neighbors, "radius_graph_pbc", totals, "neighbours"),
            timed(Potential, "__call__", totals, "model"),
            timed(BatchedLBFGS, "step", totals, "optimizer"),
            timed(LBFGS, "step", totals, "optimizer"),
        ):
            start = time.perf_counter()
            method.run(steps)
            total = time.perf_counter() - start
        totals["model"] -= totals["neighbours"]
        totals["other"] = total - totals["model"] - totals["neighbours"] - totals["optimizer"]
        columns.append((total, totals))
    print("\nProfile, one run each (s, share of the run):\n")
    print("| part | " + " | ".join(method.name for method in methods) + " |")
    print("|---" + "|---:" * len(methods) + "|")
    for label, key in parts.items():
        cells = [f"{totals[key]:.2f} ({totals[key] / total:.0%})" for total, totals in columns]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("| total | " + " | ".join(f"{total:.2f}" for total, _ in columns) + " |")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", type=int, default=32, help="slabs to relax")
    parser.add_argument(
        "--batch-size", type=int, nargs="+", default=[32], help="catforge systems in flight (rows)"
    )
    parser.add_argument("--steps", type=int, default=50, help="LBFGS steps per system (fmax 0)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--size", choices=sorted(SIZES), default="demo", help="SchNet sizes")
    parser.add_argument("--checkpoint", help="a trained catforge checkpoint instead of --size")
    parser.add_argument("--device", default="cpu", help="device of the catforge side, e.g. cuda")
    parser.add_argument("--profile", action="store_true", help="split each method's time")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available to this torch build")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    slabs = build_slabs(args.systems, args.seed)
    # float64 graphs: catforge starts from the very positions ASE starts from (atoms_to_graph's
    # default float32 would round them by ~1e-6 A, which 50 steps of a float32 model amplify).
    graphs = [
        atoms_to_graph(slab, sid=index, with_labels=False, float_dtype=torch.float64)
        for index, slab in enumerate(slabs)
    ]
    cpu_potential, potential = load_potentials(args)
    lbfgs = LBFGSSettings(maxstep=0.04, memory=50, damping=1.0, alpha=70.0)
    methods = [ase_method(slabs, cpu_potential, lbfgs)]
    for batch_size in dict.fromkeys([1, *args.batch_size]):
        methods.append(catforge_method(graphs, potential, lbfgs, batch_size))
    for method in methods:  # warm-up: allocator, thread pools, CUDA kernels, first-call paths
        method.run(2)
    for _ in range(args.repeats):  # interleaved, so load from other processes hits all alike
        for method in methods:
            start = time.perf_counter()
            method.calls, method.evaluations, method.positions = method.run(args.steps)
            method.times.append(time.perf_counter() - start)

    model = f"checkpoint {args.checkpoint}" if args.checkpoint else f"random SchNet ({args.size})"
    natoms = np.array([len(slab) for slab in slabs])
    n_fixed = sum(len(slab.constraints[0].get_indices()) for slab in slabs)
    n_params = sum(parameter.numel() for parameter in cpu_potential.model.parameters())
    print(
        f"{args.systems} slabs, {natoms.min()}-{natoms.max()} atoms ({natoms.mean():.1f} on "
        f"average, {n_fixed / args.systems:.1f} fixed); {model}, {n_params:,} parameters, "
        f"{cpu_potential.dtype}; {lbfgs}, fmax 0, {args.steps} steps; "
        f"torch.set_num_threads({args.threads}); catforge on {args.device}; median of "
        f"{args.repeats} rounds; torch {torch.__version__}\n"
    )
    reference = statistics.median(methods[0].times)
    print(
        "| method | s (median) | systems/s | ms / model call | ms / (call x system) "
        "| force calls / system | speed-up vs ASE |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method in methods:
        seconds = statistics.median(method.times)
        print(
            f"| {method.name} | {seconds:.2f} | {args.systems / seconds:.2f} "
            f"| {seconds * 1e3 / method.calls:.2f} | {seconds * 1e3 / method.evaluations:.3f} "
            f"| {method.evaluations / args.systems:.1f} | {reference / seconds:.2f}x |"
        )
    ase_final, one_final = methods[0].positions[0], methods[1].positions[0]
    moved = np.abs(ase_final - slabs[0].positions).max()
    print(
        f"\nsystem 0: max |catforge batch 1 - ASE| = {np.abs(one_final - ase_final).max():.2e} A "
        f"(atoms moved up to {moved:.3f} A)"
    )
    for method in methods[2:]:
        difference = max(
            np.abs(one - many).max()
            for one, many in zip(methods[1].positions, method.positions, strict=True)
        )
        print(f"all systems: max |{method.name} - batch 1| = {difference:.2e} A")
    if args.profile:
        profile(methods, args.steps)


if __name__ == "__main__":
    main()
