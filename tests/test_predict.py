"""``--mode predict``: ids, order, shapes, dtypes, unlabelled data, equality with a direct call."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from catforge.assemble.models import build_model
from catforge.cli.modes import run
from catforge.config import Config, RunOptions, load_config
from catforge.data.atoms import atoms_to_graph, graph_to_atoms
from catforge.data.lmdb import LmdbDataset, write_lmdb
from catforge.errors import ConfigError, DataError
from catforge.models.forces import ForceModel
from catforge.potential.checkpoint import save_checkpoint
from catforge.potential.targets import Normalizer, TargetTransform
from catforge.potential.trained import Potential
from catforge.prediction.predict import Predictions, predict, write_predictions
from catforge.training.loaders import build_loader
from tests.factories import SMALL_MODEL

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "s2ef": ROOT / "configs" / "demo" / "s2ef_schnet.yml",
    "is2re": ROOT / "configs" / "demo" / "is2re_schnet.yml",
}
CPU = torch.device("cpu")


def split_src(demo: Path, task: str) -> Path:
    return demo / "s2ef" / "test" if task == "s2ef" else demo / "is2re" / "test" / "data.lmdb"


def scalar(value: object) -> int:
    """An integer stored as a scalar or a one-element array."""
    return int(np.asarray(value).reshape(-1)[0])


def make_config(demo: Path, task: str, options: RunOptions | None = None) -> Config:
    overrides = [*SMALL_MODEL, f"--dataset.test.src={split_src(demo, task)}"]
    return load_config(CONFIGS[task], overrides, options)


def make_model(config: Config) -> tuple[ForceModel, TargetTransform]:
    torch.manual_seed(0)
    field = "y" if config.trainer == "forces" else "y_relaxed"
    return build_model(config), TargetTransform(Normalizer(-0.3, 0.5), field=field)


def predict_set(
    dataset: LmdbDataset, model: ForceModel, transform: TargetTransform, forces: bool
) -> Predictions:
    loader = build_loader(dataset, batch_size=4, num_workers=0, seed=0)
    return predict(Potential(model, transform, CPU), loader, with_forces=forces)


@dataclass(frozen=True)
class Case:
    """A small random S2EF model and its predictions on the demo test split."""

    config: Config
    model: ForceModel
    transform: TargetTransform
    dataset: LmdbDataset
    predictions: Predictions


@pytest.fixture(scope="module")
def s2ef(demo: Path) -> Case:
    config = make_config(demo, "s2ef")
    model, transform = make_model(config)
    dataset = LmdbDataset(split_src(demo, "s2ef"))
    return Case(config, model, transform, dataset, predict_set(dataset, model, transform, True))


def test_s2ef_ids_order_shapes_and_chunks(s2ef: Case) -> None:
    dataset, predictions = s2ef.dataset, s2ef.predictions
    entries = [dataset.fields(i) for i in range(len(dataset))]
    expected = [f"{scalar(e['sid'])}_{scalar(e['fid'])}" for e in entries]
    assert predictions.ids == expected and len(set(expected)) == len(dataset) > 4
    assert predictions.ids != sorted(predictions.ids)  # dataset order, not OCP V2+'s sorted ids
    assert predictions.energy.shape == (len(dataset),) and predictions.energy.dtype == np.float64
    free_counts = [int((~np.asarray(e["fixed"], dtype=bool)).sum()) for e in entries]
    assert predictions.forces is not None and predictions.forces.shape == (sum(free_counts), 3)
    blocks = predictions.free_forces()
    assert [len(block) for block in blocks] == free_counts
    assert predictions.system_forces is not None
    for entry, block, full in zip(entries, blocks, predictions.system_forces, strict=True):
        assert full.shape == (len(entry["atomic_numbers"]), 3)
        np.testing.assert_array_equal(block, full[~np.asarray(entry["fixed"], dtype=bool)])


def test_s2ef_files_default_float32(s2ef: Case, tmp_path: Path) -> None:
    predictions = s2ef.predictions
    json_path, npz_path = write_predictions(predictions, tmp_path, "s2ef")
    assert npz_path.name == "s2ef_predictions.npz" and json_path.name == "predictions.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == [json_path.name, npz_path.name]
    with np.load(npz_path) as npz:
        assert set(npz.files) == {"ids", "energy", "forces", "chunk_idx"}
        assert npz["ids"].tolist() == predictions.ids
        assert npz["energy"].dtype == np.float32 and npz["forces"].dtype == np.float32
        np.testing.assert_allclose(npz["energy"], predictions.energy, rtol=1e-6)
        np.testing.assert_array_equal(npz["chunk_idx"], predictions.chunk_idx)
        blocks = np.split(npz["forces"], npz["chunk_idx"])
        energies = npz["energy"]
    records = json.loads(json_path.read_text())
    assert [r["id"] for r in records] == predictions.ids
    assert all(set(r) == {"id", "energy", "forces"} for r in records)
    for record, block, energy in zip(records, blocks, energies, strict=True):
        assert record["energy"] == float(energy)
        np.testing.assert_array_equal(np.array(record["forces"]).reshape(-1, 3), block)


def test_float16_option(s2ef: Case, tmp_path: Path) -> None:
    predictions = s2ef.predictions
    _, npz_path = write_predictions(predictions, tmp_path, "s2ef", "float16")
    with np.load(npz_path) as npz:
        assert npz["energy"].dtype == np.float16 and npz["forces"].dtype == np.float16
        np.testing.assert_allclose(npz["energy"], predictions.energy, rtol=2**-10, atol=1e-4)


def test_duplicate_ids_are_refused(tmp_path: Path) -> None:
    predictions = Predictions(["1", "1"], np.zeros(2))
    with pytest.raises(DataError, match="'1' occurs twice"):
        write_predictions(predictions, tmp_path, "is2re")
    assert not list(tmp_path.iterdir())


def test_predictions_equal_a_direct_call_on_ase_structures(s2ef: Case) -> None:
    model, transform, dataset, predictions = (
        s2ef.model,
        s2ef.transform,
        s2ef.dataset,
        s2ef.predictions,
    )
    assert predictions.system_forces is not None
    for index in (0, len(dataset) // 2, len(dataset) - 1):
        graph = atoms_to_graph(graph_to_atoms(dataset[index]), with_labels=False)
        output = model(graph, training=False)
        energy, forces = transform.denormalize(output.energy, output.forces, graph)
        assert forces is not None
        np.testing.assert_allclose(predictions.energy[index], energy.item(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            predictions.system_forces[index], forces.double().numpy(), rtol=1e-5, atol=1e-5
        )


def test_unlabelled_test_set(s2ef: Case, tmp_path: Path) -> None:
    model, transform, dataset, labelled = s2ef.model, s2ef.transform, s2ef.dataset, s2ef.predictions
    path = tmp_path / "unlabelled.lmdb"
    write_lmdb((dataset[i].replace(y=None, force=None) for i in range(len(dataset))), path)
    unlabelled = LmdbDataset(path)
    assert unlabelled[0].y is None and unlabelled[0].force is None
    predictions = predict_set(unlabelled, model, transform, True)
    assert predictions.ids == labelled.ids
    np.testing.assert_allclose(predictions.energy, labelled.energy, rtol=1e-6)
    assert predictions.forces is not None and labelled.forces is not None
    np.testing.assert_allclose(predictions.forces, labelled.forces, rtol=1e-6, atol=1e-7)


def test_missing_sid_uses_the_dataset_index(s2ef: Case, tmp_path: Path) -> None:
    model, transform, dataset = s2ef.model, s2ef.transform, s2ef.dataset
    path = tmp_path / "no_ids.lmdb"
    write_lmdb((dataset[i].replace(sid=None, fid=None, y=None) for i in range(6)), path)
    predictions = predict_set(LmdbDataset(path), model, transform, True)
    assert predictions.ids == [f"{i}_{i}" for i in range(6)]


def test_is2re_predictions(demo: Path, tmp_path: Path) -> None:
    config = make_config(demo, "is2re")
    model, transform = make_model(config)
    dataset = LmdbDataset(split_src(demo, "is2re"))
    predictions = predict_set(dataset, model, transform, False)
    assert predictions.ids == [str(scalar(dataset.fields(i)["sid"])) for i in range(len(dataset))]
    assert predictions.forces is None and predictions.chunk_idx is None
    json_path, npz_path = write_predictions(predictions, tmp_path, "is2re")
    with np.load(npz_path) as npz:
        assert npz_path.name == "is2re_predictions.npz"
        assert set(npz.files) == {"ids", "energy"} and npz["energy"].dtype == np.float32
        assert npz["ids"].tolist() == predictions.ids
    records = json.loads(json_path.read_text())
    assert [set(r) for r in records] == [{"id", "energy"}] * len(dataset)


def test_run_predict_end_to_end(s2ef: Case, demo: Path, tmp_path: Path) -> None:
    config, model, transform, predictions = (
        s2ef.config,
        s2ef.model,
        s2ef.transform,
        s2ef.predictions,
    )
    checkpoint = tmp_path / "ckpt.pt"
    state = {"state_dict": model.state_dict(), "normalizers": transform.state_dict()}
    save_checkpoint({**state, "config": config.to_dict()}, checkpoint)
    options = RunOptions(mode="predict", run_dir=tmp_path, checkpoint=checkpoint, timestamp_id="t")
    run(make_config(demo, "s2ef", options))
    results = tmp_path / "results" / "t"
    paths = [results / "predictions.json", results / "s2ef_predictions.npz"]
    assert sorted(results.iterdir()) == paths
    with np.load(paths[1]) as npz:
        assert npz["ids"].tolist() == predictions.ids
        np.testing.assert_allclose(npz["energy"], predictions.energy, rtol=1e-5, atol=1e-6)


def test_run_predict_errors(s2ef: Case, demo: Path, tmp_path: Path) -> None:
    from catforge.errors import CheckpointError

    with pytest.raises(ConfigError, match="--checkpoint"):
        run(make_config(demo, "s2ef", RunOptions(mode="predict", run_dir=tmp_path)))
    checkpoint = tmp_path / "ckpt.pt"
    save_checkpoint({"state_dict": s2ef.model.state_dict()}, checkpoint)
    options = RunOptions(mode="predict", run_dir=tmp_path, checkpoint=checkpoint)
    wider = load_config(
        CONFIGS["s2ef"],
        ["--model.hidden_channels=32", f"--dataset.test.src={split_src(demo, 's2ef')}"],
        options,
    )
    with pytest.raises(CheckpointError, match=r"does not fit the configured model: .*shape"):
        run(wider)
