"""catforge.runtime.slurm: sweep grids, job specs, submitit parameters, the requeue protocol,
and real jobs on submitit's local executor (no Slurm needed: sbatch is replaced by ``echo``)."""

from __future__ import annotations

import dataclasses
import json
import pickle
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import submitit
import yaml
from submitit.core.job_environment import SignalHandler
from submitit.slurm.slurm import SlurmExecutor

from catforge.cli import main as cli
from catforge.config import RunOptions, parse_overrides
from catforge.errors import CatforgeError, ConfigError
from catforge.runtime import slurm
from catforge.runtime.preemption import RESUME_EXIT_CODE
from catforge.runtime.slurm import CatforgeJob, JobSpec
from tests.factories import SMALL_MODEL, data_overrides

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo" / "s2ef_schnet.yml"
NOW = datetime(2024, 5, 6, 7, 8, 9)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def options_of(argv: list[str]) -> RunOptions:
    args, _ = cli.build_ocp_parser().parse_known_args(argv)
    return RunOptions.from_namespace(args)


def spec_of(argv: list[str]) -> JobSpec:
    """The job spec of a ``main.py`` command line, as the command line builds it."""
    args, extra = cli.build_ocp_parser().parse_known_args(argv)
    return JobSpec(args.config_yml, RunOptions.from_namespace(args), tuple(extra))


def plan(argv: list[str], now: datetime | None = NOW) -> list[JobSpec]:
    spec = spec_of(argv)
    return slurm.plan_jobs(spec.config_yml, spec.overrides, spec.options, now=now)


def submitted_spec(job: submitit.Job[Any]) -> JobSpec:
    spec = pickle.loads(job.paths.submitted_pickle.read_bytes()).args[0]
    assert isinstance(spec, JobSpec)
    return spec


# --- sweep files ---------------------------------------------------------------------------


def test_sweep_grid_is_the_product_in_file_order(tmp_path: Path) -> None:
    sweep = write(
        tmp_path / "s.yml", "optim.lr_initial: [1.0e-3, 5.0e-4]\nmodel.num_interactions: [3, 5]\n"
    )
    assert slurm.sweep_overrides(sweep) == [
        ["--optim.lr_initial=0.001", "--model.num_interactions=3"],
        ["--optim.lr_initial=0.001", "--model.num_interactions=5"],
        ["--optim.lr_initial=0.0005", "--model.num_interactions=3"],
        ["--optim.lr_initial=0.0005", "--model.num_interactions=5"],
    ]


def test_sweep_nested_form_equals_dotted(tmp_path: Path) -> None:
    nested = write(tmp_path / "n.yml", "optim:\n  lr_initial: [0.1, 0.2]\nmodel: {cutoff: [5.0]}\n")
    dotted = write(tmp_path / "d.yml", "optim.lr_initial: [0.1, 0.2]\nmodel.cutoff: [5.0]\n")
    assert slurm.sweep_overrides(nested) == slurm.sweep_overrides(dotted)
    assert len(slurm.sweep_overrides(nested)) == 2


def test_sweep_values_read_back_unchanged(tmp_path: Path) -> None:
    values = [1e-10, "1e-3", 3, True, "abc", "true", None, [0.5, 0.9], {"a": 1}, "a b"]
    sweep = write(tmp_path / "s.yml", yaml.safe_dump({"optim.x": values}))
    read = [parse_overrides(run)["optim"]["x"] for run in slurm.sweep_overrides(sweep)]
    assert read == values


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (None, "cannot read"),
        ("optim.lr_initial: [1, 2", "invalid YAML"),
        ("- 1\n- 2\n", "mapping"),
        ("optim.lr_initial: 0.1\n", "non-empty list"),
        ("optim.lr_initial: []\n", "non-empty list"),
        ("{}\n", "names no config keys"),
        ("trainer: [energy, forces]\n", "cannot be swept"),
        ("optim.lr_initial: [1]\noptim: {lr_initial: [2]}\n", "twice"),
    ],
)
def test_bad_sweep_files_name_the_file_and_the_format(
    tmp_path: Path, text: str | None, problem: str
) -> None:
    path = tmp_path / "sweep.yml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=problem) as error:
        slurm.sweep_overrides(path)
    assert str(path) in str(error.value) and "optim.lr_initial" in str(error.value)


# --- job argv --------------------------------------------------------------------------------


