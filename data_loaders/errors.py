"""The project's error family. It lives at the lowest layer that raises one of them: ``pipeline/`` and
``launchers/`` build on ``data_loaders/``, never the other way round.

Every error a user must act on is one line naming the bad value and the fix. Its class says what was wrong, and
``exit_code`` how a command ends with it: a launcher catches ``SovitError`` alone, prints the line and exits with
that code, and anything else is a bug that keeps its traceback. None of them is also a ValueError or RuntimeError,
so an ``except RuntimeError`` around a library call (a state dict that does not fit, torch's zip writer) never
swallows one of ours. Only the standard library is imported here: ``pipeline.config`` and ``--help`` build on it.
"""

from __future__ import annotations


class SovitError(Exception):
    """The root: a one-line message for the user and the exit code a command ends with."""

    exit_code = 2  # bad input the user must fix (a config, data, a run directory, a full disk)


class ConfigError(SovitError):
    """A bad configuration value: the message is one line that names the key and the fix."""


class DataError(SovitError):
    """A problem with the data, not the code: one line that names the bad path or value and the fix."""
