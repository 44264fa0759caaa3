"""Watching training: samples at evaluations (--sample-every, --no-samples), early stopping
(--patience), numbered checkpoints (--keep-last) and the loss curve printed at the end."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import TINY_CONFIG, run_charlm

from charlm.config import load_toml
from charlm.runs.directory import read_metrics
from charlm.sampling.sampler import generate
from charlm.storage import checkpoint
from charlm.training.setup import train

# Tiny models train fastest on one thread, and the test machine may be busy.
ONE_THREAD = ("--set", "train.threads=1")
SAMPLE_HEADER = re.compile(r"^--- sample at step (\d+) \(val [0-9.]+\) ---$", re.M)


@pytest.fixture(autouse=True)
def restore_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def tiny(**train_fields):
    cfg = load_toml(TINY_CONFIG)
    cfg.train.threads, cfg.train.device, cfg.train.precision = 1, "cpu", "fp32"
    for key, value in train_fields.items():
        setattr(cfg.train, key, value)
    return cfg


def sample_steps(output: str) -> list[int]:
    return [int(s) for s in SAMPLE_HEADER.findall(output)]


def test_command_samples_every_n_steps_keeps_last_k_and_draws_the_curve(text_file, tmp_path):
    run = tmp_path / "run"
    proc = run_charlm("train", text_file, "--config", TINY_CONFIG, "--out", run, "--no-progress",
                      "--max-steps", 40, "--eval-every", 10, "--sample-every", 20,
                      "--keep-last", 2, *ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    # Evaluations at 10, 20, 30, 40; samples only at the multiples of 20.
    assert sample_steps(proc.stdout) == [20, 40], proc.stdout
    evals = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals == [10, 20, 30, 40]
    # Each sample starts from the first characters of the training text.
    bodies = [b.split("\n---")[0] for b in SAMPLE_HEADER.split(proc.stdout)[2::2]]
    assert len(bodies) == 2 and all(b.lstrip("\n").startswith("First Ci") for b in bodies)

    step_files = sorted(p.name for p in run.glob("step-*.pt"))
    assert step_files == ["step-00000030.pt", "step-00000040.pt"]
    assert (run / "best.pt").is_file() and (run / "last.pt").is_file()

    # The terminal loss curve follows the summary table.
    err = proc.stderr
    assert "bits/char" in err and "train" in err and "validation" in err
    assert err.index("bits/char") > err.index("val loss (best)")
    assert re.search(r"0 +5,120 characters", err), err
    grid = [line for line in err.splitlines() if re.match(r"^ +([0-9.]+ ┤|│)", line)]
    assert len(grid) == 8 and "●" in "".join(grid) and "•" in "".join(grid)


def test_command_no_samples_and_patience_stops_early(text_file, tmp_path):
    run = tmp_path / "run"
    # A learning rate too small to move fp32 weights: the validation loss never improves.
    proc = run_charlm("train", text_file, "--config", TINY_CONFIG, "--out", run, "--no-progress",
                      "--no-samples", "--patience", 2, "--lr", "1e-10", "--max-steps", 200,
                      "--eval-every", 5, *ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    assert "--- sample" not in proc.stdout + proc.stderr
    assert "early stopping: no new best in 2 evaluations" in proc.stderr
    assert re.search(r"stopped by\s*│\s*patience", proc.stderr), proc.stderr
    evals = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval"]
    # Stopped at the first evaluation that made two in a row without a new best.
    assert [e["step"] for e in evals] == [5, 10, 15]
    assert [e["best"] for e in evals] == [True, False, False]
    assert checkpoint.load(run / "last.pt")["train_state"]["step"] == 15


def test_samples_at_every_evaluation_by_default(text_file, tmp_path, capsys):
    result = train(text_file, tiny(max_steps=30, eval_every=10), out_dir=tmp_path / "r",
                   progress=False)
    assert result.stopped == "max_steps"
    assert sample_steps(capsys.readouterr().out) == [10, 20, 30]


def test_sample_every_not_a_multiple_samples_at_the_next_evaluation(text_file, tmp_path, capsys):
    train(text_file, tiny(max_steps=60, eval_every=10, sample_every=25), out_dir=tmp_path / "r",
          progress=False)
    # ... and at the end of the run, as every run that ends does.
    assert sample_steps(capsys.readouterr().out) == [30, 50, 60]


def test_sample_is_the_seeded_continuation_of_the_checkpoint(text_file, tmp_path, capsys):
    """The printed sample is exactly what the model at that step generates from the start of
    the training text with the run's fixed seed, so successive samples are comparable."""
    cfg = tiny(max_steps=20, eval_every=10, keep_last=2, seed=7, sample_chars=30)
    run = tmp_path / "r"
    train(text_file, cfg, out_dir=run, progress=False)
    out = capsys.readouterr().out
    ckpt = checkpoint.load(run / "step-00000010.pt")
    model, vocab = checkpoint.model_of(ckpt), checkpoint.vocab_of(ckpt)
    seed = text_file.read_text()[:8]
    expected = generate(model, vocab, vocab.encode(seed).tolist(), 30, temperature=0.8,
                        random_seed=7)[0]
    first = out.split("--- sample at step 10")[1].split("---\n", 1)[1].split("\n---")[0]
    assert first == seed + expected


def test_keep_last_one_and_patience_reported_by_the_library(text_file, tmp_path):
    cfg = tiny(max_steps=100, eval_every=5, keep_last=1, patience=1, lr=1e-10, sample_chars=0)
    result = train(text_file, cfg, out_dir=tmp_path / "r", progress=False)
    assert result.stopped == "patience" and result.step == 10
    assert result.notes == ["early stopping: no new best in 1 evaluation"]
    assert [p.name for p in (tmp_path / "r").glob("step-*.pt")] == ["step-00000010.pt"]
