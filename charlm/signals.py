"""Stop signals, handled alike in every command: SIGINT (Ctrl-C), SIGTERM (``kill``, a job
scheduler) and SIGHUP (the terminal closed, an ssh connection dropped). Each ends a command
with exit status 130 (:data:`EXIT_INTERRUPTED`), whichever signal it was.

* Outside training (:func:`interrupting`, which the CLI installs for every command) a stop
  signal raises ``KeyboardInterrupt`` where the program is, as Ctrl-C does: setup, automatic
  sizing, ``eval``, ``export``, ``sample`` stop there, and a file being written is left as it
  was (the temporary file is removed).
* In training (:class:`StopSignals`) the first one asks the loop to stop after the current
  step and save last.pt; a sample in progress ends early (:func:`stop_requested`).
* A second stop signal quits at once (:func:`quit_now`), except while a file is being written
  atomically (:func:`writing`): then it quits as soon as that write has ended, renamed into
  place or removed, so that no temporary file is ever left behind.

A SIGHUP that is ignored when charlm starts (``nohup charlm train ...``) stays ignored.
Plain Python only: the atomic writer uses this module without importing torch.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_INTERRUPTED = 130

# The stop signals this platform has (Windows has no SIGHUP).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                     if hasattr(signal, name))

_lock = threading.RLock()  # re-entrant: a handler may run while the main thread holds it
_writes = 0  # atomic writes in progress, on any thread
_exit_pending = False  # a second signal came during a write: exit when the writes end
_received = 0  # the stop signal this process received (0: none)


def received() -> int:
    """The stop signal this process received, or 0. A failure that follows one (an exporter
    that turns the interrupt into an error of its own) is an interruption, not a failure."""
    return _received


def stop_requested() -> bool:
    """True once a stop signal came: long work inside training (a sample) ends early."""
    return _received != 0


def quit_now() -> None:
    """Exit with :data:`EXIT_INTERRUPTED` at once, or when the atomic writes in progress end."""
    global _exit_pending
    with _lock:
        if _writes:
            _exit_pending = True
            return
    os._exit(EXIT_INTERRUPTED)


@contextmanager
def writing() -> Iterator[None]:
    """Around an atomic write, from creating its temporary file until it is renamed into
    place or removed: a second stop signal waits for the end of it instead of leaving the
    temporary file behind. The write itself is not delayed, and the first signal still
    interrupts it (the writer then removes its temporary file)."""
    global _writes
    with _lock:
        _writes += 1
    try:
        yield
    finally:
        with _lock:
            _writes -= 1
            leave = _exit_pending and not _writes
        if leave:
            os._exit(EXIT_INTERRUPTED)


def _take(signum: int) -> bool:
    """Record a stop signal; True when it is the first (a second one quits, see quit_now)."""
    global _received
    if _received:
        quit_now()
        return False
    _received = signum
    return True


def _interrupt(signum, frame):
    if _take(signum):
        raise KeyboardInterrupt


def _install(handler, sigs) -> dict:
    """Install ``handler`` for ``sigs``; returns the previous handlers. An ignored SIGHUP
    (nohup) stays ignored; outside the main thread nothing is installed."""
    previous = {}
    try:
        for sig in sigs:
            if sig == getattr(signal, "SIGHUP", None) and signal.getsignal(sig) == signal.SIG_IGN:
                continue
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    return previous


def _restore(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextmanager
def interrupting(to_the_end: bool = False) -> Iterator[None]:
    """Every stop signal raises KeyboardInterrupt, as Ctrl-C does (a SIGINT that Python
    left ignored, as a shell's background job, stays ignored). At the end the handlers
    before are restored or, ``to_the_end`` (the process ends next), the stop signals are
    ignored: the command has done its work, and the interpreter's exit (a second with torch
    loaded) ends with the command's status, not killed half-way by a late signal."""
    global _received
    sigs = [s for s in STOP_SIGNALS
            if s != signal.SIGINT or signal.getsignal(s) is signal.default_int_handler]
    _received = 0
    previous = _install(_interrupt, sigs)
    try:
        yield
    finally:
        if to_the_end:
            _install(signal.SIG_IGN, previous)
        else:
            _restore(previous)
        _received = 0


class StopSignals:
    """In training: the first stop signal asks the loop to stop after the current step (it
    then saves); a second one quits at once (after the file being written, if any)."""

    def __init__(self, announce: bool = True):
        self.signum = 0
        self.announce = announce  # only one process of a distributed run speaks
        self.previous = {}

    def __enter__(self) -> StopSignals:
        global _received
        _received = 0  # a new training (the Python API may train several times)
        self.previous = _install(self._handle, STOP_SIGNALS)
        return self

    def _handle(self, signum, frame):
        if not _take(signum):
            return
        self.signum = signum
        if not self.announce:
            return
        from tqdm import tqdm

        try:  # stderr, with the progress bar and the final "Resume with" line
            tqdm.write("stopping after this step and saving last.pt (press Ctrl-C again to "
                       "quit now)", file=sys.stderr)
        except (RuntimeError, OSError, ValueError, AttributeError):
            # the handler interrupted a write to the same stream, or stderr is gone (a
            # closed terminal after SIGHUP, 2>&-)
            pass

    def __exit__(self, kind, exc, tb) -> bool:
        global _received
        _restore(self.previous)
        _received = 0  # after training, samples run whole again; a next signal interrupts
        return False
