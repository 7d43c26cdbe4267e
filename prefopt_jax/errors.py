"""The user-error family: mistakes in what a user gave (config, data, model, checkpoint, objective).

Every such error derives from `UserError`. The command line prints its message alone, without a
traceback, and exits with status 2 (`PREFOPT_DEBUG=1` or `--debug` shows the traceback); any other
exception is a bug and keeps its traceback. Messages name the culprit: the gin binding, the data
file and line, the tensor, the checkpoint step and path, the objective parameter.

The concrete classes live next to the code that raises them (`data.formats.DataError`,
`losses.ObjectiveError`, `models.hf.CheckpointError`, `registry.ConfigError`, ...); each also
derives from `ValueError` so callers that catch `ValueError` keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input, reported as its message alone (exit status 2)."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work (an unknown name, a bad combination), naming the binding."""


class RunDirError(UserError, RuntimeError):
    """An output directory that a run cannot use (held by another run, finished, unwritable)."""


class RestoreError(UserError, RuntimeError):
    """No intact checkpoint to resume from although the run's directory has checkpoints."""


class ModelSourceError(UserError, ValueError):
    """A model source that names nothing loadable (missing path, unknown name, not cached)."""


class DataSourceError(UserError, ValueError):
    """A data source that names nothing readable (missing file, unknown split, bad file type)."""
