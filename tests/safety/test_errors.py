"""Issue 30, errors: each internal error or wrong message becomes a one-line error naming the
real cause, with exit 2 for bad options and arguments in every command and 1 otherwise;
`charlm runs` and `plot` skip a bad metrics line or an unreadable run with a warning and show
the rest; the Python API checks types as well as ranges.

Most cases run in-process (``run_cli``) for speed; a representative few run the real command.
Tests run as root, where ``chmod 000`` denies nothing: permission denied is simulated by
making the operating system calls raise the PermissionError that a real denial raises.
"""

from __future__ import annotations

import builtins
import errno
import json
import math
import os
import pathlib
import shutil
from pathlib import Path

import pytest
from conftest import TINY_CONFIG, assert_clean_error, run_charlm, run_cli

LONG = "x" * 300  # one path component longer than any file system allows (255)


def _copy_run(tiny_run: Path, dest: Path) -> Path:
    shutil.copytree(tiny_run, dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


# ------------------------------------------------------- 1. float options that become counts
@pytest.mark.parametrize("epochs", [1e308, 1.7976931348623157e308, 1e300])
def test_pacer_plans_a_huge_epoch_limit(epochs):
    from charlm.training.pacing import Pacer

    pacer = Pacer(0, 0, 0, 0.0, epochs, steps_per_epoch=26)
    assert pacer.planned_steps >= 2**62
    assert pacer.due(1, 0.1) is not None
    assert Pacer(0, 0, 40, 0.0, epochs, 26).planned_steps == 40  # the nearer limit wins


def test_train_with_max_epochs_1e308(text_file, tmp_path, one_thread):
    proc = run_charlm("train", text_file, "--config", TINY_CONFIG, "--out", tmp_path / "run",
                      "--no-progress", "--max-steps", "2", "--max-epochs", "1e308",
                      "--precision", "fp32", env={"CHARLM_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert "internal error" not in proc.stderr
    assert (tmp_path / "run" / "last.pt").is_file()


# ------------------------------------------------------------- 2. bad lines of metrics.jsonl
BAD_LINES = {
    "deeply nested": b"[" * 100_000 + b"]" * 100_000,
    "NaN count": b'{"kind": "train", "step": 1, "chars": NaN, "elapsed": 1, "loss": 1}',
    "1e308 seconds": b'{"kind": "eval", "step": 3, "chars": 5, "elapsed": 1e308, "val_loss": 1}',
    "1e308 loss": b'{"kind": "eval", "step": 3, "chars": 5, "elapsed": 1, "val_loss": 1e308}',
    "1e308 count": b'{"kind": "train", "step": 1e308, "chars": 1e308, "elapsed": 1, "loss": 1}',
    "Infinity": b'{"kind": "train", "step": 2, "chars": 9, "elapsed": Infinity, "loss": 1}',
    "not an object": b"[1, 2, 3]",
    "a string": b'"eval"',
    "step not a number": b'{"kind": "train", "step": "x", "chars": 5, "elapsed": 1, "loss": 1}',
    "invalid UTF-8": b'{"kind": "train\xff", "step": 1, "chars": 5, "elapsed": 1, "loss": 1}',
    "not JSON": b"{kind: train",
}


@pytest.fixture
def two_runs(tiny_run, tmp_path) -> Path:
    root = tmp_path / "runs"
    root.mkdir()
    _copy_run(tiny_run, root / "good")
    _copy_run(tiny_run, root / "bad")
    return root


@pytest.mark.parametrize("line", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_runs_and_plot_skip_a_bad_metrics_line(line, two_runs, tmp_path):
    bad = two_runs / "bad" / "metrics.jsonl"
    good_lines = bad.read_bytes()
    with open(bad, "ab") as f:
        f.write(line + b"\n")
    listed = run_cli("runs", two_runs)
    assert listed.returncode == 0, listed.stderr
    assert "internal error" not in listed.stderr and "error:" not in listed.stderr
    assert "good" in listed.stdout and "bad" in listed.stdout
    warned = _warnings(listed.stderr)
    assert len(warned) == 1 and "1 bad line" in warned[0] and "metrics.jsonl" in warned[0], warned
    # The bad run reads as the good one: the bad line changes none of its numbers.
    as_json = json.loads(run_cli("runs", two_runs, "--json").stdout)["runs"]
    numbers = {r["name"]: (r["steps"], r["chars_seen"], r["elapsed"], r["best_val_loss"])
               for r in as_json}
    assert numbers["bad"] == numbers["good"]

    plotted = run_cli("plot", two_runs / "good", two_runs / "bad", "-o", tmp_path / "loss.png")
    assert plotted.returncode == 0, plotted.stderr
    assert "2 runs" in plotted.stdout
    assert len(_warnings(plotted.stderr)) == 1, plotted.stderr
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert bad.read_bytes() == good_lines + line + b"\n"  # reading never rewrites it


def test_many_bad_lines_give_one_warning_per_file(two_runs):
    with open(two_runs / "bad" / "metrics.jsonl", "ab") as f:
        for line in BAD_LINES.values():
            f.write(line + b"\n")
    proc = run_cli("runs", two_runs)
    assert proc.returncode == 0, proc.stderr
    warned = _warnings(proc.stderr)
    assert len(warned) == 1 and f"{len(BAD_LINES)} bad lines" in warned[0], warned


def test_a_torn_last_line_is_skipped_quietly(two_runs):
    with open(two_runs / "bad" / "metrics.jsonl", "ab") as f:
        f.write(b'{"kind": "train", "st')  # being written by a running training
    proc = run_cli("runs", two_runs)
    assert proc.returncode == 0 and not _warnings(proc.stderr), proc.stderr


def test_resume_over_bad_metrics_lines(tiny_run, tmp_path, one_thread):
    run = _copy_run(tiny_run, tmp_path / "run")
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(BAD_LINES["deeply nested"] + b"\n" + BAD_LINES["step not a number"] + b"\n")
    proc = run_cli("train", "--resume", run, "--max-steps", "42", "--no-progress",
                   "--no-samples")
    assert proc.returncode == 0, proc.stderr
    assert "2 bad lines" in proc.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 42  # the rewritten file holds only good lines


# ------------------------------------------------------------------ 3. a path too long
def _long_cases(tiny_run: Path, text: Path, tmp: Path) -> dict[str, tuple]:
    long = tmp / LONG
    return {
        "info": ("info", long),
        "info in a run": ("info", tiny_run / LONG),
        "sample": ("sample", "-c", long, "-n", "5"),
        "eval checkpoint": ("eval", long, text),
        "eval text": ("eval", tiny_run, long),
        "export": ("export", long, "--format", "safetensors"),
        "plot": ("plot", long),
        "runs": ("runs", long),
        "train file": ("train", long, "--config", TINY_CONFIG, "--out", tmp / "o", "--dry-run"),
        "train config": ("train", text, "--config", long, "--out", tmp / "o", "--dry-run"),
        "train resume": ("train", "--resume", long),
        "train init-from": ("train", text, "--init-from", long, "--out", tmp / "o"),
        "bench config": ("bench", "--config", long),
    }


LONG_CASES = ["info", "info in a run", "sample", "eval checkpoint", "eval text", "export",
              "plot", "runs", "train file", "train config", "train resume", "train init-from",
              "bench config"]


@pytest.mark.parametrize("case", LONG_CASES)
def test_a_path_too_long_is_named(case, tiny_run, text_file, tmp_path):
    proc = run_cli(*_long_cases(tiny_run, text_file, tmp_path)[case])
    assert_clean_error(proc, "file name too long")
    assert "internal error" not in proc.stderr
    assert proc.returncode == 2


def test_a_path_too_long_by_the_real_command(tmp_path):
    proc = run_charlm("info", tmp_path / LONG)
    assert_clean_error(proc, "file name too long: ", "use a shorter path")
    assert proc.returncode == 2


def test_train_out_too_long_is_a_bad_argument(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world\n" * 200)
    proc = run_charlm("train", text, "--out", tmp_path / LONG, "--max-steps", "1")
    assert_clean_error(proc, "cannot be used: File name too long")
    assert proc.returncode == 2


# ------------------------------------------ 4. an unsearchable directory, an unreadable run
def _deny(monkeypatch, denied: Path, files_too: bool = True) -> None:
    """What the OS does for a directory of mode 000 (to anyone but root): the directory
    itself can be stat'ed, nothing inside it can, and it cannot be listed."""
    denied = str(denied)
    real_stat, real_listdir, real_scandir = pathlib.Path.stat, os.listdir, os.scandir

    def refuse(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def stat(self, *args, **kwargs):
        if files_too and str(self).startswith(denied + os.sep):
            refuse(self)
        return real_stat(self, *args, **kwargs)

    def listdir(path="."):
        if str(path) == denied:
            refuse(path)
        return real_listdir(path)

    def scandir(path="."):
        if str(path) == denied:
            refuse(path)
        return real_scandir(path)

    monkeypatch.setattr(pathlib.Path, "stat", stat)
    monkeypatch.setattr(os, "listdir", listdir)
    monkeypatch.setattr(os, "scandir", scandir)


def test_runs_skips_an_unsearchable_directory(two_runs, monkeypatch):
    _copy_run(two_runs / "good", two_runs / "locked")
    _deny(monkeypatch, two_runs / "locked")
    proc = run_cli("runs", two_runs)
    assert proc.returncode == 0, proc.stderr
    assert "good" in proc.stdout and "bad" in proc.stdout and "locked" not in proc.stdout
    warned = _warnings(proc.stderr)
    assert len(warned) == 1 and "locked" in warned[0] and "Permission denied" in warned[0]


def test_runs_warns_about_an_unreadable_metrics_file(two_runs, monkeypatch):
    target = str(two_runs / "bad" / "metrics.jsonl")
    real_open = builtins.open

    def open_(file, *args, **kwargs):
        if str(file) == target:
            raise PermissionError(errno.EACCES, "Permission denied", target)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    proc = run_cli("runs", two_runs)
    assert proc.returncode == 0, proc.stderr
    assert "good" in proc.stdout and "bad" in proc.stdout  # its checkpoint still describes it
    warned = _warnings(proc.stderr)
    assert len(warned) == 1 and "cannot read" in warned[0] and "Permission denied" in warned[0]


# ------------------------------------------------------- 5. a checkpoint that may not be read
@pytest.mark.parametrize("command", ["info", "sample", "eval", "export", "init-from"])
def test_an_unreadable_checkpoint_is_permission_denied(command, tiny_run, text_file, tmp_path,
                                                       monkeypatch):
    ckpt = tmp_path / "model.pt"
    shutil.copyfile(tiny_run / "best.pt", ckpt)
    real_open = builtins.open

    def open_(file, *args, **kwargs):  # mode 000, as a non-root user meets it
        if str(file) == str(ckpt):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    args = {"info": ("info", ckpt), "sample": ("sample", "-c", ckpt, "-n", "5"),
            "eval": ("eval", ckpt, text_file), "export": ("export", ckpt, "-f", "safetensors"),
            "init-from": ("train", text_file, "--init-from", ckpt, "--out", tmp_path / "o",
                          "--config", TINY_CONFIG, "--dry-run")}[command]
    proc = run_cli(*args)
    assert_clean_error(proc, f"permission denied: {ckpt}")
    assert "damaged" not in proc.stderr and "truncated" not in proc.stderr
    assert proc.returncode == 1


# ------------------------------------- 6 and 8. choices and ranges: exit 2 in every command
def _usage_cases(tiny_run: Path, text: Path, tmp: Path) -> dict[str, tuple[tuple, str]]:
    out = ("--out", tmp / "o")
    return {
        "eval --precision": (("eval", tiny_run, text, "--precision", "bogus"), "fp32"),
        "eval --unknown": (("eval", tiny_run, text, "--unknown", "bogus"), "charge"),
        "eval --encoding": (("eval", tiny_run, text, "--encoding", "bogus"), "utf-8"),
        "eval --device": (("eval", tiny_run, text, "--device", "bogus"), "cpu"),
        "export --format": (("export", tiny_run, "-f", "bogus"), "safetensors, onnx"),
        "export --output suffix": (("export", tiny_run, "-f", "onnx", "-o", tmp / "m.bin"),
                                   ".onnx"),
        "plot --width": (("plot", tiny_run, "--width", "5"), "[100, 10000]"),
        "plot --height": (("plot", tiny_run, "--height", "20000"), "[100, 10000]"),
        "plot --output suffix": (("plot", tiny_run, "-o", tmp / "loss.gif"), ".png"),
        "sample -n": (("sample", "-c", tiny_run, "-n", "-1"), "--length"),
        "sample -t": (("sample", "-c", tiny_run, "-t", "200"), "--temperature"),
        "sample -t text": (("sample", "-c", tiny_run, "-t", "warm"), "--temperature"),
        "sample --top-k": (("sample", "-c", tiny_run, "--top-k", "-1"), "--top-k"),
        "sample --top-p": (("sample", "-c", tiny_run, "--top-p", "0"), "--top-p"),
        "sample --num-samples": (("sample", "-c", tiny_run, "--num-samples", "0"),
                                 "--num-samples"),
        "sample --beam": (("sample", "-c", tiny_run, "--beam", "5000"), "--beam"),
        "sample --random-seed": (("sample", "-c", tiny_run, "--random-seed", "-1"),
                                 "--random-seed"),
        "sample --stop empty": (("sample", "-c", tiny_run, "--stop", ""), "--stop"),
        "sample --beam -t": (("sample", "-c", tiny_run, "--beam", "2", "-t", "0.5"), "--beam"),
        "sample --keep-state": (("sample", "-c", tiny_run, "--keep-state"), "--keep-state"),
        "sample --device": (("sample", "-c", tiny_run, "--device", "bogus"), "cpu"),
        "train --precision": (("train", text, "--precision", "bogus", *out, "--dry-run"), "fp32"),
        "train --cell": (("train", text, "--cell", "bogus", *out, "--dry-run"), "gru"),
        "train --max-time": (("train", text, "--max-time", "-1", *out, "--dry-run"), "max_time"),
        "train --stop-at-step": (("train", text, "--config", TINY_CONFIG, "--stop-at-step", "-1",
                                  *out, "--dry-run"), "--stop-at-step"),
        "train --resume --init-from": (("train", text, "--resume", tiny_run, "--init-from",
                                        tiny_run, *out), "--init-from"),
        "train --no-samples": (("train", text, "--no-samples", "--sample-every", "5", *out,
                                "--dry-run"), "--sample-every"),
        "bench --precision": (("bench", "--precision", "bogus"), "fp32"),
        "bench --steps": (("bench", "--steps", "1"), "--steps"),
    }


USAGE_CASES = list(_usage_cases(Path("r"), Path("t"), Path("o")))


@pytest.mark.parametrize("case", USAGE_CASES)
def test_bad_options_exit_2(case, tiny_run, text_file, tmp_path):
    args, needle = _usage_cases(tiny_run, text_file, tmp_path)[case]
    proc = run_cli(*args)
    assert_clean_error(proc, needle)
    assert "internal error" not in proc.stderr
    assert proc.returncode == 2, proc.stderr


def test_eval_precision_bogus_by_the_real_command(tiny_run, text_file):
    proc = run_charlm("eval", tiny_run, text_file, "--precision", "bogus")
    assert_clean_error(proc, "--precision must be one of auto, fp32, bf16, fp16")
    assert proc.returncode == 2


# ------------------------------------------------------------- 7. the Python API's types
@pytest.fixture(scope="module")
def model(tiny_run):
    import charlm

    return charlm.load(tiny_run / "best.pt")


GENERATE_TYPES = [
    ("length", 1.5), ("length", "5"), ("length", True), ("length", None),
    ("temperature", "0.5"), ("temperature", True), ("temperature", None),
    ("temperature", [0.5, "1"]), ("top_k", True), ("top_k", 1.5), ("top_k", "3"),
    ("top_p", "0.9"), ("top_p", True), ("top_p", None), ("num_samples", 2.0),
    ("num_samples", True), ("num_samples", "2"), ("random_seed", 1.0), ("random_seed", True),
    ("random_seed", "1"), ("seed", 5), ("seed", b"First"), ("seed", None),
    ("drop_unknown", "yes"), ("drop_unknown", None), ("include_seed", None),
    ("include_seed", 1), ("on_step", 5), ("stop", "ab"), ("stop", [1]), ("stop", 5),
    ("beam", 1.5), ("beam", True),
]


@pytest.mark.parametrize(("name", "value"), GENERATE_TYPES,
                         ids=[f"{n}={v!r}" for n, v in GENERATE_TYPES])
def test_generate_checks_types(model, name, value):
    from charlm.errors import CharlmError

    kwargs = {"length": 5, "random_seed": 1, name: value}
    with pytest.raises(TypeError) as caught:
        model.generate(**kwargs)
    assert isinstance(caught.value, CharlmError), repr(caught.value)
    message = str(caught.value)
    assert name in message.replace("each stop text", "stop") and "\n" not in message


@pytest.mark.parametrize(("name", "value"), [
    ("length", -1), ("length", 10**30), ("temperature", math.nan), ("temperature", math.inf),
    ("temperature", -0.5), ("top_k", -1), ("top_p", math.nan), ("top_p", 0.0),
    ("num_samples", 0), ("random_seed", -1), ("random_seed", 2**63), ("beam", 5000),
])
def test_generate_range_errors_are_config_errors(model, name, value):
    from charlm.errors import ConfigError

    with pytest.raises(ConfigError):
        model.generate(**{"length": 5, "random_seed": 1, name: value})


def test_generate_accepts_numpy_numbers(model):
    import numpy as np

    texts = model.generate("First", length=np.int64(5), temperature=np.float32(0.5),
                           top_k=np.int32(3), random_seed=np.int64(1))
    assert texts == model.generate("First", length=5, temperature=0.5, top_k=3, random_seed=1)


@pytest.mark.parametrize(("name", "value", "kind"), [
    ("encoding", 5, TypeError), ("errors", 5, TypeError), ("precision", 5, TypeError),
    ("unknown", None, TypeError), ("on_progress", 5, TypeError),
    ("precision", "bogus", None), ("unknown", "bogus", None), ("errors", "bogus", None),
    ("encoding", "rot13", None),
])
def test_evaluate_checks_types_and_choices(model, name, value, kind):
    from charlm.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        model.evaluate("First Citizen: hear me speak", **{name: value})
    if kind is not None:
        assert isinstance(caught.value, kind)
    assert name in str(caught.value)


@pytest.mark.parametrize("args", [(5,), (None,), ("{ckpt}", 5), ("{ckpt}", None)])
def test_load_checks_types(tiny_run, args):
    import charlm
    from charlm.errors import CharlmError

    args = tuple(str(tiny_run / "best.pt") if a == "{ckpt}" else a for a in args)
    with pytest.raises(TypeError) as caught:
        charlm.load(*args)
    assert isinstance(caught.value, CharlmError)
    assert ("device" if len(args) == 2 else "path") in str(caught.value)


# -------------------------------------------------------------------- 9. a CRLF seed file
def test_a_crlf_seed_file_is_read_as_training_text_was(tiny_run, tmp_path):
    crlf, lf = tmp_path / "crlf.txt", tmp_path / "lf.txt"
    crlf.write_bytes(b"First Citizen:\r\nBefore we proceed\r\n")
    lf.write_bytes(b"First Citizen:\nBefore we proceed\n")
    runs = [run_cli("sample", "-c", tiny_run, "--seed-file", f, "-n", "30", "--random-seed", "3")
            for f in (crlf, lf)]
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[0].stdout == runs[1].stdout


# ------------------------------------------------------ 10. eval of empty or unknown text
def test_eval_of_an_empty_file_says_it_is_empty(tiny_run, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    proc = run_cli("eval", tiny_run, empty)
    assert_clean_error(proc, "is empty", "nothing to evaluate")
    assert "train" not in proc.stderr


def test_eval_charges_a_text_of_only_unknown_characters(tiny_run, tmp_path):
    from charlm.evaluate import UNKNOWN_BITS

    alien = tmp_path / "alien.txt"
    alien.write_text("你好世界" * 10, encoding="utf-8")
    proc = run_cli("eval", tiny_run, alien, "--unknown", "charge", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert (r["chars"], r["unknown"]) == (0, 40)
    assert r["bits_per_char"] == pytest.approx(UNKNOWN_BITS)
    assert math.isfinite(r["loss"]) and math.isfinite(r["perplexity"])

    dropped = run_cli("eval", tiny_run, alien)  # nothing left to evaluate: one line, a hint
    assert_clean_error(dropped, "no characters in the model's vocabulary", "--unknown charge")
    assert "nan" not in dropped.stderr.lower()
