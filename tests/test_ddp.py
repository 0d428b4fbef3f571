"""Multi-process runs on the CPU (gloo): launchers, DDP equivalence, sharded evaluation and
prediction, preemption. Each test starts real processes through torchrun or
``python -m torch.distributed.launch``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from catforge.cli.main import main
from catforge.potential.checkpoint import load_checkpoint
from catforge.runtime.preemption import RESUME_EXIT_CODE
from tests.factories import SMALL_MODEL, data_overrides

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "s2ef": ROOT / "configs" / "demo" / "s2ef_schnet.yml",
    "is2re": ROOT / "configs" / "demo" / "is2re_schnet.yml",
}
TIMEOUT = 240


def run_args(demo: Path, task: str, run_dir: Path, *extra: str) -> list[str]:
    """A tiny, deterministic CPU run of the demo config on the demo data."""
    return [
        f"--config-yml={CONFIGS[task]}", *SMALL_MODEL, *data_overrides(demo, task),
        f"--run-dir={run_dir}", "--timestamp-id=t", "--cpu", "--optim.num_workers=0",
        "--optim.eval_every=1000", "--optim.max_epochs=1000", "--print-every=1", *extra,
    ]  # fmt: skip


def launch(launcher: str, args: list[str], nproc: int = 2) -> subprocess.CompletedProcess[str]:
    """``main.py`` under torchrun (``torch.distributed.run``) or ``torch.distributed.launch``."""
    command = [sys.executable, "-m", f"torch.distributed.{launcher}", f"--nproc_per_node={nproc}",
               "--standalone", str(ROOT / "main.py"), "--distributed",
               "--distributed-backend=gloo", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=ROOT, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-20000:]
    return done


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


def assert_same_weights(one: Path, other: Path, atol: float) -> None:
    first, second = weights(one), weights(other)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("launcher", ["run", "launch"])
def test_two_processes_train_end_to_end(demo: Path, tmp_path: Path, launcher: str) -> None:
    args = run_args(demo, "s2ef", tmp_path, "--mode=train", "--optim.max_steps=3",
                    "--optim.batch_size=2")  # fmt: skip
    done = launch(launcher, args)
    checkpoint = tmp_path / "checkpoints" / "t" / "checkpoint.pt"
    state = load_checkpoint(checkpoint)
    assert state["step"] == 3
    assert not any(key.startswith("module.") for key in state["state_dict"])
    # Only rank 0 logs: one "checkpoint:" line, one JSONL record per train step.
    assert done.stdout.count("checkpoint:") == 1
    records = (tmp_path / "results" / "t" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in records if '"train"' in line] == [1, 2, 3]
    # The DDP checkpoint resumes in a single process.
    assert main([*run_args(demo, "s2ef", tmp_path, "--mode=train", "--optim.max_steps=4",
                           "--optim.batch_size=2"), f"--checkpoint={checkpoint}"]) == 0  # fmt: skip
    assert load_checkpoint(checkpoint)["step"] == 4
    if launcher == "run":  # and a single-process checkpoint resumes under DDP
        more = run_args(demo, "s2ef", tmp_path, "--mode=train", "--optim.max_steps=5",
                        "--optim.batch_size=2", f"--checkpoint={checkpoint}")  # fmt: skip
        launch(launcher, more)
        assert load_checkpoint(checkpoint)["step"] == 5


@pytest.mark.parametrize(("task", "balance"), [("s2ef", "atoms"), ("is2re", None)])
def test_ddp_equals_one_process_with_the_global_batch(
    demo: Path, tmp_path: Path, task: str, balance: str | None
) -> None:
    steps = ["--mode=train", "--optim.max_steps=4", "--optim.lr_initial=0.005"]
    if balance:
        steps.append(f"--optim.load_balancing={balance}")
    launch("run", run_args(demo, task, tmp_path / "ddp", *steps, "--optim.batch_size=2"))
    assert main(run_args(demo, task, tmp_path / "one", *steps, "--optim.batch_size=4")) == 0
    assert_same_weights(
        tmp_path / "ddp" / "checkpoints" / "t" / "checkpoint.pt",
        tmp_path / "one" / "checkpoints" / "t" / "checkpoint.pt",
        atol=1e-5,
    )


def test_sharded_validation_and_prediction_equal_one_process(demo: Path, tmp_path: Path) -> None:
    train = run_args(demo, "s2ef", tmp_path, "--mode=train", "--optim.max_steps=2")
    assert main(train) == 0
    checkpoint = f"--checkpoint={tmp_path / 'checkpoints' / 't' / 'checkpoint.pt'}"
    results = {}
    for name, runner in (("one", None), ("two", "run")):
        for mode in ("validate", "predict"):
            args = run_args(demo, "s2ef", tmp_path / name, f"--mode={mode}", checkpoint,
                            "--optim.eval_batch_size=3")  # fmt: skip
            if runner is None:
                assert main(args) == 0
            else:
                launch(runner, args)
        results[name] = tmp_path / name / "results" / "t"
    one_metrics = json.loads((results["one"] / "metrics_val.json").read_text())
    two_metrics = json.loads((results["two"] / "metrics_val.json").read_text())
    assert one_metrics.keys() == two_metrics.keys()
    for key, value in one_metrics.items():
        assert two_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    with (
        np.load(results["one"] / "s2ef_predictions.npz") as one,
        np.load(results["two"] / "s2ef_predictions.npz") as two,
    ):
        assert two["ids"].tolist() == one["ids"].tolist()
        assert len(set(two["ids"].tolist())) == len(two["ids"])
        np.testing.assert_allclose(two["energy"], one["energy"], atol=1e-5)
        np.testing.assert_allclose(two["forces"], one["forces"], atol=1e-5)
        np.testing.assert_array_equal(two["chunk_idx"], one["chunk_idx"])


def test_ranks_agree_on_a_new_run_id(demo: Path, tmp_path: Path) -> None:
    assert main(run_args(demo, "is2re", tmp_path, "--mode=train", "--optim.max_steps=1")) == 0
    checkpoint = f"--checkpoint={tmp_path / 'checkpoints' / 't' / 'checkpoint.pt'}"
    args = [arg for arg in run_args(demo, "is2re", tmp_path / "new", "--mode=validate", checkpoint)
            if not arg.startswith("--timestamp-id")]  # fmt: skip
    launch("run", args)
    (folder,) = (tmp_path / "new" / "results").iterdir()
    assert (folder / "metrics_val.json").is_file()


def test_sigterm_checkpoints_and_the_resumed_run_matches(demo: Path, tmp_path: Path) -> None:
    steps = 40
    common = ["--mode=train", f"--optim.max_steps={steps}", "--optim.batch_size=2"]
    assert main(run_args(demo, "s2ef", tmp_path / "whole", *common)) == 0
    args = run_args(demo, "s2ef", tmp_path / "cut", *common)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    log = tmp_path / "cut" / "results" / "t" / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT
    while not (log.is_file() and log.read_text().count('"train"') >= 3):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == RESUME_EXIT_CODE, stderr[-3000:]
    checkpoint = tmp_path / "cut" / "checkpoints" / "t" / "checkpoint.pt"
    stopped_at = load_checkpoint(checkpoint)["step"]
    assert 3 <= stopped_at < steps
    assert "--checkpoint" in stderr
    assert main([*args, f"--checkpoint={checkpoint}"]) == 0
    assert load_checkpoint(checkpoint)["step"] == steps
    assert_same_weights(checkpoint, tmp_path / "whole" / "checkpoints" / "t" / "checkpoint.pt", 0)


def test_sharded_relaxations_equal_one_process(demo: Path, tmp_path: Path) -> None:
    assert main(run_args(demo, "s2ef", tmp_path, "--mode=train", "--optim.max_steps=2")) == 0
    relax = [
        f"--checkpoint={tmp_path / 'checkpoints' / 't' / 'checkpoint.pt'}",
        f"--task.relax_dataset.src={demo / 'is2re' / 'train' / 'data.lmdb'}",
        "--task.relaxation_steps=5", "--task.write_pos=True",
    ]  # fmt: skip
    for name in ("one", "two"):
        args = run_args(demo, "s2ef", tmp_path / name, "--mode=run-relaxations", *relax,
                        f"--task.relax_opt.traj_dir={tmp_path / name / 'traj'}")  # fmt: skip
        args[0] = f"--config-yml={ROOT / 'configs' / 'demo' / 'is2rs_schnet.yml'}"
        if name == "one":
            assert main(args) == 0
        else:
            launch("run", args)
    one, two = (tmp_path / name / "results" / "t" for name in ("one", "two"))
    assert not (two / "relaxed_pos_1.json").exists()
    first = json.loads((one / "relaxed_pos_0.json").read_text())
    second = json.loads((two / "relaxed_pos_0.json").read_text())
    assert [r["ids"] for r in second] == [r["ids"] for r in first]
    for a, b in zip(first, second, strict=True):
        np.testing.assert_allclose(b["positions"], a["positions"], atol=1e-5)
    with np.load(one / "relaxed_energies.npz") as a, np.load(two / "relaxed_energies.npz") as b:
        np.testing.assert_allclose(b["energy"], a["energy"], atol=1e-4)
    n_traj = len(list((tmp_path / "two" / "traj").glob("*.traj")))
    assert n_traj == len(first)


def test_a_bad_entry_on_one_rank_stops_every_rank_with_a_checkpoint(
    demo: Path, tmp_path: Path
) -> None:
    """One NaN entry in a global batch of the whole set reaches one rank only: all ranks stop
    before the step, rank 0 writes the checkpoint, no rank waits for the others forever."""
    import numpy as np

    from tests.test_bad_inputs import _fields, write_raw_lmdb

    good = [_fields(index) for index in range(3)]
    pos = np.array(good[1]["pos"])
    pos[0, 0] = np.nan
    shard = tmp_path / "nan" / "data.0000.lmdb"
    shard.parent.mkdir()
    write_raw_lmdb(shard, [good[0], {**good[1], "pos": pos, "sid": 41}, good[2], good[0]])
    stats = ["--dataset.train.target_mean=0", "--dataset.train.target_std=1",
             "--dataset.train.grad_target_std=1"]  # fmt: skip
    args = run_args(demo, "s2ef", tmp_path, "--mode=train", "--optim.max_steps=2",
                    "--optim.batch_size=2", f"--dataset.train.src={shard.parent}",
                    *stats)  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--standalone", str(ROOT / "main.py"), "--distributed",
               "--distributed-backend=gloo", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=env,
                          cwd=ROOT, check=False)  # fmt: skip
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("catforge: error:")]
    assert len(errors) == 2 and errors[0] == errors[1], done.stderr[-5000:]
    assert "sid 41" in errors[0] and "NaN" in errors[0] and "step 0 and saved" in errors[0]
    checkpoint = tmp_path / "checkpoints" / "t" / "checkpoint.pt"
    assert load_checkpoint(checkpoint)["step"] == 0
