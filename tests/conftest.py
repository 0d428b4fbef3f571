"""Shared fixtures: tiny EMT-labelled structures and the path to the real sample data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from catforge.data.demo import generate_demo
from tests.factories import SHARED_DATA

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n N` runs N workers: one torch thread each keeps them from fighting for the cores.
    torch.set_num_threads(1)


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data``; the test is skipped where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo dataset (seed 1), generated once per test process."""
    out = tmp_path_factory.mktemp("demo") / "demo_data"
    generate_demo(out, size="tiny", seed=1, workers=1, progress=False)
    return out
