"""OCP compatibility: OCP-era checkpoints, OCP config keys catforge used to refuse, OCP defaults.

What OCP does is read from its code (fairchem history): ``forces_trainer._compute_loss``
(tag-specific weights), ``base_trainer.load_optimizer`` (weight decay), ``ocp_trainer.train``
and ``modules/scheduler.py`` (ReduceLROnPlateau), ``common/utils.load_state_dict``
(``strict_load``), ``OC22LmdbDataset`` and ``ForcesTrainer.run_relaxations`` (defaults).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ase.data import atomic_masses

from catforge.assemble.training import loss_settings
from catforge.assemble.training import schedule as build_schedule
from catforge.config import parse_config
from catforge.data.atoms import atoms_to_graph
from catforge.data.collate import collate
from catforge.errors import CheckpointError, ConfigError
from catforge.models.forces import ModelOutput
from catforge.models.schnet import SchNet
from catforge.potential.checkpoint import load_checkpoint, load_weights
from catforge.potential.targets import TargetTransform
from catforge.registry import DATASETS
from catforge.training import losses
from catforge.training.optim import build_optimizer
from tests.factories import emt_slab


def raw_config(**sections: Any) -> dict[str, Any]:
    """A minimal S2EF SchNet config with ``sections`` merged in at the top level."""
    raw: dict[str, Any] = {
        "trainer": "forces",
        "dataset": [{"src": "data/train"}],
        "model": {"name": "schnet", "hidden_channels": 8, "num_filters": 8, "num_gaussians": 10},
        "optim": {"max_epochs": 1},
    }
    raw.update(sections)
    return raw


# --- 13: OCP-era SchNet checkpoints -----------------------------------------------------------


def _small_schnet(seed: int, **block: Any) -> torch.nn.Module:
    torch.manual_seed(seed)
    return SchNet(hidden_channels=8, num_filters=8, num_gaussians=10, **block)


def test_ocp_schnet_checkpoint_with_the_atomic_mass_buffer_loads(caplog) -> None:
    """torch_geometric < 2.2's SchNet registers ``atomic_mass`` (119,): OCP's 3-block SchNet
    state dicts have 46 keys, 45 of which are the model's."""
    source = _small_schnet(0, num_interactions=3)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    state["module.atomic_mass"] = torch.from_numpy(atomic_masses)  # float64, as PyG built it
    assert len(state) == 46 and state["module.atomic_mass"].shape == (119,)
    target = _small_schnet(1, num_interactions=3)
    with caplog.at_level(logging.INFO, logger="catforge.potential.checkpoint"):
        load_weights(target, state, "ocp.pt")
    assert "ignored 'atomic_mass'" in caplog.text
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_ocp_reference_schnet_with_atomic_mass_loads(shared_data: Path) -> None:
    """OCP's SchNetWrap state dict (the 32-key reference fixture, 2 blocks, torch_geometric
    2.3) plus the older buffer loads into catforge's SchNet with every weight equal."""
    reference = load_checkpoint(shared_data / "ocp_reference" / "schnet.pt")
    block = {key: value for key, value in reference["model"].items() if key != "name"}
    state = dict(reference["state_dict"])
    assert len(state) == 32
    state["atomic_mass"] = torch.from_numpy(atomic_masses)
    block.pop("regress_forces", None)
    model = SchNet(**block)
    load_weights(model, state, "schnet.pt")
    for key, value in reference["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value), key


def test_other_unexpected_keys_are_still_refused() -> None:
    state = dict(_small_schnet(0).state_dict())
    state["atomic_masses"] = torch.zeros(119)
    with pytest.raises(CheckpointError, match="unexpected parameter 'atomic_masses'"):
        load_weights(_small_schnet(1), state, "ckpt.pt")


def test_strict_load_false_loads_the_matching_keys_and_warns(caplog) -> None:
    """OCP's ``task.strict_load: False``: matching keys load, missing/unexpected are a warning,
    a shape mismatch is still an error."""
    source, target = _small_schnet(0), _small_schnet(1)
    state = dict(source.state_dict())
    dropped = state.pop("lin2.weight")
    state["head.extra"] = torch.zeros(3)
    kept = target.state_dict()["lin2.weight"].clone()
    with pytest.raises(CheckpointError, match=r"lin2\.weight' is missing"):
        load_weights(target, state, "ckpt.pt")
    with caplog.at_level(logging.WARNING, logger="catforge.potential.checkpoint"):
        load_weights(target, state, "ckpt.pt", strict=False)
    assert "lin2.weight" in caplog.text and "head.extra" in caplog.text
    assert torch.equal(target.state_dict()["lin1.weight"], state["lin1.weight"])
    assert torch.equal(target.state_dict()["lin2.weight"], kept)
    assert not torch.equal(kept, dropped)
    state["lin1.weight"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointError, match=r"lin1.weight' has shape \(2, 2\)"):
        load_weights(target, state, "ckpt.pt", strict=False)


def test_task_strict_load_reaches_prediction_models(tmp_path: Path) -> None:
    """``task.strict_load: False`` in a config loads a checkpoint with an extra key for
    predict, validate, relaxations and the calculator (all load through ``load_potential``)."""
    from catforge.assemble.models import load_potential
    from catforge.potential.checkpoint import save_checkpoint

    strict = parse_config(raw_config())
    relaxed = parse_config(raw_config(task={"strict_load": False}))
    state = dict(_small_schnet(0).state_dict())
    state["head.extra"] = torch.zeros(3)
    path = save_checkpoint({"state_dict": state}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match=r"unexpected parameter 'head\.extra'"):
        load_potential(path, config=strict)
    model = load_potential(path, config=relaxed).model
    assert torch.equal(model.state_dict()["lin1.weight"], state["lin1.weight"])


# --- 14: OCP config keys ----------------------------------------------------------------------


def test_ocp_task_keys_are_accepted() -> None:
    config = parse_config(
        raw_config(
            task={
                "strict_load": False,
                "tag_specific_weights": [0.05, 1.0, 1.0],
                "relax_opt": {"optimizer": "LBFGS", "maxstep": 0.04},
            }
        ),
        "fn.yml",
    )
    assert config.task.strict_load is False
    assert config.task.tag_specific_weights == (0.05, 1.0, 1.0)
    assert config.task.relax_opt.optimizer == "LBFGS"
    assert parse_config(config.to_dict()) == config


@pytest.mark.parametrize(
    ("task", "match"),
    [
        (
            {"relax_opt": {"optimizer": "FIRE"}},
            r"fn\.yml: task\.relax_opt\.optimizer 'FIRE'.*LBFGS",
        ),
        ({"relax_opt": {"optimizer": "lbfgs"}}, "case-sensitive"),
        ({"tag_specific_weights": [1.0, 2.0]}, r"task\.tag_specific_weights must be three"),
        ({"tag_specific_weights": [1.0, -2.0, 1.0]}, r"task\.tag_specific_weights must be three"),
        ({"tag_specific_weights": [0, 0, 0]}, "all 0"),
    ],
)
def test_bad_ocp_task_values(task: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(raw_config(task=task), "fn.yml")


def test_tag_weights_say_what_they_replace(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="catforge.config"):
        parse_config(raw_config(task={"tag_specific_weights": [0.05, 1, 1]}), "fn.yml")
    assert "tag-weighted" in caplog.text and "not applied" not in caplog.text
    caplog.clear()
    optim = {"max_epochs": 1, "force_coefficient": 100, "loss_force": "l2mae"}
    task = {"tag_specific_weights": [0.05, 1, 1], "train_on_free_atoms": True}
    with caplog.at_level(logging.WARNING, logger="catforge.config"):
        parse_config(raw_config(task=task, optim=optim), "fn.yml")
    assert "not applied: optim.force_coefficient 100, optim.loss_force l2mae" in caplog.text
    assert "task.train_on_free_atoms" in caplog.text


def test_oc22_dataset_is_registered_and_its_flags_are_handled() -> None:
    """OCP's OC22 configs name ``task.dataset: oc22_lmdb``; its dataset-level flags are either
    off (dropped) or refused with what to do instead."""
    config = parse_config(raw_config(task={"dataset": "oc22_lmdb"}), "oc22.yml")
    assert config.task.dataset == "oc22_lmdb"
    assert DATASETS.load("oc22_lmdb") is DATASETS.load("lmdb")
    off = [{"src": "train", "lin_ref": False, "train_on_oc20_total_energies": False}]
    assert parse_config(raw_config(dataset=off)).dataset.split("train").src == Path("train")
    with pytest.raises(ConfigError, match=r"dataset\.train\.lin_ref .*task\.element_references"):
        parse_config(raw_config(dataset=[{"src": "t", "lin_ref": "coeffs.npz"}]), "oc22.yml")
    joint = {"train": {"src": "t"}, "val": {"src": "v", "oc20_ref": "ref.pkl"}}
    with pytest.raises(ConfigError, match=r"dataset\.val\.oc20_ref .*joint OC20\+OC22"):
        parse_config(raw_config(dataset=joint), "oc22.yml")


def test_oc22_sample_reads_with_total_energies(shared_data: Path, tmp_path: Path) -> None:
    """The OC22 sample (PyG ``Data`` with the ``oc22`` flag) written to an LMDB reads through
    ``oc22_lmdb`` with its total energies as stored."""
    from catforge.data.graph import AtomicGraph
    from catforge.data.lmdb import write_lmdb
    from catforge.data.pickles import loads_pickle_file

    items = loads_pickle_file(shared_data / "oc22" / "oc22_pickle16_train.pkl")
    graphs = [AtomicGraph.from_fields(item, source="oc22") for item in items]
    write_lmdb(graphs, tmp_path / "oc22.lmdb")
    dataset = DATASETS.load("oc22_lmdb")(tmp_path / "oc22.lmdb")
    assert len(dataset) == 16
    assert float(dataset[0].y) == pytest.approx(float(np.asarray(items[0]["y"])), abs=1e-4)


def _tagged_batch() -> Any:
    graphs = [atoms_to_graph(emt_slab("Cu", "O", seed=s)) for s in (0, 1)]
    return collate(graphs)


def test_trainer_loss_uses_the_tag_weights() -> None:
    """The training loss passes ``task.tag_specific_weights`` and the batch's tags through."""
    weights = [0.05, 1.0, 2.0]
    config = parse_config(
        raw_config(task={"tag_specific_weights": weights}, optim={"max_epochs": 1}), "fn.yml"
    )
    batch = _tagged_batch()
    gen = torch.Generator().manual_seed(0)
    energy = torch.randn(batch.n_graphs, generator=gen)
    forces = torch.randn(batch.n_atoms, 3, generator=gen)
    output = ModelOutput(energy, forces)
    result = loss_settings(config).compute(output, batch, TargetTransform())
    error = np.abs(forces.numpy() - batch.force.numpy()).sum(axis=1)
    w = np.array(weights)[batch.tags.numpy()]
    expected_forces = (error * w).sum() / (3 * w.sum())
    expected_energy = np.abs(energy.numpy() - batch.y.numpy()).mean()
    assert result.parts["forces"].item() == pytest.approx(expected_forces, rel=1e-6)
    assert result.total.item() == pytest.approx(expected_energy + expected_forces, rel=1e-6)


def test_plateau_scheduler_steps_on_the_primary_metric_with_the_configs_mode(caplog) -> None:
    """OCP's S2EF configs (``mode: min``) step ReduceLROnPlateau on EFwT (higher is better):
    OCP passes ``mode`` to torch as given; so does catforge, with a warning."""
    optim = {"max_epochs": 1, "scheduler": "ReduceLROnPlateau", "mode": "min", "factor": 0.5,
             "patience": 0}  # fmt: skip
    config = parse_config(raw_config(optim=optim), "gemnet.yml")
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="catforge.training.optim"):
        schedule = build_schedule(config, optimizer, steps_per_epoch=10, total_steps=10)
    assert "energy_force_within_threshold (higher is better) with mode 'min'" in caplog.text
    assert schedule.scheduler.mode == "min"
    schedule.step_eval(0.1)
    schedule.step_eval(0.2)  # EFwT improved, but mode min sees no decrease: the LR drops
    assert schedule.lr == pytest.approx(0.05)
    caplog.clear()
    on_forces = parse_config(raw_config(optim=optim, task={"primary_metric": "forces_mae"}))
    with caplog.at_level(logging.WARNING, logger="catforge.training.optim"):
        build_schedule(on_forces, optimizer, steps_per_epoch=10, total_steps=10)
    assert "ReduceLROnPlateau" not in caplog.text


# --- 14: tag-specific force weights, against a hand computation -------------------------------


def test_tag_weighted_force_loss_by_hand() -> None:
    f_pred = torch.tensor([[1.0, 0, 0], [0, -2, 0], [0, 0, 3], [1, 1, 1]], dtype=torch.float64)
    f_true = torch.zeros(4, 3, dtype=torch.float64)
    tags = torch.tensor([0, 1, 2, 5])  # tag 5 weighs 0, as in OCP (zeros_like)
    e_pred, e_true = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 2.5])
    fixed = torch.tensor([True, False, False, False])  # not a mask with tag weights (OCP)
    result = losses.energy_force_loss(
        e_pred, e_true, f_pred, f_true, fixed=fixed, energy_coefficient=2.0,
        force_coefficient=100.0, tag_weights=[0.05, 1.0, 2.0], tags=tags,
    )  # fmt: skip
    # sum_i w_i sum_xyz |dF| = 0.05*1 + 1*2 + 2*3 + 0*3 = 8.05; 3 * sum w = 3 * 3.05 = 9.15
    assert result.parts["forces"].item() == pytest.approx(8.05 / 9.15, rel=1e-12)
    assert result.total.item() == pytest.approx(2.0 * 0.5 + 8.05 / 9.15, rel=1e-6)
    small = losses.tag_weighted_term(f_pred[:1], f_true[:1], tags[:1], [0.05, 1.0, 2.0])
    assert small.value().item() == pytest.approx(1.0 / 3.0)  # count 0.15 < 1 is not clamped


