"""``main.py --submit``: run ``main.py`` invocations as Slurm jobs through submitit.

:func:`submit` turns one command (config file, dotted overrides and :class:`RunOptions`) into one
job, or into a job array over the grid of a ``--sweep-yml`` file (:func:`sweep_overrides`). Each
job is a :class:`JobSpec` run by :class:`CatforgeJob` through the entry function the command
line hands to :func:`submit` (this module never parses a command line); its options have
``submit`` and ``sweep_yml`` cleared and a ``timestamp_id`` fixed at submit time, so that every
rerun of the job writes to the same ``checkpoints/<id>/``, ``results/<id>/`` and
``logs/<logger>/<id>/`` folders. submitit's files
(sbatch script, pickles, stdout/stderr of each task) go to ``<run_dir>/<logdir>/slurm/<job id>/``.

Requeue. submitit asks Slurm for ``--signal=USR2@90`` (USR2 90 s before the time limit) and, in
the job, handles USR2 by calling :meth:`CatforgeJob.checkpoint` (on the task of global rank 0),
pickling the :class:`~submitit.helpers.DelayedSubmission` it returns as the job's new input,
running ``scontrol requeue`` and exiting; SIGTERM is only logged. A training run also catches
USR2 and SIGTERM (:mod:`catforge.runtime.preemption`): it finishes the current step, writes
``checkpoint.pt`` and then hands the signal to the handler it displaced. For USR2 that is
submitit's, which requeues the job with argv that resume from that checkpoint. SIGTERM, which
submitit only logs, ends the command with
:data:`~catforge.runtime.preemption.RESUME_EXIT_CODE`; when that happens within 10 minutes of the
job's time limit, :class:`CatforgeJob` requeues it through submitit's handler too. A rerun for
any other reason (Slurm's own requeue of a preempted job) also resumes: :class:`CatforgeJob`
sets ``checkpoint`` whenever its run's ``checkpoint.pt`` exists.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import submitit
import yaml
from submitit.core.job_environment import SignalHandler
from submitit.helpers import DelayedSubmission

from catforge.config import RunOptions, load_config
from catforge.config.load import read_yaml
from catforge.errors import CatforgeError, ConfigError
from catforge.runtime.preemption import RESUME_EXIT_CODE
from catforge.runtime.runs import FOLDERS, MODE_FOLDERS, RunPaths

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
    """One job to run: a config file, its dotted overrides and the run's options (``submit``
    and ``sweep_yml`` cleared, ``timestamp_id`` fixed); ``verbose`` turns on debug logging;
    ``time_limit_s`` is the job's time limit (``timeout_min`` of the submission)."""

    config_yml: Path
    options: RunOptions
    overrides: tuple[str, ...] = ()
    verbose: bool = False
    time_limit_s: float = 72 * 3600.0

    def with_options(self, **changes: Any) -> JobSpec:
        """This spec with ``options`` fields replaced."""
        return dataclasses.replace(self, options=dataclasses.replace(self.options, **changes))


Entry = Callable[[JobSpec], int]
"""What a job runs: a module-level function (pickled by reference) from a spec to an exit
status, :func:`catforge.cli.main.run_job` for the command line."""


