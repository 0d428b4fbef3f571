"""Shared fixtures: tiny EMT-labelled structures and the path to the real sample data."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import SHARED_DATA


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data``; the test is skipped where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA}")
    return SHARED_DATA
