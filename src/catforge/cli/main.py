"""Command-line entry shared by ``main.py`` and the ``catforge`` console script."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from catforge.errors import CatforgeError, ConfigError
from catforge.runtime.preemption import INTERRUPT_EXIT_CODE

if TYPE_CHECKING:
    from catforge.config import Config, RunOptions
    from catforge.runtime.slurm import JobSpec

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

    export = data_commands.add_parser("export", help="write an LMDB dataset in OCP's own format")
    export.add_argument("src", type=Path, metavar="SRC", help="LMDB file or folder")
    export.add_argument(
        "--format", choices=("ocp",), required=True, help="ocp: pickled torch_geometric Data"
    )
    export.add_argument("--out", type=Path, required=True, help="output file or folder, as SRC")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output")
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
    elif args.data_command == "export":
        from catforge.data.export import export_ocp

        print(export_ocp(args.src, args.out, overwrite=args.overwrite).format())
    else:
        from catforge.data.info import format_info, info

        info_summary = info(args.path)
        print(json.dumps(info_summary) if args.json else format_info(info_summary))


def build_ocp_parser() -> argparse.ArgumentParser:
    """OCP's ``main.py`` flags; unknown ``--a.b=value`` arguments are config overrides."""
    parser = argparse.ArgumentParser(
        prog="catforge",
        description="Run an OCP-format config: catforge --mode train --config-yml CONFIG "
        "[--optim.lr_initial=0.001 ...]. Data tools: catforge data -h; config: catforge config -h.",
    )
    add = parser.add_argument
    add("--mode", required=True, help="train, validate, predict or run-relaxations")
    add("--config-yml", type=Path, required=True, help="OCP-format YAML config")
    add("--checkpoint", type=Path, help="checkpoint to load")
    add("--identifier", default="", help="appended to the run's timestamp id")
    add("--seed", type=int, default=0)
    add("--run-dir", type=Path, default=Path("."), help="root of checkpoints/, results/, logs/")
    add("--print-every", type=int, default=10, help="log every N steps")
    add("--amp", action="store_true", help="mixed precision on CUDA")
    add("--cpu", action="store_true", help="run on the CPU even if CUDA is present")
    add("--debug", action="store_true", help="write no folders, logs or checkpoints")
    add("--timestamp-id", help="reuse this run id (continue a run's folders)")
    add("--logdir", type=Path, default=Path("logs"), help="Slurm job logs")
    add("-v", "--verbose", action="store_true", help="debug logging")
    add("--submit", action="store_true", help="submit to Slurm through submitit")
    add("--num-nodes", type=int, default=1)
    add("--num-gpus", type=int, default=1)
    add("--distributed", action="store_true", help="one of N processes (torchrun, launch, Slurm)")
    add("--distributed-port", type=int, default=13356, help="rendezvous port (Slurm jobs)")
    add(
        "--distributed-backend", default="auto", help="auto (nccl on CUDA, gloo on CPU), nccl, gloo"
    )
    add("--local_rank", "--local-rank", dest="local_rank", type=int, help=argparse.SUPPRESS)
    add("--slurm-partition", default="ocp")
    add("--slurm-mem", type=int, default=80, help="GB")
    add("--slurm-timeout", type=int, default=72, help="hours")
    add("--num-workers", type=int, default=0, help="CPUs per Slurm task minus one")
    add("--sweep-yml", type=Path)
    return parser


def run_ocp_command(argv: Sequence[str]) -> int:
    """``--mode ... --config-yml ...`` with dotted overrides."""
    parser = build_ocp_parser()
    args, extra = parser.parse_known_args(argv)
    _configure_logging(args.verbose)
    from catforge.config import RunOptions, load_config, parse_overrides

    parse_overrides(extra)  # anything else than --a.b=VALUE / --a.b VALUE is refused here
    options = RunOptions.from_namespace(args)
    check_flags(options)
    if options.submit:
        from catforge.runtime.slurm import JobSpec, submit

        config = load_config(args.config_yml, extra, options)  # check it before submitting
        spec = JobSpec(args.config_yml, options, tuple(extra), args.verbose)
        submit(spec, config.slurm.params, run_job)
        return 0
    return _run_in_process_group(options, lambda: load_config(args.config_yml, extra, options))


