"""The one error type for bad input, shared by the model library, `data` and `launcher`.

An ``InputError`` says that something the caller gave (a file, a directory, an option, a
setting) cannot be used, and its message names the input, the problem and the fix. The
`performer` commands print it as one line, ``error: <message>``, and exit with code 2
(``launcher.errors``); any other exception is a bug and keeps its traceback. Each area raises
its own subclass (ExportError here, DataError, ConfigError, CheckpointError, ... elsewhere), so
callers can catch what they handle and the command line catches them all.
"""


class InputError(Exception):
    """A bad input; the message names it, says what is wrong and how to fix it."""


class ConfigError(InputError, ValueError):
    """A config problem (a file, a mapping, a ``--set``), with the key it concerns and how to fix it."""