class CatforgeJob(submitit.helpers.Checkpointable):
    """The callable a submitit job runs: ``CatforgeJob(entry)(spec)`` runs ``entry(spec)``.

    Pickled by reference (module and class name, and the entry function's), so a job runs the
    catforge installed where it starts. See the module docs for the requeue protocol.
    """

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        self.started = time.time()

    def __call__(self, spec: JobSpec) -> int:
        """Run ``spec`` in this job; returns the command's exit status (0, or
        :data:`~catforge.runtime.preemption.RESUME_EXIT_CODE` when stopped by a signal and not
        requeued).

        The run resumes from its own ``checkpoint.pt`` when that exists (a rerun of the job),
        and is ``distributed`` when the job has several tasks (ranks from the Slurm env).

        Raises:
            CatforgeError: the command failed (its error is in the task's stderr log).
        """
        self.started = time.time()
        spec = resume_spec(spec)
        if job_num_tasks() > 1 and not spec.options.distributed:
            spec = spec.with_options(distributed=True)
        status = self.entry(spec)
        if status == RESUME_EXIT_CODE:
            _requeue_near_time_limit(spec.time_limit_s, self.started)
        elif status != 0:
            raise CatforgeError(f"catforge job {describe(spec)} exited with status {status}")
        return status

    def checkpoint(self, spec: JobSpec) -> DelayedSubmission:  # type: ignore[override]
        """What submitit requeues on a time-out or preemption: this job, resuming from the
        run's ``checkpoint.pt`` if it exists (else the same spec again)."""
        return DelayedSubmission(CatforgeJob(self.entry), resume_spec(spec))


def describe(spec: JobSpec) -> str:
    """``--mode M --config-yml C [overrides] (run ID)`` for messages."""
    options = spec.options
    overrides = "".join(f" {item}" for item in spec.overrides)
    run = f"(run {options.timestamp_id})"
    return f"--mode {options.mode} --config-yml {spec.config_yml}{overrides} {run}"


def resume_spec(spec: JobSpec) -> JobSpec:
    """``spec`` with ``checkpoint`` = ``<run_dir>/checkpoints/<timestamp_id>/checkpoint.pt`` when
    it is a training run with a fixed ``timestamp_id`` and that file exists; else ``spec``."""
    options = spec.options
    if options.mode != "train" or not options.timestamp_id:
        return spec
    path = RunPaths.create(options.run_dir, timestamp_id=options.timestamp_id).checkpoint_dir
    path = path / "checkpoint.pt"
    return spec.with_options(checkpoint=path) if path.is_file() else spec


def job_num_tasks() -> int:
    """The number of tasks (processes) of the submitit job this runs in; 1 outside a job."""
    try:
        return submitit.JobEnvironment().num_tasks
    except RuntimeError:  # not in a submitit job
        return 1


def _requeue_near_time_limit(time_limit_s: float, started: float) -> None:
    """After a run stopped on a signal and wrote its checkpoint: requeue as submitit would.

    The run's own handler (:mod:`catforge.runtime.preemption`) took the signal from submitit's,
    so it is not known which signal it was. Within :data:`TIME_LIMIT_WINDOW_S` of the job's time
    limit the stop was the time-limit warning: call submitit's handler, which (on rank 0) calls
    :meth:`CatforgeJob.checkpoint`, pickles the result, runs ``scontrol requeue`` and exits.
    Earlier it was a preemption or ``scancel``: leave it to Slurm (a rerun resumes).
    """
    number = getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}", signal.SIGUSR2)
    handler = getattr(signal.getsignal(number), "__self__", None)
    if not isinstance(handler, SignalHandler):
        return  # not in a submitit job
    if near_time_limit(started, time_limit_s):
        handler.checkpoint_and_try_requeue(number)
    else:
        log.warning(
            "stopped by a signal before the time limit (preemption or scancel): not requeued "
            "here; a rerun of this job (Slurm's requeue) resumes from the checkpoint"
        )


