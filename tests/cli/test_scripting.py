"""Scripts and pipes: ``charlm --version``, ``--json`` on runs, info, eval and bench (one JSON
document on stdout), and tables that never break a run name or a path across lines."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from importlib.metadata import version

import pytest
from conftest import TINY_CONFIG, charlm_exe, run_charlm

from charlm.evaluate import evaluate_file
from charlm.runs.directory import list_runs
from charlm.storage import checkpoint

LONG_NAME = "tinyshakespeare-gru-with-a-name-much-longer-than-an-eighty-column-table-allows"


@pytest.fixture(scope="module")
def runs_root(tiny_run, tmp_path_factory):
    """The shared tiny run under a long name and a short one."""
    root = tmp_path_factory.mktemp("scripting") / "runs"
    for name in (LONG_NAME, "short"):
        shutil.copytree(tiny_run, root / name, ignore=shutil.ignore_patterns(".lock"))
    return root


def test_version():
    proc = run_charlm("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"charlm {version('charlm')}\n"


@pytest.mark.parametrize("columns", ["80", "40"])
def test_runs_table_never_breaks_a_name(runs_root, columns):
    # The pipe, as a user types it: a narrow COLUMNS, output through grep.
    command = f"{' '.join(charlm_exe())} runs {runs_root} | grep {LONG_NAME}"
    proc = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": columns})
    assert proc.returncode == 0, proc.stdout + proc.stderr  # grep found the whole name
    (line,) = proc.stdout.splitlines()
    assert line.split()[:2] == [LONG_NAME, "lstm"]  # the rest of the row is on the same line


def test_info_table_never_breaks_a_path(tiny_run, tmp_path):
    deep = tmp_path / ("a-folder-with-a-long-name-" * 4) / "best.pt"
    deep.parent.mkdir()
    shutil.copy(tiny_run / "best.pt", deep)
    proc = run_charlm("info", deep, env={"COLUMNS": "50"})
    assert proc.returncode == 0, proc.stderr
    assert any(str(deep) in line for line in proc.stdout.splitlines()), proc.stdout


def test_runs_json(runs_root):
    proc = run_charlm("runs", runs_root, "--json", env={"COLUMNS": "40"})
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # the whole of stdout is one document
    assert doc["directory"] == str(runs_root)
    expected = list_runs(runs_root)
    assert [r["name"] for r in doc["runs"]] == [r.name for r in expected]
    for got, want in zip(doc["runs"], expected, strict=True):
        assert got["path"] == str(want.path)
        assert (got["cell"], got["hidden_size"], got["num_layers"]) == ("lstm", 32, 1)
        assert got["steps"] == want.steps and got["best_val_loss"] == want.best_val_loss
        assert got["best_val_bpc"] == pytest.approx(want.best_val_loss / math.log(2))
        assert got["chars_per_sec"] == pytest.approx(want.chars_seen / want.elapsed)
        assert got["modified"].endswith("+00:00")
    empty = run_charlm("runs", runs_root / LONG_NAME / "nothing-here", "--json")
    assert empty.returncode != 0 and empty.stdout == ""  # errors stay on stderr


def test_info_json(tiny_run):
    proc = run_charlm("info", tiny_run / "best.pt", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    ckpt = checkpoint.load(tiny_run / "best.pt")
    ts = ckpt["train_state"]
    assert doc["checkpoint"] == str(tiny_run / "best.pt")
    assert (doc["cell"], doc["hidden_size"], doc["vocab_size"]) == ("lstm", 32, len(ckpt["vocab"]))
    assert doc["steps"] == ts["step"] and doc["best_val_loss"] == ts["best_val_loss"]
    assert doc["parameters"] == sum(t.numel() for t in ckpt["model"].values())
    assert doc["train_file"]["sha256"] == ckpt["train_file"]["sha256"]
    assert doc["config"] == ckpt["config"]


def test_eval_json(tiny_run, text_file):
    proc = run_charlm("eval", tiny_run / "best.pt", text_file, "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    r = evaluate_file(tiny_run / "best.pt", text_file, device="cpu")
    assert doc == {"checkpoint": str(tiny_run / "best.pt"), "file": str(text_file),
                   "loss": r.loss, "bits_per_char": r.bpc, "perplexity": r.perplexity,
                   "chars": r.chars, "unknown": 0, "unknown_mode": "drop", "unknown_bits": None}


def test_bench_json():
    proc = run_charlm("bench", "--config", TINY_CONFIG, "--device", "cpu", "--precision", "fp32",
                      "--set", "train.threads=1", "--steps", "2", "--sample-length", "10",
                      "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert (doc["device"], doc["precision"], doc["threads"]) == ("cpu", "fp32", 1)
    assert doc["model"]["cell"] == "lstm" and (doc["batch_size"], doc["seq_len"]) == (8, 16)
    for key in ("train_chars_per_sec", "sample_one_chars_per_sec", "sample_batch_chars_per_sec",
                "matmul_gflops", "model_gflops"):
        assert doc[key] > 0, key
    assert doc["peak_fraction"] == pytest.approx(doc["model_gflops"] / doc["matmul_gflops"])
