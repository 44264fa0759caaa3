"""Checkpoint files written off the training thread.

A checkpoint of ``configs/gpu.toml`` is about 280 MB with its optimizer state: written and
fsynced at every evaluation on the training thread, saving took 10-30% of a 3-minute GPU
run. Here the training thread only copies the tensors (from the GPU, or out of the live CPU
parameters) and hands the copy to one writer thread, which writes each file atomically
(temporary file, fsync, rename) in the order given. A newer copy of a file that is still
waiting replaces the older one, so a slow disk never makes training wait; :meth:`close`
waits for everything pending. An error on the writer thread (a full disk) is raised on the
training thread at the next call, with the previous files left intact.
"""

from __future__ import annotations

import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from charlm.storage import checkpoint


def detached_copy(obj: Any, clone_cpu: bool = True) -> Any:
    """``obj`` with every tensor copied to the CPU, sharing no memory with the originals.
    ``clone_cpu=False`` leaves CPU tensors as they are: right when the model trains on a GPU,
    where every CPU tensor of a checkpoint is already a fresh copy (``.cpu()``, RNG states)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.device.type != "cpu":
            return t.to("cpu")
        return t.clone() if clone_cpu else t
    if isinstance(obj, dict):
        return {k: detached_copy(v, clone_cpu) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(detached_copy(v, clone_cpu) for v in obj)
    return obj


class CheckpointWriter:
    """One background writer of checkpoint files. ``blocked`` counts the seconds the training
    thread spent saving (copies and waits)."""

    def __init__(self) -> None:
        self._pending: dict[Path, Any] = {}  # path -> checkpoint, in write order
        self._prune: tuple[Path, int] | None = None  # (run directory, step-*.pt files to keep)
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._closed = False
        self.blocked = 0.0
        self._thread = threading.Thread(target=self._run, name="charlm-checkpoints",
                                        daemon=True)
        self._thread.start()

    def submit(self, files: dict[Path, dict[str, Any]], prune: tuple[Path, int] | None = None,
               started: float | None = None) -> None:
        """Queue ``files`` (path -> checkpoint of copied tensors) to be written in order, then
        ``prune``: keep that many step-*.pt files in that directory, the newest.
        ``started``: when the training thread began preparing them, for ``blocked``."""
        with self._cond:
            self._raise()
            for path, ckpt in files.items():
                self._pending.pop(path, None)  # re-queued at the end: order is kept
                self._pending[path] = ckpt
            self._prune = prune or self._prune
            self._cond.notify()
        if started is not None:
            self.blocked += time.perf_counter() - started

    def close(self) -> None:
        """Write everything pending, stop the thread, and raise a writer error if any."""
        t = time.perf_counter()
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        self.blocked += time.perf_counter() - t
        with self._cond:
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._pending or self._prune or self._closed):
                    self._cond.wait()
                if self._pending:  # files first, so that pruning sees the newest step file
                    path = next(iter(self._pending))
                    job = partial(checkpoint.save, path, self._pending.pop(path))
                elif self._prune:
                    job, self._prune = partial(_prune_steps, *self._prune), None
                else:
                    return
            try:
                job()
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread
                with self._cond:
                    self._error = exc
                    self._pending.clear()
                    self._prune = None


def _prune_steps(run_dir: Path, keep: int) -> None:
    for old in sorted(run_dir.glob("step-*.pt"))[:-keep]:
        old.unlink(missing_ok=True)
