"""Listing runs: records read from metrics.jsonl, config.toml and checkpoints, best validation
loss first, and the ``charlm runs`` table."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from conftest import SAMPLE_TEXT, TINY_CONFIG, assert_clean_error, run_charlm, run_cli

from charlm.config import load_toml
from charlm.runs.directory import list_runs, read_metrics, run_info
from charlm.storage import checkpoint
from charlm.training.setup import train

# name: (cell, hidden_size, num_layers, max_steps)
RUNS = {"alpha": ("lstm", 16, 1, 20), "beta": ("gru", 32, 2, 60), "gamma": ("rnn", 24, 1, 40)}


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    """Three tiny runs trained by the library, plus things that are not runs."""
    root = tmp_path_factory.mktemp("listing") / "runs"
    text = root.parent / "input.txt"
    text.write_text(SAMPLE_TEXT, encoding="utf-8")
    threads = torch.get_num_threads()
    for name, (cell, hidden, layers, steps) in RUNS.items():
        cfg = load_toml(TINY_CONFIG)
        cfg.model.cell, cfg.model.hidden_size, cfg.model.num_layers = cell, hidden, layers
        t = cfg.train
        t.max_steps, t.eval_every, t.sample_chars = steps, 10, 0
        t.threads, t.device, t.precision = 1, "cpu", "fp32"
        train(text, cfg, out_dir=root / name, progress=False)
    torch.set_num_threads(threads)
    (root / "notes").mkdir()  # a folder without run files
    (root / "README.txt").write_text("not a run\n")
    return root


def best_from_metrics(run) -> float:
    return min(r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval")


def expected_order(root) -> list[str]:
    return sorted(RUNS, key=lambda name: best_from_metrics(root / name))


def test_list_runs_sorted_by_best_validation_loss(runs_root):
    runs = list_runs(runs_root)
    order = expected_order(runs_root)
    assert len({best_from_metrics(runs_root / n) for n in RUNS}) == 3  # the order is meaningful
    assert [r.name for r in runs] == order
    for r in runs:
        cell, hidden, layers, steps = RUNS[r.name]
        assert (r.cell, r.hidden_size, r.num_layers, r.embed_size) == (cell, hidden, layers, 16)
        assert r.steps == steps and r.chars_seen == steps * 8 * 16  # tiny.toml: B=8, T=16
        ts = checkpoint.load(r.path / "last.pt")["train_state"]
        assert r.best_val_loss == pytest.approx(ts["best_val_loss"], rel=1e-12)
        assert r.best_val_bpc == pytest.approx(ts["best_val_loss"] / math.log(2))
        assert 0 < r.elapsed <= ts["elapsed"] + 1e-3
        assert r.chars_per_sec == pytest.approx(r.chars_seen / r.elapsed)
        assert r.modified >= (r.path / "metrics.jsonl").stat().st_mtime


def test_runs_command_prints_the_table_in_order(runs_root):
    proc = run_charlm("runs", runs_root)
    assert proc.returncode == 0, proc.stderr
    # The text column names the training text on the first row of its group only.
    lines = [line.split() for line in proc.stdout.splitlines() if line.split()]
    assert [line[0] for line in lines if len(line) > 1 and line[1] in RUNS] == ["input.txt"]
    rows = [line[1:] if line[0] == "input.txt" else line for line in lines]
    rows = [row for row in rows if row[0] in RUNS]
    assert [row[0] for row in rows] == expected_order(runs_root)
    header = next(line for line in proc.stdout.splitlines() if line.lstrip().startswith("text "))
    for name in ("run", "cell", "size", "steps", "val loss", "bits/char", "chars/s", "time", "date"):
        assert name in header
    for row in rows:
        cell, hidden, layers, steps = RUNS[row[0]]
        best = best_from_metrics(runs_root / row[0])
        assert row[1:6] == [cell, f"{hidden}x{layers}", str(steps), f"{best:.4f}",
                            f"{best / math.log(2):.4f}"]
    firsts = [line.split()[0] for line in proc.stdout.splitlines() if line.split()]
    assert "notes" not in firsts and "README.txt" not in firsts and len(rows) == 3


def test_a_run_directory_lists_itself(runs_root):
    assert [r.name for r in list_runs(runs_root / "alpha")] == ["alpha"]


def test_checkpoint_fills_in_without_metrics_or_config(runs_root, tmp_path):
    copy = tmp_path / "beta-copy"
    shutil.copytree(runs_root / "beta", copy)
    (copy / "metrics.jsonl").unlink()
    (copy / "config.toml").unlink()
    r = run_info(copy)
    ts = checkpoint.load(copy / "last.pt")["train_state"]
    assert (r.cell, r.hidden_size, r.num_layers, r.steps) == ("gru", 32, 2, 60)
    assert r.best_val_loss == ts["best_val_loss"] and r.elapsed == ts["elapsed"]


def test_damaged_runs_are_listed_not_fatal(runs_root, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(runs_root / "alpha", root / "alpha")
    bad = root / "broken"
    bad.mkdir()
    (bad / "config.toml").write_text("[model\ncell = ")
    (bad / "metrics.jsonl").write_bytes(b'\xff\xfe garbage\n{"kind": "train", "step": ')
    (bad / "last.pt").write_bytes(b"not a checkpoint")
    runs = list_runs(root)
    assert [r.name for r in runs] == ["alpha", "broken"]  # never evaluated: last
    assert (runs[1].cell, runs[1].steps, runs[1].best_val_loss) == (None, 0, None)
    proc = run_cli("runs", root)
    assert proc.returncode == 0, proc.stderr
    assert "broken" in proc.stdout and "alpha" in proc.stdout


def test_empty_directory_is_a_friendly_message(tmp_path):
    proc = run_cli("runs", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "no runs in" in proc.stdout and "charlm train" in proc.stdout


def test_missing_directory_is_a_clean_error(tmp_path):
    assert_clean_error(run_cli("runs", tmp_path / "nope"), "runs directory not found")
    (tmp_path / "file").write_text("x")
    assert_clean_error(run_cli("runs", tmp_path / "file"), "is not a directory")
