"""Atomic file writes: a temporary file in the same directory, flushed to disk, then renamed
over the target, so a crash at any moment leaves the previous file intact. Plain Python
only: plotting, caching and the run directory use it without importing torch."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from charlm.errors import CharlmError
from charlm.files import open_fresh, remove_quietly, temporary_name
from charlm.signals import writing


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write ``path`` through a temporary file in the same directory, fsync, then rename.

    ``write`` receives the open temporary file. On any error the temporary file is removed
    and the previous ``path`` is left untouched.
    """
    path = Path(path)
    tmp = temporary_name(path)  # only charlm's own temporary files are ever cleaned
    with writing():  # a second stop signal waits for the rename or the removal
        try:
            with open_fresh(tmp, mode) as f:  # never through a link planted at that name
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            remove_quietly(tmp)
            os_error = _os_error(exc)
            if os_error is not None:
                raise CharlmError(
                    f"could not write {path}: {os_error.strerror or os_error}; the previous file "
                    "is unchanged"
                ) from None
            raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``, if any. On a full disk torch.save's cleanup raises a
    RuntimeError ("unexpected pos") while the write's OSError is being handled."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
