"""Run directories: naming, locking, metrics files, finding a run's checkpoint, and listing
runs.

Over 300 lines: everything that knows the layout of a run directory, in one place."""

from __future__ import annotations

import json
import math
import os
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

from charlm.errors import CharlmError, ConfigError, path_error, printable
from charlm.files import (
    atomic_write_text,
    is_charlm_temporary,
    open_no_follow,
    refuse_symlink,
    remove_quietly,
)
from charlm.units import bits

RUNS_DIR = Path("runs")
CHECKPOINT_NAMES = ("last.pt", "best.pt")
# Written first into every run directory charlm creates or takes over: what makes a directory
# a charlm run (runs of releases before it are recognized by their checkpoints or config.toml).
MARKER = ".charlm-run"
# The names charlm writes or reads in a run directory, never through a symbolic link.
OWN_NAMES = (MARKER, ".lock", "config.toml", "metrics.jsonl", *CHECKPOINT_NAMES)


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
    """Use an explicit run directory: a new or empty one, or a charlm run (refusing to start
    a new run over one that has checkpoints). A directory holding anything else is refused
    before anything is written there; the marker is written first."""
    check_out_dir(path, resuming)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CharlmError(f"cannot create run directory {path}: {exc.strerror}") from None
    _write_marker(path)
    return path


def check_out_dir(path: Path, resuming: bool) -> None:
    """What :func:`open_run_dir` checks, writing nothing: training calls it before its
    set-up (which may take seconds of sizing) so that a wrong --out is refused at once."""
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as exc:  # a name too long, a component that is not a directory, ...
        error = CharlmError(f"--out {printable(path)} cannot be used: {exc.strerror}")
        error.exit_code = getattr(path_error(exc, path), "exit_code", 1)  # a bad name: 2
        raise error from None
    if exists and not is_dir:
        raise CharlmError(f"--out {printable(path)} exists and is not a directory")
    if exists:
        check_owned(path)
    if not resuming and any((path / name).exists() for name in CHECKPOINT_NAMES):
        raise CharlmError(
            f"{path} already holds a run; continue it with --resume {shlex.quote(str(path))}, "
            "or choose another --out"
        )


def check_owned(path: Path) -> None:
    """Refuse (one line, naming what is there) a directory that is neither empty nor a charlm
    run: charlm never writes over or appends to files it did not write."""
    for name in OWN_NAMES:
        refuse_symlink(path / name)  # before a link's target could be read or written
    try:
        entries = sorted(os.listdir(path))
    except OSError as exc:
        raise CharlmError(
            f"--out {printable(path)} cannot be read ({exc.strerror}); choose a directory you "
            "can write, or a new one"
        ) from None
    if is_charlm_run(path, entries):
        return
    # Left by a charlm run killed before it wrote anything else: a lock, temporary files.
    foreign = [e for e in entries if e != ".lock" and not is_charlm_temporary(e)]
    if not foreign:
        return
    shown = ", ".join(printable(e) for e in foreign[:5])
    more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
    raise CharlmError(
        f"--out {printable(path)} is not a charlm run directory: it holds {shown}{more}, which "
        "charlm did not write; choose a new or empty directory (charlm never writes over "
        "files it does not own)"
    )


def is_charlm_run(path: Path, entries: list[str] | None = None) -> bool:
    """A run directory charlm wrote: its marker, or (releases before the marker) a
    checkpoint, or a config.toml exactly as charlm renders one."""
    names = set(os.listdir(path) if entries is None else entries)
    if MARKER in names and _regular(path / MARKER):
        try:
            fd = open_no_follow(path / MARKER, os.O_RDONLY)
            with os.fdopen(fd, "rb") as f:
                if f.read(64).startswith(b"charlm"):
                    return True
        except OSError:
            pass
    if any(name in names and _regular(path / name) for name in CHECKPOINT_NAMES):
        return True
    return "config.toml" in names and _regular(path / "config.toml") and \
        _rendered_by_charlm(path / "config.toml")


def _regular(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _rendered_by_charlm(path: Path) -> bool:
    """``config.toml`` as charlm writes it: comment lines (automatic sizing's), then every
    field of every section in charlm's own rendering. A user's config file sets some keys."""
    from charlm.config import Config, to_toml

    try:
        if path.stat().st_size > 1 << 16:
            return False
        fd = open_no_follow(path, os.O_RDONLY)
        with os.fdopen(fd, "rb") as f:
            text = f.read(1 << 16).decode("utf-8")
        lines = text.splitlines(keepends=True)
        while lines and lines[0].startswith("#"):
            lines.pop(0)
        body = "".join(lines)
        return to_toml(Config.from_dict(tomllib.loads(body))) == body
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, ConfigError, ValueError,
            RecursionError):
        return False


