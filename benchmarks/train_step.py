"""S2EF training-step speed: catforge SchNet vs torch_geometric's SchNet, same weights and graph.

Builds OC20-sized slabs (Pt/Cu fcc111 4x4x5 + CO/OH, 82-83 atoms, periodic, rattled, EMT-labelled),
precomputes their graph once (cutoff 6 A, at most 50 neighbours), and times one full S2EF training
step at OCP's S2EF-200k SchNet sizes (hidden 1024, filters 256, 3 interactions, 200 Gaussians,
cutoff 6): forward energy + forces by autograd with ``create_graph=True``, L1 loss on energy and
forces, backward, AdamW step. PyG's SchNet is driven through its own modules (embedding, Gaussian
smearing, interaction blocks with CFConv, head) with the precomputed ``edge_index`` and the PBC
distances computed as OCP's ``get_pbc_distances`` does, so no torch_cluster is needed. Both models
start from the same state dict; the first-step losses are printed to show they compute the same.

Prints s/step and structures/s (median over steps, implementations interleaved so load from other
processes hits all alike) and the speed ratio to PyG, by median and by fastest step; with
``--ablations`` also catforge without pair sharing and with ``loss.backward(inputs=parameters)``
(no gradient to the positions leaf; a trainer-side saving PyG/OCP could make too). Run:
``python benchmarks/train_step.py [--batch-size 8] [--steps 5] [--threads 2] [--ablations]
[--device cuda]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from ase.build import add_adsorbate, fcc111, molecule
from ase.calculators.emt import EMT
from torch import Tensor, nn

from catforge.data.atoms import atoms_to_graph
from catforge.data.collate import collate
from catforge.data.graph import AtomicGraph
from catforge.data.neighbors import radius_graph_pbc
from catforge.models import ForceModel, SchNet

SIZES = {
    "hidden_channels": 1024,
    "num_filters": 256,
    "num_interactions": 3,
    "num_gaussians": 200,
    "cutoff": 6.0,
}
Step = Callable[[], float]


def oc20_like_batch(batch_size: int, seed: int = 0) -> AtomicGraph:
    """``batch_size`` rattled, EMT-labelled slabs with adsorbates and a precomputed graph."""
    rng = np.random.default_rng(seed)
    graphs = []
    for index in range(batch_size):
        metal, adsorbate = [("Pt", "CO"), ("Cu", "OH")][index % 2]
        slab = fcc111(metal, size=(4, 4, 5), vacuum=7.0)
        add_adsorbate(slab, molecule(adsorbate), 1.8, "fcc")
        slab.rattle(0.05, seed=int(rng.integers(1 << 30)))
        slab.calc = EMT()
        slab.get_forces()
        graph = radius_graph_pbc(atoms_to_graph(slab, sid=index), SIZES["cutoff"], 50)
        graphs.append(graph)
    return collate(graphs)


def s2ef_loss(energy: Tensor, forces: Tensor, batch: AtomicGraph) -> Tensor:
    """OCP's default S2EF loss: L1 energy + 100 x L1 forces (means)."""
    assert batch.y is not None and batch.force is not None
    return (energy - batch.y).abs().mean() + 100.0 * (forces - batch.force).abs().mean()


