"""Bad input through the command line: exit status 2, one line naming what is wrong, no
traceback, and nothing already written changes.

Each case runs ``main.py`` in a fresh process inside a run folder that already holds a finished
S2EF run and an IS2RE run; the folder's files are hashed before and after.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import numpy as np
import pytest

from catforge.cli.modes import run
from catforge.config import RunOptions, load_config
from catforge.data.lmdb import LmdbDataset, write_lmdb
from catforge.data.pickles import dumps_entry
from catforge.potential.checkpoint import load_checkpoint, save_checkpoint
from tests.factories import SMALL_MODEL, data_overrides, graphs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "demo"
S2EF = str(CONFIGS / "s2ef_schnet.yml")
IS2RE = str(CONFIGS / "is2re_schnet.yml")
IS2RS = str(CONFIGS / "is2rs_schnet.yml")


@dataclass
class World:
    """A run folder with two finished runs, the demo data and bad files made for the cases."""

    root: Path
    demo: Path
    s2ef_run: str
    is2re_run: str
    files: dict[str, Path] = field(default_factory=dict)

    def checkpoint(self, run_id: str) -> str:
        return str(self.root / "checkpoints" / run_id / "checkpoint.pt")

    def s2ef(self, *extra: str) -> list[str]:
        return ["--config-yml", S2EF, *data_overrides(self.demo, "s2ef"), *SMALL_MODEL, *extra]

    def is2rs(self, *extra: str) -> list[str]:
        relax = f"--task.relax_dataset.src={self.demo / 'is2re' / 'val' / 'data.lmdb'}"
        return ["--config-yml", IS2RS, *data_overrides(self.demo, "s2ef"), *SMALL_MODEL, relax,
                "--task.relaxation_steps=2", "--task.relax_opt.traj_dir=null", *extra]  # fmt: skip

    def is2re(self, *extra: str) -> list[str]:
        return ["--config-yml", IS2RE, *data_overrides(self.demo, "is2re"), *SMALL_MODEL, *extra]


def _train(root: Path, config: str, overrides: list[str], run_id: str) -> str:
    options = RunOptions(mode="train", run_dir=root, cpu=True, timestamp_id=run_id)
    run(load_config(Path(config), [*overrides, *SMALL_MODEL, "--optim.max_steps=2"], options))
    return run_id


def write_raw_lmdb(path: Path, entries: list[dict[str, object]]) -> Path:
    """Entries stored as they are (no validation), with the ``length`` key."""
    env = lmdb.open(str(path), subdir=False, map_size=1 << 30, lock=False)
    with env.begin(write=True) as txn:
        for index, entry in enumerate(entries):
            txn.put(str(index).encode(), dumps_entry(entry))
        txn.put(b"length", pickle.dumps(len(entries)))
    env.close()
    return path


def _fields(graph_index: int, **changes: object) -> dict[str, object]:
    fields: dict[str, object] = dict(graphs()[graph_index].to_fields())
    fields.update(changes)
    return fields


@pytest.fixture(scope="module")
def world(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("bad_inputs")
    s2ef_run = _train(root, S2EF, data_overrides(demo, "s2ef"), "s2ef-run")
    is2re_run = _train(root, IS2RE, data_overrides(demo, "is2re"), "is2re-run")
    data = root / "data"
    data.mkdir()
    files = {
        "empty": data / "empty.lmdb",
        "unlabelled": data / "unlabelled.lmdb",
        "nan": data / "nan" / "data.0000.lmdb",
        "truncated": data / "truncated.pt",
    }
    write_lmdb([], files["empty"])
    write_lmdb([g.replace(y=None, force=None) for g in graphs()], files["unlabelled"])
    good = [_fields(0), _fields(1), _fields(2)]
    pos = np.array(good[1]["pos"])
    pos[2, 1] = np.nan
    files["nan"].parent.mkdir()
    write_raw_lmdb(files["nan"], [*good[:1], {**good[1], "pos": pos, "sid": 41}, *good[2:]] * 6)
    empty_structure = {name: np.asarray(value)[:0] for name, value in good[0].items()
                       if name in ("pos", "atomic_numbers", "tags", "fixed", "force")}  # fmt: skip
    files["no_atoms"] = data / "no_atoms" / "data.0000.lmdb"
    files["no_atoms"].parent.mkdir()
    write_raw_lmdb(files["no_atoms"], [good[0], {**good[0], **empty_structure, "sid": 7}, good[2]])
    files["flipped"] = data / "flipped" / "data.0000.lmdb"
    write_lmdb(graphs(), files["flipped"])
    content = bytearray(files["flipped"].read_bytes())
    at = content.find(graphs()[3].pos.numpy().tobytes())
    assert at > 0
    content[at + 5] ^= 0x40  # one flipped bit inside the positions of entry 3
    files["flipped"].write_bytes(bytes(content))
    world = World(root, demo, s2ef_run, is2re_run, files)
    source = Path(world.checkpoint(s2ef_run)).read_bytes()
    files["truncated"].write_bytes(source[: len(source) // 2])
    other = load_checkpoint(world.checkpoint(s2ef_run))
    other["state_dict"] = {key: value * 1.01 for key, value in other["state_dict"].items()}
    files["other_model"] = save_checkpoint(other, data / "other_model.pt")  # other weights
    relax = ["--mode", "run-relaxations", *world.is2rs("--task.relax_opt.traj_dir=trajs")]
    relaxed = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *relax, "--checkpoint", world.checkpoint(s2ef_run)],
        cwd=root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert relaxed.returncode == 0, relaxed.stderr[-3000:]
    return world


@dataclass(frozen=True)
class Case:
    """A command (given the world) and the words its one error line must hold."""

    name: str
    argv: Callable[[World], list[str]]
    expect: tuple[str, ...]
    writes: bool = False  # may write new files (a bad entry stops training with a checkpoint)


NAN_TRAINING = (
    "--dataset.train.src=data/nan", "--dataset.train.target_mean=0",
    "--dataset.train.target_std=1", "--dataset.train.grad_target_std=1",
    "--optim.max_steps=4", "--optim.batch_size=4",
)  # fmt: skip
"""Training on the NaN shard with the statistics given (no label pass reads it first)."""

CASES = [
    Case("timestamp id of a finished run",
         lambda w: ["--mode", "train", *w.s2ef(), "--timestamp-id", w.s2ef_run],
         ("--timestamp-id s2ef-run", "already has files", "--checkpoint")),
    Case("print every zero", lambda w: ["--mode", "train", *w.s2ef(), "--print-every", "0"],
         ("--print-every",)),
    Case("sweep without submit",
         lambda w: ["--mode", "train", *w.s2ef(), "--sweep-yml", "grid.yml"],
         ("--sweep-yml", "--submit")),
    Case("distributed without a launcher",
         lambda w: ["--mode", "train", *w.s2ef(), "--distributed"], ("--distributed", "torchrun")),
    Case("misspelt mode", lambda w: ["--mode", "trian", *w.s2ef()], ("'--mode'", "'train'")),
    Case("misspelt override", lambda w: ["--mode", "train", *w.s2ef("--optim.lr_intial=0.1")],
         ("command-line override --optim.lr_intial", "optim.lr_initial")),
    Case("negative cutoff", lambda w: ["--mode", "train", *w.s2ef("--model.cutoff=-1")],
         ("model.cutoff",)),
    Case("unknown flag", lambda w: ["--mode", "train", *w.s2ef(), "--bogus"],
         ("unrecognized argument --bogus",)),
    Case("missing val path",
         lambda w: ["--mode", "train", *w.s2ef(), "--dataset.val.src=/no/such/val"],
         ("dataset.val.src", "/no/such/val")),
    Case("empty val set",
         lambda w: ["--mode", "train", *w.s2ef(f"--dataset.val.src={w.files['empty']}")],
         ("dataset.val.src", "holds no structures")),
    Case("unlabelled val set for S2EF training",
         lambda w: ["--mode", "train", *w.s2ef(f"--dataset.val.src={w.files['unlabelled']}")],
         ("dataset.val.src", "'y'", "dataset.test")),
    Case("validate an unlabelled IS2RE set",
         lambda w: ["--mode", "validate", *w.is2re(f"--dataset.val.src={w.files['unlabelled']}"),
                    "--checkpoint", w.checkpoint(w.is2re_run)],
         ("dataset.val.src", "'y_relaxed'")),
    Case("IS2RE checkpoint for S2EF predictions",
         lambda w: ["--mode", "predict", *w.s2ef(), "--checkpoint", w.checkpoint(w.is2re_run)],
         ("is2re-run", "serves IS2RE", "S2EF predictions")),
    Case("S2EF checkpoint for IS2RE predictions",
         lambda w: ["--mode", "predict", *w.is2re(), "--checkpoint", w.checkpoint(w.s2ef_run)],
         ("s2ef-run", "serves S2EF", "IS2RE predictions")),
    Case("IS2RE checkpoint for S2EF validation",
         lambda w: ["--mode", "validate", *w.s2ef(), "--checkpoint", w.checkpoint(w.is2re_run)],
         ("serves IS2RE",)),
    Case("IS2RE checkpoint to resume S2EF training",
         lambda w: ["--mode", "train", *w.s2ef(), "--checkpoint", w.checkpoint(w.is2re_run)],
         ("serves IS2RE",)),
    Case("missing checkpoint",
         lambda w: ["--mode", "validate", *w.s2ef(), "--checkpoint", "nope.pt"],
         ("nope.pt", "--checkpoint")),
    Case("truncated checkpoint",
         lambda w: ["--mode", "predict", *w.s2ef(), "--checkpoint", str(w.files["truncated"])],
         ("truncated.pt", "unreadable checkpoint")),
    Case("missing config file", lambda w: ["--mode", "train", "--config-yml", "nope.yml"],
         ("nope.yml",)),
    Case("NaN in a training entry",
         lambda w: ["--mode", "train", *w.s2ef(*NAN_TRAINING)],
         ("data.0000.lmdb", "sid 41", "'pos'", "NaN", "step 0", "--checkpoint"), writes=True),
    Case("empty test set for predictions",
         lambda w: ["--mode", "predict", *w.s2ef(f"--dataset.test.src={w.files['empty']}"),
                    "--checkpoint", w.checkpoint(w.s2ef_run)],
         ("dataset.test.src", "holds no structures")),
    Case("IS2RE checkpoint for relaxations",
         lambda w: ["--mode", "run-relaxations", *w.is2rs(), "--checkpoint",
                    w.checkpoint(w.is2re_run)],
         ("is2re-run", "serves IS2RE", "relaxations")),
    Case("empty relax set",
         lambda w: ["--mode", "run-relaxations",
                    *w.is2rs(f"--task.relax_dataset.src={w.files['empty']}"),
                    "--checkpoint", w.checkpoint(w.s2ef_run)],
         ("task.relax_dataset.src", "holds no structures")),
    Case("trajectories of another model in traj_dir",
         lambda w: ["--mode", "run-relaxations", *w.is2rs("--task.relax_opt.traj_dir=trajs"),
                    "--checkpoint", str(w.files["other_model"])],
         ("trajs", "another model", "traj_dir")),
    Case("export of a missing dataset",
         lambda w: ["data", "export", "--format", "ocp", "no/such/data", "--out", "ocp_out"],
         ("no/such/data",)),
    Case("a structure without atoms",
         lambda w: ["--mode", "train", *w.s2ef("--dataset.train.src=data/no_atoms")],
         ("data.0000.lmdb entry 1 (sid 7)", "no atoms", "skip_bad_entries")),
    Case("flipped bytes in a training file",
         lambda w: ["--mode", "train", *w.s2ef("--dataset.train.src=data/flipped")],
         ("data.0000.lmdb entry 3", "checksum", "corrupt")),
    Case("demo into a folder with files",
         lambda w: ["data", "demo", "--out", str(w.files["empty"].parent), "--size", "tiny"],
         ("--overwrite",)),
]  # fmt: skip


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root``: a file's sha256, or ``dir``."""
    found = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        found[name] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_line_with_status_2_and_changes_nothing(world: World, case: Case) -> None:
    before = snapshot(world.root)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *case.argv(world)],
        cwd=world.root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    stderr = done.stderr.strip()
    assert done.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.splitlines()
    assert sum(line.startswith("catforge: error:") for line in lines) == 1, stderr[-3000:]
    error = lines[-1]
    assert error.startswith("catforge: error:"), stderr[-3000:]
    for word in case.expect:
        assert word in error, error
    after = snapshot(world.root)
    if case.writes:
        after = {name: digest for name, digest in after.items() if name in before}
    else:
        _remove_new_run_files(world.root, before, after)
    assert after == before


def _remove_new_run_files(root: Path, before: dict[str, str], after: dict[str, str]) -> None:
    """Nothing new may appear; clean up anyway so later cases see the same folder."""
    for name in sorted(set(after) - set(before), reverse=True):
        path = root / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def test_the_nan_entry_of_the_table_is_really_bad(world: World) -> None:
    """The table's bad data is what it claims: entry 1 fails, its neighbours read fine."""
    dataset = LmdbDataset(world.files["nan"])
    dataset[0]
    with pytest.raises(Exception, match="NaN"):
        dataset[1]


def test_skip_bad_entries_trains_on_the_good_ones(world: World) -> None:
    """``dataset.train.skip_bad_entries: true`` leaves the NaN entries out, with a count."""
    argv = ["--mode", "train", *world.s2ef(*NAN_TRAINING, "--dataset.train.skip_bad_entries=true"),
            "--optim.max_steps=2", "--debug"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), *argv], cwd=world.root, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipped 6 bad entries of 18" in done.stderr
    assert "training s2ef: 12 structures" in done.stderr
