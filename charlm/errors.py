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


def printable(text: object) -> str:
    """``text`` on one line, with control characters (terminal escapes, newlines) and
    undecodable bytes of file names shown as escapes instead of acting on a terminal."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(text))


def first_line(exc: BaseException) -> str:
    """An exception's message cut to one short line (its type's name when it has none), for
    quoting a library's error inside one of ours."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


def internal_error(exc: BaseException) -> str:
    """How an unexpected exception is reported: its type and the first line of its message."""
    return f"internal error: {type(exc).__name__}: {first_line(exc)}"