def test_tag_weighted_loss_under_ddp_equals_the_full_batch() -> None:
    """Two ranks dividing local weighted sums by the all-reduced 3*sum(w), times world_size,
    average to the gradient of the full batch (OCP's formula)."""
    gen = torch.Generator().manual_seed(3)
    f_pred = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    f_true = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    tags = torch.tensor([0, 0, 1, 2, 0, 1, 2])
    weights = [0.05, 1.0, 1.0]

    def grad(atoms: slice, count: torch.Tensor | None = None, world: int = 1):
        scale = torch.ones(7, 3, dtype=torch.float64, requires_grad=True)
        term = losses.tag_weighted_term(
            (f_pred * scale)[atoms], f_true[atoms], tags[atoms], weights
        )
        term.value(count, world).backward()
        return term, scale.grad

    _, full = grad(slice(None))
    ranks = [slice(0, 2), slice(2, 7)]
    total = sum(grad(r)[0].count for r in ranks)
    averaged = sum(grad(r, total, 2)[1] for r in ranks) / 2
    torch.testing.assert_close(averaged, full)


# --- 15: OCP's defaults -----------------------------------------------------------------------


def test_relaxation_defaults_are_ocps_and_logged(caplog) -> None:
    task = {"relax_dataset": {"src": "is2re/val.lmdb"}}
    with caplog.at_level(logging.INFO, logger="catforge.config"):
        config = parse_config(raw_config(task=task), "is2rs.yml")
    assert (config.task.relaxation_steps, config.task.relaxation_fmax) == (200, 0.0)
    assert "task.relaxation_steps not set: using 200, OCP's default" in caplog.text
    assert "task.relaxation_fmax not set: using 0.0 eV/A, OCP's default" in caplog.text


