"""Hardening: every bad input ends in one clear ``error:`` line and a non-zero exit, and no
fault loses or damages a checkpoint.

The option and data matrices run the CLI inside this process (``run_cli``: the same
``main()`` and error mapping as the console script, without paying for a torch import per
case). Everything that depends on the process itself (pipes, signals, file-size limits,
locks, a real divergence) runs the installed ``charlm`` command.
"""

from __future__ import annotations

import hashlib
import math
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    SAMPLE_TEXT,
    TINY_CONFIG,
    assert_clean_error,
    charlm_exe,
    run_charlm,
    run_cli,
)

from charlm.config import Config, apply_dict, load_toml
from charlm.data.batching import load_corpus
from charlm.data.text import iter_text, resolve_source
from charlm.errors import CharlmError, ConfigError
from charlm.runs.directory import read_metrics
from charlm.storage import checkpoint

TINY = ("--config", TINY_CONFIG, "--no-progress", "--no-samples", "--set", "train.threads=1")


def clean_error(proc, *needles: str) -> str:
    """One ``error:`` line, non-zero exit, no traceback, and not the last-resort handler."""
    assert_clean_error(proc, *needles)
    line = next(x for x in proc.stderr.splitlines() if x.startswith("error:"))
    assert "internal error" not in line, line
    return line


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def finite_checkpoint(path: Path) -> dict:
    ckpt = checkpoint.load(path)
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values()), path
    return ckpt


def leftovers(run: Path) -> list[str]:
    return [p.name for p in run.glob(".*.tmp")]


# ------------------------------------------------------------------------- training text
BAD_TEXTS = {
    # name: (file bytes or None for no file, extra options, needles)
    "missing": (None, (), ("not found",)),
    "empty": (b"", (), ("empty or only whitespace",)),
    "whitespace": (b" \n\t\r\n  \n", (), ("empty or only whitespace",)),
    "nul-bytes": (b"abc\x00def" * 50, (), ("binary data", "NUL byte at offset 3")),
    "undecodable": (bytes(range(128, 256)) * 40, (), ("binary data", "not valid utf-8")),
    "undecodable-replace": (bytes(range(128, 256)) * 40, ("--set", "data.errors=replace"),
                            ("binary data", "100%")),
    "invalid-utf8": (SAMPLE_TEXT.encode()[:500] + b"\xff" + SAMPLE_TEXT.encode()[:500], (),
                     ("not valid utf-8", "byte 0xff at offset 500", "data.errors=replace")),
    "latin-1": ("Le café est très bon.\n".encode("latin-1") * 60, (),
                ("not valid utf-8", "byte 0xe9 at offset 6", "--encoding")),
    "short": (b"hello world\n", (),
              ("too short", "10 training characters", "--batch-size 8", "--seq-len 16",
               "at least 129", "at least 144 characters")),
    "bad-encoding-name": (b"abc" * 100, ("--encoding", "klingon"), ("unknown text encoding",)),
}


@pytest.mark.parametrize("case", BAD_TEXTS, ids=list(BAD_TEXTS))
def test_bad_training_text_is_one_line_and_writes_nothing(case, tmp_path):
    data, extra, needles = BAD_TEXTS[case]
    path = tmp_path / "input.txt"
    if data is not None:
        path.write_bytes(data)
    out = tmp_path / "run"
    clean_error(run_cli("train", path, *TINY, "--out", out, *extra), *needles)
    assert not out.exists()  # the text is checked before the run directory is made


def test_minimum_size_in_the_message_is_exact(tmp_path):
    # tiny.toml: batch 8 x window 16 needs 129 training characters; 10% is validation.
    path = tmp_path / "edge.txt"
    path.write_text("ab" * 71 + "a")  # 143 characters: one short
    clean_error(run_cli("train", path, *TINY, "--out", tmp_path / "r1"), "at least 144 characters")
    path.write_text("ab" * 72)  # 144 characters: enough
    proc = run_cli("train", path, *TINY, "--out", tmp_path / "r2", "--max-steps", "1")
    assert proc.returncode == 0, proc.stderr


