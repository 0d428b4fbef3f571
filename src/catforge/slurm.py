"""``main.py --submit``: run ``main.py`` invocations as Slurm jobs through submitit.

:func:`submit` turns one command line into one job, or into a job array over the grid of a
``--sweep-yml`` file (:func:`sweep_overrides`). Each job runs :class:`CatforgeJob`, which calls
:func:`catforge.cli.main` with the user's argv minus ``--submit`` and ``--sweep-yml``, plus a
``--timestamp-id`` fixed at submit time, so that every rerun of the job writes to the same
``checkpoints/<id>/``, ``results/<id>/`` and ``logs/<logger>/<id>/`` folders. submitit's files
(sbatch script, pickles, stdout/stderr of each task) go to ``<run_dir>/<logdir>/slurm/<job id>/``.

Requeue. submitit asks Slurm for ``--signal=USR2@90`` (USR2 90 s before the time limit) and, in
the job, handles USR2 by calling :meth:`CatforgeJob.checkpoint` (on the task of global rank 0),
pickling the :class:`~submitit.helpers.DelayedSubmission` it returns as the job's new input,
running ``scontrol requeue`` and exiting; SIGTERM is only logged. A training run also catches
USR2 and SIGTERM (:mod:`catforge.preemption`): it finishes the current step, writes
``checkpoint.pt`` and then hands the signal to the handler it displaced. For USR2 that is
submitit's, which requeues the job with argv that resume from that checkpoint. SIGTERM, which
submitit only logs, ends the command with :data:`~catforge.preemption.RESUME_EXIT_CODE`; when
that happens within 10 minutes of the job's time limit, :class:`CatforgeJob` requeues it through
submitit's handler too. A rerun
for any other reason (Slurm's own requeue of a preempted job) also resumes: :class:`CatforgeJob`
adds ``--checkpoint`` whenever its run's ``checkpoint.pt`` exists.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import submitit
import yaml
from submitit.core.job_environment import SignalHandler
from submitit.helpers import DelayedSubmission

from catforge import cli
from catforge.config import RunOptions, load_config
from catforge.config.load import read_yaml
from catforge.errors import CatforgeError, ConfigError
from catforge.preemption import RESUME_EXIT_CODE
from catforge.runs import FOLDERS, MODE_FOLDERS, RunPaths

log = logging.getLogger(__name__)

EXECUTORS = ("slurm", "local")
"""``submit(executor=...)``: a Slurm cluster, or local processes (tests, trying things out)."""
MAX_NUM_TIMEOUT = 3
"""How many times a job is requeued after a time-out (OCP's ``slurm_max_num_timeout``)."""
TIME_LIMIT_WINDOW_S = 600
"""A run stopped by a signal this close to the time limit is requeued (submitit's margin)."""
SWEEP_FORMAT = (
    "a YAML mapping of config keys to lists of values, e.g. "
    "{optim.lr_initial: [0.001, 0.0005], model.num_interactions: [3, 5]} "
    "or the nested form {optim: {lr_initial: [0.001, 0.0005]}}"
)
_JOB_FLAGS = ("--submit", "--sweep-yml", "--identifier", "--timestamp-id")
"""Flags :func:`plan_jobs` replaces in the user's argv."""


def sweep_overrides(sweep_yml: Path) -> list[list[str]]:
    """The grid of a sweep file as dotted overrides, one list per run.

    ``sweep_yml`` maps config keys (dotted, or nested mappings) to lists of values; the runs
    are the cartesian product in file order, the last key varying fastest (as OCP's
    ``create_grid``): ``{optim.lr_initial: [1e-3, 5e-4], model.num_interactions: [3, 5]}`` gives
    ``[["--optim.lr_initial=0.001", "--model.num_interactions=3"], ...]`` (4 runs). Values are
    written as YAML, so the CLI reads them back unchanged.

    Raises:
        ConfigError: the file is unreadable or not of that form (the message names both).
    """
    path = Path(sweep_yml)
    try:
        raw = read_yaml(path)
    except ConfigError as error:
        raise ConfigError(f"--sweep-yml: {error} (expected {SWEEP_FORMAT})") from error
    grid: dict[str, list[Any]] = {}
    _flatten_sweep(raw, "", path, grid)
    if not grid:
        raise ConfigError(f"{path}: the sweep file names no config keys; expected {SWEEP_FORMAT}")
    keys = list(grid)
    return [
        [f"--{key}={_yaml_text(value)}" for key, value in zip(keys, values, strict=True)]
        for values in itertools.product(*grid.values())
    ]


def _flatten_sweep(
    node: Mapping[Any, Any], prefix: str, path: Path, out: dict[str, list[Any]]
) -> None:
    for key, value in node.items():
        if not isinstance(key, str) or not key.strip("."):
            raise ConfigError(
                f"{path}: sweep key {key!r} is not a config key; expected {SWEEP_FORMAT}"
            )
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping) and value:
            _flatten_sweep(value, name, path, out)
            continue
        if not isinstance(value, list) or not value:
            raise ConfigError(
                f"{path}: '{name}' must be a non-empty list of values, got "
                f"{type(value).__name__} {value!r}; expected {SWEEP_FORMAT}"
            )
        if "." not in name or name.split(".")[0] == "includes":
            raise ConfigError(
                f"{path}: '{name}' cannot be swept: sweep keys name a value inside a config "
                f"section, like optim.lr_initial; expected {SWEEP_FORMAT}"
            )
        if name in out:
            raise ConfigError(f"{path}: '{name}' is given twice (dotted and nested)")
        out[name] = value


