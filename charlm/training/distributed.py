"""Process-group plumbing for training under ``torchrun`` (DistributedDataParallel).

Over 300 lines: one concept, the process group and its error protocol, which reads best whole.

A plain :class:`Dist` is the single-process case: rank 0 of a world of 1, every collective
the identity. :func:`from_env` returns a :class:`DDPDist` when torchrun's variables
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) say this process is one of several: NCCL for
CUDA tensors (one GPU per local rank) and gloo for CPU tensors, as torch's own default.

Errors are reported once, and no process is left waiting:

* Setup (config, checkpoint, data, model) runs on every rank before the first collective,
  which therefore also gathers each rank's setup error, if any. Each distinct error is
  printed by the lowest rank that hit it; the others exit non-zero quietly
  (:class:`AlreadyReported`). So "too many processes for this text" is one line, not N.
* After that, the training loop only stops on conditions all ranks decide together (a
  non-finite loss, a limit, a signal), so rank 0 reports those errors for everybody.
* A rank that dies closes its connections: with gloo the others fail in their next
  collective at once. A rank that stalls (or dies, with NCCL) makes them fail after
  ``timeout`` seconds (gloo raises; NCCL's watchdog ends the process). On one machine
  torchrun itself also stops every worker as soon as one fails. Nobody hangs.
"""

from __future__ import annotations

import gc
import hashlib
import math
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from charlm.device import resolve_device
from charlm.errors import CharlmError, ConfigError, first_line, internal_error

# Seconds a collective may wait for a stalled process before every other one gives up.
# Rank 0 writes checkpoints and samples while the others wait, so keep it well above that.
DEFAULT_TIMEOUT = 300.0
MAX_TIMEOUT = 7 * 86400.0

# How gloo, NCCL and the c10d store word a lost or stalled peer.
_LOST = re.compile(
    r"gloo|nccl|c10d|Connection (reset|closed|refused)|Timed out|timeout|pair closure|"
    r"Broken pipe|DistBackendError|ProcessGroup",
    re.IGNORECASE,
)


class DistributedError(CharlmError):
    """Another training process died or stalled, or the launch cannot work."""


class AlreadyReported(CharlmError):
    """An error that another process of the same run prints; this one exits quietly."""

    quiet = True

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class Dist:
    """One process: rank 0 of a world of 1. Every collective is the identity."""

    rank = 0
    world = 1
    local_rank = 0
    local_world = 1
    device: torch.device | None = None
    # mean_loss skips the all-reduce when this is None.
    all_reduce_sum = None

    def pick_device(self, name: str, cell: str | None = None) -> torch.device:
        self.device = resolve_device(name, cell)
        return self.device

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def broadcast_path(self, path: Path) -> Path:
        return path

    def gather_objects(self, obj: Any) -> list[Any]:
        return [obj]

    def any(self, flag: bool) -> bool:
        return flag

    def all_finite(self, loss: torch.Tensor) -> bool:
        return bool(torch.isfinite(loss))

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def agree(self, value: float) -> float:
        """Rank 0's ``value`` on every rank (for decisions taken from clocks)."""
        return value

    def replica_digests(self, model: torch.nn.Module) -> list[str]:
        """Each rank's digest of the model's weights; empty for a single process."""
        return []

    def close(self) -> None:
        pass

    def __enter__(self) -> Dist:
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        self.close()
        return False


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every weight's name and bytes: equal digests mean bit-identical models."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _describe(exc: BaseException) -> tuple[str, int]:
    """(one-line message, exit code) of an error, as the CLI would print it."""
    if isinstance(exc, CharlmError):
        return str(exc), exc.exit_code
    return internal_error(exc), 1


