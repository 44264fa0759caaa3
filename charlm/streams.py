"""Standard output and standard error that never stop charlm by themselves.

:func:`guarded` puts a :class:`GuardedStream` in front of ``sys.stdout`` and ``sys.stderr``
(the CLI does it for every command, :func:`charlm.training.setup.train` for a training run), so that
every writer (rich, tqdm, the monitors, warnings) gets the same rules:

* A character the console cannot encode (``PYTHONIOENCODING=cp1252``, ``LANG=C``) is printed
  escaped (``\\u4e2d``), with a one-time hint on stderr to set ``PYTHONIOENCODING=utf-8``.
* A stream that goes away (a broken pipe: ``| head``; a closed descriptor: ``2>&-``; a full
  disk under a redirect) is turned off: later writes go nowhere, its descriptor is pointed at
  /dev/null so that Python's flush at exit stays quiet, and the loss is noted once on the
  other stream where that one still works.

  - Standard error is diagnostics: losing it never stops a command.
  - Standard output stops a command that is only there to print (``sample``, ``info``,
    ``runs``): a broken pipe raises ``BrokenPipeError`` (the CLI exits quietly with status 0,
    as ``| head`` expects), any other failure raises :class:`OutputLost` ("cannot write the
    output"). Inside :func:`keep_going` (a training run) it never raises: training goes on to
    its checkpoint with its samples turned off.

Descriptors 0-2 that are closed when charlm starts are opened on /dev/null, so that no file
charlm opens later (a checkpoint) takes their number and receives stray output.
Plain Python only (no typer, rich or torch).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from charlm.errors import CharlmError

HINT = ("note: this console's encoding ({encoding}) cannot show some characters; they are "
        "printed as \\u escapes; set PYTHONIOENCODING=utf-8 to see them")
_NAMES = {"stdout": "standard output", "stderr": "standard error"}

_lock = threading.RLock()
_keep_going = 0  # keep_going() blocks entered (training runs)
_hinted = False


class OutputLost(CharlmError):
    """Standard output cannot be written (closed, full disk, I/O error): exit status 1."""


def _why(exc: BaseException | None) -> str:
    if exc is None or isinstance(exc, ValueError):
        return "closed"
    if isinstance(exc, BrokenPipeError | ConnectionResetError):
        return "broken pipe"
    if isinstance(exc, OSError) and exc.errno == errno.EBADF:
        return "closed"
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or "error"


def _is_loss(exc: BaseException) -> bool:
    """A failure of the stream itself (not a bug of the writer)."""
    if isinstance(exc, ValueError):
        return "closed file" in str(exc)
    return isinstance(exc, OSError)


class GuardedStream:
    """A text stream in front of ``stream`` (None: a stream closed when Python started)."""

    def __init__(self, name: str, stream):
        self.name = name  # "stdout" or "stderr"
        self.stream = stream
        self.lost: str | None = None if stream is not None else "closed"
        self.noted = False  # the loss was noted on the other stream

    # The attributes writers look at (encoding, isatty, fileno, buffer, ...) are the stream's.
    def __getattr__(self, attr):
        stream = self.__dict__.get("stream")
        if stream is None:
            raise AttributeError(attr)
        return getattr(stream, attr)

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", None) or "utf-8"

    @property
    def closed(self) -> bool:
        return False  # writes are always accepted (and dropped once the stream is lost)

    def isatty(self) -> bool:
        if self.lost is not None:
            return False
        try:
            return self.stream.isatty()
        except (OSError, ValueError, AttributeError):
            return False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.lost is None:
            try:
                self._write(text)
            except Exception as exc:  # noqa: BLE001 - sorted below
                if not _is_loss(exc):
                    raise
                self._lose(exc)
        elif self._raises():
            self._raise(None)
        else:
            self._note()
        return len(text)

    def flush(self) -> None:
        if self.lost is None:
            try:
                self.stream.flush()
            except Exception as exc:  # noqa: BLE001 - sorted below
                if not _is_loss(exc):
                    raise
                self._lose(exc)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
        except UnicodeEncodeError:
            encoding = self.encoding
            try:  # from now on the stream escapes by itself
                self.stream.reconfigure(errors="backslashreplace")
                self.stream.write(text)
            except (AttributeError, ValueError, LookupError):
                self.stream.write(text.encode(encoding, "backslashreplace")
                                  .decode(encoding, "replace"))
            _hint(encoding)

    def _raises(self) -> bool:
        return self.name == "stdout" and not _keep_going

    def _lose(self, exc: BaseException) -> None:
        """Turn this stream off after ``exc``; raise it on where this stream must not be lost."""
        first = self.lost is None
        self.lost = _why(exc)
        to_devnull(self.stream)
        if self._raises():
            self._raise(exc)
        if first:
            self._note()

    def _note(self) -> None:
        """Say once, on the other stream, that this one is off (stdout carries samples and
        tables: it hears of a lost stderr only in training, where it shows samples anyway)."""
        if self.noted or not (self.name == "stdout" or _keep_going):
            return
        self.noted = True
        other = sys.stdout if self.name == "stderr" else sys.stderr
        if isinstance(other, GuardedStream) and other is not self and other.lost is None:
            what = "is closed" if self.lost == "closed" else f"failed ({self.lost})"
            other.write(f"note: {_NAMES[self.name]} {what}; its output is off from here, and "
                        "charlm goes on\n")
            other.flush()

    def _raise(self, exc: BaseException | None):
        if isinstance(exc, BrokenPipeError):
            raise exc  # the reader went away (| head): the CLI exits quietly
        if self.lost == "broken pipe":
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
        raise OutputLost(f"cannot write the output: {_NAMES[self.name]} is "
                         f"{self.lost}" if self.lost == "closed" else
                         f"cannot write the output: {self.lost}") from None


def _hint(encoding: str) -> None:
    global _hinted
    with _lock:
        if _hinted:
            return
        _hinted = True
    err = sys.stderr
    if err is not None:
        try:
            err.write(HINT.format(encoding=encoding) + "\n")
            err.flush()
        except Exception:  # noqa: BLE001 - a hint never stops anything
            pass


def to_devnull(stream) -> None:
    """Point the descriptor of a lost standard stream at /dev/null: the bytes still buffered in
    it are then flushed there at exit, without an "Exception ignored" message."""
    try:
        fd = stream.fileno()
    except Exception:  # noqa: BLE001 - no descriptor (a StringIO under tests), or closed
        return
    if fd not in (1, 2):
        return
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)
    except OSError:
        pass


def _open_closed_descriptors() -> None:
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            try:
                null = os.open(os.devnull, os.O_RDWR)
                if null != fd:
                    os.dup2(null, fd)
                    os.close(null)
            except OSError:
                pass


@contextmanager
def guarded(restore: bool = True) -> Iterator[None]:
    """``sys.stdout`` and ``sys.stderr`` guarded inside the block (already guarded ones are
    kept). ``restore=False`` leaves them guarded after it (the console script, which ends next:
    Python's own flush at exit then goes through the guard too)."""
    _open_closed_descriptors()
    if hasattr(signal, "SIGPIPE") and threading.current_thread() is threading.main_thread():
        try:  # a write to a pipe without a reader fails with EPIPE instead of killing charlm
            if signal.getsignal(signal.SIGPIPE) == signal.SIG_DFL:
                signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        except (OSError, ValueError):
            pass
    saved = sys.stdout, sys.stderr
    if not isinstance(sys.stdout, GuardedStream):
        sys.stdout = GuardedStream("stdout", sys.stdout)
    if not isinstance(sys.stderr, GuardedStream):
        sys.stderr = GuardedStream("stderr", sys.stderr)
    try:
        yield
    finally:
        if restore:
            for guard in (sys.stdout, sys.stderr):
                if isinstance(guard, GuardedStream) and guard.lost is None:
                    try:
                        guard.flush()
                    except Exception:  # noqa: BLE001 - restoring never raises
                        pass
            sys.stdout, sys.stderr = saved


@contextmanager
def keep_going() -> Iterator[None]:
    """Inside the block (a training run), no failure of standard output or standard error
    raises: a lost stream is turned off and the work goes on."""
    global _keep_going
    with guarded():
        with _lock:
            _keep_going += 1
        try:
            yield
        finally:
            with _lock:
                _keep_going -= 1
