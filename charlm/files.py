"""Creating files safely in directories a user shares: run directories, the ids cache and
export outputs. A symbolic link planted there is never followed for writing (a ``.lock`` or
``metrics.jsonl`` link would otherwise truncate or append to another file), and temporary
files left by a killed process are recognized by their name and removed.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from charlm.errors import CharlmError
from charlm.signals import writing

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def open_no_follow(path: Path, flags: int, fresh: bool = False) -> int:
    """``os.open(path, flags)`` that refuses a symbolic link at ``path`` (one-line
    CharlmError); ``fresh`` first removes whatever is there (our own temporary name)."""
    if fresh:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    try:
        return os.open(path, flags | O_NOFOLLOW, 0o644)
    except OSError:
        refuse_symlink(path)
        raise


def open_fresh(path: Path, mode: str):
    """``open(path, mode)`` for a new file of our own naming: whatever is at ``path`` (a
    stale temporary file, a planted link) is removed, never followed."""
    return open(path, mode, opener=lambda name, flags: open_no_follow(
        Path(name), flags | os.O_EXCL, fresh=True))


def refuse_symlink(path: Path) -> None:
    if path.is_symlink():
        raise CharlmError(
            f"{path} is a symbolic link; charlm never writes through one there (remove it "
            "and run again)"
        )


# charlm's temporary files: ``.charlm-NAME.PID.tmp``. Releases before 0.2 named them
# ``.NAME.PID.tmp``; of those only the names of charlm's own run files count as charlm's, so
# that a user's ``.draft.tmp`` (or ``.notes.txt.12.tmp``) is never removed.
_TEMPORARY = re.compile(r"\.charlm-(?P<name>.+)\.(?P<pid>[0-9]+)\.tmp")
_OLD_TEMPORARY = re.compile(
    r"\.(?P<name>last\.pt|best\.pt|step-[0-9]+\.pt|config\.toml|metrics\.jsonl)"
    r"\.(?P<pid>[0-9]+)\.tmp")


def temporary_name(path: Path) -> Path:
    """Where charlm writes ``path`` before renaming it into place."""
    return path.with_name(f".charlm-{path.name}.{os.getpid()}.tmp")


def is_charlm_temporary(name: str, dead_only: bool = False) -> bool:
    """Whether ``name`` is one of charlm's temporary files (``dead_only``: and the process
    that wrote it is gone, so that it is a write killed half-way)."""
    found = _TEMPORARY.fullmatch(name) or _OLD_TEMPORARY.fullmatch(name)
    return found is not None and not (dead_only and _alive(int(found["pid"])))


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files of ``path`` (``.charlm-NAME.PID.tmp``, as atomic_write
    names them, or ``.NAME.PID.tmp`` from earlier releases) whose process is gone: a write
    that was killed half-way."""
    for prefix in (".charlm-", "."):
        head = f"{prefix}{path.name}."
        for tmp in path.parent.glob(f"{glob.escape(head)}*.tmp"):
            pid = tmp.name[len(head) : -len(".tmp")]
            if pid.isdigit() and not _alive(int(pid)):
                remove_quietly(tmp)


def remove_quietly(path: Path) -> None:
    """Remove ``path`` if it is there; best effort (a read-only file system, or a folder
    that is not ours to change, refuses even to unlink what is not there)."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError, OverflowError):  # not ours to signal, or no such pid form
        return True
    return True

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