class DDPDist(Dist):
    """One of ``world`` processes started by torchrun; ``timeout`` bounds every wait."""

    def __init__(self, rank: int, world: int, local_rank: int, local_world: int,
                 timeout: float = DEFAULT_TIMEOUT):
        self.rank, self.world = rank, world
        self.local_rank, self.local_world = local_rank, local_world
        self.timeout = timeout
        self._synced = False  # has every rank finished its setup?
        self._closed = False
        # CPU tensors (objects, flags, and everything on a CPU run) go through gloo; CUDA
        # tensors through NCCL, whose communicators start lazily at the first CUDA collective.
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        try:
            torch.distributed.init_process_group(
                backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout)
            )
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(
                f"process {rank} could not join the other {world - 1} training process(es): "
                f"{first_line(exc)}"
            ) from None

    # ----------------------------------------------------------------- device and model
    def pick_device(self, name: str, cell: str | None = None) -> torch.device:
        """``auto``/``cuda``: this process's GPU, ``cuda:LOCAL_RANK``; ``cpu``: the CPU;
        ``auto`` without CUDA: see :func:`charlm.device.resolve_device`."""
        if name == "auto" and torch.cuda.is_available():
            name = "cuda"
        device = resolve_device(name, cell)
        if device.type == "cuda":
            if device.index not in (None, self.local_rank):
                raise ConfigError(
                    f"under torchrun each process uses the GPU of its local rank; use --device "
                    f"cuda (or auto) instead of {name!r}"
                )
            count = torch.cuda.device_count()
            if self.local_rank >= count:
                raise ConfigError(
                    f"torchrun started {self.local_world} processes on this machine but it has "
                    f"{count} GPU(s); use --nproc_per_node={count} (or --device cpu)"
                )
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        return device

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel over ``model``: it starts every rank from rank 0's
        weights and averages gradients during backward. Checkpoints keep saving ``model``."""
        from torch.nn.parallel import DistributedDataParallel

        self._sync()
        ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    # ------------------------------------------------------------------- collectives
    def _gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def _sync(self) -> None:
        """The first collective: every rank says whether its setup failed."""
        if self._synced:
            return
        reports = self._gather(None)
        self._synced = True
        for report in reports:
            if report is not None:
                raise AlreadyReported(*report)

    def broadcast_path(self, path: Path) -> Path:
        self._sync()
        box = [str(path)]
        torch.distributed.broadcast_object_list(box, src=0)
        return Path(box[0])

    def gather_objects(self, obj: Any) -> list[Any]:
        self._sync()
        return self._gather(obj)

    def any(self, flag: bool) -> bool:
        self._sync()
        t = torch.tensor([int(flag)], dtype=torch.int32)  # CPU: gloo, no GPU sync
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def all_finite(self, loss: torch.Tensor) -> bool:
        self._sync()
        ok = torch.isfinite(loss.detach()).to(torch.int32).reshape(1)
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
        return bool(ok.item())

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        self._sync()
        total = value.detach().float().clone()
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
        return total / self.world

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over all ranks, in place (used for the validation loss)."""
        self._sync()
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)

    def agree(self, value: float) -> float:
        self._sync()
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.broadcast(t, src=0)
        return float(t.item())

    def replica_digests(self, model: torch.nn.Module) -> list[str]:
        """Every rank's weights digest; raises on all ranks if any copy differs."""
        digests = self.gather_objects(weights_digest(model))
        if len(set(digests)) > 1:
            odd = [r for r, d in enumerate(digests) if d != digests[0]]
            raise DistributedError(
                f"the model's copies differ between processes (ranks {odd} differ from rank 0); "
                "this is a bug in distributed training, please report it"
            )
        return digests

    # ------------------------------------------------------------------------- ending
    def close(self) -> None:
        """Leave together: wait until every rank is done (rank 0 writes the last files
        meanwhile), drop lingering references to the group (a DDP wrapper), then destroy
        it while the interpreter is fully alive; a group left to interpreter shutdown can
        abort the process."""
        if self._closed or not torch.distributed.is_initialized():
            return
        self._closed = True
        self.any(False)  # a barrier on the CPU group
        gc.collect()
        torch.distributed.destroy_process_group()

    def _lost_contact(self, exc: BaseException) -> bool:
        return isinstance(exc, RuntimeError) and bool(_LOST.search(str(exc)))

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None:
            self.close()
            return False
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: just go
            return False
        if isinstance(exc, AlreadyReported):
            return False
        if not self._synced and not self._lost_contact(exc):
            self._agree_on_setup_error(exc)
        prefix = "" if self.rank == 0 else f"process {self.rank}: "
        if self._lost_contact(exc):
            detail = re.sub(r"^\[[^\]]*\]\s*", "", first_line(exc))[:120]  # no C++ file:line
            raise DistributedError(
                f"{prefix}lost contact with the other training processes: one of them died, or "
                f"stalled for more than {self.timeout:g} s (--dist-timeout); see its own output "
                f"({detail}). The last saved checkpoint is intact"
            ) from None
        if isinstance(exc, CharlmError) and self.rank != 0:
            # Raised after setup, so decided by all ranks together: rank 0 reports it.
            raise AlreadyReported(str(exc), exc.exit_code) from None
        return False

    def _agree_on_setup_error(self, exc: Exception) -> None:
        """Take part in the first collective with this rank's error, then raise what this
        rank should show: its own error if no lower rank had the same one, else nothing."""
        message, code = _describe(exc)
        try:
            reports = self._gather((message, code))
        except RuntimeError:
            reports = [None] * self.world  # the others are gone: report our own error
        self._synced = True
        for report in reports[: self.rank]:
            if report is not None and report[0] == message:
                raise AlreadyReported(message, code) from None
        if self.rank and isinstance(exc, CharlmError):
            error = CharlmError(f"process {self.rank}: {message}")
            error.exit_code = code
            raise error from None
        raise exc


def from_env(timeout: float | None = None) -> Dist:
    """A :class:`DDPDist` when launched by torchrun with several processes, else a
    plain :class:`Dist`. ``timeout`` (seconds) bounds every wait for another process."""
    if timeout is not None and not (math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT):
        message = f"--dist-timeout must be in (0, {MAX_TIMEOUT:g}] seconds; got {timeout:g}"
        if os.environ.get("RANK", "0").strip() not in ("", "0"):
            raise AlreadyReported(message, ConfigError.exit_code)  # rank 0 prints it, once
        raise ConfigError(message)
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    if not all(name in os.environ for name in names):
        return Dist()
    try:
        rank, world, local_rank = (int(os.environ[name]) for name in names)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        raise DistributedError(
            "RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)"
        ) from None
    if world <= 1:
        return Dist()
    return DDPDist(rank, world, local_rank, local_world, timeout or DEFAULT_TIMEOUT)


def restack_rows(per_rank: list[list[torch.Tensor]], rank: int, rows: int) -> list[torch.Tensor]:
    """Rank ``rank``'s share of carried states saved by another number of processes.

    Inputs: ``per_rank[r]`` is rank r's state tensors, each (L, B_old, H), rank r holding
    streams ``r * B_old ...``; ``rows`` is the new per-process batch size B.
    Returns: the state tensors (L, B, H) of streams ``rank * B ... (rank + 1) * B``.
    """
    whole = [torch.cat(parts, dim=1) for parts in zip(*per_rank, strict=True)]  # (L, S, H)
    return [t[:, rank * rows : (rank + 1) * rows].contiguous() for t in whole]
