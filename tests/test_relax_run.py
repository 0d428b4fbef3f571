"""``--mode run-relaxations`` end to end: output files, trajectories, metrics, resume."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.io import read

from catforge.assemble.models import build_model, load_potential
from catforge.cli.main import main
from catforge.config import load_config
from catforge.data.lmdb import LmdbDataset, write_lmdb
from catforge.potential.checkpoint import save_checkpoint
from catforge.potential.targets import Normalizer, TargetTransform
from catforge.relax import run as relax_run
from catforge.relax.driver import RelaxResult
from catforge.relax.trajectory import LOCK_NAME
from catforge.runtime import progress as progress_module
from tests.factories import SMALL_MODEL

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo" / "is2rs_schnet.yml"
IS2RE_CONFIG = ROOT / "configs" / "demo" / "is2re_schnet.yml"


@dataclass(frozen=True)
class Setup:
    checkpoint: Path
    relax_set: Path
    run_dir: Path

    def argv(self, *extra: str, timestamp: str = "t") -> list[str]:
        return [
            "--mode=run-relaxations", f"--config-yml={CONFIG}", f"--checkpoint={self.checkpoint}",
            f"--run-dir={self.run_dir}", f"--timestamp-id={timestamp}", "--cpu",
            *SMALL_MODEL, f"--task.relax_dataset.src={self.relax_set}",
            f"--task.relax_opt.traj_dir={self.run_dir / 'traj'}",
            "--task.relaxation_steps=12", "--optim.eval_batch_size=3", *extra,
        ]  # fmt: skip

    def results(self, timestamp: str = "t") -> Path:
        return self.run_dir / "results" / timestamp


def save_model(path: Path, seed: int = 0, config_file: Path = CONFIG) -> Path:
    """A random small model of ``config_file`` with non-trivial normalisers, saved like the
    trainer does."""
    config = load_config(config_file, SMALL_MODEL)
    torch.manual_seed(seed)
    model = build_model(config)
    transform = TargetTransform(Normalizer(-0.3, 0.5))
    state = {"state_dict": model.state_dict(), "normalizers": transform.state_dict()}
    save_checkpoint({**state, "config": config.to_dict()}, path)
    return path


@pytest.fixture
def setup(demo: Path, tmp_path: Path) -> Setup:
    """A random small S2EF model and the two demo IS2RE validation structures."""
    checkpoint = save_model(tmp_path / "checkpoint.pt")
    return Setup(checkpoint, demo / "is2re" / "val" / "data.lmdb", tmp_path / "run")


def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (the run's lock file aside), by relative path."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != LOCK_NAME
    }


def test_outputs_trajectories_and_metrics(setup: Setup) -> None:
    assert main(setup.argv()) == 0
    dataset = LmdbDataset(setup.relax_set)
    sids = [str(int(dataset[index].sid)) for index in range(len(dataset))]
    results = setup.results()
    records = json.loads((results / "relaxed_pos_0.json").read_text())
    assert [record["ids"] for record in records] == sids
    with np.load(results / "relaxed_positions.npz") as npz:
        assert npz["ids"].tolist() == sids
        blocks = np.split(npz["pos"], npz["chunk_idx"])
    with np.load(results / "relaxed_energies.npz") as npz:
        energies, steps = npz["energy"], npz["steps"]
    potential = load_potential(setup.checkpoint)
    for index, (record, block) in enumerate(zip(records, blocks, strict=True)):
        initial = dataset[index]
        np.testing.assert_allclose(block, record["positions"], atol=1e-12)
        assert block.shape == (initial.n_atoms, 3)
        fixed = initial.fixed.numpy()
        np.testing.assert_allclose(block[fixed], initial.pos.numpy()[fixed], atol=1e-6)
        # The relaxed energy is the model's energy at the relaxed positions.
        relaxed = initial.replace(pos=torch.as_tensor(block, dtype=torch.float32))
        assert energies[index] == pytest.approx(float(potential(relaxed).energy), abs=1e-4)
        frames = read(setup.run_dir / "traj" / f"{record['ids']}.traj", index=":")
        assert len(frames) == steps[index] + 1
        np.testing.assert_allclose(frames[0].positions, initial.pos.numpy(), atol=1e-6)
        np.testing.assert_allclose(frames[-1].positions, block, atol=1e-12)
        for frame in (frames[0], frames[-1]):  # each frame's results belong to its positions
            at_frame = initial.replace(pos=torch.as_tensor(frame.positions, dtype=torch.float32))
            output = potential(at_frame)
            assert frame.get_potential_energy() == pytest.approx(float(output.energy), abs=1e-4)
            np.testing.assert_allclose(
                frame.get_forces(apply_constraint=False), output.forces.numpy(), atol=1e-4
            )
            assert np.array_equal(frame.constraints[0].index, np.flatnonzero(fixed))
    assert not list((setup.run_dir / "traj").glob("*.traj_tmp"))
    metrics = json.loads((results / "metrics_relax.json").read_text())
    for name in ("average_distance_within_threshold", "positions_mae", "energy_mae",
                 "energy_within_threshold", "converged_fraction"):  # fmt: skip
        assert 0.0 <= metrics[name] < float("inf")
    logged = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["split"] == "relax"
    assert list((setup.run_dir / "logs" / "tensorboard" / "t").iterdir())


def test_rerun_skips_completed_trajectories(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    assert main(setup.argv(timestamp="first")) == 0
    traj = sorted((setup.run_dir / "traj").glob("*.traj"))
    stamps = {path: path.stat().st_mtime_ns for path in traj}
    redo = traj[1]
    redo.unlink()
    with caplog.at_level(logging.INFO, logger="catforge.relax.run"):
        assert main(setup.argv(timestamp="second")) == 0
    assert f"{len(traj) - 1} of {len(traj)} structures already relaxed" in caplog.text
    assert all(path.stat().st_mtime_ns == stamps[path] for path in traj if path != redo)
    assert redo.is_file()
    for name in ("relaxed_positions.npz", "relaxed_energies.npz"):
        with (
            np.load(setup.results("first") / name) as first,
            np.load(setup.results("second") / name) as second,
        ):
            for key in first.files:
                if first[key].dtype.kind == "f":  # float32 model: batch composition rounds
                    np.testing.assert_allclose(second[key], first[key], atol=1e-5)
                else:
                    np.testing.assert_array_equal(second[key], first[key])
    # A trajectory of another structure under this name is not taken for this one.
    other = traj[0]
    other.write_bytes(redo.read_bytes())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="catforge"):
        assert main(setup.argv(timestamp="swapped")) == 0
    assert "starts from another structure" in caplog.text
    with (
        np.load(setup.results("first") / "relaxed_energies.npz") as first,
        np.load(setup.results("swapped") / "relaxed_energies.npz") as swapped,
    ):
        np.testing.assert_allclose(swapped["energy"], first["energy"], atol=1e-5)
    # Other settings: refused like another model, nothing replaced.
    before = hashes(setup.run_dir / "traj")
    assert main(setup.argv("--task.relax_opt.maxstep=0.03", timestamp="third")) == 2
    assert hashes(setup.run_dir / "traj") == before


def test_first_and_last_frames_only(setup: Setup) -> None:
    assert main(setup.argv("--task.save_full_traj=False", "--task.relaxation_fmax=0")) == 0
    for path in (setup.run_dir / "traj").glob("*.traj"):
        frames = read(path, index=":")
        assert [frame.info["step"] for frame in frames] == [0, 12]


def test_batch_limit_and_no_positions_file(setup: Setup, demo: Path) -> None:
    train = demo / "is2re" / "train" / "data.lmdb"
    assert len(LmdbDataset(train)) > 3
    argv = setup.argv(
        "--task.num_relaxation_batches=1", "--task.write_pos=False",
        f"--task.relax_dataset.src={train}", "--task.relaxation_steps=2",
    )  # fmt: skip
    assert main(argv) == 0
    results = setup.results()
    assert not (results / "relaxed_pos_0.json").exists()
    with np.load(results / "relaxed_energies.npz") as npz:
        assert len(npz["ids"]) == 3  # one batch of eval_batch_size


def test_tutorial_layout_with_relax_keys_at_top_level(setup: Setup, tmp_path: Path) -> None:
    config = tmp_path / "tutorial.yml"
    config.write_text(
        f"includes: [{ROOT / 'configs' / 'demo' / 's2ef_schnet.yml'}]\n"
        f"relax_dataset: {{src: {setup.relax_set}}}\n"
        "write_pos: True\nrelaxation_steps: 3\n"
        f"relax_opt: {{maxstep: 0.04, memory: 50, damping: 1.0, alpha: 70.0, "
        f"traj_dir: {tmp_path / 'tutorial_traj'}}}\n"
    )
    argv = [f"--config-yml={config}" if arg.startswith("--config-yml") else arg
            for arg in setup.argv() if "relax" not in arg.split("=")[0]]  # fmt: skip
    assert main(argv) == 0
    assert len(list((tmp_path / "tutorial_traj").glob("*.traj"))) == 2
    assert (setup.results() / "relaxed_pos_0.json").is_file()


def test_repeated_sids_are_refused_before_relaxing(
    setup: Setup, demo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frames = demo / "s2ef" / "val"  # S2EF frames: one sid per trajectory frame
    assert main(setup.argv(f"--task.relax_dataset.src={frames}")) == 2
    assert "repeats sid" in capsys.readouterr().err
    assert not (setup.run_dir / "traj").exists()


def test_errors(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [arg for arg in setup.argv() if not arg.startswith("--checkpoint")]
    assert main(argv) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert main([*setup.argv(), "--task.relax_opt.memory=0"]) == 2
    assert "memory" in capsys.readouterr().err


def test_second_model_neither_replaces_nor_mixes_with_the_first(
    setup: Setup,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    traj = setup.run_dir / "traj"
    assert main(setup.argv(timestamp="first")) == 0
    first = hashes(traj)
    assert len(first) == 2
    stale = traj / "999.traj_tmp"  # left by a killed run: removed when the next one starts
    stale.write_bytes(b"partial")
    capsys.readouterr()
    other = save_model(tmp_path / "other.pt", seed=1)
    second = Setup(other, setup.relax_set, setup.run_dir)
    assert main(second.argv(timestamp="second")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"{traj}: holds 2 finished trajectories of another model" in err
    assert str(setup.checkpoint) in err and "use another task.relax_opt.traj_dir" in err
    assert hashes(traj) == {**first, "999.traj_tmp": hashlib.sha256(b"partial").hexdigest()}
    assert not second.results("second").exists()
    # In its own folder the second model relaxes everything and the first's files stay.
    elsewhere = f"--task.relax_opt.traj_dir={tmp_path / 'other_traj'}"
    assert main(second.argv(elsewhere, timestamp="second")) == 0
    assert len(list((tmp_path / "other_traj").glob("*.traj"))) == 2
    assert hashes(traj) == {**first, "999.traj_tmp": hashlib.sha256(b"partial").hexdigest()}
    # The first model's rerun still resumes: nothing relaxed again, the stale file removed.
    with caplog.at_level(logging.INFO, logger="catforge.relax"):
        assert main(setup.argv(timestamp="third")) == 0
    assert "2 of 2 structures already relaxed" in caplog.text
    assert hashes(traj) == first
    with (
        np.load(setup.results("first") / "relaxed_energies.npz") as a,
        np.load(setup.results("third") / "relaxed_energies.npz") as b,
    ):
        np.testing.assert_array_equal(a["energy"], b["energy"])


def test_trajectories_of_another_program_are_refused(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(setup.argv()) == 0
    traj = setup.run_dir / "traj"
    path = sorted(traj.glob("*.traj"))[0]
    atoms = read(path)
    assert isinstance(atoms, Atoms)
    atoms.info.clear()  # as OCP writes them: no relax tag
    atoms.write(path)
    capsys.readouterr()
    before = hashes(traj)
    assert main(setup.argv(timestamp="again")) == 2
    err = capsys.readouterr().err
    assert "holds 1 finished trajectories" in err and "written by another program" in err
    assert hashes(traj) == before


def test_energy_only_checkpoint_is_refused(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    is2re = save_model(tmp_path / "is2re.pt", config_file=IS2RE_CONFIG)
    assert main(Setup(is2re, setup.relax_set, setup.run_dir).argv()) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert (
        f"{is2re}: this checkpoint serves IS2RE" in err
        and "for relaxations use a checkpoint of a S2EF" in err
    )
    assert hashes(setup.run_dir) == {}  # no file written


def test_empty_and_missing_relax_sets(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.lmdb"
    assert write_lmdb([], empty) == 0
    assert main(setup.argv(f"--task.relax_dataset.src={empty}")) == 2
    err = capsys.readouterr().err
    assert f"task.relax_dataset.src: {empty} holds no structures" in err
    missing = tmp_path / "missing.lmdb"
    assert main(setup.argv(f"--task.relax_dataset.src={missing}")) == 2
    err = capsys.readouterr().err
    assert "task.relax_dataset.src" in err and str(missing) in err
    assert hashes(setup.run_dir) == {}  # no file written


def test_progress_lines_off_a_terminal(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(progress_module, "HEARTBEAT_SECONDS", 0.0)  # a line before every step
    with caplog.at_level(logging.INFO, logger="catforge.relax.run"):
        argv = setup.argv("--task.relaxation_fmax=0", "--task.relaxation_steps=3")
        assert main([*argv, "--optim.eval_batch_size=1"]) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("relaxed ")]
    assert lines[0].startswith("relaxed 0 of 2 structures (0 converged), ")
    assert lines[-1].startswith("relaxed 1 of 2 structures (0 converged), ")
    assert lines[-1].endswith(" structures/s")
    assert len(lines) == 2 * 4  # 4 model calls per structure: 3 steps and the last forces


def stop_after_first_structure(monkeypatch: pytest.MonkeyPatch, stop_signal: int) -> None:
    """Send ``stop_signal`` to this process when the first structure finishes."""
    finished = relax_run._Watched.finished

    def finished_then_signal(self: relax_run._Watched, result: RelaxResult) -> None:
        finished(self, result)
        if self.done == 1:
            os.kill(os.getpid(), stop_signal)

    monkeypatch.setattr(relax_run._Watched, "finished", finished_then_signal)


@pytest.mark.parametrize("traj_dir", [True, False])
def test_ctrl_c_stops_after_the_current_step(
    setup: Setup,
    demo: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    traj_dir: bool,
) -> None:
    stop_after_first_structure(monkeypatch, signal.SIGINT)
    train = demo / "is2re" / "train" / "data.lmdb"
    argv = setup.argv(f"--task.relax_dataset.src={train}", "--optim.eval_batch_size=1")
    if not traj_dir:
        argv.append("--task.relax_opt.traj_dir=null")
    assert main(argv) == 130
    err = capsys.readouterr().err
    stopped = "catforge: relaxations stopped by SIGINT (Ctrl-C) after 1 of 10 structures; "
    if traj_dir:
        traj = setup.run_dir / "traj"
        assert stopped + f"finished trajectories are in {traj}; rerun the same command" in err
        assert [path.suffix for path in traj.iterdir() if path.name != LOCK_NAME] == [".traj"]
    else:
        assert stopped + "without task.relax_opt.traj_dir none of them was kept; " in err
        assert "rerun the same command to start over" in err
    assert "(exit status 130)" in err
    assert not setup.results().exists()


@pytest.mark.slow
def test_sigterm_keeps_finished_trajectories_and_the_rerun_completes(
    setup: Setup, demo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    argv = setup.argv(
        f"--task.relax_dataset.src={demo / 'is2re' / 'train' / 'data.lmdb'}",  # 10 structures
        "--task.relaxation_fmax=0", "--task.relaxation_steps=25", "--optim.eval_batch_size=2",
    )  # fmt: skip
    traj = setup.run_dir / "traj"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), *argv], env=env, text=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(traj.glob("*.traj")):
            assert process.poll() is None, "relaxations ended before the signal"
            assert time.monotonic() < deadline, "no trajectory finished"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 75, err[-3000:]
    finished = sorted(traj.glob("*.traj"))
    assert 1 <= len(finished) < 10
    assert "Traceback" not in err
    assert (
        f"catforge: relaxations stopped by SIGTERM after {len(finished)} of 10 structures; "
        f"finished trajectories are in {traj}; rerun the same command to continue (finished "
        "structures are skipped) (exit status 75)"
    ) in err
    assert not list(traj.glob("*.traj_tmp"))
    assert not setup.results().exists()
    stamps = {path: path.stat().st_mtime_ns for path in finished}
    with caplog.at_level(logging.INFO, logger="catforge.relax.run"):
        assert main(argv) == 0
    assert f"{len(finished)} of 10 structures already relaxed" in caplog.text
    assert all(path.stat().st_mtime_ns == stamps[path] for path in finished)
    assert len(list(traj.glob("*.traj"))) == 10 and not list(traj.glob("*.traj_tmp"))
    with np.load(setup.results() / "relaxed_energies.npz") as npz:
        assert npz["steps"].tolist() == [25] * 10


def test_a_traj_dir_in_use_by_another_run_is_refused(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    """While one run holds the folder, another neither relaxes there nor deletes its files."""
    import fcntl

    traj = setup.run_dir / "traj"
    traj.mkdir(parents=True, exist_ok=True)
    running = traj / "5.traj_tmp"  # the other run's structure in progress
    running.write_bytes(b"being written")
    with (traj / LOCK_NAME).open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(setup.argv(timestamp="busy")) == 2
    err = capsys.readouterr().err
    assert f"{traj}: another run-relaxations is writing trajectories here" in err
    assert running.read_bytes() == b"being written"
    assert main(setup.argv(timestamp="free")) == 0  # released: the next run goes ahead
    assert not running.exists()