def test_one_job_drops_submit_and_fixes_the_timestamp(tmp_path: Path) -> None:
    argv = ["--mode", "train", "--config-yml", "c.yml", "--sub", "--identifier", "exp",
            "--optim.batch_size=4", "--num-gpus=2"]  # fmt: skip
    (spec,) = plan(argv)
    options = spec.options
    assert not options.submit and options.identifier == "exp" and options.num_gpus == 2
    assert options.timestamp_id == "2024-05-06-07-08-09-exp"
    assert spec.overrides == ("--optim.batch_size=4",) and spec.config_yml == Path("c.yml")
    given = [*argv, "--timestamp-id", "mine"]
    assert plan(given, None)[0].options.timestamp_id == "mine"


def test_sweep_jobs_have_their_own_identifier_and_timestamp(tmp_path: Path) -> None:
    sweep = write(tmp_path / "s.yml", "optim.lr_initial: [0.1, 0.2, 0.3]\n")
    argv = ["--mode", "train", "--config-yml", "c.yml", "--submit", f"--sweep-yml={sweep}"]
    specs = plan(argv)
    assert [s.options.identifier for s in specs] == ["run0", "run1", "run2"]
    assert [s.options.timestamp_id for s in specs] == [
        f"2024-05-06-07-08-09-run{i}" for i in range(3)
    ]
    lrs = ["--optim.lr_initial=0.1", "--optim.lr_initial=0.2", "--optim.lr_initial=0.3"]
    assert [s.overrides[-1] for s in specs] == lrs
    assert all(s.options.sweep_yml is None and not s.options.submit for s in specs)


# --- submitit parameters and submission (sbatch replaced by echo) ----------------------------


@pytest.fixture
def fake_sbatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SlurmExecutor that works without Slurm: ``sbatch FILE`` becomes ``echo``."""
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    monkeypatch.setattr(
        SlurmExecutor, "_make_submission_command",
        lambda self, path: ["echo", "Submitted batch job 4242"],
    )  # fmt: skip


@pytest.mark.parametrize("distributed", [False, True])
def test_executor_parameters_and_sbatch_script(
    tmp_path: Path, fake_sbatch: None, distributed: bool
) -> None:
    argv = ["--mode", "train", "--config-yml", "c.yml", "--identifier", "exp", "--num-gpus", "4",
            "--num-nodes", "2", "--num-workers", "7", "--slurm-partition", "big", "--slurm-mem",
            "64", "--slurm-timeout", "2"] + ["--distributed"] * distributed  # fmt: skip
    parameters = slurm.executor_parameters(options_of(argv), {"account": "catalysis"})
    assert parameters == {
        "name": "exp", "mem_gb": 64, "timeout_min": 120, "slurm_partition": "big",
        "gpus_per_node": 4, "cpus_per_task": 8, "tasks_per_node": 4 if distributed else 1,
        "nodes": 2, "slurm_additional_parameters": {"account": "catalysis"},
    }  # fmt: skip
    executor = slurm.make_executor(tmp_path / "%j", parameters)
    script = executor._executor._make_submission_file_text("command", "uid")  # type: ignore[attr-defined]
    for line in ("--job-name=exp", "--mem=64GB", "--time=120", "--partition=big",
                 "--gpus-per-node=4", "--cpus-per-task=8", "--nodes=2", "--account=catalysis",
                 f"--ntasks-per-node={4 if distributed else 1}", "--signal=USR2@90"):  # fmt: skip
        assert f"#SBATCH {line}\n" in script
    assert executor._executor.max_num_timeout == slurm.MAX_NUM_TIMEOUT  # type: ignore[attr-defined]


def test_no_slurm_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: -1))
    argv = ["--mode", "train", "--config-yml", "c.yml"]
    with pytest.raises(ConfigError, match="Slurm"):
        slurm.make_executor(tmp_path, slurm.executor_parameters(options_of(argv), {}))
    with pytest.raises(ConfigError, match="one node"):
        slurm.make_executor(
            tmp_path, slurm.executor_parameters(options_of([*argv, "--num-nodes=2"]), {}), "local"
        )


@pytest.mark.parametrize("flag", ["--num-gpus=2", "--num-nodes=2"])
def test_several_gpus_or_nodes_need_distributed(tmp_path: Path, flag: str) -> None:
    argv = ["--mode", "train", "--config-yml", str(CONFIG), "--submit", flag]
    with pytest.raises(ConfigError, match="--distributed"):
        slurm.submit(spec_of(argv), {}, cli.run_job, executor="local")


def test_sweep_submits_a_job_array(
    tmp_path: Path, fake_sbatch: None, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = write(
        tmp_path / "s.yml", "optim.lr_initial: [0.1, 0.2]\nmodel.num_interactions: [2, 3]\n"
    )
    argv = ["--mode", "train", "--config-yml", str(CONFIG), "--submit", "--sweep-yml", str(sweep),
            "--run-dir", str(tmp_path), "--identifier", "grid"]  # fmt: skip
    jobs = slurm.submit(spec_of(argv), {"qos": "low"}, cli.run_job)
    assert [job.job_id for job in jobs] == [f"4242_{i}" for i in range(4)]
    folder = tmp_path / "logs" / "slurm"
    script = (folder / "4242" / "4242_submission.sh").read_text()  # one sbatch for the array
    assert "#SBATCH --array=0-3%4\n" in script and "#SBATCH --qos=low\n" in script
    specs = []
    for job in jobs:
        delayed = pickle.loads(job.paths.submitted_pickle.read_bytes())
        assert isinstance(delayed.function, CatforgeJob) and delayed.function.entry is cli.run_job
        specs.append(delayed.args[0])
    assert len({s.options.timestamp_id for s in specs}) == 4
    assert [s.options.identifier for s in specs] == [f"grid_run{i}" for i in range(4)]
    assert {s.time_limit_s for s in specs} == {72 * 3600}
    assert capsys.readouterr().out.count("submitted job 4242_") == 4


def test_submissions_in_the_same_second_get_their_own_runs(
    tmp_path: Path, fake_sbatch: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    class FrozenClock(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> datetime:
            return NOW

    monkeypatch.setattr(slurm, "datetime", FrozenClock)
    argv = ["--mode", "train", "--config-yml", str(CONFIG), "--submit", "--run-dir",
            str(tmp_path), "--identifier", "exp"]  # fmt: skip
    ids = []
    for _ in range(2):
        (job,) = slurm.submit(spec_of(argv), {}, cli.run_job)
        ids.append(submitted_spec(job).options.timestamp_id)
    assert ids == ["2024-05-06-07-08-09-exp", "2024-05-06-07-08-09-exp-2"]
    assert (tmp_path / "checkpoints" / "2024-05-06-07-08-09-exp-2").is_dir()


def test_a_bad_sweep_key_fails_before_submitting(tmp_path: Path, fake_sbatch: None) -> None:
    sweep = write(tmp_path / "s.yml", "optim.lr_initail: [0.1, 0.2]\n")
    argv = ["--mode", "train", "--config-yml", str(CONFIG), "--submit", "--sweep-yml", str(sweep),
            "--run-dir", str(tmp_path)]  # fmt: skip
    with pytest.raises(ConfigError, match="lr_initial"):
        slurm.submit(spec_of(argv), {}, cli.run_job)
    assert not (tmp_path / "logs").exists()


# --- the job: resume, --distributed, exit statuses, requeue ---------------------------------


def train_spec(run_dir: Path, *extra: str, limit_s: float = 72 * 3600) -> JobSpec:
    argv = ["--mode", "train", "--config-yml", "c.yml", "--run-dir", str(run_dir),
            "--timestamp-id=run1", *extra]  # fmt: skip
    return dataclasses.replace(spec_of(argv), time_limit_s=limit_s)


class FakeEntry:
    """The job's entry function replaced: records each spec and returns ``status``."""

    def __init__(self) -> None:
        self.status = 0
        self.calls: list[JobSpec] = []

    def __call__(self, spec: JobSpec) -> int:
        self.calls.append(spec)
        return self.status


