"""Checkpoint files written off the training thread.

A checkpoint of ``configs/gpu.toml`` is about 280 MB with its optimizer state: written and
fsynced at every evaluation on the training thread, saving took 10-30% of a 3-minute GPU
run. Here the training thread only copies the tensors (from the GPU, or out of the live CPU
parameters) and hands the copy to one writer thread, which writes each file atomically
(temporary file, fsync, rename) in the order given. A newer copy of a file that is still
waiting replaces the older one, so a slow disk never makes training wait; :meth:`close`
waits for everything pending. An error on the writer thread (a full disk) is raised on the
training thread at the next call, with the previous files left intact.

What is written when is the checkpoint policy: :class:`SavePolicy` keeps its bookkeeping and
takes its decisions (no model needed), and :class:`Saver` carries them out for the loop.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from charlm.storage import checkpoint
from charlm.training.state import TrainState, snapshot

if TYPE_CHECKING:
    from charlm.training.step import Setup

CHEAP_SAVE = 0.02  # seconds: a checkpoint that copies faster is written at every evaluation


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


def step_name(step: int) -> str:
    return f"step-{step:08d}.pt"


def stale_steps(paths: Iterable[Path], keep: int) -> list[Path]:
    """Of the step-NNNNNNNN.pt files ``paths``, those to delete to keep the newest ``keep``
    (none when ``keep`` is 0: pruning is then off)."""
    return sorted(paths)[:-keep] if keep else []


def _prune_steps(run_dir: Path, keep: int) -> None:
    for old in stale_steps(run_dir.glob("step-*.pt"), keep):
        old.unlink(missing_ok=True)


@dataclass(frozen=True)
class SavePlan:
    """The files one save writes, decided by :meth:`SavePolicy.plan`."""

    step: int
    best: bool  # best.pt: the weights and training state, without the optimizer state
    full: bool  # last.pt: all of it, for resuming
    keep: int  # with last.pt, a step-NNNNNNNN.pt, keeping the newest ``keep`` (0: none)

    def names(self) -> list[str]:
        """The file names, in the order they are written."""
        names = ["best.pt"] if self.best else []
        if self.full:
            names += ["last.pt", step_name(self.step)] if self.keep else ["last.pt"]
        return names


class SavePolicy:
    """The checkpoint policy's bookkeeping and decisions, apart from any model or file.

    After an evaluation: best.pt when the validation loss improved; last.pt when due
    (:meth:`full_due`), and always at the end of training (:meth:`finish`); a step file with
    last.pt, keeping the newest ``keep_last``. At a pause or an interrupt between evaluations:
    last.pt. ``saved_step``: the step last.pt holds (a resumed run's own step; -1 for none).
    """

    def __init__(self, keep_last: int, saved_step: int = -1):
        self.keep_last = keep_last
        self.saved_step = saved_step
        self.evaluated_step = -1  # the step of the last evaluation
        # last.pt (with the optimizer state) is written at an evaluation when copying it last
        # cost under CHEAP_SAVE or under 1% of the time since then: at every evaluation for
        # the models a CPU trains, every few for a GPU's (copying configs/gpu.toml's optimizer
        # state takes tens of milliseconds).
        self.full_at, self.full_cost = -math.inf, 0.0
        self.finishing = False  # the end of training: last.pt whatever it costs

    def full_due(self, now: float, evaluated: bool) -> bool:
        """Whether last.pt is due at ``now`` (seconds of the run)."""
        return (self.finishing or not evaluated
                or self.full_cost <= max(0.01 * (now - self.full_at), CHEAP_SAVE))

    def plan(self, step: int, evaluated: bool, improved: bool, full: bool) -> SavePlan | None:
        """What to write at ``step`` (``full``: last.pt, as :meth:`full_due` said, agreed
        between the processes); None for nothing."""
        if evaluated:
            self.evaluated_step = step
        if not (full or improved):
            return None
        if full:
            self.saved_step = step
        return SavePlan(step, improved, full, self.keep_last if evaluated else 0)

    def copied(self, now: float, seconds: float) -> None:
        """last.pt was copied at ``now``, in ``seconds``: what :meth:`full_due` weighs."""
        self.full_at, self.full_cost = now, seconds

    def finish(self) -> None:
        self.finishing = True

    def saved(self, step: int) -> bool:
        """Whether last.pt holds ``step``."""
        return self.saved_step == step

    def evaluated(self, step: int) -> bool:
        return self.evaluated_step == step


class Saver:
    """A run's checkpoints: the policy (:class:`SavePolicy`) carried out. Every process takes
    part in the snapshot; rank 0 (``main``) copies it and hands it to the writer thread, which
    writes each file atomically, so the training thread pays only for the copy."""

    def __init__(self, run_dir: Path, keep_last: int, main: bool, saved_step: int = -1):
        self.run_dir = run_dir
        self.policy = SavePolicy(keep_last, saved_step)
        self.writer = CheckpointWriter() if main else None

    def save(self, run: Setup, state: TrainState, now: float, evaluated: bool,
             improved: bool = False) -> list[str]:
        """Write what the policy says at ``now`` (seconds of the run); returns the names of
        the files queued (on rank 0)."""
        started = time.perf_counter()
        dist, policy = run.dist, self.policy
        full = bool(dist.agree(float(policy.full_due(now, evaluated))))  # rank 0 measured
        plan = policy.plan(state.step, evaluated, improved, full)
        if plan is None:
            return []
        train_state = snapshot(state, run.batcher, run.model, dist, now)
        if run.scaler.is_enabled():  # fp16: resume at the same loss scale
            train_state["scaler"] = run.scaler.state_dict()
        if self.writer is None:
            return []
        ckpt = detached_copy(checkpoint.make_checkpoint(
            run.model, run.cfg, run.vocab,
            **({"optimizer": run.optimizer.state_dict()} if full else {}),
            train_file=run.source_info, vocab_growth=run.vocab_growth, train_state=train_state,
        ), clone_cpu=run.device.type == "cpu")
        names = plan.names()
        files = {self.run_dir / name: ({k: v for k, v in ckpt.items() if k != "optimizer"}
                                       if name == "best.pt" else ckpt) for name in names}
        self.writer.submit(files, prune=(self.run_dir, plan.keep) if plan.keep else None,
                           started=started)
        if full:
            policy.copied(now, time.perf_counter() - started)
        return names

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Wait for the writer thread to finish the files it holds, also when training fails
        (they are good checkpoints); a writer error is raised unless another is on its way."""
        try:
            yield
        except BaseException:
            if self.writer is not None:
                with suppress(BaseException):
                    self.writer.close()
            raise
        if self.writer is not None:
            self.writer.close()

    @property
    def blocked(self) -> float:
        """Seconds the training thread spent on checkpoints (copies and waits)."""
        return self.writer.blocked if self.writer is not None else 0.0
