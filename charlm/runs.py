"""Run directories: naming, locking, metrics files, finding a run's checkpoint, and listing
runs.

Over 300 lines: everything that knows the layout of a run directory, in one place."""

from __future__ import annotations

import json
import math
import pickle
import shlex
import tomllib
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from charlm.atomic import atomic_write_text
from charlm.errors import CharlmError
from charlm.files import open_no_follow, refuse_symlink
from charlm.units import bits

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
            f"{path} already holds a run; continue it with --resume {shlex.quote(str(path))}, "
            "or choose another --out"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CharlmError(f"cannot create run directory {path}: {exc.strerror}") from None
    return path


def check_resume_out(checkpoint_path: Path, out_dir: Path) -> None:
    """``--resume A --out B``: B must be A's own directory, or hold no run, since resuming
    replaces its checkpoints, config and metrics."""
    home = checkpoint_path.resolve().parent
    if out_dir.resolve() == home or not is_run_dir(out_dir):
        return
    raise CharlmError(
        f"--out {out_dir} holds another run, which resuming {checkpoint_path} would overwrite; "
        f"to continue it elsewhere pass a new or empty directory, as in --out "
        f"{shlex.quote(str(out_dir.parent / (home.name + '-continued')))}, or leave out --out "
        f"to continue in {home}"
    )


class RunLock:
    """An exclusive lock on a run directory, released when the process ends in any way.

    filelock takes the operating system's lock (flock on POSIX, LockFileEx on Windows), so this
    module imports nothing POSIX-only and a killed process never leaves the run locked."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.lock = FileLock(self.path, timeout=0)
        try:
            refuse_symlink(self.path)  # filelock would open (and truncate) its target
            self.lock.acquire()
        except Timeout:
            raise CharlmError(
                f"another charlm train is already using {run_dir}; wait for it or use another --out"
            ) from None
        except OSError as exc:
            raise CharlmError(f"run directory {run_dir} is not writable: {exc.strerror}") from None
        # Temporary files left by a process that was killed while writing.
        for stale in run_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)

    def release(self) -> None:
        self.lock.release()


@contextmanager
def run_directory(out_dir: Path | None, resuming: bool, stem: str, cell: str, config_text: str,
                  create: bool = True) -> Iterator[Path]:
    """The run directory of a training run: ``out_dir``, or a new ``runs/<stem>-<cell>``.
    Creates it, locks it and writes ``config.toml``; the lock is released on the way out,
    whatever happens. ``create`` is False for the other processes of a distributed run,
    which only get the path (rank 0 owns the directory)."""
    if not create:
        yield Path(out_dir or ".")
        return
    path = open_run_dir(Path(out_dir), resuming) if out_dir is not None else new_run_dir(stem, cell)
    lock = RunLock(path)
    try:
        atomic_write_text(path / "config.toml", config_text)
        yield path
    finally:
        lock.release()


class MetricsLog:
    """``metrics.jsonl``: one JSON object per log or eval step, appended and flushed."""

    def __init__(self, path: Path, keep_through_step: int | None = None):
        self.path = path
        refuse_symlink(path)  # before its lines are read and rewritten
        if keep_through_step is not None and path.exists():
            # Lines written after the checkpoint we resume from describe steps that will be
            # trained again: drop them so the file reads as one uninterrupted run.
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= keep_through_step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        try:
            self.file = open(path, "a", encoding="utf-8",
                             opener=lambda name, flags: open_no_follow(Path(name), flags))
        except OSError as exc:
            raise CharlmError(f"cannot write {path}: {exc.strerror or exc}") from None

    def write(self, record: dict[str, Any]) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as exc:
            raise CharlmError(
                f"could not write {self.path}: {exc.strerror or exc}; the checkpoints saved "
                "so far are intact"
            ) from None

    def close(self) -> None:
        self.file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file, skipping a torn last line."""
    records = []
    # Undecodable bytes become U+FFFD, so a damaged line fails to parse and is skipped.
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def latest_checkpoint(root: Path = RUNS_DIR) -> Path:
    """``best.pt`` (or ``last.pt``) of the most recently written run under ``root``."""
    found = [p for name in CHECKPOINT_NAMES for p in root.glob(f"*/{name}")]
    if not found:
        raise CharlmError(f"no checkpoint found under {root}/; pass --checkpoint PATH")
    return checkpoint_in(max(found, key=lambda p: p.stat().st_mtime).parent)


