"""Config loading: includes, overrides, OCP spellings, typed parsing, errors and shipped configs."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from catforge.assemble.models import build_model
from catforge.config import (
    Config,
    RunOptions,
    load_config,
    load_yaml_config,
    parse_config,
    parse_overrides,
)
from catforge.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("**/*.yml"))


def write(path: Path, data: dict[str, Any] | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def minimal(**extra: Any) -> dict[str, Any]:
    """The smallest valid raw config (S2EF SchNet with a train set), with ``extra`` keys added."""
    raw: dict[str, Any] = {
        "trainer": "forces",
        "dataset": [{"src": "data/train"}],
        "model": {"name": "schnet"},
        "optim": {"max_epochs": 1},
    }
    raw.update(extra)
    return raw


def optim(**keys: Any) -> Config:
    return parse_config(minimal(optim={"max_epochs": 1, **keys}), "test.yml")


# --- includes -------------------------------------------------------------------------------


def test_include_resolved_relative_to_the_including_file(tmp_path, monkeypatch):
    write(tmp_path / "cfg" / "base.yml", {"trainer": "energy", "optim": {"batch_size": 8}})
    child = write(tmp_path / "cfg" / "child.yml", {"includes": ["base.yml"], "model": {"a": 1}})
    monkeypatch.chdir(tmp_path)  # base.yml is not in the CWD
    assert load_yaml_config(child) == {
        "trainer": "energy",
        "optim": {"batch_size": 8},
        "model": {"a": 1},
    }


def test_nested_includes_deep_merge_and_the_including_file_wins(tmp_path):
    write(tmp_path / "c.yml", {"optim": {"lr_initial": 0.1, "batch_size": 4}, "task": {"x": 1}})
    write(tmp_path / "sub" / "b.yml", {"includes": ["../c.yml"], "optim": {"batch_size": 8}})
    top = write(tmp_path / "a.yml", {"includes": ["sub/b.yml"], "optim": {"max_epochs": 3}})
    assert load_yaml_config(top) == {
        "optim": {"lr_initial": 0.1, "batch_size": 8, "max_epochs": 3},
        "task": {"x": 1},
    }


def test_clash_between_includes_later_wins_with_a_warning(tmp_path, caplog):
    write(tmp_path / "one.yml", {"optim": {"batch_size": 4, "lr_initial": 0.1}})
    write(tmp_path / "two.yml", {"optim": {"batch_size": 8, "lr_initial": 0.1}})
    top = write(tmp_path / "top.yml", {"includes": ["one.yml", "two.yml"]})
    with caplog.at_level(logging.WARNING, logger="catforge.config"):
        assert load_yaml_config(top) == {"optim": {"batch_size": 8, "lr_initial": 0.1}}
    assert "optim.batch_size" in caplog.text and "two.yml" in caplog.text
    assert "lr_initial" not in caplog.text  # equal values are no clash


def test_include_cycle_is_an_error_naming_the_chain(tmp_path):
    write(tmp_path / "a.yml", {"includes": ["b.yml"]})
    write(tmp_path / "b.yml", {"includes": ["a.yml"]})
    with pytest.raises(ConfigError, match="include cycle") as error:
        load_yaml_config(tmp_path / "a.yml")
    message = str(error.value)
    assert message.index("a.yml") < message.index("b.yml") < message.rindex("a.yml")


def test_diamond_includes_are_not_a_cycle(tmp_path):
    write(tmp_path / "base.yml", {"trainer": "forces"})
    write(tmp_path / "left.yml", {"includes": ["base.yml"]})
    write(tmp_path / "right.yml", {"includes": ["base.yml"]})
    top = write(tmp_path / "top.yml", {"includes": ["left.yml", "right.yml"]})
    assert load_yaml_config(top) == {"trainer": "forces"}


def test_include_relative_to_cwd_still_works_with_a_deprecation_warning(
    tmp_path, monkeypatch, caplog
):
    write(tmp_path / "configs" / "x" / "base.yml", {"trainer": "energy"})
    child = write(tmp_path / "configs" / "x" / "child.yml", {"includes": ["configs/x/base.yml"]})
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="catforge.config"):
        assert load_yaml_config(child) == {"trainer": "energy"}
    assert "deprecated" in caplog.text


def test_missing_include_names_the_including_file(tmp_path):
    top = write(tmp_path / "top.yml", {"includes": ["nope.yml"]})
    with pytest.raises(ConfigError, match=r"top\.yml: included file 'nope\.yml' not found"):
        load_yaml_config(top)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = write(tmp_path / "bad.yml", "trainer: forces\noptim:\n  batch_size: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yml:\d+:\d+: invalid YAML") as error:
        load_yaml_config(bad)
    line = int(str(error.value).split("bad.yml:")[1].split(":")[0])
    assert line in (3, 4)


def test_duplicate_key_is_an_error_with_its_line(tmp_path):
    bad = write(tmp_path / "dup.yml", "optim:\n  batch_size: 1\n  batch_size: 2\n")
    with pytest.raises(
        ConfigError, match=r"dup\.yml:3:3: invalid YAML.*duplicate key 'batch_size'"
    ):
        load_yaml_config(bad)


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_yaml_config(tmp_path / "absent.yml")


# --- overrides ------------------------------------------------------------------------------


def test_parse_overrides_types_and_nesting():
    args = [
        "--optim.lr_initial=0.001",
        "--optim.max_epochs=3",
        "--task.write_pos=true",
        "--optim.lr_milestones=[1, 2]",
        "--model.hidden_channels",
        "64",
        "--optim.eval_every",
        "-10000",
        "--logger=tensorboard",
        "--a.b.c=null",
    ]
    assert parse_overrides(args) == {
        "optim": {
            "lr_initial": 0.001,
            "max_epochs": 3,
            "lr_milestones": [1, 2],
            "eval_every": -10000,
        },
        "task": {"write_pos": True},
        "model": {"hidden_channels": 64},
        "logger": "tensorboard",
        "a": {"b": {"c": None}},
    }


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["optim.lr_initial=1"], "unexpected argument"),
        (["--optim.lr_initial"], "needs a value"),
        (["--optim.lr_initial", "--optim.batch_size=2"], "needs a value"),
        (["--optim=1", "--optim.batch_size=2"], "conflicts"),
        (["--optim..x=1"], "empty name"),
        (["--includes=[a.yml]"], "cannot be overridden"),
    ],
)
def test_bad_overrides(args, match):
    with pytest.raises(ConfigError, match=match):
        parse_overrides(args)


def test_overrides_win_over_file_and_includes(tmp_path):
    write(tmp_path / "base.yml", minimal(optim={"max_epochs": 1, "lr_initial": 0.1}))
    top = write(tmp_path / "top.yml", {"includes": ["base.yml"], "optim": {"lr_initial": 0.2}})
    config = load_config(
        top, ["--optim.lr_initial=1e-3", "--model.hidden_channels=32", "--relaxation_steps=7"]
    )
    assert config.optim.lr_initial == pytest.approx(1e-3)  # "1e-3" is a YAML 1.1 string
    assert config.optim.max_epochs == 1
    assert config.model.attributes["hidden_channels"] == 32
    assert config.task.relaxation_steps == 7  # top-level relax override moved under task


def test_dataset_overrides_by_split_name_on_a_list_dataset(tmp_path):
    top = write(tmp_path / "c.yml", minimal(dataset=[{"src": "a"}, {"src": "b"}]))
    config = load_config(top, ["--dataset.val.src=other", "--dataset.test.src=t"])
    assert config.dataset.train is not None and config.dataset.train.src == Path("a")
    assert config.dataset.split("val").src == Path("other")
    assert config.dataset.split("test").src == Path("t")


def test_override_typo_is_reported_with_its_path(tmp_path):
    top = write(tmp_path / "c.yml", minimal())
    with pytest.raises(ConfigError, match=r"'optim\.lr_intial'.*Did you mean 'optim\.lr_initial'"):
        load_config(top, ["--optim.lr_intial=0.1"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--optim.lr_intial=0.1", "command-line override --optim.lr_intial: unknown key"),
        ("--model.cutoff=abc", "command-line override --model.cutoff: 'model.cutoff' must be"),
        ("--optim.batch_size=-2", "command-line override --optim.batch_size: optim.batch_size"),
        ("--relaxation_steps=x", "command-line override --relaxation_steps: 'task.relaxation"),
    ],
)
def test_errors_of_an_override_blame_the_command_line(tmp_path, override, message):
    top = write(tmp_path / "c.yml", minimal())
    with pytest.raises(ConfigError) as error:
        load_config(top, [override, "--optim.lr_initial=0.01"])
    assert str(error.value).startswith(message)
    assert str(top) not in str(error.value)


def test_errors_of_the_file_still_name_the_file(tmp_path):
    top = write(tmp_path / "c.yml", minimal(optim={"max_epochs": 1, "lr_intial": 0.1}))
    with pytest.raises(ConfigError, match=rf"^{tmp_path}.*c\.yml: unknown key 'optim\.lr_intial'"):
        load_config(top, ["--optim.lr_initial=0.01"])


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (-1, r"model\.cutoff must be a distance in A > 0.*got -1"),
        (0, r"model\.cutoff must be a distance in A > 0.*got 0"),
        (".inf", r"model\.cutoff must be a distance in A > 0.*got inf"),
        ("abc", r"'model\.cutoff' must be a number, got str 'abc'"),
    ],
)
def test_bad_model_cutoff_names_the_key_and_range(value, match):
    """Types fail when the config is parsed; values the model cannot use when it is built
    (before any data is read)."""
    raw = minimal(model={"name": "schnet", "cutoff": yaml.safe_load(str(value))})
    with pytest.raises(ConfigError, match=match):
        build_model(parse_config(raw, "test.yml"))


def test_bad_model_sizes_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.num_gaussians must be >= 2, got 1"):
        build_model(parse_config(minimal(model={"name": "schnet", "num_gaussians": 1})))
    with pytest.raises(ConfigError, match=r"model\.readout must be one of add, sum, mean"):
        build_model(parse_config(minimal(model={"name": "schnet", "readout": "max"})))


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        ({"mode": "trian"}, r"^'--mode' must be one of 'train', 'predict', 'validate', "
                            r"'run-relaxations', got 'trian'\. Did you mean 'train'\?"),
        ({"mode": "train", "print_every": "x"}, r"^'--print-every' must be an integer"),
        ({"mode": "train", "run_dir": ""}, r"^'--run-dir' must be a path"),
    ],
)  # fmt: skip
def test_run_option_errors_name_the_flag(flags, match):
    with pytest.raises(ConfigError, match=match):
        RunOptions.from_namespace(argparse.Namespace(**flags))


# --- dataset forms --------------------------------------------------------------------------


def test_dataset_as_list_dict_single_entry_and_separate_keys():
    as_list = parse_config(minimal(dataset=[{"src": "a"}, {"src": "b"}, {"src": "c"}]))
    as_dict = parse_config(
        minimal(dataset={"train": {"src": "a"}, "val": {"src": "b"}, "test": {"src": "c"}})
    )
    separate = parse_config(
        minimal(dataset={"src": "a"}, val_dataset={"src": "b"}, test_dataset={"src": "c"})
    )
    assert as_list.dataset == as_dict.dataset == separate.dataset
    assert as_list.dataset.split("test").src == Path("c")
    only_train = parse_config(minimal(dataset=[{"src": "a", "normalize_labels": True}]))
    assert only_train.dataset.val is None
    assert only_train.dataset.split("train").normalize_labels is True
    with pytest.raises(ConfigError, match=r"no dataset\.val.*2nd entry"):
        only_train.dataset.split("val")


@pytest.mark.parametrize(
    ("dataset", "match"),
    [
        ([{"src": str(i)} for i in range(4)], "1 to 3 entries"),
        ({"trian": {"src": "a"}}, r"'dataset\.trian'.*Did you mean 'dataset\.train'"),
        ([{"srcs": "a"}], r"'dataset\.train\.srcs'.*Did you mean 'dataset\.train\.src'"),
        ([{"normalize_labels": True}], r"missing required key 'dataset\.train\.src'"),
        ("data/train", "must be a list"),
    ],
)
def test_bad_dataset_blocks(dataset, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(minimal(dataset=dataset), "x.yml")


# --- shipped configs ------------------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_parses_and_round_trips(path, monkeypatch):
    monkeypatch.chdir(REPO)
    if "model" not in load_yaml_config(path):
        return  # a fragment (base.yml) that only other configs include: readable is enough
    config = load_config(path, options=RunOptions(mode="train"))
    assert config.model.name == "schnet"
    assert config.dataset.train is not None
    plain = config.to_dict()
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain
    assert parse_config(plain, path) == config


def test_shipped_configs_exist():
    names = {str(p.relative_to(REPO / "configs")) for p in CONFIGS}
    assert {
        "ocp_is2re/schnet.yml",
        "ocp_is2re/base.yml",
        "ocp_s2ef/schnet.yml",
        "ocp_s2ef/base.yml",
        "demo/s2ef_schnet.yml",
        "demo/is2re_schnet.yml",
        "demo/is2rs_schnet.yml",
        "ocp_is2rs/schnet.yml",
    } <= names


def test_ocp_is2rs_tutorial_values(monkeypatch):
    monkeypatch.chdir(REPO)
    config = load_config(Path("configs/ocp_is2rs/schnet.yml"))
    task, opt = config.task, config.task.relax_opt
    assert config.trainer == "forces" and config.model.attributes["hidden_channels"] == 1024
    assert task.relax_dataset is not None
    assert task.relax_dataset.src == Path("data/is2re/all/val_id/data.lmdb")
    assert (task.relaxation_steps, task.write_pos) == (300, True)
    assert (opt.maxstep, opt.memory, opt.damping, opt.alpha) == (0.04, 50, 1.0, 70.0)
    assert opt.traj_dir == Path("trajectories")


def test_ocp_is2re_tutorial_values(monkeypatch):
    monkeypatch.chdir(REPO)
    config = load_config(Path("configs/ocp_is2re/schnet.yml"))
    assert config.trainer == "energy" and config.task.dataset == "single_point_lmdb"
    assert config.model.attributes["hidden_channels"] == 128
    assert config.model.regress_forces is False
    train = config.dataset.split("train")
    assert train.src == Path("data/is2re/10k/train/data.lmdb")
    assert train.target_mean == pytest.approx(-0.969171404838562)
    assert config.optim.schedule_unit == "epochs" and config.optim.warmup == 3
    assert config.optim.lr_milestones == (5, 9, 13)


# --- unknown keys and wrong types -----------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (minimal(optm={}), r"unknown key 'optm'\. Did you mean 'optim'\?"),
        (minimal(lr_initial=0.1), r"unknown key 'lr_initial'\. Did you mean 'optim\.lr_initial'"),
        (
            minimal(optim={"lr_intial": 0.1}),
            r"unknown key 'optim\.lr_intial'\. Did you mean 'optim\.lr_initial'\?",
        ),
        (
            minimal(task={"relax_opt": {"max_step": 0.1}}),
            r"'task\.relax_opt\.max_step'\. Did you mean 'task\.relax_opt\.maxstep'",
        ),
        (
            minimal(task={"train_on_free_atom": True}),
            r"Did you mean 'task\.train_on_free_atoms'",
        ),
        (
            minimal(model={"name": "schnet", "hiden_channels": 3}),
            r"'model\.hiden_channels'\. Did you mean 'model\.hidden_channels'",
        ),
        (minimal(model={"name": "shnet"}), r"unknown model.*'shnet'\. Did you mean 'schnet'"),
        (minimal(options={"sed": 1}), r"'options\.sed'\. Did you mean 'options\.seed'"),
    ],
)
def test_unknown_keys_name_their_path_and_the_closest_key(raw, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(raw, "c.yml")


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (minimal(optim={"batch_size": "big"}), r"'optim\.batch_size' must be an integer, got str"),
        (minimal(optim={"batch_size": 2.5}), r"'optim\.batch_size' must be an integer"),
        (minimal(optim={"lr_initial": True}), r"'optim\.lr_initial' must be a number, got bool"),
        (minimal(task={"write_pos": "yes"}), r"'task\.write_pos' must be true or false"),
        (minimal(optim={"lr_milestones": 5}), r"'optim\.lr_milestones' must be a list of numbers"),
        (minimal(optim={"loss_force": "l2"}), r"unknown force loss \(optim\.loss_force\) 'l2'"),
        (minimal(trainer="energies"), r"'trainer' must be one of 'energy', 'forces'"),
        (
            minimal(optim={"clip_grad_norm": "x"}),
            r"'optim\.clip_grad_norm' must be a number or null",
        ),
        (minimal(model={"name": "schnet", "cutoff": "far"}), r"'model\.cutoff' must be a number"),
        (minimal(optim=[1]), r"'optim' must be a mapping"),
    ],
)
def test_wrong_types_name_the_field_and_the_expected_type(raw, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(raw, "c.yml")


def test_numbers_are_coerced_where_safe():
    config = optim(lr_initial="1e-3", batch_size=8.0, lr_milestones=[100, "2e3"], weight_decay=0)
    assert config.optim.lr_initial == pytest.approx(1e-3)
    assert config.optim.batch_size == 8 and isinstance(config.optim.batch_size, int)
    assert config.optim.lr_milestones == (100.0, 2000.0)
    assert isinstance(config.optim.weight_decay, float)


def test_missing_required_keys_are_named():
    with pytest.raises(ConfigError, match="missing required key 'trainer'"):
        parse_config({"model": {"name": "schnet"}}, "c.yml")
    with pytest.raises(ConfigError, match=r"missing required key 'model\.name'"):
        parse_config(minimal(model={"hidden_channels": 2}), "c.yml")
    with pytest.raises(ConfigError, match="missing required section 'model'"):
        parse_config({"trainer": "forces"}, "c.yml")


# --- OCP spellings --------------------------------------------------------------------------


def test_top_level_relax_keys_move_under_task_with_a_warning(caplog):
    raw = minimal(
        relax_dataset={"src": "data/is2re/val/data.lmdb"},
        write_pos=True,
        relaxation_steps=300,
        relaxation_fmax=0.02,
        relax_opt={"maxstep": 0.04, "memory": 50, "damping": 1.0, "alpha": 70.0, "traj_dir": "t"},
    )
    with caplog.at_level(logging.WARNING, logger="catforge.config"):
        config = parse_config(raw, "c.yml")
    assert "moved top-level" in caplog.text and "write_pos" in caplog.text
    task = config.task
    assert task.relax_dataset is not None and task.relax_dataset.src.name == "data.lmdb"
    assert task.write_pos and task.relaxation_steps == 300 and task.relaxation_fmax == 0.02
    assert task.relax_opt.traj_dir == Path("t") and task.relax_opt.memory == 50
    with pytest.raises(ConfigError, match="both at the top level and under task"):
        parse_config(minimal(write_pos=True, task={"write_pos": False}), "c.yml")


def test_child_top_level_relax_key_overrides_base_task_key(tmp_path):
    write(tmp_path / "base.yml", minimal(task={"relaxation_steps": 200}))
    top = write(tmp_path / "top.yml", {"includes": ["base.yml"], "relaxation_steps": 300})
    assert load_config(top).task.relaxation_steps == 300


def test_eval_every_t0_negative_values():
    assert optim(eval_every=-10000).optim.eval_every == 10000  # T0: iters % -10000 == 0
    assert optim(eval_every=-1).optim.eval_every is None  # T0 default: once per epoch
    assert optim(eval_every=500).optim.eval_every == 500
    assert optim().optim.eval_every is None
    with pytest.raises(ConfigError, match=r"optim\.eval_every must be > 0"):
        optim(eval_every=0)


def test_schedule_units_and_warmup():
    t0 = optim(lr_milestones=[5, 8, 10], warmup_epochs=3).optim
    assert (t0.schedule_unit, t0.warmup, t0.warmup_epochs) == ("epochs", 3.0, 3.0)
    v3 = optim(lr_milestones=[7812, 12500], warmup_steps=4687).optim
    assert (v3.schedule_unit, v3.warmup) == ("steps", 4687.0)
    fraction = optim(schedule_unit="fraction", warmup_steps=0.05, lr_milestones=[0.5, 0.8]).optim
    assert fraction.warmup == 0.05
    assert optim().optim.warmup == 0.0 and optim().optim.scheduler is None
    with pytest.raises(ConfigError, match="not both"):
        optim(warmup_steps=10, warmup_epochs=1)
    with pytest.raises(ConfigError, match="warmup_epochs needs schedule_unit: epochs"):
        optim(warmup_epochs=1, schedule_unit="steps")
    with pytest.raises(ConfigError, match="fractions of the total steps"):
        optim(schedule_unit="fraction", lr_milestones=[0.5, 2])
    with pytest.raises(ConfigError, match="ascending"):
        optim(lr_milestones=[300, 200])


def test_milestones_in_steps_that_look_like_epochs_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="catforge.config"):
        optim(lr_milestones=[5, 8], warmup_steps=3)
    assert "look like epochs" in caplog.text


def test_scheduler_kwargs_at_optim_level_move_to_scheduler_params():
    config = optim(scheduler="ReduceLROnPlateau", mode="min", factor=0.8, patience=3)
    assert config.optim.scheduler_params == {"mode": "min", "factor": 0.8, "patience": 3}
    assert parse_config(config.to_dict()) == config
    step = optim(scheduler="StepLR", scheduler_params={"step_size": 10, "gamma": 0.5})
    assert step.optim.scheduler_params == {"step_size": 10, "gamma": 0.5}
    assert optim(scheduler="Null").optim.scheduler == "Null"  # OCP: constant LR
    assert optim(scheduler="null").optim.scheduler == "Null"
    assert optim(scheduler="LambdaLR").optim.scheduler is None  # OCP's default, spelled out


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ({"scheduler": "StepLr"}, r"Did you mean 'StepLR'"),
        ({"scheduler": "MultiplicativeLR"}, "cannot be set from a config"),
        ({"scheduler": "StepLR", "scheduler_params": {"step": 1}}, r"scheduler_params\.step'"),
        ({"scheduler_params": {"gamma": 0.5}}, "needs optim.scheduler"),
        ({"step_size": 10}, r"unknown key 'optim\.step_size'"),
        ({"optimizer": "Adamw"}, r"Did you mean 'AdamW'"),
        (
            {"optimizer_params": {"bettas": [0.9, 0.99]}},
            r"Did you mean 'optim\.optimizer_params\.betas'",
        ),
    ],
)
def test_bad_scheduler_and_optimizer_settings(keys, match):
    with pytest.raises(ConfigError, match=match):
        optim(**keys)


def test_weight_decay_absent_given_or_in_optimizer_params(caplog):
    assert optim().optim.weight_decay is None  # OCP's rule: the optimizer's own default
    assert optim(weight_decay=0).optim.weight_decay == 0.0
    kept = optim(optimizer_params={"weight_decay": 0.01, "eps": 1e-7}).optim
    assert kept.weight_decay is None  # as OCP: optimizer_params' value, on all parameters
    assert kept.optimizer_params == {"weight_decay": 0.01, "eps": 1e-7}
    with pytest.raises(ConfigError, match="weight_decay is given both"):
        optim(weight_decay=0.1, optimizer_params={"weight_decay": 0.01})
    with caplog.at_level(logging.WARNING, logger="catforge.config"):
        assert optim(num_gpus=8).optim.batch_size == 32  # T0's DataParallel count is dropped
    assert "num_gpus" in caplog.text


def test_optim_defaults_follow_ocp():
    o = optim().optim
    assert (o.batch_size, o.eval_batch_size, o.lr_initial, o.optimizer) == (32, 32, 1e-3, "AdamW")
    assert (o.energy_coefficient, o.force_coefficient, o.loss_force) == (1.0, 30.0, "mae")
    assert (o.lr_gamma, o.warmup_factor, o.load_balancing) == (0.1, 0.2, None)
    assert optim(batch_size=8, eval_batch_size=None).optim.eval_batch_size == 8
    assert optim(load_balancing="atoms").optim.load_balancing == "atoms"


def test_model_block_is_completed_with_factory_defaults():
    forces = parse_config(minimal(model={"name": "schnet", "cutoff": 6}))
    assert forces.model.attributes["cutoff"] == 6.0
    assert forces.model.attributes["hidden_channels"] == 128  # SchNet's default, pinned
    assert forces.model.regress_forces is True
    energy = parse_config(minimal(trainer="energy"))
    assert energy.model.regress_forces is False  # the energy trainer needs no forces


def test_task_primary_metric_and_element_references(tmp_path):
    task = parse_config(minimal(task={"primary_metric": "forces_mae"})).task
    assert task.primary_metric == "forces_mae"
    with pytest.raises(ConfigError, match=r"Did you mean 'energy_within_threshold'"):
        parse_config(minimal(trainer="energy", task={"primary_metric": "energy_within_treshold"}))
    assert (
        parse_config(minimal(task={"element_references": "fit"})).task.element_references == "fit"
    )
    refs = write(tmp_path / "refs.yml", {"H": -3.4, 8: "-7.2", "Cu": 0})
    path_task = parse_config(minimal(task={"element_references": str(refs)})).task
    assert path_task.element_references == refs
    with pytest.raises(ConfigError, match=r"unknown dataset.*Did you mean 'trajectory_lmdb'"):
        parse_config(minimal(task={"dataset": "trajectory_lmbd"}))


def test_logger_forms():
    assert parse_config(minimal()).logger.name == "tensorboard"
    assert (
        parse_config(minimal(logger={"name": "tensorboard", "project": "p"})).logger.project == "p"
    )
    with pytest.raises(ConfigError, match=r"unknown logger \(logger\) 'tensorbord'\. Did you mean"):
        parse_config(minimal(logger="tensorbord"))


def test_wandb_logger_needs_the_package():
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        logger = parse_config(minimal(logger="wandb", logger_project="ocp")).logger
        assert (logger.name, logger.project) == ("wandb", "ocp")
    else:
        with pytest.raises(ConfigError, match=r"pip install 'catforge\[wandb\]'"):
            parse_config(minimal(logger="wandb"))


def test_slurm_params_are_kept_as_given():
    config = parse_config(minimal(slurm={"constraint": "volta32gb", "additional": {"x": [1]}}))
    assert config.slurm.params["constraint"] == "volta32gb"
    assert config.to_dict()["slurm"] == {"constraint": "volta32gb", "additional": {"x": [1]}}


# --- run options and modes ------------------------------------------------------------------


def test_run_options_from_namespace_and_mode_spelling():
    namespace = argparse.Namespace(
        mode="run_relaxations", config_yml="x.yml", seed=3, checkpoint="c.pt", cpu=True, amp=None
    )
    options = RunOptions.from_namespace(namespace)
    assert options.mode == "run-relaxations" and options.seed == 3
    assert options.checkpoint == Path("c.pt") and options.cpu and not options.amp
    with pytest.raises(ConfigError, match=r"'options\.mode' must be one of"):
        RunOptions.from_mapping({"mode": "trian"})


def test_mode_requirements_are_checked_when_options_are_given():
    raw = minimal(dataset=[{"src": "a"}])
    parse_config(raw, "c.yml")  # no options: no mode checks
    parse_config(raw, "c.yml", RunOptions(mode="train"))
    with pytest.raises(ConfigError, match=r"no dataset\.val"):
        parse_config(raw, "c.yml", RunOptions(mode="validate"))
    with pytest.raises(ConfigError, match=r"no dataset\.test"):
        parse_config(raw, "c.yml", RunOptions(mode="predict"))
    with pytest.raises(ConfigError, match=r"task\.relax_dataset"):
        parse_config(raw, "c.yml", RunOptions(mode="run-relaxations"))
    with pytest.raises(ConfigError, match=r"max_epochs or optim\.max_steps"):
        parse_config(minimal(optim={}), "c.yml", RunOptions(mode="train"))
    with pytest.raises(ConfigError, match=r"no dataset\.train"):
        parse_config(minimal(dataset=None), "c.yml", RunOptions(mode="train"))


def test_cli_options_replace_stored_options_and_round_trip():
    stored = parse_config(minimal(options={"seed": 5, "mode": "run_relaxations"}))
    assert stored.options.seed == 5 and stored.options.mode == "run-relaxations"
    given = parse_config(minimal(options={"seed": 5}), options=RunOptions(seed=9))
    assert given.options.seed == 9
    assert parse_config(given.to_dict()) == given


# --- round trip -----------------------------------------------------------------------------


def test_to_dict_round_trips_a_full_config():
    raw = minimal(
        dataset={
            "train": {"src": "a", "normalize_labels": True, "target_mean": -1, "target_std": 2}
        },
        task={"labels": ["potential energy"], "element_references": "refs.json", "write_pos": True},
        optim={
            "max_steps": 100,
            "lr_milestones": [0.5],
            "schedule_unit": "fraction",
            "optimizer_params": {"betas": [0.9, 0.99]},
            "ema_decay": 0.999,
            "init_from": "ckpt.pt",
        },
        logger={"name": "tensorboard", "project": None},
        slurm={"mem": "80G"},
    )
    config = parse_config(raw, "c.yml")
    plain = config.to_dict()
    assert plain["optim"]["optimizer_params"] == {"betas": [0.9, 0.99]}
    assert plain["task"]["element_references"] == "refs.json"
    assert plain["model"]["name"] == "schnet"
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain
    assert parse_config(plain, "again") == config
    assert parse_config(parse_config(plain).to_dict()).to_dict() == plain
