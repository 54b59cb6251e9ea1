"""The library's errors: one base class, one subclass per kind of mistake.

Why a hierarchy: the command line, the server and the studio turn errors into exit codes and HTTP statuses by
class, never by matching names or messages, and a caller can catch everything deltatune raises on purpose with
`except DeltatuneError`. Each class also derives from the built-in exception that code written against `peft`
expects (`ValueError`, `TypeError`, `KeyError`), so `except ValueError` keeps working.
"""

from __future__ import annotations

import os
import sys
import warnings

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class DeltatuneError(Exception):
    """Base of every error deltatune raises on purpose; the message says what is wrong and how to fix it."""


class ConfigError(DeltatuneError, ValueError):
    """An adapter config (from code or from `adapter_config.json`) or a recipe has a bad or unsupported value."""


class DataError(DeltatuneError, ValueError):
    """Training or evaluation data is missing, malformed, or would give a misleading number."""


class CheckpointError(DeltatuneError, ValueError):
    """An adapter folder or a resume checkpoint cannot be read, does not fit the model, or holds unsafe data."""


class AdapterNotFoundError(DeltatuneError, KeyError, ValueError):
    """A name that is not one of the model's adapters (or the server's)."""

    def __str__(self) -> str:  # KeyError quotes its message; show it as written
        return str(self.args[0]) if self.args else ""


class MergeError(DeltatuneError, ValueError):
    """A merge or unmerge that cannot be done (or would be wrong); nothing was changed."""


class UnsupportedModelError(DeltatuneError, TypeError):
    """The method cannot adapt this model or this kind of module; the message names what to exclude or change."""


class RunError(DeltatuneError, RuntimeError):
    """A training run cannot start or continue as asked (e.g. its output folder holds another run)."""


def warn_at_caller(message: str) -> None:
    """A UserWarning pointed at the user's line (`from_pretrained(...)`, `set_adapter(...)`), however many
    deltatune frames lie between it and here: a fixed `stacklevel` points inside the library whenever the path
    through it changes."""
    frame, level = sys._getframe(0), 1
    while frame is not None and frame.f_code.co_filename.startswith(PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)
