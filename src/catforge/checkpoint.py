"""Checkpoints: atomic, versioned save and load of training state and model weights.

A checkpoint is a dict with OCP's keys (``state_dict``, ``optimizer``, ``scheduler``,
``normalizers``, ``config``, ``epoch``, ``step``, ``val_metrics``, ``ema``, ``amp``) plus
``format_version``. Model weights are saved unwrapped (no DDP ``module.`` prefix).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from catforge.errors import CheckpointError

FORMAT_VERSION = 1


def save_checkpoint(state: Mapping[str, Any], path: Path) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file, flushed, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with partial.open("wb") as handle:
            torch.save({**state, "format_version": FORMAT_VERSION}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by catforge or OCP; errors name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; check --checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:
        raise CheckpointError(
            f"{path}: unreadable checkpoint (corrupt or truncated?): {error}"
        ) from error
    if not isinstance(state, dict) or "state_dict" not in state:
        raise CheckpointError(f"{path}: not a model checkpoint (no 'state_dict' key)")
    version = state.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {version} is newer than this catforge reads "
            f"({FORMAT_VERSION}); upgrade catforge"
        )
    state["state_dict"] = strip_module_prefix(state["state_dict"])
    return state


def strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Remove DDP/DataParallel ``module.`` prefixes (OCP saved ``module.module.`` under DDP)."""
    stripped = {}
    for key, value in state_dict.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        stripped[key] = value
    return stripped
