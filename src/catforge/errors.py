"""Error types raised for bad user input: each message names the file, key or field and the fix."""

from __future__ import annotations


class CatforgeError(Exception):
    """Base class of every error catforge raises on purpose; the CLI prints it as one line."""


class ConfigError(CatforgeError):
    """A config file, key, value or command-line flag is wrong."""


class DataError(CatforgeError):
    """A data file or entry is missing, corrupt or has a wrong field."""


class CheckpointError(CatforgeError):
    """A checkpoint is missing, corrupt or does not fit the model."""


class OutputError(CatforgeError):
    """An output file or folder cannot be written (no space left, no permission)."""
