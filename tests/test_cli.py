"""The command line as users and scripts call it: main.py and the catforge console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_demo_info_and_ingest_end_to_end(tmp_path: Path) -> None:
    demo = run(sys.executable, str(ROOT / "main.py"), "data", "demo", "--out", "demo",
               "--size", "tiny", "--workers", "1", cwd=tmp_path)  # fmt: skip
    assert demo.returncode == 0, demo.stderr
    assert "s2ef" in demo.stdout and "is2re" in demo.stdout
    assert (tmp_path / "demo" / "stats.yml").is_file()

    catforge = shutil.which("catforge", path=str(Path(sys.executable).parent))
    assert catforge is not None, "the console script is not installed"
    info = run(catforge, "data", "info", "demo/is2re/train/data.lmdb", "--json", cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    summary = json.loads(info.stdout)
    assert {
        "entries",
        "fields",
        "natoms",
        "elements",
        "energy_mean",
        "energy_std",
        "force_std",
    } <= set(summary)
    assert summary["entries"] > 0 and "y_relaxed" in summary["fields"]
    assert summary["force_std"] is None  # IS2RE entries hold no forces

    s2ef = run(catforge, "data", "info", "demo/s2ef/train", cwd=tmp_path)
    assert s2ef.returncode == 0 and "entries" in s2ef.stdout


def test_errors_are_one_line_with_status_2(tmp_path: Path) -> None:
    missing = run(sys.executable, str(ROOT / "main.py"), "data", "info", "nope.lmdb", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0
    assert "nope.lmdb" in missing.stderr and "Traceback" not in missing.stderr
    ingest = run(sys.executable, str(ROOT / "main.py"), "data", "ingest", "--task", "s2ef",
                 "--out", "out", str(tmp_path), cwd=tmp_path)  # fmt: skip
    assert ingest.returncode == 2 and "Traceback" not in ingest.stderr


def _train_argv(demo: Path, tmp_path: Path, *extra: str) -> list[str]:
    from tests.factories import SMALL_MODEL, data_overrides

    config = ROOT / "configs" / "demo" / "s2ef_schnet.yml"
    return ["--mode", "train", "--config-yml", str(config), *data_overrides(demo, "s2ef"),
            *SMALL_MODEL, "--cpu", "--run-dir", str(tmp_path), *extra]  # fmt: skip


def test_override_with_a_separate_value_trains(demo: Path, tmp_path: Path) -> None:
    """``--optim.max_steps 2`` (as ``config show`` accepts it) works for ``--mode train``."""
    from catforge.cli import main as cli

    assert cli.main(_train_argv(demo, tmp_path, "--optim.max_steps", "2", "--debug")) == 0


def test_flags_that_would_be_ignored_are_reported(
    demo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from catforge.cli import main as cli

    argv = _train_argv(demo, tmp_path, "--optim.max_steps=1", "--num-gpus", "2", "--amp")
    assert cli.main([*argv, "--debug"]) == 0
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert any("--num-gpus 2 is ignored without --distributed" in line for line in warnings)
    assert any("--amp is ignored on cpu" in line for line in warnings)


def test_resuming_a_finished_run_says_so(
    demo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from catforge.cli import main as cli

    assert cli.main(_train_argv(demo, tmp_path, "--optim.max_steps=2", "--timestamp-id=done")) == 0
    checkpoint = tmp_path / "checkpoints" / "done" / "checkpoint.pt"
    before = checkpoint.read_bytes()
    caplog.clear()
    resume = _train_argv(demo, tmp_path, "--optim.max_steps=2", f"--checkpoint={checkpoint}")
    assert cli.main(resume) == 0
    assert any("nothing to train" in record.getMessage() for record in caplog.records)
    assert checkpoint.read_bytes() == before


def test_debug_writes_nothing_in_every_mode(demo: Path, tmp_path: Path) -> None:
    """``--debug`` has one meaning: no folders, logs, checkpoints or result files, in every
    mode (train, validate, predict, run-relaxations)."""
    from catforge.cli import main as cli
    from tests.factories import SMALL_MODEL, data_overrides

    trained = tmp_path / "trained"
    assert cli.main(_train_argv(demo, trained, "--optim.max_steps=2", "--timestamp-id=t")) == 0
    checkpoint = trained / "checkpoints" / "t" / "checkpoint.pt"
    s2ef = [str(ROOT / "configs" / "demo" / "s2ef_schnet.yml"), *data_overrides(demo, "s2ef")]
    relax = [
        str(ROOT / "configs" / "demo" / "is2rs_schnet.yml"),
        f"--task.relax_dataset.src={demo / 'is2re' / 'val' / 'data.lmdb'}",
        "--task.num_relaxation_batches=1",
        "--optim.eval_batch_size=2",
        f"--task.relax_opt.traj_dir={tmp_path / 'debug' / 'trajectories'}",
    ]
    debug = tmp_path / "debug"
    debug.mkdir()
    common = ["--cpu", "--debug", "--run-dir", str(debug), *SMALL_MODEL]
    modes = [("train", s2ef), ("validate", s2ef), ("predict", s2ef), ("run-relaxations", relax)]
    for mode, config in modes:
        argv = ["--mode", mode, "--config-yml", *config, *common]
        if mode == "train":
            argv.append("--optim.max_steps=1")
        else:
            argv.append(f"--checkpoint={checkpoint}")
        assert cli.main(argv) == 0, mode
        assert list(debug.iterdir()) == [], f"--mode {mode} --debug wrote {list(debug.rglob('*'))}"
