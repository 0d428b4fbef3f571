"""``--mode run-relaxations`` end to end: output files, trajectories, metrics, resume."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.io import read

from catforge.checkpoint import save_checkpoint
from catforge.cli import main
from catforge.config import load_config
from catforge.data.lmdb import LmdbDataset
from catforge.potential import Potential, build_model
from catforge.targets import Normalizer, TargetTransform
from tests.factories import SMALL_MODEL

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo" / "is2rs_schnet.yml"


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


@pytest.fixture
def setup(demo: Path, tmp_path: Path) -> Setup:
    """A random small S2EF model with non-trivial normalisers, saved like the trainer does."""
    config = load_config(CONFIG, SMALL_MODEL)
    torch.manual_seed(0)
    model = build_model(config)
    transform = TargetTransform(Normalizer(-0.3, 0.5))
    checkpoint = tmp_path / "checkpoint.pt"
    state = {"state_dict": model.state_dict(), "normalizers": transform.state_dict()}
    save_checkpoint({**state, "config": config.to_dict()}, checkpoint)
    return Setup(checkpoint, demo / "is2re" / "val" / "data.lmdb", tmp_path / "run")


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
    potential = Potential.from_checkpoint(setup.checkpoint)
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
    stamps[other] = other.stat().st_mtime_ns
    # Other settings: the trajectories are stale, every structure is relaxed again.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="catforge.relax.run"):
        assert main(setup.argv("--task.relax_opt.maxstep=0.03", timestamp="third")) == 0
    assert "already relaxed" not in caplog.text
    assert all(path.stat().st_mtime_ns != stamps[path] for path in traj if path != redo)


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