def test_weight_decay_absent_is_adamws_default_on_all_parameters(caplog) -> None:
    """OCP's ``load_optimizer``: no ``weight_decay`` (or 0) -> ``AdamW(model.parameters())``,
    i.e. torch's 0.01 on every parameter; ``> 0`` -> no decay for bias/embedding names."""
    config = parse_config(raw_config(), "ocp.yml")
    assert config.optim.weight_decay is None
    model = _small_schnet(0)
    with caplog.at_level(logging.INFO, logger="catforge.training.optim"):
        optimizer = build_optimizer(model, lr=1e-3, weight_decay=config.optim.weight_decay)
    assert "optim.weight_decay not set: using 0.01" in caplog.text
    (group,) = optimizer.param_groups
    assert group["weight_decay"] == 0.01
    assert len(group["params"]) == len(list(model.parameters()))
    given = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    decays = {g["weight_decay"]: len(g["params"]) for g in given.param_groups}
    names = [name for name, _ in model.named_parameters()]
    exempt = sum(any(k in name for k in ("embedding", "frequencies", "bias")) for name in names)
    assert decays == {0.05: len(names) - exempt, 0.0: exempt}
    every = build_optimizer(model, lr=1e-3, optimizer_params={"weight_decay": 0.002})
    assert [g["weight_decay"] for g in every.param_groups] == [0.002]  # OCP: all parameters
    assert build_optimizer(model, lr=1e-3, weight_decay=0.0).param_groups[0]["weight_decay"] == 0