def test_checkpoint_resumes_from_the_runs_checkpoint_when_it_exists(tmp_path: Path) -> None:
    spec = train_spec(tmp_path, "--checkpoint", "other.pt")
    again = CatforgeJob(cli.run_job).checkpoint(spec)
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    assert isinstance(again.function, CatforgeJob) and again.args == (spec,)
    assert again.function.entry is cli.run_job

    saved = tmp_path / "checkpoints" / "run1" / "checkpoint.pt"
    saved.parent.mkdir(parents=True)
    saved.write_bytes(b"")
    resumed = CatforgeJob(cli.run_job).checkpoint(spec).args[0]
    assert resumed.options.checkpoint == saved and resumed.options.timestamp_id == "run1"
    predict = train_spec(tmp_path).with_options(mode="predict")
    assert CatforgeJob(cli.run_job).checkpoint(predict).args == (predict,)


def test_the_job_runs_its_entry_and_reports_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = FakeEntry()
    spec = train_spec(tmp_path)
    assert CatforgeJob(entry)(spec) == 0 and entry.calls[-1] == spec
    monkeypatch.setattr(slurm, "job_num_tasks", lambda: 4)
    CatforgeJob(entry)(spec)
    assert entry.calls[-1] == spec.with_options(distributed=True)
    entry.status = 2
    with pytest.raises(CatforgeError, match="status 2"):
        CatforgeJob(entry)(spec)
    entry.status = RESUME_EXIT_CODE
    assert CatforgeJob(entry)(spec) == RESUME_EXIT_CODE  # outside submitit: nothing to requeue