def test_real_command_reports_missing_and_undecodable_files(tmp_path):
    clean_error(run_charlm("train", tmp_path / "nope.txt", *TINY), "training file not found")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(SAMPLE_TEXT.encode()[:700] + b"\xc3(" + SAMPLE_TEXT.encode())
    clean_error(run_charlm("train", bad, *TINY, "--out", tmp_path / "r"),
                "offset 700", "--set data.errors=replace")
    # The suggested fix works: the bad byte becomes U+FFFD and training goes on.
    proc = run_charlm("train", bad, *TINY, "--out", tmp_path / "r", "--max-steps", "2",
                      "--set", "data.errors=replace")
    assert proc.returncode == 0, proc.stderr
    assert "\ufffd" in checkpoint.load(tmp_path / "r" / "last.pt")["vocab"]


def test_directory_trains_on_its_txt_files_in_sorted_order(tmp_path):
    d = tmp_path / "books"
    d.mkdir()
    half = len(SAMPLE_TEXT) // 2
    (d / "b.txt").write_text(SAMPLE_TEXT[half:])
    (d / "a.txt").write_text(SAMPLE_TEXT[:half])
    (d / "notes.md").write_text("# {not text to train on} @@@" * 50)
    (d / "sub.txt").mkdir()  # a directory named *.txt is not a file to read
    source = resolve_source(d)
    assert [p.name for p in source.paths] == ["a.txt", "b.txt"]
    assert "".join(iter_text(source)) == SAMPLE_TEXT

    proc = run_charlm("train", d, *TINY, "--out", tmp_path / "run", "--max-steps", "2")
    assert proc.returncode == 0, proc.stderr
    ckpt = checkpoint.load(tmp_path / "run" / "last.pt")
    assert ckpt["train_file"]["name"] == "books"
    assert "#" not in ckpt["vocab"] and "@" not in ckpt["vocab"]

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no text files here")
    clean_error(run_cli("train", empty, *TINY, "--out", tmp_path / "r2"), "no *.txt files")


def test_bom_is_stripped_and_crlf_is_normalized_and_reported(tmp_path):
    path = tmp_path / "windows.txt"
    path.write_bytes(b"\xef\xbb\xbf" + SAMPLE_TEXT.replace("\n", "\r\n").encode())
    proc = run_charlm("train", path, *TINY, "--out", tmp_path / "run", "--max-steps", "2")
    assert proc.returncode == 0, proc.stderr
    assert "CRLF" in proc.stderr and "read as" in proc.stderr  # the summary says so
    vocab = checkpoint.load(tmp_path / "run" / "last.pt")["vocab"]
    assert "\r" not in vocab and "\ufeff" not in vocab


def test_cjk_vocabulary_of_20000_characters_trains_and_samples(tmp_path):
    rng = np.random.default_rng(0)
    chars = np.array([chr(c) for c in range(0x4E00, 0x4E00 + 20_000)])
    path = tmp_path / "cjk.txt"
    path.write_text("".join(rng.permutation(chars)) + "".join(rng.choice(chars[:40], 3000)),
                    encoding="utf-8")
    corpus = load_corpus(path)
    assert len(corpus.vocab) == 20_000 and corpus.ids.dtype == np.uint16
    run = tmp_path / "run"
    proc = run_charlm("train", path, *TINY, "--out", run, "--embed-size", "4",
                      "--hidden-size", "4", "--max-steps", "3", "--eval-every", "3")
    assert proc.returncode == 0, proc.stderr
    assert len(checkpoint.load(run / "last.pt")["vocab"]) == 20_000
    proc = run_charlm("sample", "-c", run / "last.pt", "--seed", "一丁", "-n", "30",
                      "--random-seed", "1")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.rstrip("\n")
    assert text.startswith("一丁") and len(text) == 32
    assert all(0x4E00 <= ord(c) < 0x4E00 + 20_000 for c in text)


