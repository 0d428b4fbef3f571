"""SchNet as OCP uses it (PyG's ``SchNet`` layers), as an energy model over AtomicGraph batches.

Parameter names equal those of ``torch_geometric.nn.models.SchNet`` (and so OCP's ``SchNetWrap``),
including the buffer ``distance_expansion.offset`` and the alias ``interactions.k.conv.nn`` of
``interactions.k.mlp``, so their state dicts load with ``strict=True``. Initialisation is PyG's.

Speed (exact, no approximation): distances, the Gaussian basis and the cosine envelope are computed
once per forward and shared by all blocks, and only once per *pair* of reverse edges: ``j -> i``
(offset ``o``) and ``i -> j`` (offset ``-o``) have the same distance and hence the same filter, so
each block runs its filter network on the P ~ E/2 pairs and sends the messages of both directions
with it (see :func:`~catforge.models.layers.symmetric_pairs`; ``share_pair_filters=False`` turns
this off). Aggregation is ``index_add``; there is no Python loop over atoms or edges.

Zero-length edges: OCP drops edges with ``d == 0`` in ``get_pbc_distances``. A proper neighbour
list has none (catforge's drops ``d <= 1e-8``; OCP's ``d^2 <= 1e-4``), but a hand-made or stale
graph might; such edges get a zero envelope and a zero (not NaN) gradient, as if dropped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn
from torch.nn import Embedding, Linear, ModuleList, Sequential

from catforge.data.graph import AtomicGraph
from catforge.data.graph_spec import GraphSpec
from catforge.errors import ConfigError
from catforge.models.layers import (
    GaussianSmearing,
    ShiftedSoftplus,
    cosine_cutoff,
    edge_displacements,
    safe_norm,
    scatter_sum,
    symmetric_pairs,
)
from catforge.runtime.numerics import initialise_vector_math

READOUTS = ("add", "sum", "mean")


@dataclass(frozen=True)
class EdgeBasis:
    """Per-forward edge data shared by all interaction blocks, one row per pair of reverse edges.

    Pair ``p`` is the edge ``neighbour[p] -> centre[p]`` (P,) and, for ``p < n_both``, also its
    reverse ``centre[p] -> neighbour[p]``. ``rbf`` (P, G) is the Gaussian basis and ``envelope``
    (P,) the cosine cutoff of the pair distances (zero for zero-length edges).
    """

    neighbour: Tensor
    centre: Tensor
    n_both: int
    rbf: Tensor
    envelope: Tensor


class CFConv(nn.Module):
    """Continuous-filter convolution: ``lin2(sum_j lin1(x)_j * W_ji)`` with ``W = nn(rbf) * C``."""

    def __init__(
        self, in_channels: int, out_channels: int, num_filters: int, mlp: Sequential, cutoff: float
    ) -> None:
        super().__init__()
        self.lin1 = Linear(in_channels, num_filters, bias=False)
        self.lin2 = Linear(num_filters, out_channels)
        self.nn = mlp  # the block's filter network, registered here too as in PyG
        self.cutoff = cutoff
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.lin1.weight)
        nn.init.xavier_uniform_(self.lin2.weight)
        nn.init.zeros_(self.lin2.bias)

    def forward(self, x: Tensor, edges: EdgeBasis) -> Tensor:
        """Atom features ``x`` (n_atoms, in) -> (n_atoms, out)."""
        x = self.lin1(x)
        weights = self.nn(edges.rbf) * edges.envelope.unsqueeze(-1)  # (P, F), one per pair
        out = scatter_sum(x.index_select(0, edges.neighbour) * weights, edges.centre, x.shape[0])
        if edges.n_both:  # the reverse edges reuse their pair's filter: no gather of weights
            both = slice(0, edges.n_both)
            reverse = x.index_select(0, edges.centre[both]) * weights[both]
            out = out.index_add(0, edges.neighbour[both], reverse)
        return self.lin2(out)


class InteractionBlock(nn.Module):
    """SchNet interaction: CFConv -> shifted softplus -> Linear(H, H) (residual added outside)."""

    def __init__(
        self, hidden_channels: int, num_gaussians: int, num_filters: int, cutoff: float
    ) -> None:
        super().__init__()
        self.mlp = Sequential(
            Linear(num_gaussians, num_filters),
            ShiftedSoftplus(),
            Linear(num_filters, num_filters),
        )
        self.conv = CFConv(hidden_channels, hidden_channels, num_filters, self.mlp, cutoff)
        self.act = ShiftedSoftplus()
        self.lin = Linear(hidden_channels, hidden_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weights and zero biases, in PyG's order (mlp, conv, lin)."""
        for layer in self.modules():
            if isinstance(layer, Linear):
                nn.init.xavier_uniform_(layer.weight)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, edges: EdgeBasis) -> Tensor:
        return self.lin(self.act(self.conv(x, edges)))


