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


# Commands that read an endless input are run with their data memory limited, so that the
# old code (which grew by ~400 MB/s) fails fast with "out of memory" instead of taking the
# machine's memory first.
DATA_LIMIT = 4 << 30


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_DATA, (DATA_LIMIT, DATA_LIMIT))


def _timed(*args, timeout: float, input: str | None = None
           ) -> tuple[subprocess.CompletedProcess, float]:
    """charlm run with a time limit and its data memory limited (see DATA_LIMIT)."""
    from conftest import charlm_exe

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    start = time.monotonic()
    try:
        proc = subprocess.run([*charlm_exe(), *map(str, args)], capture_output=True, text=True,
                              timeout=timeout, env=env, input=input, preexec_fn=_limit_memory)
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


# ------------------------------------------------------------------ inputs read whole
def _from_dev_zero(*args, timeout: float) -> subprocess.CompletedProcess:
    """charlm with standard input from /dev/zero (endless, no newline), memory limited."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    from conftest import charlm_exe

    with open("/dev/zero", "rb") as zero:
        try:
            return subprocess.run([*charlm_exe(), *map(str, args)], stdin=zero,
                                  capture_output=True, text=True, timeout=timeout, env=env,
                                  preexec_fn=_limit_memory)
        except subprocess.TimeoutExpired:
            pytest.fail(f"charlm {' '.join(map(str, args))} < /dev/zero ran past {timeout} s")


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero and rlimits")
def test_interactive_line_from_dev_zero_is_bounded(tiny_run):
    proc = _from_dev_zero("sample", "-c", tiny_run, "-i", "-n", 5, timeout=40)
    assert_clean_error(proc, "input line is longer than 1,048,576 characters")
    assert proc.returncode == 1


def test_interactive_long_line_ends_the_session_with_one_line(tiny_run):
    lines = "All:\n" + "a" * (2 << 20) + "\nAll:\n"
    proc = run_charlm("sample", "-c", tiny_run, "-i", "-n", 5, "--random-seed", 1,
                      input=lines, timeout=60)
    assert_clean_error(proc, "longer than 1,048,576 characters", "--seed-file")
    assert 0 < len(proc.stdout) < 100  # the first line was answered (5 characters), then it stopped


def test_interactive_line_just_under_the_bound_is_read(tiny_run):
    from charlm.interactive import MAX_LINE_CHARS, line_reader
    import io

    text = "a" * MAX_LINE_CHARS + "\n" + "b" * (MAX_LINE_CHARS + 1) + "\n"
    read_line = line_reader(io.StringIO(text))
    assert read_line() == "a" * MAX_LINE_CHARS
    from charlm.errors import CharlmError

    with pytest.raises(CharlmError, match="longer than"):
        read_line()


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero and rlimits")
def test_seed_file_stdin_from_dev_zero_is_bounded(tiny_run):
    proc = _from_dev_zero("sample", "-c", tiny_run, "--seed-file", "-", "-n", 5, timeout=40)
    assert_clean_error(proc, "seed file (stdin) is longer than 16 MiB")


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero and rlimits")
def test_seed_file_dev_zero_is_bounded(tiny_run):
    proc, took = _timed("sample", "-c", tiny_run, "--seed-file", "/dev/zero", "-n", 5,
                        timeout=40)
    assert_clean_error(proc, "seed file /dev/zero is longer than 16 MiB")


def test_seed_file_over_the_bound_is_refused(tiny_run, tmp_path):
    big = tmp_path / "seed.txt"
    big.write_bytes(b"All:\n" * ((16 << 20) // 5 + 1))
    proc, _ = _timed("sample", "-c", tiny_run, "--seed-file", big, "-n", 5, timeout=40)
    assert_clean_error(proc, "longer than 16 MiB", "tail -c")


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero and rlimits")
def test_config_dev_zero_is_bounded(text_file, tmp_path):
    proc, _ = _timed("train", text_file, "--config", "/dev/zero", "--dry-run", timeout=30)
    assert_clean_error(proc, "config file /dev/zero is larger than 1 MiB")
    assert proc.returncode == 2


def test_config_over_the_bound_is_refused(text_file, tmp_path):
    config = tmp_path / "big.toml"
    config.write_text("# padding\n" * ((1 << 20) // 10 + 1) + "[model]\n", encoding="utf-8")
    proc, _ = _timed("train", text_file, "--config", config, "--dry-run", timeout=30)
    assert_clean_error(proc, "larger than 1 MiB")
    assert proc.returncode == 2


@pytest.mark.parametrize("nesting", ["[" * 600 + "]" * 600, "{a=" * 600 + "}" * 600,
                                     "[" * 200_000 + "]" * 200_000],
                         ids=["arrays-600", "tables-600", "arrays-200000"])
def test_deeply_nested_config_is_one_line(text_file, tmp_path, nesting):
    config = tmp_path / "deep.toml"
    config.write_text(f"[model]\nhidden_size = {nesting}\n", encoding="utf-8")
    proc, _ = _timed("train", text_file, "--config", config, "--dry-run", timeout=30)
    assert_clean_error(proc, "deep.toml", "nested too deeply")
    assert "internal error" not in proc.stderr
    assert proc.returncode == 2


def _metrics_with_long_line(path: Path, long_bytes: int) -> Path:
    import json

    records = [{"kind": "train", "step": s, "epoch": 0.1 * s, "chars": 100 * s, "loss": 2.0,
                "time": 0.5 * s} for s in (1, 2)]
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(records[0]) + "\n")
        f.write('{"kind": "train", "x": "' + "a" * long_bytes + '"}\n')
        f.write(json.dumps(records[1]) + "\n")
    return path


def test_metrics_line_over_the_bound_is_skipped_without_reading_it_whole(tmp_path):
    import tracemalloc

    from charlm.runs import read_metrics

    path = _metrics_with_long_line(tmp_path / "metrics.jsonl", 64 << 20)
    tracemalloc.start()
    try:
        records = read_metrics(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r["step"] for r in records] == [1, 2]
    assert peak < 16 << 20, f"read_metrics held {peak / 2**20:.0f} MiB for a 64 MiB line"


def test_metrics_long_line_is_named_in_the_warning(tmp_path):
    from charlm.runs import read_metrics

    path = _metrics_with_long_line(tmp_path / "metrics.jsonl", 2 << 20)
    warnings: list[str] = []
    assert [r["step"] for r in read_metrics(path, warnings)] == [1, 2]
    assert len(warnings) == 1 and "line 2: longer than 1 MiB" in warnings[0], warnings