# ------------------------------------------------------------------------------- options
BAD_TRAIN_OPTIONS = [
    (("--batch-size", "0"), ("train.batch_size", "[1, 1048576]", "got 0")),
    (("--batch-size", "-5"), ("train.batch_size", "got -5")),
    (("--batch-size", "abc"), ("--batch-size", "valid int")),
    (("--seq-len", "0"), ("train.seq_len", "[1, 1048576]")),
    (("--num-layers", "0"), ("model.num_layers", "[1, 64]")),
    (("--num-layers", "1000"), ("model.num_layers", "[1, 64]", "got 1000")),
    (("--hidden-size", "0"), ("model.hidden_size", "[1, 65536]")),
    (("--embed-size", "-1"), ("model.embed_size", "[1, 65536]")),
    (("--lr", "0"), ("train.lr", "(0, 10]")),
    (("--lr", "1e30"), ("train.lr", "(0, 10]")),
    (("--lr", "nan"), ("train.lr", "finite")),
    (("--lr", "inf"), ("train.lr", "finite")),
    (("--dropout", "1"), ("model.dropout", "[0, 1)")),
    (("--dropout", "-0.1"), ("model.dropout",)),
    (("--max-steps", "-1"), ("train.max_steps", "[0, inf]")),
    (("--max-time", "-1"), ("train.max_time", "[0, inf]")),
    (("--max-epochs", "-2"), ("train.max_epochs", "[0, inf]")),
    (("--eval-every", "-1"), ("train.eval_every", "[0, inf]")),
    (("--seed", "-1"), ("train.seed", "[0, 9223372036854775807]")),
    (("--patience", "-1"), ("train.patience",)),
    (("--keep-last", "-1"), ("train.keep_last",)),
    (("--sample-every", "-1"), ("train.sample_every",)),
    (("--stop-at-step", "-1"), ("--stop-at-step", ">= 0")),
    (("--cell", "transformer"), ("model.cell", "rnn, lstm, gru")),
    (("--precision", "fp8"), ("train.precision", "auto, fp32, bf16, fp16")),
    (("--device", "tpu"), ("device 'tpu'", "cpu, cuda")),
    (("--set", "train.on_nan=maybe"), ("train.on_nan", "stop, skip")),
    (("--set", "data.val_fraction=0.95"), ("data.val_fraction", "(0, 0.9]")),
    (("--set", "train.grad_clip=-1"), ("train.grad_clip", "[0, inf]")),
    (("--set", "train.foo=1"), ("unknown key train.foo", "batch_size", "on_nan")),
    (("--set", "trian.lr=1"), ("unknown section 'trian'", "model, data, train")),
    (("--set", "train.lr=fast"), ("train.lr must be float", "'fast'")),
    (("--set", "nonsense"), ("section.key=value",)),
    (("--bogus",), ("No such option: --bogus",)),
    (("--resume", "a", "--init-from", "b"), ("--resume and --init-from",)),
    (("--allow-other-data",), ("--allow-other-data only applies with --resume",)),
    (("--drop-unknown",), ("--drop-unknown only applies",)),
    (("--no-samples", "--sample-every", "10"), ("--no-samples and --sample-every",)),
]


@pytest.mark.parametrize(("args", "needles"), BAD_TRAIN_OPTIONS,
                         ids=[" ".join(a) for a, _ in BAD_TRAIN_OPTIONS])
def test_bad_train_option(args, needles, text_file, tmp_path):
    out = tmp_path / "run"
    # Not TINY: its --no-samples would collide with the --sample-every case.
    clean_error(run_cli("train", text_file, "--no-progress", "--out", out, *args), *needles)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda(text_file, tmp_path):
    clean_error(run_cli("train", text_file, *TINY, "--device", "cuda", "--out", tmp_path / "r"),
                "CUDA is not available")


BAD_SAMPLE_OPTIONS = [
    (("--length", "-1"), ("--length", "[0, 100000000]")),
    (("--length", "99999999999999999999"), ("--length", "[0, 100000000]")),
    (("--length", "x"), ("--length", "valid int")),
    (("--temperature", "-1"), ("--temperature", "[0, 100]")),
    (("--temperature", "nan"), ("--temperature", "[0, 100]")),
    (("--top-k", "-1"), ("--top-k", ">= 0")),
    (("--top-p", "0"), ("--top-p", "(0, 1]")),
    (("--top-p", "1.5"), ("--top-p", "(0, 1]")),
    (("--num-samples", "0"), ("--num-samples", "[1, 65536]")),
    (("--num-samples", "1000", "--length", "1000000"), ("fewer or shorter samples",)),
    (("--random-seed", "-1"), ("--random-seed",)),
]


@pytest.mark.parametrize(("args", "needles"), BAD_SAMPLE_OPTIONS,
                         ids=[" ".join(a) for a, _ in BAD_SAMPLE_OPTIONS])
def test_bad_sample_option(args, needles, tiny_run):
    clean_error(run_cli("sample", "-c", tiny_run / "best.pt", *args), *needles)


