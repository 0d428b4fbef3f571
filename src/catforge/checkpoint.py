"""Checkpoints: atomic, versioned save and load of training state and model weights.

``checkpoint.pt`` (full training state) has OCP's keys (``state_dict``, ``optimizer``,
``scheduler``, ``normalizers``, ``config``, ``epoch``, ``step``, ``val_metrics``, ``ema``,
``amp``, ``best_val_metric``, ``primary_metric``) plus ``format_version``, ``run_id``,
``batch_in_epoch``, ``steps_per_epoch`` and ``rng`` (torch, cuda, numpy, python).
``best_checkpoint.pt`` holds the same minus optimizer, scheduler, EMA and RNG state (its
``state_dict`` is the EMA weights when EMA is on). Weights are saved unwrapped (no ``module.``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from catforge.atomic import atomic_write
from catforge.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def save_checkpoint(state: Mapping[str, Any], path: Path) -> Path:
    """Write ``state`` (plus ``format_version``) to ``path`` atomically."""
    with atomic_write(path) as handle:
        torch.save({**state, "format_version": FORMAT_VERSION}, handle)
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
            source, ", ".join(repr(key) for key in ignored), type(model).__name__,
        )  # fmt: skip
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
            source, ", ".join(missing) or "none", ", ".join(unexpected) or "none",
        )  # fmt: skip
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
