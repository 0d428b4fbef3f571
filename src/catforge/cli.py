"""Command-line entry shared by ``main.py`` and the ``catforge`` console script."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from catforge.errors import CatforgeError

log = logging.getLogger("catforge")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="catforge",
        description="Graph neural networks for catalyst surfaces (OC20 S2EF, IS2RE, IS2RS).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="build, convert and inspect datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True)

    demo = data_commands.add_parser("demo", help="generate the OC20-like EMT demo dataset")
    demo.add_argument("--out", type=Path, required=True, help="output folder")
    demo.add_argument("--size", default="small", help="tiny, small (default), medium, large or N")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--workers", type=int, default=2, help="relaxation processes")
    demo.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    ingest = data_commands.add_parser("ingest", help="convert ASE or raw OC20 files to LMDB")
    ingest.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="files or folders")
    ingest.add_argument("--task", choices=("s2ef", "is2re", "is2rs"), required=True)
    ingest.add_argument("--out", type=Path, required=True, help="output folder")
    ingest.add_argument("--ref-energy", action="store_true", help="subtract reference energies")
    ingest.add_argument("--workers", type=int, default=1, help="processes (s2ef: one shard each)")
    ingest.add_argument("--get-edges", action="store_true", help="store the neighbour graph")
    ingest.add_argument("--cutoff", type=float, default=6.0, help="edge cutoff in A")
    ingest.add_argument("--max-neighbors", type=int, default=50)
    ingest.add_argument("--overwrite", action="store_true", help="replace an existing output")

    info = data_commands.add_parser("info", help="summarise an LMDB file or folder")
    info.add_argument("path", type=Path)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def run_data_command(args: argparse.Namespace) -> None:
    if args.data_command == "demo":
        from catforge.data.demo import generate_demo

        demo_summary = generate_demo(
            args.out, size=args.size, seed=args.seed, workers=args.workers, overwrite=args.overwrite
        )
        print(demo_summary.format())
    elif args.data_command == "ingest":
        from catforge.data.ingest import ingest

        ingest_summary = ingest(
            args.inputs,
            args.out,
            args.task,
            ref_energy=args.ref_energy,
            workers=args.workers,
            get_edges=args.get_edges,
            cutoff=args.cutoff,
            max_neighbors=args.max_neighbors,
            overwrite=args.overwrite,
        )
        print(ingest_summary.format())
    else:
        from catforge.data.info import format_info, info

        info_summary = info(args.path)
        print(json.dumps(info_summary) if args.json else format_info(info_summary))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run; a CatforgeError is printed as one line and exits with status 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        run_data_command(args)
    except CatforgeError as error:
        print(f"catforge: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