def _write_marker(path: Path) -> None:
    """The marker file, written before anything else charlm puts in a run directory."""
    from charlm._version import __version__

    if (path / MARKER).is_file():
        return
    try:
        fd = open_no_follow(path / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return
    except OSError as exc:
        raise CharlmError(f"run directory {path} is not writable: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(f"charlm run directory (charlm {__version__})\n")


def set_aside_stale(path: Path) -> Path | None:
    """A run that stopped before its first checkpoint (killed, out of memory, a NaN) left
    config.toml and metrics.jsonl (and TensorBoard events): move them into
    ``stale-<time>/`` so that the new run starts clean rather than appending to them.
    Returns that folder, or None when there was nothing to move."""
    if any((path / name).is_file() for name in CHECKPOINT_NAMES):
        return None
    stale = [path / "metrics.jsonl"] * (path / "metrics.jsonl").is_file()
    stale += sorted(p for p in path.glob("events.out.tfevents.*") if _regular(p))
    if not stale:
        return None
    if _regular(path / "config.toml"):
        stale.append(path / "config.toml")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for n in range(1, 1000):
        dest = path / (f"stale-{stamp}" if n == 1 else f"stale-{stamp}-{n}")
        try:
            dest.mkdir()
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise CharlmError(f"cannot set aside the stale files in {path}: {exc.strerror}") from None
    try:
        for p in stale:
            os.replace(p, dest / p.name)
    except OSError as exc:
        raise CharlmError(f"cannot set aside the stale files in {path}: {exc.strerror}") from None
    return dest


def check_resume_out(checkpoint_path: Path, out_dir: Path) -> None:
    """``--resume A --out B``: B must be A's own directory, or hold no run, since resuming
    replaces its checkpoints, config and metrics."""
    home = checkpoint_path.resolve().parent
    if out_dir.is_dir() and out_dir.resolve() != home:
        check_owned(out_dir)  # a directory of the user's own files: named as such
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
        # Temporary files left by a charlm process killed while writing (only charlm's own
        # names, and only when their process is gone: an export may be writing here).
        try:
            entries = os.listdir(run_dir)
        except OSError:
            entries = []
        for name in entries:
            if is_charlm_temporary(name, dead_only=True):
                remove_quietly(run_dir / name)

    def release(self) -> None:
        self.lock.release()


@contextmanager
def run_directory(out_dir: Path | None, resuming: bool, stem: str, cell: str, config_text: str,
                  create: bool = True, notes: list[str] | None = None) -> Iterator[Path]:
    """The run directory of a training run: ``out_dir``, or a new ``runs/<stem>-<cell>``.
    Checks it is new, empty or a charlm run, writes the marker, locks it, sets aside the
    files of a run that stopped before its first checkpoint (a note in ``notes``) and writes
    ``config.toml``; the lock is released on the way out, whatever happens. ``create`` is
    False for the other processes of a distributed run, which only get the path (rank 0
    owns the directory)."""
    if not create:
        yield Path(out_dir or ".")
        return
    if out_dir is not None:
        path = open_run_dir(Path(out_dir), resuming)
    else:
        path = new_run_dir(stem, cell)
        _write_marker(path)
    lock = RunLock(path)
    try:
        moved = set_aside_stale(path)
        if moved is not None and notes is not None:
            notes.append(f"{path} held a run that stopped before its first checkpoint; its "
                         f"metrics and config were moved to {moved}")
        atomic_write_text(path / "config.toml", config_text)
        yield path
    finally:
        lock.release()


class MetricsLog:
    """``metrics.jsonl``: one JSON object per log or eval step, appended and flushed."""

    def __init__(self, path: Path, keep_through_step: int | None = None):
        self.path = path
        self.warnings: list[str] = []  # bad lines dropped when resuming, said once
        refuse_symlink(path)  # before its lines are read and rewritten
        if keep_through_step is not None and path.exists():
            # Lines written after the checkpoint we resume from describe steps that will be
            # trained again: drop them so the file reads as one uninterrupted run.
            kept = [r for r in read_metrics(path, self.warnings)
                    if r.get("step", 0) <= keep_through_step]
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


# What a record charlm writes can hold: counts are whole numbers below 2**63, seconds and
# epochs finite and not negative, losses (float32, so below 1e39) not negative or not finite
# (a diverged step).
_COUNT_KEYS = ("step", "chars")
_FINITE_KEYS = ("elapsed", "epoch", "save_seconds")
_LOSS_KEYS = ("loss", "bpc", "val_loss", "val_bpc", "lr", "grad_norm")
_MOST_SECONDS = 1e12
_MOST_LOSS = 1e39


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def metrics_problem(line: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """One line of a metrics file as its record, or (None, what is wrong with it)."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except RecursionError:
        return None, "nested too deeply"
    except ValueError:  # JSONDecodeError, or an integer of too many digits
        return None, "not valid JSON"
    if not isinstance(record, dict):
        kinds = {list: "an array", str: "a string", bool: "true or false", type(None): "null"}
        return None, f"{kinds.get(type(record), 'a number')}, not a JSON object"
    if "kind" in record and not isinstance(record["kind"], str):
        return None, "kind is not a string"
    for key in _COUNT_KEYS:
        value = record.get(key)
        if key in record and not (_is_number(value) and math.isfinite(value)
                                      and 0 <= value < 2**63 and value == int(value)):
            return None, f"{key} is not a count ({printable(repr(value)[:40])})"
    for key in _FINITE_KEYS:
        value = record.get(key)
        if key in record and not (_is_number(value) and 0 <= value <= _MOST_SECONDS):
            return None, f"{key} is out of range ({printable(repr(value)[:40])})"
    for key in _LOSS_KEYS:
        value = record.get(key)
        if key not in record:
            continue
        if not _is_number(value) or (math.isfinite(value) and not 0 <= value <= _MOST_LOSS) \
                or value == -math.inf:
            return None, f"{key} is out of range ({printable(repr(value)[:40])})"
    return record, None


# The longest metrics line read (a record is a few hundred bytes): a longer one is skipped
# as a bad line, without ever being held whole.
MAX_METRICS_LINE = 1 << 20
TOO_LONG = f"longer than {MAX_METRICS_LINE >> 20} MiB"


def _bounded_lines(f) -> Iterator[bytes | None]:
    """The lines of the binary file ``f``, each read with at most ``MAX_METRICS_LINE + 1``
    bytes; a longer line is read past in pieces and yielded as None."""
    while line := f.readline(MAX_METRICS_LINE + 1):
        if len(line) <= MAX_METRICS_LINE or line.endswith(b"\n"):
            yield line
            continue
        while (rest := f.readline(MAX_METRICS_LINE)) and not rest.endswith(b"\n"):
            pass
        yield None


def read_metrics(path: Path, warnings: list[str] | None = None) -> list[dict[str, Any]]:
    """The records of a metrics file. A line that is not one of charlm's records (not
    JSON, nested too deeply, not UTF-8, not an object, a count or a time that is not a
    number in range) is skipped, and one line saying so, for the whole file, is added to
    ``warnings``; a torn last line (one being written) is skipped without a warning."""
    records = []
    bad, first = 0, ""
    with open(path, "rb") as f:
        for number, line in enumerate(_bounded_lines(f), 1):
            record, problem = (None, TOO_LONG) if line is None else metrics_problem(line)
            if record is not None:
                records.append(record)
            elif line is None or (line.strip()
                                  and (line.endswith(b"\n") or problem != "not valid JSON")):
                bad += 1  # (a last line without its newline is being written, or torn)
                first = first or f"line {number}: {problem}"
    if bad and warnings is not None:
        lines = "line" if bad == 1 else "lines"
        warnings.append(f"skipped {bad} bad {lines} of {printable(path)} ({first})")
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
        from charlm.config import MAX_CONFIG_BYTES

        with open(run_dir / "config.toml", "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)  # bounded, as --config reads one
        if len(raw) > MAX_CONFIG_BYTES:
            raise ValueError("config.toml is too large to be charlm's")
        config = tomllib.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):  # TOMLDecodeError too
        config = ckpt.get("config", {}) if ckpt else {}
    model = config.get("model", {}) if isinstance(config, dict) else {}
    return model if isinstance(model, dict) else {}


def _number(value: Any, kind: type) -> Any:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return kind(value) if ok and math.isfinite(value) else None


def run_info(run_dir: Path, warnings: list[str] | None = None) -> RunInfo:
    """Summarize one run from its metrics.jsonl and config.toml; the checkpoint's training
    state fills in what they lack (a run whose metrics file was deleted, say). Bad lines of
    its metrics file are skipped, said in ``warnings``."""
    metrics_path = run_dir / "metrics.jsonl"
    try:
        records = read_metrics(metrics_path, warnings) if metrics_path.is_file() else []
    except OSError as exc:
        records = []
        if warnings is not None:
            warnings.append(f"cannot read {printable(metrics_path)}: {exc.strerror or exc}")
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


def list_runs(root: str | Path = RUNS_DIR, text: str | None = None,
              warnings: list[str] | None = None) -> list[RunInfo]:
    """Every run directory directly under ``root`` (or ``root`` itself when it is one),
    grouped by training text (``text``: only the runs on the text of that name), best
    validation loss first in each group; runs never evaluated come last, newest first.
    A run that cannot be read (permission denied, ...) is left out and bad lines of a
    metrics file skipped, each said in one line added to ``warnings``."""
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
    runs = []
    for path in candidates:
        try:
            if is_run_dir(path):
                runs.append(run_info(path, warnings))
        except OSError as exc:  # an unsearchable directory, a file that cannot be read
            if warnings is not None:
                warnings.append(f"skipped {printable(path)}: {exc.strerror or exc}")
    if text is not None:
        runs = [r for r in runs if r.text == text]
    runs.sort(key=lambda r: (r.text is None, r.text or "", r.best_val_loss is None,
                             r.best_val_loss or 0.0, -r.modified))
    return runs
