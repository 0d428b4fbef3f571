"""Exact resume: kill-and-resume equals uninterrupted, best checkpoints, config diffs."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from catforge.cli.modes import run
from catforge.config import RunOptions, load_config
from catforge.errors import CheckpointError
from catforge.potential.checkpoint import load_checkpoint, save_checkpoint
from tests.factories import SMALL_MODEL, data_overrides

ROOT = Path(__file__).resolve().parents[1]
S2EF_CONFIG = ROOT / "configs" / "demo" / "s2ef_schnet.yml"
IS2RE_CONFIG = ROOT / "configs" / "demo" / "is2re_schnet.yml"
STEPS_PER_EPOCH = 18  # tiny S2EF demo: 18 batches of 16 frames


def train(config: Path, overrides: list[str], run_dir: Path, **options: object) -> None:
    """One in-process ``--mode train`` run on the CPU."""
    run_options = RunOptions(mode="train", run_dir=run_dir, print_every=4, cpu=True, **options)  # type: ignore[arg-type]
    run(load_config(config, overrides, run_options))


def only_checkpoint_dir(run_dir: Path) -> Path:
    (folder,) = (run_dir / "checkpoints").iterdir()
    return folder


def assert_same_weights(first: Path, second: Path) -> None:
    a, b = load_checkpoint(first)["state_dict"], load_checkpoint(second)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_checkpoint_holds_the_full_training_state(demo: Path, tmp_path: Path) -> None:
    overrides = [*data_overrides(demo, "s2ef"), *SMALL_MODEL, "--optim.max_steps=5"]
    train(S2EF_CONFIG, [*overrides, "--optim.checkpoint_every=2"], tmp_path)
    state = load_checkpoint(only_checkpoint_dir(tmp_path) / "checkpoint.pt")
    expected = {"format_version", "config", "state_dict", "optimizer", "scheduler", "ema"}
    expected |= {"normalizers", "amp", "step", "epoch", "batch_in_epoch", "best_val_metric"}
    assert expected | {"rng", "run_id", "primary_metric"} <= state.keys()
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (5, 0, 5)
    assert state["run_id"] == only_checkpoint_dir(tmp_path).name
    assert {"torch", "cuda", "numpy", "python"} <= state["rng"].keys()
    assert state["config"]["optim"]["max_steps"] == 5


def test_stop_mid_epoch_then_resume_equals_uninterrupted(demo: Path, tmp_path: Path) -> None:
    # A schedule in steps (warmup, then x0.1 after the resume point), not in fractions of the
    # run: the first part stops early by a smaller max_steps, which must not change its LR.
    schedule = [
        "--optim.schedule_unit=steps",
        "--optim.warmup_steps=3",
        "--optim.lr_milestones=[15]",
    ]
    base = [*data_overrides(demo, "s2ef"), *SMALL_MODEL, *schedule]
    steps = STEPS_PER_EPOCH + 4
    train(S2EF_CONFIG, [*base, f"--optim.max_steps={steps}"], tmp_path / "whole")
    train(S2EF_CONFIG, [*base, "--optim.max_steps=7"], tmp_path / "split")
    checkpoint = only_checkpoint_dir(tmp_path / "split") / "checkpoint.pt"
    assert load_checkpoint(checkpoint)["batch_in_epoch"] == 7
    train(S2EF_CONFIG, [*base, f"--optim.max_steps={steps}"], tmp_path / "split",
          checkpoint=checkpoint)  # fmt: skip
    resumed = load_checkpoint(checkpoint)
    assert (resumed["step"], resumed["epoch"], resumed["batch_in_epoch"]) == (steps, 1, 4)
    assert_same_weights(only_checkpoint_dir(tmp_path / "whole") / "checkpoint.pt", checkpoint)


def _train_command(demo: Path, steps: int, *extra: str) -> list[str]:
    """``main.py --mode train`` of the small demo S2EF model for ``steps`` steps on the CPU."""
    return [
        sys.executable, str(ROOT / "main.py"), "--mode", "train", "--config-yml", str(S2EF_CONFIG),
        *data_overrides(demo, "s2ef"), *SMALL_MODEL, f"--optim.max_steps={steps}", "--cpu", *extra,
    ]  # fmt: skip


def _train_uninterrupted(command: list[str], run_dir: Path) -> dict[str, str]:
    """Run ``command`` to the end in ``run_dir``; returns the environment it ran with."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    run_dir.mkdir()
    whole = subprocess.run(command, cwd=run_dir, env=env, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert whole.returncode == 0, whole.stderr[-3000:]
    return env


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(demo: Path, tmp_path: Path) -> None:
    steps = 2 * STEPS_PER_EPOCH + 6
    command = _train_command(demo, steps, "--optim.checkpoint_every=3", "--print-every=5")
    env = _train_uninterrupted(command, tmp_path / "whole")

    (tmp_path / "killed").mkdir()
    killed = subprocess.Popen(command, cwd=tmp_path / "killed", env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        checkpoint = _wait_for_mid_epoch_checkpoint(tmp_path / "killed", killed)
        killed.send_signal(signal.SIGKILL)
    finally:
        killed.kill()
        killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    stopped = load_checkpoint(checkpoint)
    assert 0 < stopped["step"] < steps and stopped["batch_in_epoch"] > 0

    resume = subprocess.run([*command, "--checkpoint", str(checkpoint)], cwd=tmp_path / "killed",
                            env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resume.returncode == 0, resume.stderr[-3000:]
    assert only_checkpoint_dir(tmp_path / "killed") == checkpoint.parent  # same run folders
    final = load_checkpoint(checkpoint)
    assert final["step"] == steps
    assert_same_weights(only_checkpoint_dir(tmp_path / "whole") / "checkpoint.pt", checkpoint)
    run_id = checkpoint.parent.name
    records = (tmp_path / "killed" / "results" / run_id / "metrics.jsonl").read_text()
    logged = [
        (json.loads(line)["split"], json.loads(line)["step"]) for line in records.splitlines()
    ]
    assert max(step for _, step in logged) == steps  # appended to the same run, continuing steps
    # The steps logged after the checkpoint by the killed process are not there twice.
    assert len(logged) == len(set(logged)), sorted(logged)
    whole_log = only_results_dir(tmp_path / "whole") / "metrics.jsonl"
    whole_logged = [(json.loads(line)["split"], json.loads(line)["step"])
                    for line in whole_log.read_text().splitlines()]  # fmt: skip
    assert logged == whole_logged


def only_results_dir(run_dir: Path) -> Path:
    (folder,) = (run_dir / "results").iterdir()
    return folder


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_the_resumed_run_matches(demo: Path, tmp_path: Path) -> None:
    """SIGINT finishes the step, writes checkpoint.pt, prints the resume command, exits 130."""
    steps = STEPS_PER_EPOCH + 6
    command = _train_command(demo, steps, "--optim.checkpoint_every=1000", "--print-every=1")
    env = _train_uninterrupted(command, tmp_path / "whole")

    (tmp_path / "stopped").mkdir()
    stopped = subprocess.Popen(command, cwd=tmp_path / "stopped", env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        _wait_for_logged_step(tmp_path / "stopped", stopped, 3)
        stopped.send_signal(signal.SIGINT)
        _, stderr = stopped.communicate(timeout=120)
    finally:
        stopped.kill()
    assert stopped.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    checkpoint = only_checkpoint_dir(tmp_path / "stopped") / "checkpoint.pt"
    assert f"resume with --checkpoint {checkpoint.relative_to(tmp_path / 'stopped')}" in stderr
    state = load_checkpoint(checkpoint)
    assert 3 <= state["step"] < STEPS_PER_EPOCH  # mid-epoch: nothing else had written one

    resume = subprocess.run([*command, "--checkpoint", str(checkpoint)], cwd=tmp_path / "stopped",
                            env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resume.returncode == 0, resume.stderr[-3000:]
    assert_same_weights(only_checkpoint_dir(tmp_path / "whole") / "checkpoint.pt", checkpoint)


def _wait_for_logged_step(run_dir: Path, process: subprocess.Popen[str], step: int) -> None:
    """Poll the run's metrics.jsonl until it logged train ``step``."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, "training finished before it could be stopped"
        for log in run_dir.glob("results/*/metrics.jsonl"):
            if any(json.loads(line)["step"] >= step for line in log.read_text().splitlines()):
                return
        time.sleep(0.02)
    raise AssertionError(f"step {step} was never logged")


def _wait_for_mid_epoch_checkpoint(run_dir: Path, process: subprocess.Popen[bytes]) -> Path:
    """Poll until the run has a checkpoint.pt taken mid-epoch (step >= 3)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, "training finished before it could be killed"
        for checkpoint in run_dir.glob("checkpoints/*/checkpoint.pt"):
            state = load_checkpoint(checkpoint)
            if state["step"] >= 3 and state["batch_in_epoch"] > 0:
                return checkpoint
        time.sleep(0.02)
    raise AssertionError("no mid-epoch checkpoint appeared")


@pytest.mark.parametrize(
    ("primary", "unbeatable"),
    [("energy_mae", 0.0), ("energy_within_threshold", 1.0)],
)
def test_resumed_run_keeps_a_better_best_checkpoint(
    demo: Path, tmp_path: Path, primary: str, unbeatable: float
) -> None:
    base = [*data_overrides(demo, "is2re"), *SMALL_MODEL, f"--task.primary_metric={primary}"]
    train(IS2RE_CONFIG, [*base, "--optim.max_steps=2", "--optim.eval_every=1"], tmp_path)
    folder = only_checkpoint_dir(tmp_path)
    best = load_checkpoint(folder / "best_checkpoint.pt")
    assert best["primary_metric"] == primary and "optimizer" not in best
    # The best so far was unbeatable: resuming must not replace best_checkpoint.pt.
    state = load_checkpoint(folder / "checkpoint.pt")
    save_checkpoint({**state, "best_val_metric": unbeatable}, folder / "checkpoint.pt")
    before = (folder / "best_checkpoint.pt").read_bytes()
    train(IS2RE_CONFIG, [*base, "--optim.max_steps=4", "--optim.eval_every=1"], tmp_path,
          checkpoint=folder / "checkpoint.pt")  # fmt: skip
    assert (folder / "best_checkpoint.pt").read_bytes() == before
    assert load_checkpoint(folder / "checkpoint.pt")["best_val_metric"] == unbeatable


def test_a_better_best_file_than_the_checkpoint_knows_is_kept(demo: Path, tmp_path: Path) -> None:
    """Killed between writing best_checkpoint.pt and checkpoint.pt: the file's metric counts."""
    base = [*data_overrides(demo, "is2re"), *SMALL_MODEL, "--optim.eval_every=1"]
    train(IS2RE_CONFIG, [*base, "--optim.max_steps=2"], tmp_path)
    folder = only_checkpoint_dir(tmp_path)
    best = load_checkpoint(folder / "best_checkpoint.pt")
    best["val_metrics"] = {**best["val_metrics"], "energy_mae": 0.0}
    save_checkpoint(best, folder / "best_checkpoint.pt")
    state = load_checkpoint(folder / "checkpoint.pt")
    save_checkpoint({**state, "best_val_metric": None}, folder / "checkpoint.pt")
    before = (folder / "best_checkpoint.pt").read_bytes()
    train(IS2RE_CONFIG, [*base, "--optim.max_steps=3"], tmp_path,
          checkpoint=folder / "checkpoint.pt")  # fmt: skip
    assert (folder / "best_checkpoint.pt").read_bytes() == before


def test_worse_best_metric_is_replaced_on_resume(demo: Path, tmp_path: Path) -> None:
    base = [*data_overrides(demo, "is2re"), *SMALL_MODEL, "--optim.eval_every=1"]
    train(IS2RE_CONFIG, [*base, "--optim.max_steps=2"], tmp_path)
    folder = only_checkpoint_dir(tmp_path)
    state = load_checkpoint(folder / "checkpoint.pt")
    save_checkpoint({**state, "best_val_metric": 1e9}, folder / "checkpoint.pt")
    (folder / "best_checkpoint.pt").unlink()
    train(IS2RE_CONFIG, [*base, "--optim.max_steps=3"], tmp_path,
          checkpoint=folder / "checkpoint.pt")  # fmt: skip
    assert load_checkpoint(folder / "best_checkpoint.pt")["step"] == 3


def test_changed_config_is_reported_and_wins(
    demo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = [*data_overrides(demo, "s2ef"), *SMALL_MODEL]
    train(S2EF_CONFIG, [*base, "--optim.max_epochs=1", "--optim.max_steps=3"], tmp_path)
    checkpoint = only_checkpoint_dir(tmp_path) / "checkpoint.pt"
    with caplog.at_level(logging.WARNING, logger="catforge.training.resume"):
        changed = ["--optim.max_epochs=1", "--optim.max_steps=5", "--optim.clip_grad_norm=5.0"]
        train(S2EF_CONFIG, [*base, *changed], tmp_path, checkpoint=checkpoint)
    messages = [record.getMessage() for record in caplog.records]
    assert any("optim.max_steps: 3 -> 5" in message for message in messages), messages
    assert any("optim.clip_grad_norm: 10.0 -> 5.0" in message for message in messages)
    assert not any("options.checkpoint" in message for message in messages)
    state = load_checkpoint(checkpoint)
    assert state["step"] == 5 and state["config"]["optim"]["clip_grad_norm"] == 5.0


def test_resume_into_an_incompatible_model_names_the_parameter(demo: Path, tmp_path: Path) -> None:
    base = [*data_overrides(demo, "is2re"), "--model.num_filters=16", "--model.num_gaussians=20"]
    train(IS2RE_CONFIG, [*base, "--model.hidden_channels=16", "--optim.max_steps=1"], tmp_path)
    checkpoint = only_checkpoint_dir(tmp_path) / "checkpoint.pt"
    wider = [*base, "--model.hidden_channels=32", "--optim.max_steps=2"]
    with pytest.raises(CheckpointError, match=r"parameter '[\w.]+' has shape \(.*16.*\).*\(.*32"):
        train(IS2RE_CONFIG, wider, tmp_path, checkpoint=checkpoint)
    with pytest.raises(CheckpointError, match=r"parameter '[\w.]+' has shape"):
        train(IS2RE_CONFIG, [*wider, f"--optim.init_from={checkpoint}"], tmp_path / "fine")


def test_init_from_loads_weights_only(demo: Path, tmp_path: Path) -> None:
    base = [*data_overrides(demo, "is2re"), *SMALL_MODEL]
    train(IS2RE_CONFIG, [*base, "--optim.max_steps=3"], tmp_path / "first")
    source = only_checkpoint_dir(tmp_path / "first") / "checkpoint.pt"
    train(IS2RE_CONFIG, [*base, "--optim.max_steps=1", f"--optim.init_from={source}"],
          tmp_path / "second")  # fmt: skip
    state = load_checkpoint(only_checkpoint_dir(tmp_path / "second") / "checkpoint.pt")
    assert state["step"] == 1  # fresh counters
    assert float(state["optimizer"]["state"][0]["step"]) == 1  # a fresh optimizer
