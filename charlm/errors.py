"""Errors the library raises for bad input. The CLI prints them as one line and exits non-zero."""


class CharlmError(Exception):
    """A problem the user can fix; ``str(error)`` is a complete one-line message."""

    exit_code = 1


class ConfigError(CharlmError):
    """A config file or option is unknown, of the wrong type or out of range."""

    exit_code = 2


class DataError(CharlmError):
    """A text file cannot be read, decoded or batched."""


class CheckpointError(CharlmError):
    """A checkpoint is missing, damaged, unsafe or does not fit the request."""
