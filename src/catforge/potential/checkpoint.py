"""Checkpoints: atomic, versioned save and load of training state and model weights.

``checkpoint.pt`` (full training state) has OCP's keys (``state_dict``, ``optimizer``,
``scheduler``, ``normalizers``, ``config``, ``epoch``, ``step``, ``val_metrics``, ``ema``,
``amp``, ``best_val_metric``, ``primary_metric``) plus ``format_version``, ``run_id``,
``batch_in_epoch``, ``steps_per_epoch`` and ``rng`` (torch, cuda, numpy, python; tensors and
plain values).
``best_checkpoint.pt`` holds the same minus optimizer, scheduler, EMA and RNG state (its
``state_dict`` is the EMA weights when EMA is on). Weights are saved unwrapped (no ``module.``).
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

from catforge.errors import CheckpointError
from catforge.runtime.atomic import atomic_write

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""1: ``rng`` held numpy's and Python's RNG states as returned (a numpy array; still read).
2: every RNG state is tensors and plain values (:func:`catforge.training.resume.rng_state`)."""

_NUMPY_DTYPE_CODES = "?bhilqBHILQefd"  # bool, signed/unsigned integers, float16/32/64
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")
_REFUSALS = ("unrecognized function", "Can only build", "Can only create new object")


def save_checkpoint(state: Mapping[str, Any], path: Path) -> Path:
    """Write ``state`` (plus ``format_version``) to ``path`` atomically."""
    with atomic_write(path) as handle:
        torch.save({**state, "format_version": FORMAT_VERSION}, handle)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by catforge or OCP; errors name the file and the fix.

    The file is unpickled with ``torch.load(weights_only=True)`` and only the globals of
    :func:`checkpoint_globals` allowed, so an object of any other class is refused, unbuilt.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; check --checkpoint")
    state = _read(path, map_location)
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


def checkpoint_globals() -> list[Any]:
    """The non-tensor globals a checkpoint may name: numpy arrays of bool, integer and float
    dtypes, under their numpy >= 2 and numpy 1.x pickle names. Format-1 checkpoints hold
    ``numpy.random.get_state()`` (a uint32 array); OCP files may hold numpy inputs."""
    dtype_classes = {type(np.dtype(code)) for code in _NUMPY_DTYPE_CODES} - {np.dtype}
    return [
        (_reconstruct, "numpy._core.multiarray._reconstruct"),
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        *sorted(dtype_classes, key=lambda cls: cls.__name__),
    ]