TOML_CASES = {
    "unknown-key": ('[train]\nbatchsize = 8\n', ("unknown key train.batchsize", "batch_size")),
    "unknown-section": ('[training]\nlr = 1\n', ("unknown section [training]", "model, data")),
    "wrong-type": ('[train]\nbatch_size = "8"\n',
                   ("bad.toml", "train.batch_size must be int", "got str '8'")),
    "bool-for-float": ("[model]\ndropout = true\n", ("model.dropout must be float",)),
    "invalid-toml": ("[train\nlr = 1\n", ("not valid TOML", "line 1")),
    "out-of-range": ("[model]\nnum_layers = 0\n", ("model.num_layers", "[1, 64]")),
}


@pytest.mark.parametrize("case", TOML_CASES, ids=list(TOML_CASES))
def test_bad_config_file(case, text_file, tmp_path):
    body, needles = TOML_CASES[case]
    path = tmp_path / "bad.toml"
    path.write_text(body)
    clean_error(run_cli("train", text_file, "--config", path, "--out", tmp_path / "r"), *needles)
    clean_error(run_cli("train", text_file, "--config", tmp_path / "none.toml"), "not found")


def test_config_errors_name_every_valid_key():
    with pytest.raises(ConfigError) as info:
        apply_dict(Config(), {"model": {"size": 3}}, source="x.toml")
    for key in ("cell", "embed_size", "hidden_size", "num_layers", "dropout"):
        assert key in str(info.value)
    assert load_toml(TINY_CONFIG).model.hidden_size == 32  # the shipped config is valid


def test_usage_errors_are_one_line(tmp_path):
    clean_error(run_cli("frobnicate"), "No such command")
    # A value or file name with a newline in it still gives one line, the newline escaped.
    clean_error(run_cli("train", tmp_path / "a\nb.txt", "--no-progress"), "a\\nb.txt")
    clean_error(run_cli("train", "--set", "model.hidden_size=1\n2", "--no-progress"),
                "model.hidden_size must be int", "1\\n2")
    proc = run_cli()  # bare `charlm`: the help, not an error
    assert proc.returncode == 0 and "error" not in proc.stderr.lower()


# -------------------------------------------------------------------------------- output
def test_out_inside_a_regular_file_fails_cleanly(text_file, tmp_path):
    # Fails for root too, unlike a chmod'ed directory.
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    clean_error(run_charlm("train", text_file, *TINY, "--out", blocker / "run"),
                "cannot create run directory", "Not a directory")
    clean_error(run_cli("train", text_file, *TINY, "--out", blocker), "not a directory")
    assert blocker.read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories anyway")
def test_read_only_run_directory(text_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o500)
    try:
        clean_error(run_cli("train", text_file, *TINY, "--out", out), "not writable")
    finally:
        out.chmod(0o700)


