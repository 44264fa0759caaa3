"""Stopping cleanly on Ctrl-C or SIGTERM: the loop finishes its step and saves last.pt."""

from __future__ import annotations

import os
import signal
import sys

from tqdm import tqdm

EXIT_INTERRUPTED = 130


class StopSignals:
    """First SIGINT/SIGTERM asks the loop to stop after the current step (it then saves);
    a second one exits at once. Files are always replaced atomically, so nothing is torn."""

    def __init__(self, announce: bool = True):
        self.signum = 0
        self.announce = announce  # only one process of a distributed run speaks
        self.previous = {}

    def __enter__(self) -> StopSignals:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    def _handle(self, signum, frame):
        if self.signum:
            os._exit(EXIT_INTERRUPTED)
        self.signum = signum
        if not self.announce:
            return
        try:  # stderr, with the progress bar and the final "Resume with" line
            tqdm.write("stopping after this step and saving last.pt (press Ctrl-C again to "
                       "quit now)", file=sys.stderr)
        except (RuntimeError, OSError):  # the handler interrupted a write to the same stream
            pass

    def __exit__(self, kind, exc, tb) -> bool:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False