def _read(path: Path, map_location: str | torch.device) -> Any:
    """``torch.load`` with only :func:`checkpoint_globals` allowed beyond torch's own."""
    try:
        with torch.serialization.safe_globals(checkpoint_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        refused = _refused_object(str(error))
        if refused is None:
            raise CheckpointError(
                f"{path}: unreadable checkpoint (corrupt or truncated?): {_first_line(error)}"
            ) from None
        raise CheckpointError(
            f"{path}: holds an object that is not allowed in a checkpoint ({refused}); it was "
            "not loaded and nothing in it ran. A checkpoint may hold tensors, numbers, strings, "
            "lists, dicts and numeric numpy arrays only: save it again with those"
        ) from None
    except Exception as error:
        raise CheckpointError(
            f"{path}: unreadable checkpoint (corrupt or truncated?): {error}"
        ) from error


def _refused_object(message: str) -> str | None:
    """What torch's weights-only unpickler refused, from its error message (None: the pickle
    is malformed rather than refused)."""
    found = _REFUSED_GLOBAL.search(message)
    if found:
        return found.group(1)
    for line in message.splitlines():
        if any(marker in line for marker in _REFUSALS):
            return line.replace("WeightsUnpickler error:", "").strip()
    return None


def _first_line(error: Exception) -> str:
    lines = [line for line in str(error).splitlines() if "WeightsUnpickler error" in line]
    return (lines or str(error).splitlines() or [type(error).__name__])[0].strip()


def strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Remove DDP/DataParallel ``module.`` prefixes (OCP saved ``module.module.`` under DDP)."""
    stripped = {}
    for key, value in state_dict.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        stripped[key] = value
    return stripped


def load_weights(
    model: torch.nn.Module,
    state_dict: Mapping[str, Any],
    source: str | Path,
    *,
    strict: bool = True,
) -> None:
    """Load ``state_dict`` into ``model``; a mismatch is a CheckpointError naming the first
    missing, unexpected or differently shaped parameter (with both shapes).

    Keys the model declares unused (``ignored_checkpoint_keys`` of the model or, for a
    ForceModel, of its energy model; such as the ``atomic_mass`` buffer of torch_geometric < 2.2's
    SchNet in OCP checkpoints) are dropped with an info line. ``strict=False`` is OCP's
    ``task.strict_load: False`` (as OCP's ``load_state_dict``): the matching keys load, missing
    and unexpected ones are reported in one warning; a shape mismatch is still an error.
    """
    expected = model.state_dict()
    state_dict = _without_ignored_keys(model, expected, strip_module_prefix(state_dict), source)
    if not strict:
        state_dict = _matching_keys(expected, state_dict, source)
    problem = _weights_mismatch(expected, state_dict, strict)
    if problem:
        raise CheckpointError(f"{source}: checkpoint does not fit the configured model: {problem}")
    try:
        model.load_state_dict(state_dict, strict=strict)
    except RuntimeError as error:
        raise CheckpointError(
            f"{source}: checkpoint does not fit the configured model: {str(error).splitlines()[0]}"
        ) from error


def ignored_checkpoint_keys(model: torch.nn.Module) -> tuple[str, ...]:
    """Checkpoint keys ``model`` declares unused (state-dict names, as :func:`load_weights`
    sees them)."""
    inner = getattr(model, "energy_model", model)  # a ForceModel's keys are its energy model's
    return tuple(getattr(inner, "ignored_checkpoint_keys", ()))


def _without_ignored_keys(
    model: torch.nn.Module,
    expected: Mapping[str, Any],
    state_dict: dict[str, Any],
    source: str | Path,
) -> dict[str, Any]:
    declared = ignored_checkpoint_keys(model)
    ignored = [key for key in declared if key in state_dict and key not in expected]
    if ignored:
        log.info(
            "%s: ignored %s in the checkpoint (unused by %s)",
            source,
            ", ".join(repr(key) for key in ignored),
            type(model).__name__,
        )
    return {key: value for key, value in state_dict.items() if key not in ignored}


def _matching_keys(
    expected: Mapping[str, Any], state_dict: dict[str, Any], source: str | Path
) -> dict[str, Any]:
    """``state_dict`` without the keys the model lacks; one warning lists what does not match."""
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    if missing or unexpected:
        log.warning(
            "%s: task.strict_load is False: loading the matching weights; missing from the "
            "checkpoint (left as initialised): %s; unexpected (not loaded): %s",
            source,
            ", ".join(missing) or "none",
            ", ".join(unexpected) or "none",
        )
    return {key: value for key, value in state_dict.items() if key in expected}


def _weights_mismatch(
    expected: Mapping[str, Any], found: Mapping[str, Any], strict: bool = True
) -> str | None:
    """A description of the first difference between two state dicts (only shapes of the keys
    both have unless ``strict``), or None."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    if missing and strict:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return f"parameter '{missing[0]}' is missing from the checkpoint{more}"
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        return f"unexpected parameter '{unexpected[0]}' in the checkpoint{more}"
    for key, tensor in expected.items():
        if key not in found:
            continue
        shape = tuple(getattr(found[key], "shape", ()))
        if tuple(tensor.shape) != shape:
            return (
                f"parameter '{key}' has shape {shape} in the checkpoint but "
                f"{tuple(tensor.shape)} in the model"
            )
    return None