def near_time_limit(started: float, limit_s: float, now: float | None = None) -> bool:
    """Whether a job that started at ``started`` (``time.time()``) with a time limit of
    ``limit_s`` seconds is within :data:`TIME_LIMIT_WINDOW_S` of it."""
    elapsed_s = (time.time() if now is None else now) - started
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
    config_yml: Path,
    overrides: tuple[str, ...],
    options: RunOptions,
    *,
    now: datetime | None = None,
    verbose: bool = False,
) -> list[JobSpec]:
    """The jobs of a ``--submit`` command: one, or one per ``--sweep-yml`` grid point.

    Each job has ``submit``/``sweep_yml`` cleared, its identifier (``<identifier>_run<i>`` in a
    sweep) and a ``timestamp_id`` fixed now (``<time>-<identifier>``, or the given
    ``--timestamp-id``), and the sweep overrides after the command's.
    """
    grid: list[list[str]] = (
        [[]] if options.sweep_yml is None else sweep_overrides(options.sweep_yml)
    )
    now = now or datetime.now()
    specs = []
    for index, extra in enumerate(grid):
        identifier = options.identifier
        if options.sweep_yml is not None:
            identifier = f"{identifier}_run{index}" if identifier else f"run{index}"
        if options.timestamp_id is None:
            run = RunPaths.create(options.run_dir, identifier=identifier, now=now).timestamp_id
        elif options.sweep_yml is None:
            run = options.timestamp_id
        else:
            run = f"{options.timestamp_id}-{identifier}"
        job_options = dataclasses.replace(
            options, submit=False, sweep_yml=None, identifier=identifier, timestamp_id=run
        )
        job_overrides = (*overrides, *extra)
        specs.append(JobSpec(Path(config_yml), job_options, job_overrides, verbose))
    return specs


def submit(
    spec: JobSpec,
    slurm_params: Mapping[str, Any],
    entry: Entry,
    *,
    executor: str = "slurm",
) -> list[submitit.Job[Any]]:
    """Submit the command of ``spec`` (``options.submit`` set) as one job, or as a job array
    over its ``--sweep-yml`` grid, each run by ``entry``; prints the job ids and log folders,
    returns the jobs.

    Every job's config is loaded first, so a bad sweep key fails here, before anything runs.

    Raises:
        ConfigError: a job's config is invalid, or no Slurm cluster is found.
    """
    options = spec.options
    _check_layout(options)
    now = datetime.now()
    specs = plan_jobs(spec.config_yml, spec.overrides, options, now=now, verbose=spec.verbose)
    for planned in specs:
        _check_config(planned)
    if options.timestamp_id is None:
        specs = [_claim_run(planned, now) for planned in specs]
    folder = (options.run_dir / options.logdir / "slurm" / "%j").absolute()
    parameters = executor_parameters(options, slurm_params)
    limit_s = 60.0 * parameters["timeout_min"]
    specs = [dataclasses.replace(planned, time_limit_s=limit_s) for planned in specs]
    auto = make_executor(folder, parameters, executor)
    job = CatforgeJob(entry)
    jobs = [auto.submit(job, specs[0])] if len(specs) == 1 else auto.map_array(job, specs)
    for submitted, planned in zip(jobs, specs, strict=True):
        run = planned.options.timestamp_id
        print(f"submitted job {submitted.job_id} (run {run}); logs: {submitted.paths.folder}")
    return jobs


def _claim_run(spec: JobSpec, now: datetime) -> JobSpec:
    """``spec`` with its new run's folders created now, so that another submission in the same
    second gets another id (``<id>-2``, ...) and the job never shares another run's folders."""
    options = spec.options
    claimed = RunPaths.claim_new(
        options.run_dir,
        identifier=options.identifier,
        folders=MODE_FOLDERS.get(options.mode, FOLDERS),
        now=now,
    )
    return spec.with_options(timestamp_id=claimed.timestamp_id)


def _check_layout(options: RunOptions) -> None:
    """Several GPUs or nodes need ``--distributed`` (one task per GPU): a single task would
    compute a world size of ``nodes * num_gpus`` from the Slurm env and wait for ranks that
    never start (:func:`catforge.runtime.distributed.detect`)."""
    if not options.distributed and (options.num_nodes > 1 or options.num_gpus > 1):
        raise ConfigError(
            f"--submit with --num-nodes {options.num_nodes} --num-gpus {options.num_gpus} needs "
            "--distributed (one process per GPU); drop those flags for a one-GPU job"
        )


def _check_config(spec: JobSpec) -> None:
    """Load ``spec``'s config as the job will (a ConfigError names the run)."""
    try:
        load_config(spec.config_yml, spec.overrides, spec.options)
    except ConfigError as error:
        raise ConfigError(f"run {spec.options.timestamp_id}: {error}") from error