def checkpoint_in(path: Path) -> Path:
    """The checkpoint that ``path`` names: itself, or for a run directory its ``best.pt``
    (``last.pt`` when it has none yet)."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in ("best.pt", "last.pt"):
        if (path / name).is_file():
            return path / name
    raise CharlmError(f"{path} is a directory with no checkpoint (best.pt or last.pt)")


# ------------------------------------------------------------------------------ run listing
RUN_FILES = ("metrics.jsonl", "config.toml", *CHECKPOINT_NAMES)


@dataclass
class RunInfo:
    """What ``charlm runs`` shows about one run directory (plain values; None when unknown)."""

    name: str
    path: Path
    cell: str | None
    embed_size: int | None
    hidden_size: int | None
    num_layers: int | None
    steps: int
    chars_seen: int
    elapsed: float  # seconds of training, over all resumes
    best_val_loss: float | None  # nats per character
    modified: float  # POSIX time the run last wrote a file
    text: str | None = None  # the name of the text it trains on (runs on different texts
    # do not compare: their bits/char measure different things)

    @property
    def best_val_bpc(self) -> float | None:
        return None if self.best_val_loss is None else bits(self.best_val_loss)

    @property
    def chars_per_sec(self) -> float | None:
        return self.chars_seen / self.elapsed if self.elapsed > 0 else None

    def to_dict(self) -> dict[str, Any]:
        """One run of ``charlm runs --json`` (``modified``: ISO 8601, UTC)."""
        record = asdict(self)
        record.update(
            path=str(self.path), best_val_bpc=self.best_val_bpc, chars_per_sec=self.chars_per_sec,
            modified=datetime.fromtimestamp(self.modified, UTC).isoformat(timespec="seconds"),
        )
        return record


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in RUN_FILES)


def _quiet_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """last.pt (else best.pt) memory-mapped, so only the small values are read from disk;
    None when neither can be read (a listing shows what it can rather than fail)."""
    import torch  # only here: listing runs and plotting curves do not need it

    for name in CHECKPOINT_NAMES:
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError,
                KeyError, zipfile.BadZipFile):
            continue
        if isinstance(ckpt, dict):
            return ckpt
    return None


def _model_config(run_dir: Path, ckpt: dict[str, Any] | None) -> dict[str, Any]:
    try:
        config = tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        config = ckpt.get("config", {}) if ckpt else {}
    model = config.get("model", {}) if isinstance(config, dict) else {}
    return model if isinstance(model, dict) else {}


def _number(value: Any, kind: type) -> Any:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return kind(value) if ok and math.isfinite(value) else None


def run_info(run_dir: Path) -> RunInfo:
    """Summarize one run from its metrics.jsonl and config.toml; the checkpoint's training
    state fills in what they lack (a run whose metrics file was deleted, say)."""
    metrics_path = run_dir / "metrics.jsonl"
    try:
        records = read_metrics(metrics_path) if metrics_path.is_file() else []
    except OSError:
        records = []
    steps = max((_number(r.get("step"), int) or 0 for r in records), default=0)
    chars = max((_number(r.get("chars"), int) or 0 for r in records), default=0)
    elapsed = max((_number(r.get("elapsed"), float) or 0.0 for r in records), default=0.0)
    vals = [_number(r.get("val_loss"), float) for r in records if r.get("kind") == "eval"]
    vals = [v for v in vals if v is not None]
    best = min(vals, default=None)

    ckpt = _quiet_checkpoint(run_dir)  # memory-mapped: only its small values are read
    ts = ckpt.get("train_state", {}) if ckpt else {}
    source = ckpt.get("train_file") if ckpt else None
    text = source.get("name") if isinstance(source, dict) else None
    if not records and isinstance(ts, dict):
        steps = _number(ts.get("step"), int) or 0
        chars = _number(ts.get("chars_seen"), int) or 0
        elapsed = _number(ts.get("elapsed"), float) or 0.0
        best = _number(ts.get("best_val_loss"), float)
    model = _model_config(run_dir, ckpt)

    def model_value(key: str, kind: type) -> Any:
        value = model.get(key)
        return value if isinstance(value, kind) and not isinstance(value, bool) else None

    mtimes = [(run_dir / name).stat().st_mtime for name in RUN_FILES if (run_dir / name).is_file()]
    return RunInfo(
        name=run_dir.name, path=run_dir, cell=model_value("cell", str),
        embed_size=model_value("embed_size", int), hidden_size=model_value("hidden_size", int),
        num_layers=model_value("num_layers", int), steps=steps, chars_seen=chars, elapsed=elapsed,
        best_val_loss=best, modified=max(mtimes, default=run_dir.stat().st_mtime),
        text=text if isinstance(text, str) else None,
    )


def list_runs(root: str | Path = RUNS_DIR, text: str | None = None) -> list[RunInfo]:
    """Every run directory directly under ``root`` (or ``root`` itself when it is one),
    grouped by training text (``text``: only the runs on the text of that name), best
    validation loss first in each group; runs never evaluated come last, newest first."""
    root = Path(root)
    if not root.exists():
        raise CharlmError(f"runs directory not found: {root}")
    if not root.is_dir():
        raise CharlmError(f"{root} is not a directory")
    if is_run_dir(root):
        candidates = [root]
    else:
        try:
            candidates = sorted(root.iterdir())
        except OSError as exc:
            raise CharlmError(f"cannot read {root}: {exc.strerror}") from None
    runs = [run_info(path) for path in candidates if is_run_dir(path)]
    if text is not None:
        runs = [r for r in runs if r.text == text]
    runs.sort(key=lambda r: (r.text is None, r.text or "", r.best_val_loss is None,
                             r.best_val_loss or 0.0, -r.modified))
    return runs
