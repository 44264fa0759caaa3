"""Run directories: naming, locking, metrics files, and finding the latest checkpoint."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from charlm.checkpoint import atomic_write_text
from charlm.errors import CharlmError

RUNS_DIR = Path("runs")
CHECKPOINT_NAMES = ("last.pt", "best.pt")


def new_run_dir(stem: str, cell: str, root: Path = RUNS_DIR) -> Path:
    """Create ``root/<stem>-<cell>``, or ``-2``, ``-3``... rather than reuse an earlier run."""
    base = f"{stem}-{cell}"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CharlmError(f"cannot create run directory {root}: {exc.strerror}") from None
    for n in range(1, 100_000):
        path = root / (base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise CharlmError(f"cannot create run directory {path}: {exc.strerror}") from None
    raise CharlmError(f"too many runs named {base} under {root}")


def open_run_dir(path: Path, resuming: bool) -> Path:
    """Use an explicit run directory; refuse to start a new run over an existing one."""
    if path.exists() and not path.is_dir():
        raise CharlmError(f"--out {path} exists and is not a directory")
    if not resuming and any((path / name).exists() for name in CHECKPOINT_NAMES):
        raise CharlmError(
            f"{path} already holds a run; continue it with --resume {path}, "
            "or choose another --out"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CharlmError(f"cannot create run directory {path}: {exc.strerror}") from None
    return path


class RunLock:
    """An exclusive lock on a run directory, released when the process ends in any way."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CharlmError(f"run directory {run_dir} is not writable: {exc.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise CharlmError(
                f"another charlm train is already using {run_dir}; wait for it or use another --out"
            ) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        # Temporary files left by a process that was killed while writing.
        for stale in run_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)

    def release(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


class MetricsLog:
    """``metrics.jsonl``: one JSON object per log or eval step, appended and flushed."""

    def __init__(self, path: Path, keep_through_step: int | None = None):
        self.path = path
        if keep_through_step is not None and path.exists():
            # Lines written after the checkpoint we resume from describe steps that will be
            # trained again: drop them so the file reads as one uninterrupted run.
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= keep_through_step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file, skipping a torn last line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def latest_checkpoint(root: Path = RUNS_DIR) -> Path:
    """``best.pt`` (or ``last.pt``) of the most recently written run under ``root``."""
    found = [p for name in CHECKPOINT_NAMES for p in root.glob(f"*/{name}")]
    if not found:
        raise CharlmError(f"no checkpoint found under {root}/; pass --checkpoint PATH")
    newest_dir = max(found, key=lambda p: p.stat().st_mtime).parent
    best = newest_dir / "best.pt"
    return best if best.exists() else newest_dir / "last.pt"
