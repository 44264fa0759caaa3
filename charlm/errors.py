"""Errors the library raises for bad input. The CLI prints them as one line and exits non-zero."""

import errno


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


class PathError(CharlmError):
    """A path the operating system refused: too long, permission denied, a loop of links,
    a part that is not a directory. A name that cannot work (exit 2, like a bad option) is
    told from a file that may not be read (exit 1)."""


# errno -> (what is wrong, what to do, exit code): a name that cannot work is a bad
# argument (2); a file that may not be read is not (1).
_PATH_PROBLEMS = {
    errno.ENAMETOOLONG: ("file name too long", "use a shorter path", 2),
    errno.ELOOP: ("too many levels of symbolic links", "fix the links", 2),
    errno.ENOTDIR: ("not a directory", "a part of the path is a file", 2),
    errno.EACCES: ("permission denied", "check its permissions", 1),
    errno.EPERM: ("permission denied", "check its permissions", 1),
}


def path_error(exc: OSError, path: object = None) -> CharlmError | None:
    """The one-line error for an OSError about a path (``path``, or the one the error names):
    ``file name too long: <path>``, ``permission denied: <path>``, ...; None for an errno
    that is not about the path (a full disk, an I/O error)."""
    if exc.errno not in _PATH_PROBLEMS:
        return None
    what, hint, code = _PATH_PROBLEMS[exc.errno]
    name = path if path is not None else exc.filename
    shown = printable(name if name is not None else "?")
    if len(shown) > 200:  # a name too long for the OS is too long for a line, too
        shown = f"{shown[:100]}...{shown[-60:]} ({len(shown):,} characters)"
    error = PathError(f"{what}: {shown}; {hint}")
    error.exit_code = code
    return error


class ArgumentTypeError(ConfigError, TypeError):
    """An argument of the Python API of the wrong type (``length=1.5``, ``temperature="0.5"``):
    a TypeError, and a ConfigError with a one-line message."""


_KINDS = {"int": "an integer", "number": "a number", "str": "a string", "bool": "True or False",
          "callable": "a function or None"}


def check_type(name: str, value: object, kind: str) -> None:
    """Raise :class:`ArgumentTypeError` unless ``value`` is of ``kind``: "int" (not a bool),
    "number" (an int or float, not a bool), "str", "bool", or "callable" (or None)."""
    import numbers

    if kind == "int":
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif kind == "number":
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    elif kind == "str":
        ok = isinstance(value, str)
    elif kind == "bool":
        ok = isinstance(value, bool)
    else:
        ok = value is None or callable(value)
    if not ok:
        raise ArgumentTypeError(
            f"{name} must be {_KINDS[kind]}, not {type(value).__name__} {printable(repr(value))[:60]}"
        )