def _yaml_text(value: Any) -> str:
    """``value`` as one line of YAML that :func:`catforge.config.parse_overrides` reads back."""
    text: str = yaml.safe_dump(value, default_flow_style=True, width=1_000_000_000)
    return text.removesuffix("...\n").strip()


@dataclass(frozen=True)
class JobSpec:
    """One job to run: the argv of a ``main.py`` invocation (without ``--submit``), run in the
    job through :func:`catforge.cli.main`."""

    argv: tuple[str, ...]


class CatforgeJob(submitit.helpers.Checkpointable):
    """The callable a submitit job runs: ``CatforgeJob()(spec)`` runs ``spec.argv``.

    Pickled by reference (module and class name), so a job runs the catforge installed where
    it starts. See the module docs for the requeue protocol.
    """

    def __call__(self, spec: JobSpec) -> int:
        """Run ``spec`` in this job; returns the command's exit status (0, or
        :data:`~catforge.preemption.RESUME_EXIT_CODE` when stopped by a signal and not
        requeued).

        The run resumes from its own ``checkpoint.pt`` when that exists (a rerun of the job),
        and gets ``--distributed`` when the job has several tasks (ranks from the Slurm env).

        Raises:
            CatforgeError: the command failed (its error is in the task's stderr log).
        """
        argv = list(resume_spec(spec).argv)
        if job_num_tasks() > 1 and _find_flag(argv, "--distributed") is None:
            argv.append("--distributed")
        status = cli.main(argv)
        if status == RESUME_EXIT_CODE:
            _requeue_near_time_limit()
        elif status != 0:
            raise CatforgeError(f"catforge {' '.join(argv)} exited with status {status}")
        return status

    def checkpoint(self, spec: JobSpec) -> DelayedSubmission:  # type: ignore[override]
        """What submitit requeues on a time-out or preemption: this job, resuming from the
        run's ``checkpoint.pt`` if it exists (else the same argv again)."""
        return DelayedSubmission(self, resume_spec(spec))


def resume_spec(spec: JobSpec) -> JobSpec:
    """``spec`` with ``--checkpoint <run_dir>/checkpoints/<timestamp_id>/checkpoint.pt`` when it
    is a training run with a fixed ``--timestamp-id`` and that file exists; else ``spec``."""
    args, _ = cli.build_ocp_parser().parse_known_args(list(spec.argv))
    if args.mode != "train" or not args.timestamp_id:
        return spec
    path = RunPaths.create(args.run_dir, timestamp_id=args.timestamp_id).checkpoint_dir
    path = path / "checkpoint.pt"
    if not path.is_file():
        return spec
    return JobSpec((*_drop_flags(spec.argv, ("--checkpoint",)), f"--checkpoint={path}"))


def job_num_tasks() -> int:
    """The number of tasks (processes) of the submitit job this runs in; 1 outside a job."""
    try:
        return submitit.JobEnvironment().num_tasks
    except RuntimeError:  # not in a submitit job
        return 1