# --- 14: what OC22's configs need -------------------------------------------------------------


def test_atomwise_l2_force_loss_by_hand_and_under_ddp() -> None:
    """OCP's ``atomwisel2``: sum_i natoms(i) * |dF_i|_2 over free atoms / n_structures."""
    f_pred = torch.tensor([[3.0, 4, 0], [0, 0, 1], [1, 0, 0], [0, 2, 0], [0, 0, 0]])
    f_true = torch.zeros(5, 3)
    natoms = torch.tensor([2, 3])  # atoms 0-1 in structure 0, atoms 2-4 in structure 1
    fixed = torch.tensor([False, True, False, False, False])
    e = torch.zeros(2)
    result = losses.energy_force_loss(
        e, e, f_pred, f_true, fixed=fixed, loss_force="atomwisel2", force_coefficient=1.0,
        natoms=natoms,
    )  # fmt: skip
    # free atoms: 2 * 5 (atom 0) + 3 * 1 (atom 2) + 3 * 2 (atom 3) + 3 * 0 = 19, over 2 structures
    assert result.parts["forces"].item() == pytest.approx(19 / 2)
    first = losses.atomwise_l2_term(f_pred[:2], f_true[:2], natoms[:1], ~fixed[:2])
    second = losses.atomwise_l2_term(f_pred[2:], f_true[2:], natoms[1:], ~fixed[2:])
    global_count = first.count + second.count  # OCP all-reduces the batch size
    ranks = first.value(global_count, 2) + second.value(global_count, 2)
    assert (ranks / 2).item() == pytest.approx(19 / 2)  # DDP averages the two ranks