def test_existing_run_without_resume_is_refused(tiny_run, text_file, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = {p.name: digest(p) for p in run.iterdir() if p.is_file()}
    clean_error(run_cli("train", text_file, *TINY, "--out", run), "already holds a run",
                f"--resume {run}")
    assert {p.name: digest(p) for p in run.iterdir() if p.is_file()} == before


def _no_larger_files_than(limit: int):
    def limit_file_size():
        # Without this the kernel kills the writer with SIGXFSZ; ignored, write() fails
        # with EFBIG, as it does with ENOSPC on a full disk.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limit_file_size


def test_full_disk_during_checkpoint_write_keeps_the_previous_one(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = {name: digest(run / name) for name in ("last.pt", "best.pt")}
    size = (run / "best.pt").stat().st_size  # the smaller one: weights, no optimizer state
    # Room for the ids cache, config and metrics, not for a checkpoint.
    limit = min(size // 2, 64 << 10)
    assert limit > len(SAMPLE_TEXT)
    proc = subprocess.run(
        [*charlm_exe(), "train", "--resume", str(run), "--max-steps", "41", "--no-progress",
         "--set", "train.threads=1"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
        preexec_fn=_no_larger_files_than(limit),
    )
    clean_error(proc, "could not write", "File too large", "previous file is unchanged")
    assert {name: digest(run / name) for name in before} == before
    assert not leftovers(run)
    assert checkpoint.load(run / "last.pt")["train_state"]["step"] == 40
    # ...and the run goes on from it once there is room again.
    proc = run_charlm("train", "--resume", run, "--max-steps", "41", "--no-progress",
                      "--set", "train.threads=1")
    assert proc.returncode == 0, proc.stderr
    assert checkpoint.load(run / "last.pt")["train_state"]["step"] == 41


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no posix_fallocate here")
def test_full_disk_for_the_ids_cache_falls_back_to_memory(text_file, monkeypatch):
    # A memory map of a sparse file dies with SIGBUS when the disk is full; the blocks are
    # reserved first, and when that fails the ids are kept in memory instead.
    import charlm.data.batching

    expected = load_corpus(text_file, use_cache=False).ids

    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(charlm.data.batching.os, "posix_fallocate", full)
    corpus = load_corpus(text_file)
    assert not isinstance(corpus.ids, np.memmap) and np.array_equal(corpus.ids, expected)
    assert not list((charlm.data.batching.cache_dir() / "ids").iterdir())


def test_failed_encoding_leaves_no_temporary_cache_file(text_file):
    import charlm.data.batching
    from charlm.data.vocab import Vocab

    with pytest.raises(CharlmError, match="outside the vocabulary"):
        load_corpus(text_file, vocab=Vocab(tuple("First")))
    assert not list((charlm.data.batching.cache_dir() / "ids").iterdir())


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
def test_full_disk_while_logging_metrics_is_one_line():
    from charlm.runs.directory import MetricsLog

    log = MetricsLog(Path("/dev/full"))  # every write fails with ENOSPC
    with pytest.raises(CharlmError, match="could not write /dev/full: No space left"):
        log.write({"step": 1})


def test_second_training_on_the_same_run_directory_is_refused(text_file, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(
        [*charlm_exe(), "train", str(text_file), *map(str, TINY), "--out", str(run),
         "--max-steps", "0", "--max-time", "120", "--eval-every", "1000000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 90
        while not ((run / ".lock").exists() and (run / "config.toml").exists()):
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first training never started"
            time.sleep(0.2)
        config = (run / "config.toml").read_bytes()
        second = run_charlm("train", text_file, *TINY, "--out", run, "--max-steps", "2")
        clean_error(second, "another charlm train is already using", str(run))
        assert (run / "config.toml").read_bytes() == config
        first.send_signal(signal.SIGINT)  # the first stops cleanly and saves
        _, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 130, err
    assert "Traceback" not in err
    finite_checkpoint(run / "last.pt")


# ------------------------------------------------------------------------------ sampling
def test_seed_with_unknown_characters_and_empty_seed(tiny_run):
    best = tiny_run / "best.pt"
    clean_error(run_cli("sample", "-c", best, "--seed", "Zebra €", "-n", "5"),
                "'Z'", "'€'", "--drop-unknown")
    proc = run_cli("sample", "-c", best, "--seed", "Zebra €", "-n", "5", "--drop-unknown",
                   "--random-seed", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("era ")  # the seed as the model continues from it
    proc = run_cli("sample", "-c", best, "--seed", "", "-n", "25", "--random-seed", "1")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.rstrip("\n")) >= 20


def test_sample_piped_into_head_exits_quietly(tiny_run, tmp_path):
    err = tmp_path / "err.txt"
    cmd = " ".join(f"'{a}'" for a in charlm_exe()) + (
        f" sample -c '{tiny_run / 'best.pt'}' -n 1000000 --random-seed 1 2>'{err}'"
        " | head -1; echo \"status=${PIPESTATUS[0]}\""
    )
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert "status=0" in proc.stdout, proc.stdout
    assert err.read_text() == ""  # no BrokenPipeError, no "Exception ignored"


def test_ctrl_c_while_sampling_exits_quietly(tiny_run):
    proc = subprocess.Popen(
        [*charlm_exe(), "sample", "-c", str(tiny_run / "best.pt"), "-n", "10000000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        # A shell may start background jobs with SIGINT ignored; Python then never raises
        # KeyboardInterrupt. Ctrl-C at a terminal is the default disposition.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert len(proc.stdout.read(20)) == 20  # it is generating
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert b"Traceback" not in err and len(err.decode().strip().splitlines()) <= 1


# -------------------------------------------------------------------- numerical faults
# AdamW's decoupled weight decay multiplies the weights by 1 - lr * weight_decay = -99 per
# step: they overflow float32 within about twenty steps, a real divergence.
DIVERGE = ("--lr", "10", "--set", "train.weight_decay=10", "--set", "train.warmup_steps=0",
           "--set", "train.grad_clip=0", "--eval-every", "5", "--max-steps", "60")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(text_file, tmp_path):
    run = tmp_path / "run"
    proc = run_charlm("train", text_file, *TINY, "--out", run, *DIVERGE)
    line = clean_error(proc, "NaN or infinite", "kept the last good checkpoint", "--lr",
                       "grad_clip", "on_nan=skip")
    nan_step = int(line.split("at step ")[1].split(";")[0])
    ckpt = finite_checkpoint(run / "last.pt")
    assert 0 < ckpt["train_state"]["step"] < nan_step
    assert math.isfinite(ckpt["train_state"]["best_val_loss"])
    finite_checkpoint(run / "best.pt")
    assert not leftovers(run)
    # Skipping cannot rescue weights that have overflowed: it stops the same way and says so.
    clean_error(run_cli("train", text_file, *TINY, "--out", tmp_path / "skip", *DIVERGE,
                        "--set", "train.on_nan=skip"), "skipping cannot help")
    finite_checkpoint(tmp_path / "skip" / "last.pt")


def _poison_steps(monkeypatch, steps: set[int]):
    """Make the training forward pass return NaN logits at the given (1-based) calls."""
    import charlm.training.setup
    from charlm.model.network import build_model as real_build

    calls = {"n": 0}

    def build(vocab_size, cfg):
        model = real_build(vocab_size, cfg)
        forward = model.forward

        def poisoned(ids, state=None):
            logits, state = forward(ids, state)
            if model.training:
                calls["n"] += 1
                if calls["n"] in steps:
                    logits = logits * float("nan")
            return logits, state

        model.forward = poisoned
        return model

    monkeypatch.setattr(charlm.training.setup, "build_model", build)


def _tiny_cfg(**train) -> Config:
    cfg = load_toml(TINY_CONFIG)
    cfg.train.sample_chars = 0
    cfg.train.threads = 1
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def test_on_nan_skip_drops_the_bad_steps_and_goes_on(text_file, tmp_path, monkeypatch):
    from charlm.training.setup import train

    _poison_steps(monkeypatch, {6, 7})
    with pytest.raises(CharlmError, match="NaN or infinite at step 6.*on_nan=skip"):
        train(text_file, _tiny_cfg(max_steps=20, eval_every=5), out_dir=tmp_path / "stop",
              progress=False)
    assert checkpoint.load(tmp_path / "stop" / "last.pt")["train_state"]["step"] == 5

    _poison_steps(monkeypatch, {6, 7})
    result = train(text_file, _tiny_cfg(max_steps=20, eval_every=5, on_nan="skip"),
                   out_dir=tmp_path / "skip", progress=False)
    assert result.stopped == "max_steps" and result.step == 20
    assert any("skipped 2 step(s)" in note for note in result.notes)
    assert math.isfinite(result.train_loss) and math.isfinite(result.val_loss)
    assert finite_checkpoint(tmp_path / "skip" / "last.pt")["train_state"]["step"] == 20


def test_exploding_gradients_are_clipped_and_the_norm_is_logged(text_file, tmp_path,
                                                                 monkeypatch):
    import charlm.training.setup

    clip = 0.01  # far below a normal gradient norm, so every step is clipped
    applied: list[float] = []
    real_make = charlm.training.setup.make_optimizer

    def make(model, cfg, device):
        opt = real_make(model, cfg, device)

        def record(optimizer, args, kwargs):
            grads = [p.grad for g in optimizer.param_groups for p in g["params"]
                     if p.grad is not None]
            applied.append(float(torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

        opt.register_step_pre_hook(record)
        return opt

    monkeypatch.setattr(charlm.training.setup, "make_optimizer", make)
    cfg = _tiny_cfg(max_steps=12, eval_every=12, log_every=3, grad_clip=clip)
    charlm.training.setup.train(text_file, cfg, out_dir=tmp_path / "run", progress=False)
    logged = [r["grad_norm"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
              if r["kind"] == "train"]
    assert len(logged) == 4 and all(math.isfinite(g) for g in logged)
    assert min(logged) > clip  # the norm before clipping is what is logged
    assert len(applied) == 12 and max(applied) <= clip * (1 + 1e-4)  # ...and what was applied