def test_the_job_entry_runs_a_spec_as_the_command_line_would(tmp_path: Path) -> None:
    """``cli.run_job``: one-line errors with status 2, as ``main.py``."""
    spec = spec_of(["--mode", "train", "--config-yml", str(tmp_path / "missing.yml")])
    assert cli.run_job(spec) == 2


class FakeHandler(SignalHandler):
    """submitit's handler, recording requeue requests instead of requeueing."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def checkpoint_and_try_requeue(self, signum: int, frame: Any = None) -> None:
        self.calls.append(signum)


@pytest.mark.parametrize(("limit_s", "requeued"), [(120.0, True), (72 * 3600.0, False)])
def test_a_stopped_run_is_requeued_by_submitit_only_near_its_time_limit(
    tmp_path: Path, limit_s: float, requeued: bool
) -> None:
    """Exit status 75 after the time-limit warning (USR2 90 s before the limit) is requeued; a
    stop earlier in the job (preemption, scancel) is not."""
    handler = FakeHandler()
    entry = FakeEntry()
    entry.status = RESUME_EXIT_CODE
    previous = signal.signal(signal.SIGUSR2, handler.checkpoint_and_try_requeue)
    try:
        assert CatforgeJob(entry)(train_spec(tmp_path, limit_s=limit_s)) == RESUME_EXIT_CODE
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert handler.calls == ([signal.SIGUSR2] if requeued else [])


@pytest.mark.parametrize(
    ("elapsed_s", "near"),
    [(72 * 3600 - 120, True), (60.0, False), (0.9 * 72 * 3600, False), (72 * 3600 - 600, True)],
)
def test_near_time_limit_is_the_last_ten_minutes(elapsed_s: float, near: bool) -> None:
    assert slurm.near_time_limit(1000.0, 72 * 3600, now=1000.0 + elapsed_s) == near


# --- real jobs on submitit's local executor --------------------------------------------------


def wait_for(job: submitit.Job[Any], timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while not job.done():
        if time.monotonic() > deadline:
            job.cancel()
            pytest.fail(f"job did not finish in {timeout} s:\n{job.stderr()}")
        time.sleep(0.2)
    return job.result()


def local_train_argv(demo: Path, run_dir: Path, *extra: str) -> list[str]:
    data = data_overrides(demo, "s2ef")
    return ["--mode", "train", "--config-yml", str(CONFIG), "--cpu", "--submit",
            "--run-dir", str(run_dir), *SMALL_MODEL, *data, *extra]  # fmt: skip


@pytest.mark.distributed
def test_local_job_trains_to_completion(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = local_train_argv(demo, tmp_path, "--optim.max_epochs=1", "--optim.max_steps=2")
    (job,) = slurm.submit(spec_of(argv), {}, cli.run_job, executor="local")
    assert wait_for(job) == 0
    run = submitted_spec(job).options
    assert (tmp_path / "checkpoints" / str(run.timestamp_id) / "checkpoint.pt").is_file()
    assert job.paths.folder.parent == tmp_path / "logs" / "slurm"


@pytest.mark.distributed
def test_local_job_stopped_at_its_time_limit_is_requeued_and_resumes(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM -> the trainer saves and exits 75 -> within 10 min of the (5 min) time limit, so
    submitit's handler calls checkpoint() and requeues -> the rerun resumes with --checkpoint."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    parameters = slurm.executor_parameters
    monkeypatch.setattr(
        slurm, "executor_parameters", lambda *a: {**parameters(*a), "timeout_min": 5}
    )
    steps = 60
    argv = local_train_argv(demo, tmp_path, "--print-every=1", "--optim.max_epochs=10",
                            f"--optim.max_steps={steps}", "--optim.eval_every=1000")  # fmt: skip
    (job,) = slurm.submit(spec_of(argv), {}, cli.run_job, executor="local")
    first = submitted_spec(job).options
    metrics = tmp_path / "results" / str(first.timestamp_id) / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.is_file() and '"train"' in metrics.read_text()):
        assert not job.done(), job.stderr()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    job._process.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]  # forwarded to the task
    assert wait_for(job) == 0
    log = job.stderr() or ""
    assert "Requeued job" in log
    resumed = submitted_spec(job).options
    saved = tmp_path / "checkpoints" / str(first.timestamp_id) / "checkpoint.pt"
    assert resumed.checkpoint == saved and resumed.timestamp_id == first.timestamp_id
    train_steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
                   if json.loads(line)["split"] == "train"]  # fmt: skip
    assert 1 <= train_steps[0] < steps and train_steps[-1] == steps
