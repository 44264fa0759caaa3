"""Ids on disk, the train/validation split, and the stateful batcher of (x, y) windows.

Over 300 lines: one pipeline stage, from a text's ids on disk to the windows of a batch.

The encoded ids of a text are cached as a raw file keyed by the text's SHA-256 and the
vocabulary, and memory-mapped, so a second run skips encoding and a large corpus is never
held in memory more than once.

Batching follows char-rnn / torch-rnn / pytorch's word_language_model: the training ids are
cut into ``S`` contiguous streams and every batch is the next window of ``T`` characters of
each stream, so the hidden state can be carried from one batch to the next (truncated BPTT).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from charlm.data.text import Source, changed, check_start, read_text, resolve_source, text_paths
from charlm.data.vocab import MAX_CODE_POINT, UNKNOWN, Vocab, code_points, id_dtype
from charlm.errors import CharlmError, DataError
from charlm.files import atomic_write_text, open_fresh, remove_quietly, temporary_name


def cache_dir() -> Path:
    """``CHARLM_CACHE_DIR``, else the platform's cache folder: ``$XDG_CACHE_HOME/charlm`` or
    ``~/.cache/charlm`` on Linux, ``~/Library/Caches/charlm`` on macOS,
    ``%LOCALAPPDATA%\\charlm\\Cache`` on Windows."""
    if os.environ.get("CHARLM_CACHE_DIR"):
        return Path(os.environ["CHARLM_CACHE_DIR"])
    try:
        import platformdirs  # only where a cache is used
    except ImportError:  # an offline machine with charlm installed --no-deps: the same folders
        return _platform_cache_dir()
    return Path(platformdirs.user_cache_dir("charlm", appauthor=False))


def _platform_cache_dir() -> Path:
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local"
        return Path(base) / "charlm" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "charlm"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "charlm"


@dataclass
class Corpus:
    """A text encoded with a vocabulary."""

    ids: np.ndarray  # (N,) smallest unsigned dtype
    vocab: Vocab
    source: Source
    unknown: int  # characters dropped because they are not in the vocabulary
    crlf: bool  # the file has Windows (CRLF) or old Mac (CR) line endings
    notes: list[str] = field(default_factory=list)  # e.g. the cache could not be used
    newline: str = "normalize"  # what was done with the line endings: read as \n, or "keep"


def _scan(source: Source, encoding: str, errors: str,
          newline: str = "normalize") -> tuple[np.ndarray, int, bool]:
    """Read the whole text; returns (code points present, number of chars, has CR)."""
    counts = np.zeros(0x110000, dtype=np.int64)
    total = 0
    crlf = [False]
    for chunk in read_text(source, encoding, errors, newline, crlf):
        counts += np.bincount(code_points(chunk), minlength=0x110000)
        total += len(chunk)
    return np.flatnonzero(counts), total, crlf[0]


def _cache_stem(kind: str, *parts: str) -> Path:
    """Where the cache keeps ``kind`` files, named by a hash of everything that decides their
    content (the text's SHA-256 first)."""
    return cache_dir() / kind / hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def _write_cache_file(path: Path, meta: dict) -> None:
    """Best effort: a read-only or full cache only costs a scan or an encode next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(meta))
    except (OSError, CharlmError):
        pass


def _scan_cached(
    source: Source, encoding: str, errors: str, use_cache: bool, newline: str = "normalize"
) -> tuple[np.ndarray, int, bool]:
    """:func:`_scan`, kept in the cache by the text's SHA-256, so a second run of the same
    text reads the result instead of the text."""
    path = _cache_stem("scan", source.sha256, encoding, errors, newline).with_suffix(".json")
    if use_cache:
        try:
            meta = json.loads(path.read_text())
            present = np.array(meta["code_points"], dtype=np.int64)
            total, crlf = int(meta["total"]), meta["crlf"]
            # Anything else is a damaged cache file: read the text again.
            if (present.ndim == 1 and len(present) <= total and isinstance(crlf, bool)
                    and ((present >= 0) & (present <= MAX_CODE_POINT)).all()):
                return present, total, crlf
        except (OSError, ValueError, KeyError, TypeError):
            pass
    present, total, crlf = _scan(source, encoding, errors, newline)
    if use_cache:
        _write_cache_file(path, {"code_points": present.tolist(), "total": total, "crlf": crlf})
    return present, total, crlf


def scan_code_points(path: str | Path, encoding: str = "utf-8", errors: str = "strict",
                     use_cache: bool = True, newline: str = "normalize") -> np.ndarray:
    """The distinct code points of a text file (or directory of ``*.txt``), sorted; the scan
    is cached as for :func:`load_corpus`."""
    return _scan_cached(_source(path, encoding, errors), encoding, errors, use_cache, newline)[0]


def _source(path: str | Path, encoding: str, errors: str) -> Source:
    """:func:`resolve_source`, after the start of each file is checked for binary data, so
    that a large non-text file is refused at once instead of after hashing all of it."""
    check_start(text_paths(path), encoding, errors)
    return resolve_source(path)


def _cache_paths(source: Source, vocab: Vocab, encoding: str, errors: str,
                 newline: str) -> tuple[Path, Path]:
    stem = _cache_stem("ids", source.sha256, vocab.to_json(), encoding, errors, newline)
    return stem.with_suffix(".bin"), stem.with_suffix(".json")


def _checksum(ids: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(ids)).cast("B"))


# Ids up to this size are read into memory rather than memory-mapped: a memory map of the
# cache dies with SIGBUS when the file is truncated under it (another run clearing the cache,
# a full disk), and reading costs little (tiny Shakespeare's ids: 1.1 MB, ~1 ms). Larger ids
# stay memory-mapped, shared with the page cache (see the notes of issue 30).
IN_MEMORY_IDS_BYTES = 1 << 30


def _read_ids(bin_path: Path, dtype: np.dtype, length: int) -> np.ndarray:
    """The ``length`` ids of a cache file: in memory up to IN_MEMORY_IDS_BYTES, else a
    read-only memory map. OSError when the file is shorter."""
    if length * dtype.itemsize > IN_MEMORY_IDS_BYTES:
        return np.memmap(bin_path, dtype=dtype, mode="r", shape=(length,))
    ids = np.empty(length, dtype=dtype)
    with open(bin_path, "rb") as f:
        got = f.readinto(memoryview(ids).cast("B"))
    if got != ids.nbytes:
        raise OSError(f"{bin_path} is shorter than its {length:,} ids")
    return ids


def _load_cached(bin_path: Path, meta_path: Path, source: Source, dtype: np.dtype,
                 total: int) -> tuple[np.ndarray, dict] | None:
    """The cached ids, or None when anything about them is off (a miss, never an error):
    the metadata must name this text, dtype and length, and the ids file must have that
    size and the checksum written with it."""
    try:
        meta = json.loads(meta_path.read_text())
        length, unknown = meta["length"], meta["unknown"]
        ok = (meta["dtype"] == dtype.name and meta["source"]["sha256"] == source.sha256
              and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                      for v in (length, unknown, meta["crc32"]))
              and length + unknown == total and length > 0
              and os.stat(bin_path).st_size == length * dtype.itemsize)
        if not ok:
            return None
        ids = _read_ids(bin_path, dtype, length)
        if _checksum(ids) != meta["crc32"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return ids, meta


def _encode_to(out: np.ndarray, source, vocab, encoding, errors, drop_unknown,
               newline) -> tuple[int, int]:
    """Encode ``source`` into ``out``; returns (ids written, unknown characters dropped)."""
    n = unknown = 0
    for chunk in read_text(source, encoding, errors, newline):
        ids = vocab.lookup(code_points(chunk))
        bad = ids == UNKNOWN
        if bad.any():
            if not drop_unknown:
                missing = vocab.unknown_chars(chunk)
                shown = "".join(missing[:20])
                raise DataError(
                    f"{source.name} has {len(missing)}+ characters outside the vocabulary "
                    f"(e.g. {shown!r}); pass --drop-unknown to drop them, or --grow-vocab "
                    "(with --init-from) to add them"
                )
            unknown += int(bad.sum())
            ids = ids[~bad]
        if n + len(ids) > len(out):  # more characters than the scan counted
            raise changed(source)
        out[n : n + len(ids)] = ids
        n += len(ids)
    return n, unknown


def _cache_buffer(bin_path: Path, total: int, dtype: np.dtype) -> tuple[np.ndarray, Path]:
    """A memory map of a fresh temporary file next to ``bin_path`` for ``total`` ids."""
    tmp = temporary_name(bin_path)
    try:
        bin_path.parent.mkdir(parents=True, exist_ok=True)
        with open_fresh(tmp, "wb") as f:
            # Reserve the blocks: on a full disk this fails here, and the ids are kept in
            # memory, instead of SIGBUS when a page of a sparse memory map is written.
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(f.fileno(), 0, max(total, 1) * dtype.itemsize)
            else:
                f.truncate(max(total, 1) * dtype.itemsize)
        return np.memmap(tmp, dtype=dtype, mode="r+", shape=(max(total, 1),)), tmp
    except OSError:
        remove_quietly(tmp)
        raise


def _cache_note(exc: OSError) -> str:
    return (f"the ids cache {cache_dir()} cannot be written ({exc.strerror or exc}); "
            "encoded the text in memory instead")


def load_corpus(
    path: str | Path,
    vocab: Vocab | None = None,
    encoding: str = "utf-8",
    errors: str = "strict",
    drop_unknown: bool = False,
    use_cache: bool = True,
    newline: str = "normalize",
    evaluating: bool = False,
) -> Corpus:
    """Read and encode a text file (or directory of ``*.txt``).

    With ``vocab=None`` the vocabulary is built from the text; otherwise characters outside
    ``vocab`` are an error, or dropped and counted when ``drop_unknown``. ``newline``:
    "normalize" reads CRLF and CR line endings as ``\n`` (as Python's text mode does),
    "keep" keeps them as characters. The cache is best effort: when it cannot be written
    the ids are kept in memory and ``notes`` says so. ``evaluating`` (``charlm eval``): only
    an empty text is refused, and a text with no character of ``vocab`` gives no ids.
    """
    source = _source(path, encoding, errors)
    present, total, crlf = _scan_cached(source, encoding, errors, use_cache, newline)
    if total == 0 and evaluating:
        raise DataError(f"{source.name} is empty; nothing to evaluate")
    if total == 0 or not evaluating and not any(chr(int(c)).strip() for c in present):
        raise DataError(f"{source.name} is empty or only whitespace; nothing to train on")
    if vocab is None:
        vocab = Vocab.from_code_points(present)
    dtype = id_dtype(len(vocab))
    bin_path, meta_path = _cache_paths(source, vocab, encoding, errors, newline)
    cached = _load_cached(bin_path, meta_path, source, dtype, total) if use_cache else None
    if cached is not None and (drop_unknown or cached[1]["unknown"] == 0):
        ids, meta = cached
        return Corpus(ids, vocab, source, meta["unknown"], crlf, newline=newline)

    notes = []
    if use_cache:
        try:
            out, tmp = _cache_buffer(bin_path, total, dtype)
        except OSError as exc:
            use_cache = False
            notes.append(_cache_note(exc))
    if not use_cache:
        out = np.empty(total, dtype=dtype)
    try:
        n, unknown = _encode_to(out, source, vocab, encoding, errors, drop_unknown, newline)
        if n == 0 and not evaluating:
            raise DataError(f"{source.name} has no characters in the vocabulary")
    except BaseException:
        if use_cache:
            del out
            remove_quietly(tmp)
        raise
    if n == 0:  # evaluating: no ids (--unknown charge counts the characters), nothing cached
        if use_cache:
            del out
            remove_quietly(tmp)
        return Corpus(np.empty(0, dtype=dtype), vocab, source, unknown, crlf, notes, newline)
    if not use_cache:
        return Corpus(out[:n], vocab, source, unknown, crlf, notes, newline)
    crc = _checksum(out[:n])
    out.flush()
    # Small ids are kept in memory from the buffer just written (see IN_MEMORY_IDS_BYTES).
    kept = np.array(out[:n]) if n * dtype.itemsize <= IN_MEMORY_IDS_BYTES else None
    del out
    try:
        os.truncate(tmp, n * dtype.itemsize)
        os.replace(tmp, bin_path)
    except OSError as exc:
        remove_quietly(tmp)
        corpus = load_corpus(path, vocab, encoding, errors, drop_unknown, use_cache=False,
                             newline=newline)
        corpus.notes.append(_cache_note(exc))
        return corpus
    _write_cache_file(meta_path, {"dtype": dtype.name, "length": n, "unknown": unknown,
                                  "crc32": crc, "source": source.describe()})
    ids = kept if kept is not None else np.memmap(bin_path, dtype=dtype, mode="r", shape=(n,))
    return Corpus(ids, vocab, source, unknown, crlf, newline=newline)


def split(ids: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The first ``1 - val_fraction`` of the ids for training, the contiguous rest for
    validation: the same cut as nanoGPT's shakespeare_char (``int(n * 0.9)``)."""
    n_train = int(len(ids) * (1.0 - val_fraction))
    return ids[:n_train], ids[n_train:]


def as_tensor(ids: np.ndarray, device: torch.device) -> torch.Tensor:
    """The ids as a tensor on ``device``. On CPU a memory map stays a (shared) memory map."""
    if isinstance(ids, np.memmap) and device.type == "cpu" and ids.flags.c_contiguous:
        # Copy-on-write map: torch needs a writable buffer; pages stay shared with the cache.
        # A slice of a memmap inherits its parent's ``offset``, so the slice's own start is
        # found from its address within the outermost mapped array.
        root = ids
        while isinstance(root.base, np.ndarray):
            root = root.base
        start = (ids.ctypes.data - root.ctypes.data) // ids.itemsize
        whole = np.memmap(ids.filename, dtype=ids.dtype, mode="c", shape=root.shape,
                          offset=root.offset)
        ids = whole[start:start + len(ids)]
    ids = np.asarray(ids)
    if ids.flags.writeable:
        t = torch.from_numpy(ids)
    elif device.type == "cpu":
        t = torch.from_numpy(ids.copy())  # torch wants a writable buffer
    else:  # read only until the copy to the device below: no host copy first
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            t = torch.from_numpy(ids)
    if device.type != "cpu" and t.dtype != torch.uint8:
        t = t.to(torch.int32)  # wide unsigned dtypes have few kernels off the CPU
    return t.to(device)


class Batcher:
    """Yields (x, y) windows of ``T`` ids from ``streams`` contiguous streams.

    Each epoch starts at a random offset in ``[0, T)`` drawn from ``seed`` and the epoch
    number, so the position is fully described by ``(epoch, index)``: that pair is all a
    checkpoint needs to resume the data order exactly. ``rank``/``world`` select this
    process's ``B = streams // world`` rows for distributed training.

    Inputs: ``ids`` (N,) integer tensor on the training device.
    Yields: ``x, y`` of shape (B, T), int64; ``y`` is ``x`` shifted by one character.
    """

    def __init__(self, ids: torch.Tensor, streams: int, seq_len: int, seed: int,
                 rank: int = 0, world: int = 1):
        self.ids, self.streams, self.seq_len, self.seed = ids, streams, seq_len, seed
        self.rank, self.world = rank, world
        if streams % world:
            raise DataError(f"{streams} streams cannot be split evenly over {world} processes")
        need = streams * seq_len + 1
        if len(ids) < need and world > 1:
            raise DataError(
                f"training text has {len(ids):,} characters but {world} processes x batch size "
                f"{streams // world} x sequence length {seq_len} need at least {need:,}; use "
                "fewer processes, a lower --batch-size or --seq-len, or more text"
            )
        if len(ids) < need:
            raise DataError(
                f"training text has {len(ids):,} characters but batch size x sequence length "
                f"needs at least {need:,}; lower --batch-size or --seq-len, or use more text"
            )
        self.epoch = 0
        self.index = 0
        rows = torch.arange(rank * (streams // world), (rank + 1) * (streams // world))
        self._rows = rows.to(ids.device)
        self._cols = torch.arange(seq_len + 1, device=ids.device)
        self._start_epoch()

    def _start_epoch(self) -> None:
        n, T, S = len(self.ids), self.seq_len, self.streams
        # Reduced into the generator's range, so every seed up to 2**63 - 1 works (and the
        # smaller ones keep the epochs they always had).
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        slack = n - 1 - S * T  # >= 0, checked in __init__
        # Offsets T and 0 are the same phase of the windows: draw from [0, T).
        self.offset = int(torch.randint(0, min(T - 1, slack) + 1, (1,), generator=g))
        self.stream_len = (n - 1 - self.offset) // S
        self.steps_per_epoch = self.stream_len // T
        self._base = self.offset + self._rows * self.stream_len  # (B,)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._start_epoch()

    @property
    def new_epoch(self) -> bool:
        """True when the next batch starts an epoch (the carried state must be reset)."""
        return self.index == 0 or self.index >= self.steps_per_epoch

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.index >= self.steps_per_epoch:
            self.epoch += 1
            self.index = 0
            self._start_epoch()
        starts = self._base + self.index * self.seq_len  # (B,)
        window = self.ids[starts[:, None] + self._cols].long()  # (B, T + 1)
        self.index += 1
        return window[:, :-1], window[:, 1:]

    @property
    def progress(self) -> float:
        """Epochs done, as a fraction."""
        return self.epoch + self.index / max(self.steps_per_epoch, 1)


def eval_windows(ids: torch.Tensor, streams: int, seq_len: int, rank: int = 0, world: int = 1):
    """Windows covering every prediction in ``ids`` exactly once, for evaluation.

    The ids are cut into ``streams`` contiguous streams of equal length; the few predictions
    left over form one extra stream, so nothing is skipped. Process ``rank`` of ``world``
    takes streams ``rank, rank + world, ...`` (and rank 0 the leftover stream).

    Yields: ``(x, y, reset)`` with x, y of shape (S_r, t); ``reset`` is True at the first
    window of a group of streams, which starts from a zero state.
    """
    n = len(ids) - 1  # predictions
    streams = max(1, min(streams, n))
    stream_len = n // streams
    groups = []
    # A rank beyond the last stream gets none (arange refuses a start past its end).
    mine = torch.arange(rank, max(rank, streams), world, device=ids.device)
    if len(mine):
        groups.append((mine * stream_len, stream_len))
    tail = n - streams * stream_len
    if tail and rank == 0:
        groups.append((torch.tensor([streams * stream_len], device=ids.device), tail))
    for starts, length in groups:
        for t0 in range(0, length, seq_len):
            t = min(seq_len, length - t0)
            idx = starts[:, None] + t0 + torch.arange(t + 1, device=ids.device)
            window = ids[idx].long()
            yield window[:, :-1], window[:, 1:], t0 == 0
