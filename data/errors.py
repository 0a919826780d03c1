"""The data package's bad-input error (a `performer.errors.InputError`: one line and exit 2 on the
command line)."""

from performer.errors import InputError


class DataError(InputError, ValueError):
    """Data that cannot be used as given; the message names the file (or setting) and the fix."""
