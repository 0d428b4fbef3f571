"""Run folders: unique ids, refusing another run's folders, and no empty folders left behind."""

from __future__ import annotations

import multiprocessing
from datetime import datetime
from pathlib import Path

import pytest

from catforge.config import Config, ModelConfig, RunOptions
from catforge.errors import ConfigError, OutputError
from catforge.runtime.runs import RunPaths

NOW = datetime(2026, 1, 2, 3, 4, 5)


def config(run_dir: Path, **options: object) -> Config:
    return Config(
        trainer="forces",
        model=ModelConfig("schnet"),
        options=RunOptions(run_dir=run_dir, **options),  # type: ignore[arg-type]
    )


def test_runs_started_in_the_same_second_get_different_folders(tmp_path: Path) -> None:
    first = RunPaths.reserve(config(tmp_path), fresh=True, now=NOW)
    second = RunPaths.reserve(config(tmp_path), fresh=True, now=NOW)
    assert first.timestamp_id == "2026-01-02-03-04-05"
    assert second.timestamp_id == "2026-01-02-03-04-05-2"
    for paths in (first, second):
        assert paths.checkpoint_dir.is_dir() and paths.results_dir.is_dir()
        assert paths.logs_dir == tmp_path / "logs" / "tensorboard" / paths.timestamp_id


def test_a_predict_run_of_that_second_is_not_shared_by_training(tmp_path: Path) -> None:
    predict = RunPaths.reserve(config(tmp_path, mode="predict", identifier="x"), now=NOW)
    assert predict.results_dir.is_dir() and not predict.checkpoint_dir.exists()
    train = RunPaths.reserve(config(tmp_path, identifier="x"), fresh=True, now=NOW)
    assert (predict.timestamp_id, train.timestamp_id) == (
        "2026-01-02-03-04-05-x",
        "2026-01-02-03-04-05-x-2",
    )


def _reserve_in_process(run_dir: str, queue: multiprocessing.Queue[str]) -> None:
    queue.put(RunPaths.reserve(config(Path(run_dir)), fresh=True, now=NOW).timestamp_id)


def test_concurrent_processes_never_share_an_id(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[str] = context.Queue()
    processes = [
        context.Process(target=_reserve_in_process, args=(str(tmp_path), queue)) for _ in range(6)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    ids = [queue.get(timeout=5) for _ in processes]
    assert len(set(ids)) == 6
    assert len(list((tmp_path / "checkpoints").iterdir())) == 6


def test_timestamp_id_of_a_run_with_files_is_refused_unless_resuming(tmp_path: Path) -> None:
    run = RunPaths.reserve(config(tmp_path), fresh=True, now=NOW)
    checkpoint = run.checkpoint_dir / "checkpoint.pt"
    checkpoint.write_bytes(b"finished work")
    named = config(tmp_path, timestamp_id=run.timestamp_id)
    with pytest.raises(ConfigError, match=r"--timestamp-id .*already has files.*--checkpoint"):
        RunPaths.reserve(named, fresh=True)
    assert checkpoint.read_bytes() == b"finished work"
    assert RunPaths.reserve(named).timestamp_id == run.timestamp_id  # a resume may use it
    empty = RunPaths.create(tmp_path, timestamp_id="empty-run")
    empty.results_dir.mkdir(parents=True)
    fresh = RunPaths.reserve(config(tmp_path, timestamp_id="empty-run"), fresh=True)
    assert fresh.checkpoint_dir.is_dir()  # an id whose folders hold nothing is free


def test_remove_empty_keeps_folders_with_files(tmp_path: Path) -> None:
    run = RunPaths.reserve(config(tmp_path), fresh=True, now=NOW)
    (run.logs_dir / "nested").mkdir()
    (run.results_dir / "metrics.jsonl").write_text("{}\n")
    run.remove_empty(tmp_path)
    assert not run.checkpoint_dir.exists() and not run.logs_dir.exists()
    assert run.results_dir.is_dir()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["results"]  # empty parents go


def test_debug_runs_create_nothing(tmp_path: Path) -> None:
    run = RunPaths.reserve(config(tmp_path, debug=True), fresh=True, now=NOW)
    assert run.timestamp_id == "2026-01-02-03-04-05"
    assert not any(tmp_path.iterdir())


def test_predict_takes_its_run_id_when_it_starts(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The results folder is named (and exists) before the predictions are computed."""
    from catforge.cli import modes
    from catforge.config import load_config

    seen: list[str | None] = []

    def predict_later(config: Config, context: modes.RunContext) -> dict[str, float]:
        seen.append(config.options.timestamp_id)
        assert context.paths.results_dir.is_dir()
        assert context.paths.results_dir == RunPaths.for_config(config).results_dir
        return {}

    monkeypatch.setattr(modes, "predict", predict_later)
    config_file = Path(__file__).resolve().parents[1] / "configs" / "demo" / "s2ef_schnet.yml"
    options = RunOptions(mode="predict", run_dir=tmp_path, checkpoint=tmp_path / "unused.pt")
    modes.run(load_config(config_file, [], options))
    (made,) = (tmp_path / "results").iterdir()
    assert seen == [made.name]


def test_data_loader_workers_are_capped_at_the_cpus(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from catforge.training import loaders as build

    monkeypatch.setattr(build, "available_cpus", lambda: 2)
    assert build.capped_workers(1) == 1
    assert build.capped_workers(64) == 2
    assert build.capped_workers(64) == 2
    warnings = [r for r in caplog.records if "optim.num_workers 64" in r.getMessage()]
    assert len(warnings) == 1  # one warning, not one per loader
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes share the node's two CPUs
    assert build.capped_workers(2) == 1


def test_a_run_dir_that_cannot_hold_folders_is_one_error(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    with pytest.raises(OutputError, match=r"afile/sub/checkpoints: cannot create the run folder"):
        RunPaths.reserve(config(afile / "sub"), fresh=True, now=NOW)


def test_refusal_without_a_checkpoint_does_not_offer_one(tmp_path: Path) -> None:
    run = RunPaths.reserve(config(tmp_path), fresh=True, now=NOW)
    (run.results_dir / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="wrote no checkpoint") as raised:
        RunPaths.reserve(config(tmp_path, timestamp_id=run.timestamp_id), fresh=True)
    assert "--checkpoint" not in str(raised.value)


def test_a_failed_mode_removes_only_the_folders_it_made(tmp_path: Path) -> None:
    training = RunPaths.reserve(config(tmp_path), fresh=True, now=NOW)  # no file written yet
    named = config(tmp_path, mode="validate", timestamp_id=training.timestamp_id)
    validate = RunPaths.reserve(named)
    assert validate.created == ()
    validate.remove_empty(tmp_path)
    assert training.checkpoint_dir.is_dir() and training.logs_dir.is_dir()