class SchNet(nn.Module):
    """SchNet energy model, ``forward(graph) -> energy (n_graphs,)`` in the units of its targets.

    Arguments as OCP's model block (``num_atoms``, ``bond_feat_dim`` and ``num_targets`` are
    accepted and ignored, as in OCP; ``regress_forces`` belongs to the force wrapper).
    ``cutoff`` in A. ``cutoff``, ``max_neighbors``, ``use_pbc`` and ``otf_graph`` make its
    :attr:`graph_spec`: with ``use_pbc`` the graph's ``cell_offsets`` are used, without it the
    graph step builds a non-periodic graph every forward (as OCP's ``radius_graph`` path); with
    ``otf_graph`` (or when the graph has no edges) it builds the edges on every forward.
    """

    ignored_checkpoint_keys: ClassVar[tuple[str, ...]] = ("atomic_mass",)
    """Keys of OCP checkpoints this model has no use for: ``atomic_mass`` (119,) is a buffer that
    torch_geometric < 2.2's SchNet registers (for its unused dipole option) and OCP-era
    checkpoints carry; :func:`catforge.potential.checkpoint.load_weights` drops it."""

    def __init__(
        self,
        num_atoms: int | None = None,
        bond_feat_dim: int | None = None,
        num_targets: int | None = None,
        use_pbc: bool = True,
        otf_graph: bool = False,
        hidden_channels: int = 128,
        num_filters: int = 128,
        num_interactions: int = 6,
        num_gaussians: int = 50,
        cutoff: float = 10.0,
        max_neighbors: int | None = 50,
        readout: str = "add",
        share_pair_filters: bool = True,
    ) -> None:
        super().__init__()
        check_schnet_block(
            {
                "hidden_channels": hidden_channels,
                "num_filters": num_filters,
                "num_interactions": num_interactions,
                "num_gaussians": num_gaussians,
                "cutoff": cutoff,
                "max_neighbors": max_neighbors,
                "readout": readout,
            }
        )
        initialise_vector_math()  # before the first parallel sqrt/exp (catforge.runtime.numerics)
        self.use_pbc = use_pbc
        self.otf_graph = otf_graph
        self.hidden_channels = hidden_channels
        self.num_filters = num_filters
        self.num_interactions = num_interactions
        self.num_gaussians = num_gaussians
        self.cutoff = float(cutoff)
        self.max_neighbors: int | None = max_neighbors
        self.readout = readout
        self.share_pair_filters = share_pair_filters

        self.embedding = Embedding(100, hidden_channels, padding_idx=0)
        self.distance_expansion = GaussianSmearing(0.0, self.cutoff, num_gaussians)
        self.interactions = ModuleList(
            InteractionBlock(hidden_channels, num_gaussians, num_filters, self.cutoff)
            for _ in range(num_interactions)
        )
        self.lin1 = Linear(hidden_channels, hidden_channels // 2)
        self.act = ShiftedSoftplus()
        self.lin2 = Linear(hidden_channels // 2, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyG's initialisation: N(0, 1) embedding (row 0 zero), Xavier-uniform, zero biases."""
        self.embedding.reset_parameters()
        for block in self.interactions:
            if isinstance(block, InteractionBlock):
                block.reset_parameters()
        for layer in (self.lin1, self.lin2):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def graph_spec(self) -> GraphSpec:
        """The graph this model reads (see :mod:`catforge.data.edges`)."""
        return GraphSpec(self.cutoff, self.max_neighbors, self.use_pbc, self.otf_graph)

    def forward(self, graph: AtomicGraph) -> Tensor:
        """Energy per structure (n_graphs,) of a (batched) graph with edges."""
        edges = self.edge_basis(graph)
        h = self.embedding(graph.atomic_numbers)
        for block in self.interactions:
            h = h + block(h, edges)
        h = self.lin2(self.act(self.lin1(h))).squeeze(-1)
        energy = scatter_sum(h, graph.batch, graph.n_graphs)
        if self.readout == "mean":
            energy = energy / graph.natoms.to(energy.dtype)
        return energy

    def edge_basis(self, graph: AtomicGraph) -> EdgeBasis:
        """Distances, Gaussian basis and envelope, computed once per pair of reverse edges."""
        if graph.edge_index is None:
            raise ValueError(
                "SchNet needs a graph with edges; provide them with "
                "catforge.data.edges.provide_edges(graph, model.graph_spec)"
            )
        edge_index = graph.edge_index
        offsets = graph.cell_offsets if self.use_pbc else None
        pairs = (
            symmetric_pairs(edge_index, offsets, graph.n_atoms) if self.share_pair_filters else None
        )
        n_both = 0
        if pairs is not None:
            representative, n_both = pairs
            edge_index = edge_index.index_select(1, representative)
            offsets = None if offsets is None else offsets.index_select(0, representative)
        distance, nonzero = safe_norm(edge_displacements(graph, edge_index, offsets))
        return EdgeBasis(
            neighbour=edge_index[0],
            centre=edge_index[1],
            n_both=n_both,
            rbf=self.distance_expansion(distance),
            envelope=cosine_cutoff(distance, self.cutoff) * nonzero,
        )


_MINIMUM = {"hidden_channels": 2, "num_filters": 1, "num_interactions": 0, "num_gaussians": 2}
"""The smallest value of each integer argument SchNet can be built with."""


def check_schnet_block(block: Mapping[str, Any]) -> None:
    """A ConfigError naming ``model.<key>`` and its valid range for a value SchNet cannot use.

    Checks the keys of ``block`` it knows (types are the config parser's business).
    """
    cutoff = block.get("cutoff")
    if cutoff is not None and not (math.isfinite(cutoff) and cutoff > 0):
        raise ConfigError(
            f"model.cutoff must be a distance in A > 0 (finite; OCP's configs use 6.0), "
            f"got {cutoff!r}"
        )
    for key, least in _MINIMUM.items():
        value = block.get(key)
        if value is not None and value < least:
            raise ConfigError(f"model.{key} must be >= {least}, got {value!r}")
    neighbours = block.get("max_neighbors")
    if neighbours is not None and neighbours < 1:
        raise ConfigError(
            f"model.max_neighbors must be >= 1 (or null for no cap), got {neighbours!r}"
        )
    readout = block.get("readout")
    if readout is not None and readout not in READOUTS:
        raise ConfigError(f"model.readout must be one of {', '.join(READOUTS)}, got {readout!r}")
