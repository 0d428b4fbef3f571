"""The registry: every entry loads, declared parameters are the real ones, one suggestion rule,
and parsing a config imports neither torch nor a model."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from catforge.config.parameters import model_parameters
from catforge.errors import ConfigError
from catforge.registry import (
    DATASETS,
    LOGGERS,
    LOSSES,
    MODELS,
    MODES,
    OPTIMIZERS,
    SCHEDULERS,
    Entry,
    Table,
    suggest,
)

ROOT = Path(__file__).resolve().parents[1]
TRAINER_OWNED = {"self", "params", "lr", "optimizer", "last_epoch", "verbose"}
TABLES = [MODELS, DATASETS, LOSSES, OPTIMIZERS, SCHEDULERS, LOGGERS, MODES]


@pytest.mark.parametrize("table", TABLES, ids=lambda table: table.what.split()[0])
def test_every_entry_loads(table: Table) -> None:
    for name, entry in table.items():
        if not entry.target or (entry.package and not _installed(entry.package)):
            continue
        assert callable(entry.load()), name


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


@pytest.mark.parametrize("table", [OPTIMIZERS, SCHEDULERS], ids=["optimizers", "schedulers"])
def test_declared_parameters_are_torchs(table: Table) -> None:
    for name, entry in table.items():
        if not entry.target:
            assert entry.parameters == (), name
            continue
        signature = inspect.signature(entry.load()).parameters
        real = {
            key
            for key, parameter in signature.items()
            if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
        }
        real -= TRAINER_OWNED | {"lr_lambda", "scale_fn"}  # functions: not settable from YAML
        assert set(entry.parameters or ()) == real, name


@pytest.mark.parametrize("name", list(MODELS))
def test_model_parameters_read_from_source_equal_the_signature(name: str) -> None:
    from_source = model_parameters(name)
    signature = inspect.signature(MODELS.load(name)).parameters
    assert list(from_source) == [key for key in signature if key != "self"]
    for key, parameter in signature.items():
        assert from_source[key].default == parameter.default, key


def test_lookup_suggests_the_closest_name_and_lists_all() -> None:
    with pytest.raises(ConfigError) as error:
        MODELS.lookup("schnett")
    message = str(error.value)
    assert "unknown model (model.name) 'schnett'" in message
    assert "Did you mean 'schnet'?" in message
    assert all(name in message for name in MODELS)
    assert suggest("adamw", OPTIMIZERS) == "AdamW"  # case first
    assert suggest("zzz", OPTIMIZERS) is None


def test_optional_package_is_one_line_naming_the_extra() -> None:
    entry = Entry("nowhere:thing", "logger: fancy", package="no_such_package_xyz", extra="fancy")
    with pytest.raises(ConfigError, match=r"pip install 'catforge\[fancy\]'"):
        entry.load()


def test_parsing_every_shipped_config_imports_no_torch() -> None:
    configs = sorted(str(p) for p in (ROOT / "configs").rglob("*.yml") if p.name != "base.yml")
    code = (
        "import sys\n"
        "from catforge.config import load_config\n"
        f"for path in {configs!r}:\n"
        "    load_config(path)\n"
        "heavy = [m for m in ('torch', 'numpy', 'catforge.models', 'lmdb') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