def test_oc22_optim_spellings() -> None:
    config = parse_config(
        raw_config(optim={"max_epochs": 1, "warmup_steps": -1, "loss_force": "atomwisel2"})
    )
    assert config.optim.warmup == 0  # OCP's warmup_lr_lambda never warms up for -1
    assert config.optim.force_coefficient == 1.0  # OCP V10's default for atomwisel2
    with pytest.raises(ConfigError, match="loss_energy"):
        parse_config(raw_config(optim={"max_epochs": 1, "loss_energy": "atomwisel2"}))


def test_ocp_oc22_schnet_config_trains_on_the_oc22_sample(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OCP's ``configs/oc22/s2ef/{base,schnet}.yml`` (model shrunk, 2 steps, tensorboard) on the
    real OC22 sample: total energies, oc22_lmdb, atomwisel2, warmup_steps -1."""
    import yaml

    from catforge.cli.modes import run
    from catforge.config import RunOptions, load_config
    from catforge.data.graph import AtomicGraph
    from catforge.data.lmdb import write_lmdb
    from catforge.data.pickles import loads_pickle_file

    items = loads_pickle_file(shared_data / "oc22" / "oc22_pickle16_train.pkl")
    graphs = [AtomicGraph.from_fields(item, source="oc22") for item in items]
    write_lmdb(graphs[:12], tmp_path / "data/oc22/s2ef/train/data.0000.lmdb")
    write_lmdb(graphs[12:], tmp_path / "data/oc22/s2ef/val_id/data.0000.lmdb")
    base = {
        "trainer": "forces",
        "dataset": {"train": {"src": "data/oc22/s2ef/train", "normalize_labels": False},
                    "val": {"src": "data/oc22/s2ef/val_id"}},
        "logger": "tensorboard",
        "task": {"dataset": "oc22_lmdb", "primary_metric": "forces_mae", "grad_input":
                 "atomic forces", "train_on_free_atoms": True, "eval_on_free_atoms": True,
                 "prediction_dtype": "float32"},
        "optim": {"loss_energy": "mae", "loss_force": "atomwisel2", "force_coefficient": 1,
                  "energy_coefficient": 1},
    }  # fmt: skip
    schnet = {
        "includes": ["base.yml"],
        "model": {"name": "schnet", "hidden_channels": 16, "num_filters": 16,
                  "num_interactions": 2, "num_gaussians": 20, "cutoff": 6.0, "use_pbc": True,
                  "otf_graph": True},
        "optim": {"batch_size": 4, "eval_batch_size": 4, "num_workers": 0, "lr_initial": 0.00025,
                  "warmup_steps": -1, "lr_gamma": 0.8, "lr_milestones": [52000, 77000],
                  "max_steps": 2},
    }  # fmt: skip
    (tmp_path / "base.yml").write_text(yaml.safe_dump(base))
    (tmp_path / "schnet.yml").write_text(yaml.safe_dump(schnet))
    monkeypatch.chdir(tmp_path)
    options = RunOptions(mode="train", run_dir=tmp_path, print_every=1)
    metrics = run(load_config(tmp_path / "schnet.yml", (), options))
    assert np.isfinite(metrics["forces_mae"]) and metrics["energy_mae"] > 100  # total energies
    assert list((tmp_path / "checkpoints").glob("*/checkpoint.pt"))