def _requeue_near_time_limit() -> None:
    """After a run stopped on a signal and wrote its checkpoint: requeue as submitit would.

    The run's own handler (:mod:`catforge.preemption`) took the signal from submitit's, so it is
    not known which signal it was. Within :data:`TIME_LIMIT_WINDOW_S` of the job's time limit
    the stop was the time-limit warning: call submitit's handler, which (on rank 0) calls
    :meth:`CatforgeJob.checkpoint`, pickles the result, runs ``scontrol requeue`` and exits.
    Earlier it was a preemption or ``scancel``: leave it to Slurm (a rerun resumes).
    """
    number = getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}", signal.SIGUSR2)
    handler = getattr(signal.getsignal(number), "__self__", None)
    if not isinstance(handler, SignalHandler):
        return  # not in a submitit job
    if near_time_limit(handler):
        handler.checkpoint_and_try_requeue(number)
    else:
        log.warning(
            "stopped by a signal before the time limit (preemption or scancel): not requeued "
            "here; a rerun of this job (Slurm's requeue) resumes from the checkpoint"
        )


def near_time_limit(handler: SignalHandler, now: float | None = None) -> bool:
    """Whether the job of submitit's ``handler`` is within :data:`TIME_LIMIT_WINDOW_S` of its
    time limit (submitit's own rule, ``has_timed_out``, also counts any time past 80 %)."""
    limit_s = handler._delayed._timeout_min * 60  # submitit keeps both privately
    elapsed_s = (time.time() if now is None else now) - handler._start_time
    return elapsed_s >= limit_s - TIME_LIMIT_WINDOW_S


def executor_parameters(options: RunOptions, slurm_params: Mapping[str, Any]) -> dict[str, Any]:
    """``AutoExecutor.update_parameters`` keywords from the CLI options (as OCP's ``--submit``)
    and the config's ``slurm:`` block (extra sbatch parameters, which win over submitit's)."""
    return {
        "name": options.identifier or "catforge",
        "mem_gb": options.slurm_mem,
        "timeout_min": options.slurm_timeout * 60,
        "slurm_partition": options.slurm_partition,
        "gpus_per_node": options.num_gpus,
        "cpus_per_task": options.num_workers + 1,
        "tasks_per_node": max(1, options.num_gpus) if options.distributed else 1,
        "nodes": options.num_nodes,
        "slurm_additional_parameters": dict(slurm_params),
    }


def make_executor(
    folder: Path, parameters: Mapping[str, Any], executor: str = "slurm"
) -> submitit.AutoExecutor:
    """A submitit AutoExecutor for ``executor`` (``slurm`` or ``local``) with ``parameters``.

    For ``local``, AutoExecutor checks the ``slurm_*`` keys and ignores them; the local
    executor runs one task on one node (its tasks get no Slurm rank variables).
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; use one of {', '.join(EXECUTORS)}")
    if executor == "local" and (parameters["nodes"] != 1 or parameters["tasks_per_node"] != 1):
        raise ConfigError(
            "the local executor runs one task on one node; drop --num-nodes/--distributed"
        )
    try:
        auto = submitit.AutoExecutor(
            folder=folder, cluster=executor, slurm_max_num_timeout=MAX_NUM_TIMEOUT
        )
    except RuntimeError as error:  # SlurmExecutor: no srun on this machine
        raise ConfigError(f"--submit needs a Slurm cluster (sbatch, srun): {error}") from error
    auto.update_parameters(**parameters)
    return auto


def plan_jobs(
    argv: Sequence[str], options: RunOptions, *, now: datetime | None = None
) -> list[JobSpec]:
    """The jobs of a ``--submit`` command line: one, or one per ``--sweep-yml`` grid point.

    Each job's argv is ``argv`` without ``--submit``/``--sweep-yml``, with its identifier
    (``<identifier>_run<i>`` in a sweep) and a ``--timestamp-id`` fixed now
    (``<time>-<identifier>``, or the given ``--timestamp-id``), then the sweep overrides.
    """
    base = _drop_flags(argv, _JOB_FLAGS)
    grid: list[list[str]] = (
        [[]] if options.sweep_yml is None else sweep_overrides(options.sweep_yml)
    )
    now = now or datetime.now()
    specs = []
    for index, overrides in enumerate(grid):
        identifier = options.identifier
        if options.sweep_yml is not None:
            identifier = f"{identifier}_run{index}" if identifier else f"run{index}"
        if options.timestamp_id is None:
            run = RunPaths.create(options.run_dir, identifier=identifier, now=now).timestamp_id
        elif options.sweep_yml is None:
            run = options.timestamp_id
        else:
            run = f"{options.timestamp_id}-{identifier}"
        named = [f"--identifier={identifier}"] if identifier else []
        specs.append(JobSpec((*base, *named, f"--timestamp-id={run}", *overrides)))
    return specs


def submit(
    argv: Sequence[str],
    options: RunOptions,
    slurm_params: Mapping[str, Any],
    *,
    executor: str = "slurm",
) -> list[submitit.Job[Any]]:
    """Submit ``argv`` (a ``main.py`` command line with ``--submit``) as one job, or as a job
    array over the ``--sweep-yml`` grid; prints the job ids and log folders, returns the jobs.

    Every job's config is loaded first, so a bad sweep key fails here, before anything runs.

    Raises:
        ConfigError: a job's config is invalid, or no Slurm cluster is found.
    """
    _check_layout(options)
    now = datetime.now()
    specs = plan_jobs(argv, options, now=now)
    for spec in specs:
        _check_config(spec)
    if options.timestamp_id is None:
        specs = [_claim_run(spec, now) for spec in specs]
    folder = (options.run_dir / options.logdir / "slurm" / "%j").absolute()
    auto = make_executor(folder, executor_parameters(options, slurm_params), executor)
    job = CatforgeJob()
    jobs = [auto.submit(job, specs[0])] if len(specs) == 1 else auto.map_array(job, specs)
    for submitted, spec in zip(jobs, specs, strict=True):
        run = cli.build_ocp_parser().parse_known_args(list(spec.argv))[0].timestamp_id
        print(f"submitted job {submitted.job_id} (run {run}); logs: {submitted.paths.folder}")
    return jobs


def _claim_run(spec: JobSpec, now: datetime) -> JobSpec:
    """``spec`` with its new run's folders created now, so that another submission in the same
    second gets another id (``<id>-2``, ...) and the job never shares another run's folders."""
    args, _ = cli.build_ocp_parser().parse_known_args(list(spec.argv))
    claimed = RunPaths.claim_new(
        args.run_dir, identifier=args.identifier, folders=MODE_FOLDERS.get(args.mode, FOLDERS),
        now=now,
    )  # fmt: skip
    argv = _drop_flags(spec.argv, ("--timestamp-id",))
    return JobSpec((*argv, f"--timestamp-id={claimed.timestamp_id}"))