def catforge_step(model: ForceModel, batch: AtomicGraph, only_parameters: bool = False) -> Step:
    """One step; ``only_parameters`` backpropagates to the parameters alone (not to positions)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    inputs = list(model.parameters()) if only_parameters else None

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        out = model(batch, training=True)
        assert out.forces is not None
        loss = s2ef_loss(out.energy, out.forces, batch)
        loss.backward(inputs=inputs)
        optimizer.step()
        return float(loss.detach())

    return step


def pbc_distances(batch: AtomicGraph, pos: Tensor) -> tuple[Tensor, Tensor]:
    """OCP's ``get_pbc_distances``: edges (2, E') and distances (E',), zero-length edges dropped."""
    assert batch.edge_index is not None and batch.cell_offsets is not None
    assert batch.neighbors is not None
    row, col = batch.edge_index
    cell = torch.repeat_interleave(batch.cell, batch.neighbors, dim=0)
    offsets = batch.cell_offsets.unsqueeze(1).to(cell.dtype).bmm(cell).squeeze(1)
    distances = (pos[row] - pos[col] + offsets).norm(dim=-1)
    nonzero = torch.arange(len(distances), device=distances.device)[distances != 0]
    return batch.edge_index[:, nonzero], distances[nonzero]


def pyg_energy(model: nn.Module, batch: AtomicGraph, pos: Tensor) -> Tensor:
    """PyG SchNet's forward with the precomputed PBC graph instead of its radius_graph."""
    edge_index, distance = pbc_distances(batch, pos)
    h = model.embedding(batch.atomic_numbers)
    edge_attr = model.distance_expansion(distance)
    for interaction in model.interactions:
        h = h + interaction(h, edge_index, distance, edge_attr)
    h = model.lin2(model.act(model.lin1(h)))
    energy = torch.zeros(batch.n_graphs, dtype=h.dtype, device=h.device)
    return energy.index_add_(0, batch.batch, h.squeeze(-1))


def pyg_step(model: nn.Module, batch: AtomicGraph) -> Step:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        pos = batch.pos.detach().requires_grad_(True)
        energy = pyg_energy(model, batch, pos)
        (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=True)
        loss = s2ef_loss(energy, -grad, batch)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def build_steps(batch: AtomicGraph, ablations: bool) -> dict[str, Step]:
    """Training steps by name, every model starting from the same PyG-initialised weights."""
    from torch_geometric.nn.models import SchNet as PygSchNet

    torch.manual_seed(0)
    reference = PygSchNet(**SIZES).to(batch.pos.device)
    state = {key: value.clone() for key, value in reference.state_dict().items()}
    variants: dict[str, tuple[dict[str, bool], bool]] = {"catforge": ({}, False)}
    if ablations:
        variants["catforge, no pair sharing"] = ({"share_pair_filters": False}, False)
        variants["catforge, backward(inputs=)"] = ({}, True)
    steps: dict[str, Step] = {}
    for name, (options, only_parameters) in variants.items():
        model = ForceModel(SchNet(**SIZES, max_neighbors=50, **options))
        model.load_state_dict(state, strict=True)
        model.to(batch.pos.device)
        steps[name] = catforge_step(model, batch, only_parameters)
    steps["torch_geometric"] = pyg_step(reference, batch)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ablations", action="store_true", help="also time catforge variants")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    batch = oc20_like_batch(args.batch_size).to(args.device)
    synchronize = torch.cuda.synchronize if batch.pos.is_cuda else lambda: None
    print(
        f"batch: {batch.n_graphs} structures, {batch.n_atoms} atoms, {batch.n_edges} edges; "
        f"SchNet {SIZES}; {args.threads} threads; {args.device}; torch {torch.__version__}"
    )
    steps = build_steps(batch, args.ablations)
    times: dict[str, list[float]] = {name: [] for name in steps}
    first_loss = {name: step() for name, step in steps.items()}
    for _ in range(args.warmup - 1):
        for step in steps.values():
            step()
    for _ in range(args.steps):
        for name, step in steps.items():
            synchronize()
            start = time.perf_counter()
            step()
            synchronize()
            times[name].append(time.perf_counter() - start)

    print(
        f"\n{'implementation':<28} {'first loss':>11} {'s/step':>7} {'structures/s':>13} "
        f"{'ratio':>6} {'min s/step':>10} {'ratio':>6}"
    )
    reference_median = statistics.median(times["torch_geometric"])
    reference_min = min(times["torch_geometric"])
    for name, values in times.items():
        median, fastest = statistics.median(values), min(values)
        print(
            f"{name:<28} {first_loss[name]:>11.5f} {median:>7.3f} {batch.n_graphs / median:>13.2f} "
            f"{reference_median / median:>6.2f} {fastest:>10.3f} {reference_min / fastest:>6.2f}"
        )


if __name__ == "__main__":
    main()
