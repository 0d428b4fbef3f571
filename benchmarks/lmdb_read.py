"""LMDB read throughput: catforge's format vs OCP's pickled torch_geometric Data, 1 and N processes.

Writes the same OC20-sized slabs (EMT-labelled, ~75 atoms) twice into a temporary folder, once in
catforge's layout and once as OCP writes them (pickled ``torch_geometric`` ``Data``), then prints
structures/s for:
- catforge ``LmdbDataset[i]`` (validated AtomicGraph) on each file, with the per-entry CRC32
  checksum verification (the default) and without it (``verify_checksums=False``), and the
  checksum alone (``zlib.crc32``, and ``blake2b`` with an 8-byte digest for comparison) over the
  same stored values,
- OCP's own read path, ``pickle.loads`` of the Data objects (needs torch_geometric installed),
- a shuffled torch DataLoader that reads and collates batches, in-process and with ``--workers``.

Run: ``python benchmarks/lmdb_read.py [--entries 4000] [--workers 2]``.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import lmdb
import numpy as np
import torch
from ase.build import add_adsorbate, fcc111
from ase.calculators.emt import EMT
from torch.utils.data import DataLoader

from catforge.data.atoms import atoms_to_graph
from catforge.data.collate import collate
from catforge.data.graph import AtomicGraph
from catforge.data.lmdb import LmdbDataset, write_lmdb


def oc20_like_graphs(count: int, seed: int = 0) -> list[AtomicGraph]:
    """``count`` labelled Cu(111) 3x3x8 slabs + O (73 atoms), rattled differently."""
    rng = np.random.default_rng(seed)
    graphs = []
    for index in range(min(count, 50)):
        slab = fcc111("Cu", size=(3, 3, 8), vacuum=8.0)
        add_adsorbate(slab, "O", 1.5, "fcc")
        slab.rattle(0.05, seed=int(rng.integers(1 << 30)))
        slab.calc = EMT()
        slab.get_forces()
        graphs.append(atoms_to_graph(slab, sid=index, fid=0))
    return [graphs[index % len(graphs)] for index in range(count)]


def write_pyg_lmdb(graphs: list[AtomicGraph], path: Path) -> None:
    """The OCP layout: each value a pickled torch_geometric Data with OCP's dtypes."""
    from torch_geometric.data import Data

    env = lmdb.open(str(path), subdir=False, map_size=1 << 34, lock=False)
    with env.begin(write=True) as txn:
        for index, graph in enumerate(graphs):
            data = Data(
                pos=graph.pos,
                cell=graph.cell,
                atomic_numbers=graph.atomic_numbers.float(),
                natoms=graph.n_atoms,
                tags=graph.tags,
                fixed=graph.fixed.float(),
                y=float(graph.y),
                force=graph.force,
                sid=int(graph.sid),
                fid=int(graph.fid),
            )
            txn.put(str(index).encode(), pickle.dumps(data, protocol=-1))
        txn.put(b"length", pickle.dumps(len(graphs)))
    env.close()


def rate(read: Callable[[int], object], count: int, repeats: int) -> float:
    """Best structures/s over ``repeats`` passes of ``read(0..count-1)``."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for index in range(count):
            read(index)
        best = max(best, count / (time.perf_counter() - start))
    return best


def paired_rates(
    first: Callable[[int], object], second: Callable[[int], object], count: int, repeats: int
) -> tuple[float, float]:
    """Best structures/s of two readers timed entry by entry in alternation (each goes first
    every other entry), so that changes in machine load hit both alike."""
    best = [0.0, 0.0]
    readers = list(enumerate((first, second)))
    for _ in range(repeats):
        spent = [0.0, 0.0]
        for index in range(count):
            for which, read in readers if index % 2 else readers[::-1]:
                start = time.perf_counter()
                read(index)
                spent[which] += time.perf_counter() - start
        best = [max(old, count / new) for old, new in zip(best, spent, strict=True)]
    return best[0], best[1]


def blake2b_64(value: bytes) -> bytes:
    return hashlib.blake2b(value, digest_size=8).digest()


def hash_rate(values: list[bytes], digest: Callable[[bytes], object], repeats: int = 5) -> float:
    """Best values/s of ``digest`` over ``values``."""
    return rate(lambda index: digest(values[index]), len(values), repeats)


def loader_rate(dataset: LmdbDataset, workers: int, repeats: int, batch_size: int) -> float:
    """Structures/s through a DataLoader whose workers read and collate batches."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        collate_fn=collate,
    )
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        count = sum(batch.n_graphs for batch in loader)
        best = max(best, count / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    graphs = oc20_like_graphs(args.entries)
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as folder:
        ours = Path(folder) / "catforge.lmdb"
        write_lmdb(graphs, ours)
        dataset = LmdbDataset(ours)
        unverified = LmdbDataset(ours, verify_checksums=False)
        checked, unchecked = paired_rates(
            dataset.__getitem__, unverified.__getitem__, len(graphs), args.repeats
        )
        rows.append(("catforge LmdbDataset[i], 1 process", checked))
        rows.append(("  the same without checksum verification", unchecked))
        values = [dataset.raw(index) for index in range(len(graphs))]
        crc_rate = hash_rate(values, zlib.crc32)
        rows.append(("  zlib.crc32 of the stored values alone", crc_rate))
        rows.append(("  blake2b (8 bytes) of the values alone", hash_rate(values, blake2b_64)))
        try:
            pyg_path = Path(folder) / "pyg.lmdb"
            write_pyg_lmdb(graphs, pyg_path)
        except ImportError:
            print("torch_geometric not installed: the PyG rows are skipped")
        else:
            env = lmdb.open(str(pyg_path), subdir=False, readonly=True, lock=False)

            def pyg_read(index: int) -> object:
                with env.begin() as txn:
                    return pickle.loads(txn.get(str(index).encode()))

            rows.append(
                (
                    "OCP: pickle.loads(PyG Data), 1 process",
                    rate(pyg_read, len(graphs), args.repeats),
                )
            )
            env.close()
            legacy = LmdbDataset(pyg_path)
            rows.append(
                (
                    "catforge reading the PyG file, 1 process",
                    rate(legacy.__getitem__, len(graphs), args.repeats),
                )
            )
        for workers in sorted({0, args.workers}):
            total = loader_rate(dataset, workers, args.repeats, args.batch_size)
            name = f"DataLoader + collate, batch {args.batch_size}, {workers} workers"
            rows.append((name, total))
    baseline = rows[0][1]
    size = np.mean([len(value) for value in values])
    print(
        f"\nLMDB read, {len(graphs)} structures of {graphs[0].n_atoms} atoms ({size:,.0f} bytes "
        "stored each), torch threads = 1"
    )
    print(f"{'reader':<48} {'structures/s':>13} {'vs catforge':>12}")
    for name, value in rows:
        print(f"{name:<48} {value:>13,.0f} {value / baseline:>11.2f}x")
    print(
        f"checksum verification: {checked / unchecked - 1:+.1%} structures/s read "
        f"({(1 / checked - 1 / unchecked) * 1e6:+.1f} us each); the CRC32 alone takes "
        f"{1e6 / crc_rate:.2f} us per structure, {checked / crc_rate:.1%} of a verified read"
    )


if __name__ == "__main__":
    main()
