"""Exact resume: RNG snapshots, the best metric so far, and config diffs.

The batch order of an epoch with an offset is :class:`catforge.data.samplers.ShardedBatchSampler`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from catforge.errors import CheckpointError
from catforge.potential.checkpoint import load_checkpoint
from catforge.potential.metrics import is_better

log = logging.getLogger(__name__)

# Keys expected to differ between a run and its resumption; never reported.
_RUN_KEYS = frozenset({"options.checkpoint", "options.mode", "options.timestamp_id"})


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from: torch CPU, CUDA (if present), numpy, random;
    as tensors and plain values, which ``torch.load(weights_only=True)`` reads."""
    kind, key, position, has_gauss, gauss = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {
            "bit_generator": str(kind),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }


def set_rng_state(state: Mapping[str, Any] | None) -> None:
    """Restore what :func:`rng_state` captured (missing parts are left alone); the numpy and
    Python states of format-1 checkpoints (as ``get_state()``/``getstate()`` return them) too."""
    if not state:
        return
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    if state.get("numpy") is not None:
        np.random.set_state(_numpy_state(state["numpy"]))
    if state.get("python") is not None:
        random.setstate(_python_state(state["python"]))


def _numpy_state(saved: Any) -> tuple[Any, ...]:
    """``np.random.set_state``'s legacy tuple from :func:`rng_state`'s dict (or that tuple)."""
    if not isinstance(saved, Mapping):
        return tuple(saved)
    key = np.asarray(saved["key"].cpu().numpy(), dtype=np.uint32)
    return (saved["bit_generator"], key, saved["pos"], saved["has_gauss"], saved["gauss"])


def _python_state(saved: Any) -> tuple[Any, ...]:
    """``random.setstate``'s tuple from :func:`rng_state`'s dict (or that tuple)."""
    if isinstance(saved, Mapping):
        version, internal, gauss_next = saved["version"], saved["state"], saved["gauss_next"]
        internal = internal.tolist() if isinstance(internal, torch.Tensor) else internal
    else:
        version, internal, gauss_next = saved
    return (version, tuple(int(value) for value in internal), gauss_next)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one mapping of dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat


_MISSING = "<unset>"


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, checkpoint value, current value) for every key whose value differs."""
    before, after = flatten(old), flatten(new)
    diffs = []
    for key in sorted(before.keys() | after.keys()):
        if key in _RUN_KEYS:
            continue
        was, now = before.get(key, _MISSING), after.get(key, _MISSING)
        if was != now:
            diffs.append((key, was, now))
    return diffs


def report_config_diff(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> None:
    """Log each key where the current config differs from the checkpoint's; the new one wins."""
    if not old:
        return
    diffs = config_diff(old, new)
    for key, was, now in diffs:
        log.warning("config differs from the checkpoint: %s: %r -> %r", key, was, now)
    if diffs:
        log.warning("resuming with %d changed config key(s); the current values win", len(diffs))


def stored_best(path: Path, primary: str) -> float | None:
    """The primary metric recorded in an existing ``best_checkpoint.pt`` (None, with a
    warning, if it cannot be loaded: a torn file is no better than none)."""
    if not path.is_file():
        return None
    try:
        state = load_checkpoint(path)
    except CheckpointError as error:
        log.warning("ignoring the best metric of %s", error)
        return None
    value = (state.get("val_metrics") or {}).get(primary)
    return None if value is None else float(value)


def better_of(primary: str, first: float | None, second: float | None) -> float | None:
    """The better of two primary-metric values (None counts as no value)."""
    if first is None:
        return second
    if second is None:
        return first
    return second if is_better(primary, second, first) else first
