"""Issue 30, bounds: every input read whole has a size bound with a one-line error at the
bound, beam search is bounded before it starts, a non-text file is refused from its start, and
a training survives its ids cache being truncated under it.

Each test is bounded in time (a subprocess timeout), so one that would grow without bound on
the old code fails instead of hanging the suite.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import TINY_CONFIG, assert_clean_error, run_charlm

# The old code hashed a sparse 10 GB file for ~30 s before looking at its first byte.
SPARSE_SIZE = 10 << 30


def _sparse(path: Path, head: bytes = b"") -> Path:
    """A 10 GB file that costs no disk: ``head``, then a hole of zero bytes."""
    path.write_bytes(head)
    os.truncate(path, SPARSE_SIZE)
    return path


def _timed(*args, timeout: float, **kwargs) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    try:
        proc = run_charlm(*args, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired:
        pytest.fail(f"charlm {' '.join(map(str, args))} ran past {timeout} s")
    return proc, time.monotonic() - start


# ------------------------------------------------------------------------ non-text files
def test_sparse_binary_file_is_refused_from_its_start(tmp_path):
    big = _sparse(tmp_path / "big.txt")
    proc, _ = _timed("train", big, "--config", TINY_CONFIG, "--out", tmp_path / "run",
                     "--no-progress", timeout=25)
    assert_clean_error(proc, "binary data", "NUL byte at offset 0")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_sparse_undecodable_file_is_refused_from_its_start(tmp_path):
    # No NUL in the first block, but not UTF-8 either: refused before the hash of 10 GB.
    big = _sparse(tmp_path / "big.txt", b"\xff" * (70 << 10))
    proc, _ = _timed("train", big, "--config", TINY_CONFIG, "--out", tmp_path / "run",
                     "--no-progress", timeout=25)
    assert_clean_error(proc, "binary data", "not valid utf-8")


def test_sparse_file_in_a_directory_is_refused_from_its_start(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("hello there\n" * 100, encoding="utf-8")
    _sparse(corpus / "b.txt", b"some text first\n")
    proc, _ = _timed("train", corpus, "--config", TINY_CONFIG, "--out", tmp_path / "run",
                     "--dry-run", timeout=25)
    assert_clean_error(proc, "b.txt", "NUL byte at offset 16")