def _check_layout(options: RunOptions) -> None:
    """Several GPUs or nodes need ``--distributed`` (one task per GPU): a single task would
    compute a world size of ``nodes * num_gpus`` from the Slurm env and wait for ranks that
    never start (:func:`catforge.distributed.detect`)."""
    if not options.distributed and (options.num_nodes > 1 or options.num_gpus > 1):
        raise ConfigError(
            f"--submit with --num-nodes {options.num_nodes} --num-gpus {options.num_gpus} needs "
            "--distributed (one process per GPU); drop those flags for a one-GPU job"
        )


def _check_config(spec: JobSpec) -> None:
    """Load ``spec``'s config as the job will (a ConfigError names the run)."""
    args, extra = cli.build_ocp_parser().parse_known_args(list(spec.argv))
    try:
        load_config(args.config_yml, extra, RunOptions.from_namespace(args))
    except ConfigError as error:
        raise ConfigError(f"run {args.timestamp_id}: {error}") from error


def _option_actions() -> dict[str, argparse.Action]:
    return dict(cli.build_ocp_parser()._option_string_actions)


def _find_flag(argv: Sequence[str], flag: str) -> int | None:
    """The index of the first argument that argparse reads as ``flag``, or None."""
    actions = _option_actions()
    for index, arg in enumerate(argv):
        if _resolve(arg, actions) is actions[flag]:
            return index
    return None


def _drop_flags(argv: Sequence[str], flags: Sequence[str]) -> list[str]:
    """``argv`` without ``flags`` and their values, in any spelling argparse accepts
    (``--flag value``, ``--flag=value``, unique abbreviations such as ``--sub``)."""
    actions = _option_actions()
    dropped = {id(actions[flag]) for flag in flags}
    out: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        action = _resolve(arg, actions)
        index += 1
        if action is None or id(action) not in dropped:
            out.append(arg)
        elif action.nargs != 0 and "=" not in arg:
            index += 1  # its value
    return out


def _resolve(arg: str, actions: Mapping[str, argparse.Action]) -> argparse.Action | None:
    """The option ``arg`` sets, as argparse matches it (exact, ``=value``, unique prefix)."""
    if not arg.startswith("--"):
        return None
    name = arg.split("=", 1)[0]
    if name in actions:
        return actions[name]
    matches = {id(action): action for key, action in actions.items() if key.startswith(name)}
    return next(iter(matches.values())) if len(matches) == 1 else None
