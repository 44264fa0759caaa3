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
    import io

    from charlm.sampling.interactive import MAX_LINE_CHARS, line_reader

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

    from charlm.runs.directory import read_metrics

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
    from charlm.runs.directory import read_metrics

    path = _metrics_with_long_line(tmp_path / "metrics.jsonl", 2 << 20)
    warnings: list[str] = []
    assert [r["step"] for r in read_metrics(path, warnings)] == [1, 2]
    assert len(warnings) == 1 and "line 2: longer than 1 MiB" in warnings[0], warnings


# -------------------------------------------------------------------------- beam search
def _beam_piped(tiny_run, *args, read: int, timeout: float) -> tuple[int, bytes, str]:
    """``charlm sample --beam ... | head -c READ``: a real pipe whose reader goes away."""
    from conftest import charlm_exe

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    proc = subprocess.Popen([*charlm_exe(), "sample", "-c", str(tiny_run), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=_limit_memory)
    try:
        got = proc.stdout.read(read)
        proc.stdout.close()  # the reader goes away, as head does
        code = proc.wait(timeout=timeout)
        err = proc.stderr.read().decode()
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"charlm sample {' '.join(map(str, args))} | head ran past {timeout} s")
    finally:
        proc.stderr.close()
    return code, got, err


def test_beam_length_is_bounded_before_it_starts(tiny_run):
    # The old code never returned (100 M steps, back-pointers growing all the while).
    code, got, err = _beam_piped(tiny_run, "--beam", 2, "-n", 100_000_000, read=100,
                                 timeout=40)
    assert code == 2, err
    assert got == b""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "at most 10,000 characters" in lines[0], err
    assert "--length" in lines[0] and "Traceback" not in err


def test_wide_long_beam_is_refused_at_once(tiny_run):
    # --beam 4096 -n 100000 took 3.7 GB in 30 s on the old code.
    proc, took = _timed("sample", "-c", tiny_run, "--beam", 4096, "-n", 100_000, timeout=40)
    assert_clean_error(proc, "--beam", "at most 10,000")
    assert proc.returncode == 2


def test_beam_memory_is_bounded_before_it_starts():
    """A vocabulary of 6,000 characters: 4,096 beams score 24.6 M candidates a step in float64
    (several copies), over the 1 GiB bound: refused before the first step."""
    import numpy as np

    from charlm.config import ModelConfig
    from charlm.data.vocab import Vocab
    from charlm.errors import ConfigError
    from charlm.model.network import CharRNN
    from charlm.sampling.beam import MAX_BEAM_BYTES, beam_bytes, beam_search

    vocab = Vocab.from_code_points(np.arange(0x4E00, 0x4E00 + 6000))
    model = CharRNN(len(vocab), ModelConfig(embed_size=8, hidden_size=8))
    need = beam_bytes(model, len(vocab), 5000, 4096)
    assert need > MAX_BEAM_BYTES
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"--beam 4096 over 5,000 characters needs about .* GiB, "
                                          r"more than the 1 GiB .*lower --beam or --length"):
        beam_search(model, vocab, [], 5000, 4096)
    assert time.monotonic() - start < 5
    # The back-pointers are compact: 6 bytes a beam a step, so the longest beam of the CLI's
    # widest search fits (4,096 x 10,000 x 6 = 246 MB) for a small vocabulary.
    small = Vocab.from_code_points(np.arange(97, 97 + 40))
    tiny = CharRNN(len(small), ModelConfig(embed_size=8, hidden_size=8))
    assert beam_bytes(tiny, len(small), 10_000, 4096) < MAX_BEAM_BYTES


def test_exhaustive_width_allocates_only_the_live_beams():
    """A width above V ** (length - 1) is exhaustive: memory is counted (and allocated) for the
    beams that can be live, not for the width asked for."""
    import numpy as np

    from charlm.config import ModelConfig
    from charlm.data.vocab import Vocab
    from charlm.model.network import CharRNN
    from charlm.sampling.beam import beam_bytes, beam_search

    vocab = Vocab.from_code_points(np.arange(97, 100))
    model = CharRNN(len(vocab), ModelConfig(embed_size=4, hidden_size=4))
    assert beam_bytes(model, 3, 4, 10**9) == beam_bytes(model, 3, 4, 27)
    assert len(beam_search(model, vocab, [0], 4, 10**9).ids) == 4


def test_beam_output_to_a_closed_pipe_stops_quietly(tiny_run):
    code, got, err = _beam_piped(tiny_run, "--beam", 4, "-n", 400, read=10, timeout=60)
    assert code == 0, err
    assert len(got) == 10
    assert "Traceback" not in err and "error" not in err.lower(), err


# ------------------------------------------------------------- ids cache truncated in use
def test_truncated_ids_cache_under_a_running_training(tmp_path):
    """The ids cache is truncated (another run cleaning the cache, a full disk) while a
    training reads it: the old code memory-mapped it and died with SIGBUS (-7), no checkpoint.
    Now a text's ids (below 1 GiB) are read into memory, so training goes on."""
    from conftest import SHAKESPEARE, charlm_exe

    text = tmp_path / "input.txt"
    text.write_bytes(SHAKESPEARE.read_bytes())
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CHARLM_CACHE_DIR": str(cache)}
    proc = subprocess.Popen(
        [*charlm_exe(), "train", str(text), "--config", str(TINY_CONFIG), "--out",
         str(tmp_path / "run"), "--no-progress", "--max-steps", "400",
         "--set", "train.eval_every=100", "--set", "train.log_every=10"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and metrics.stat().st_size > 0:  # training has started
                break
            time.sleep(0.05)
        bins = list((cache / "ids").glob("*.bin"))
        assert proc.poll() is None, "training ended before the cache could be truncated"
        assert len(bins) == 1, bins
        os.truncate(bins[0], 0)
        code = proc.wait(timeout=120)
        err = proc.stderr.read().decode()
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("training ran past 120 s after its cache was truncated")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert code != -7, "SIGBUS: the truncated cache was still memory-mapped"
    assert code == 0, err
    assert "Traceback" not in err
    assert (tmp_path / "run" / "last.pt").is_file()


def test_small_cached_ids_are_read_into_memory(text_file):
    """Both the first load (which writes the cache) and a cache hit hold small ids in memory,
    not a memory map that a truncation of the cache file would turn into SIGBUS."""
    import numpy as np

    from charlm.data.batching import load_corpus

    first, second = load_corpus(text_file), load_corpus(text_file)
    for corpus in (first, second):
        assert not isinstance(corpus.ids, np.memmap)
    assert np.array_equal(first.ids, second.ids)
    bins = list((Path(os.environ["CHARLM_CACHE_DIR"]) / "ids").glob("*.bin"))
    assert len(bins) == 1
    os.truncate(bins[0], 0)
    assert first.vocab.decode(first.ids[-50:]) == second.vocab.decode(second.ids[-50:])
