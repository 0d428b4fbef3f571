"""Benchmark the neighbour search on OC20-like slabs: ASE, raw vesin, and catforge's two paths.

Builds ``--structures`` different slabs (fcc111/fcc100 of Pt, Cu, Pd, Au, Ag, Ni, 4 layers or as
many as ``--natoms`` asks, vacuum 10 A, an adsorbate, rattled, pbc on all three axes as in OC20)
and prints milliseconds per structure (median over ``--repeats`` interleaved rounds). "time /
vesin" compares with raw vesin's full list (the edges catforge returns); ``neighbor_list_cpu``
asks vesin for the cheaper half list (each pair once) and mirrors it.

    PYTHONPATH=src python benchmarks/neighbors.py --repeats 20 --natoms 75
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import vesin
from ase import Atoms
from ase.build import add_adsorbate, fcc100, fcc111, molecule
from ase.neighborlist import neighbor_list

from catforge.data.atoms import atoms_to_graph
from catforge.data.collate import collate
from catforge.data.neighbors import neighbor_list_cpu, radius_graph_pbc

METALS = ("Pt", "Cu", "Pd", "Au", "Ag", "Ni")
ADSORBATES = ("CH3OH", "CO", "OH", "H2O", "NH3", "CH3CH2OH")


def build_slabs(count: int, natoms: int, seed: int) -> list[Atoms]:
    """``count`` different OC20-like slabs of about ``natoms`` atoms each."""
    rng = np.random.default_rng(seed)
    slabs = []
    for index in range(count):
        adsorbate = molecule(ADSORBATES[index % len(ADSORBATES)])
        side = 4 if natoms >= 50 else 3
        layers = max(2, round((natoms - len(adsorbate)) / side**2))
        build = fcc111 if index % 2 == 0 else fcc100
        slab = build(METALS[index % len(METALS)], (side, side, layers), vacuum=10.0)
        add_adsorbate(slab, adsorbate, 2.0, "ontop")
        slab.rattle(0.05, seed=int(rng.integers(1 << 31)))
        slab.pbc = True
        slabs.append(slab)
    return slabs


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds (median reported)")
    parser.add_argument("--natoms", type=int, default=75, help="approximate atoms per slab")
    parser.add_argument("--structures", type=int, default=32, help="slabs (and batch size)")
    parser.add_argument("--cutoff", type=float, default=6.0, help="cutoff radius in A")
    parser.add_argument("--max-neighbors", type=int, default=50, help="neighbour cap per atom")
    parser.add_argument("--threads", type=int, default=1, help="torch and vesin CPU threads")
    parser.add_argument("--ase-every", type=int, default=5, help="time ASE every n-th round only")
    parser.add_argument("--device", default="cpu", help="device of the torch path, e.g. cuda")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def methods(args: argparse.Namespace, slabs: list[Atoms]) -> dict[str, Callable[[], object]]:
    """Name -> a call that processes every slab once."""
    cutoff, cap = args.cutoff, args.max_neighbors
    arrays = [(a.positions, a.cell.array, a.pbc) for a in slabs]
    graphs = [atoms_to_graph(a, with_labels=False).to(args.device) for a in slabs]
    batch = collate([atoms_to_graph(a, with_labels=False) for a in slabs]).to(args.device)
    sync = torch.cuda.synchronize if batch.pos.is_cuda else (lambda: None)

    def raw_vesin(full_list: bool = True, quantities: str = "ijSd") -> None:
        for positions, cell, pbc in arrays:
            calculator = vesin.NeighborList(
                cutoff=cutoff, full_list=full_list, n_threads=args.threads
            )
            calculator.compute(positions, cell, pbc, quantities=quantities)

    def torch_single() -> None:
        for graph in graphs:
            radius_graph_pbc(graph, cutoff, cap)
        sync()

    def torch_batched() -> None:
        radius_graph_pbc(batch, cutoff, cap)
        sync()

    return {
        "ase.neighborlist.neighbor_list": lambda: [neighbor_list("ijS", a, cutoff) for a in slabs],
        "vesin (raw, ijSd)": raw_vesin,
        "vesin (raw, half list, PSd)": lambda: raw_vesin(full_list=False, quantities="PSd"),
        "catforge neighbor_list_cpu": lambda: [neighbor_list_cpu(*x, cutoff, cap) for x in arrays],
        f"catforge radius_graph_pbc x1 ({args.device})": torch_single,
        f"catforge radius_graph_pbc x{len(slabs)} ({args.device})": torch_batched,
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    slabs = build_slabs(args.structures, args.natoms, args.seed)
    calls = methods(args, slabs)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()  # warm-up
    for round_index in range(args.repeats):
        for name, call in calls.items():
            if name.startswith("ase") and round_index % args.ase_every:
                continue
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1e3 / len(slabs))
    ms = {name: statistics.median(values) for name, values in times.items()}
    ase_ms, vesin_ms = ms["ase.neighborlist.neighbor_list"], ms["vesin (raw, ijSd)"]
    natoms = np.mean([len(a) for a in slabs])
    print(
        f"{len(slabs)} slabs, {natoms:.1f} atoms on average, cutoff {args.cutoff} A, cap "
        f"{args.max_neighbors}; torch.set_num_threads({args.threads}), vesin n_threads="
        f"{args.threads}; median of {args.repeats} rounds (ASE: every {args.ase_every}th)"
    )
    print(f"{'method':<40} {'ms/structure':>12} {'speed-up vs ase':>16} {'time / vesin':>13}")
    for name, value in ms.items():
        print(f"{name:<40} {value:>12.3f} {ase_ms / value:>15.1f}x {value / vesin_ms:>12.2f}x")


if __name__ == "__main__":
    main()
