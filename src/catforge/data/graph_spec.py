"""What graph a model reads: cutoff, neighbour cap, periodic images and (later) triplets.

A model declares a :class:`GraphSpec` as its ``graph_spec``; the graph step of
:mod:`catforge.data.edges` provides it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from catforge.data.graph import AtomicGraph


@dataclass(frozen=True)
class GraphSpec:
    """The graph a model reads.

    ``cutoff`` (A): edges join atoms closer than this. ``max_neighbors``: edges kept per centre
    (``None``: no cap; see :mod:`catforge.data.neighbors` for how ties are kept). ``use_pbc``:
    periodic images take part; without it the graph is built non-periodic (``pbc`` all False,
    zero offsets). ``otf_graph``: always build the edges, even when the graph has stored ones.
    ``triplets``: the seam for models that read edge pairs (angle-based models such as DimeNet++
    or GemNet-OC); no model asks for them yet and :func:`provide_edges` refuses the request.
    """

    cutoff: float
    max_neighbors: int | None = None
    use_pbc: bool = True
    otf_graph: bool = False
    triplets: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.cutoff, bool) or not (
            isinstance(self.cutoff, int | float) and math.isfinite(self.cutoff) and self.cutoff > 0
        ):
            raise ValueError(f"GraphSpec.cutoff must be a distance in A > 0, got {self.cutoff!r}")
        neighbours = self.max_neighbors
        if neighbours is not None and (
            isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 1
        ):
            raise ValueError(
                f"GraphSpec.max_neighbors must be an int >= 1 or None, got {neighbours!r}"
            )

    def uses_stored_edges(self, graph: AtomicGraph) -> bool:
        """Whether ``graph``'s own edges serve this spec as they are."""
        return self.use_pbc and not self.otf_graph and graph.edge_index is not None
