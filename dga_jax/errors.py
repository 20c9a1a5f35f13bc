"""The errors a user's input causes: entry points print them as one `error: ...` line.

Anything else that escapes an entry point is a bug and keeps its traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """A user's input is missing or wrong (a file, a directory, a checkpoint, a value); the
    message names it and, where there is one, the flag or command that supplies it."""


class ConfigError(InputError):
    """A config key is unknown, missing, or has a value of the wrong type; the message names
    the key (`config.optim.lerning_rate`)."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or directory the user named does not exist or holds nothing usable."""