def run_job(spec: JobSpec) -> int:
    """The entry of a Slurm job (:mod:`catforge.runtime.slurm`): run ``spec`` as :func:`main` runs a
    command line, with the same exit statuses and one-line errors."""
    from catforge.config import load_config

    _configure_logging(spec.verbose)

    def make_config() -> Config:
        return load_config(spec.config_yml, spec.overrides, spec.options)

    return _guarded(lambda: _run_in_process_group(spec.options, make_config))


def _run_in_process_group(options: RunOptions, make_config: Callable[[], Config]) -> int:
    """Join the process group when launched as one of several processes, run, leave.

    A run stopped by a signal exits with :func:`catforge.runtime.preemption.exit_status` after
    saving its work.
    """
    from catforge.cli.modes import run
    from catforge.runtime import distributed
    from catforge.runtime.preemption import Preempted

    env = distributed.detect(options.local_rank, options.distributed_port, options.num_gpus)
    if options.distributed and env.launcher == "single":
        raise ConfigError(
            "--distributed: no launcher started this process (no RANK/WORLD_SIZE from torchrun "
            "or torch.distributed.launch, no Slurm task); run torchrun --nproc_per_node=N "
            "main.py --distributed ..., or leave out --distributed"
        )
    if env.launcher == "slurm" and not options.distributed:
        env = distributed.DistributedEnv(0, 0, 1, env.master_addr, env.master_port, "single")
    elif env.world_size > 1 and not options.distributed:
        log.warning("started as rank %d of %d without --distributed", env.rank, env.world_size)
    backend = options.distributed_backend
    if options.cpu and backend == "auto":
        backend = "gloo"
    distributed.setup(env, backend)
    if env.rank != 0:  # one log stream: other ranks report warnings and errors only
        log.setLevel(logging.WARNING)
    try:
        run(make_config())
        distributed.barrier()  # every rank is done (rank 0's files written) before the group goes
    except Preempted as stop:
        resume = f"; {stop.resume}" if stop.resume else ""
        print(f"catforge: {stop}{resume} (exit status {stop.exit_status})", file=sys.stderr)
        return stop.exit_status
    finally:
        distributed.cleanup()
    return 0


def check_flags(options: RunOptions) -> None:
    """Refuse flags that cannot work together; warn about flags that would be ignored."""
    if options.print_every < 1:
        raise ConfigError(f"--print-every must be at least 1 (steps), got {options.print_every}")
    if options.sweep_yml is not None and not options.submit:
        raise ConfigError(
            "--sweep-yml runs a grid of Slurm jobs and needs --submit; run one config without it"
        )
    if options.num_gpus != 1 and not (options.distributed or options.submit):
        log.warning(
            "--num-gpus %d is ignored without --distributed: start one process per GPU with "
            "torchrun --nproc_per_node=%d main.py --distributed ...",
            options.num_gpus,
            options.num_gpus,
        )


def run_config_command(argv: Sequence[str]) -> None:
    """``catforge config show CONFIG [overrides]``: print the fully resolved config as YAML."""
    parser = argparse.ArgumentParser(prog="catforge config")
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="print the resolved config (includes, overrides)")
    show.add_argument("config", type=Path)
    args, extra = parser.parse_known_args(argv)
    import yaml

    from catforge.config import load_config

    config = load_config(args.config, extra)
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run; a CatforgeError is printed as one line and exits with status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return _guarded(lambda: _dispatch(argv))


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] == "data":
        args = build_parser().parse_args(argv)
        _configure_logging(args.verbose)
        run_data_command(args)
        return 0
    if argv and argv[0] == "config":
        _configure_logging(False)
        run_config_command(argv[1:])
        return 0
    return run_ocp_command(argv)


def _guarded(command: Callable[[], int]) -> int:
    """``command()``'s status; a CatforgeError is printed as one line and exits with status 2."""
    try:
        return command()
    except CatforgeError as error:
        print(f"catforge: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside training (which checkpoints), or a second Ctrl-C
        print("catforge: interrupted (Ctrl-C); the current step was not saved", file=sys.stderr)
        return INTERRUPT_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
