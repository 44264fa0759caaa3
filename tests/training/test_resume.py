"""Resuming, interrupting and fine-tuning: a stopped and resumed run is bit for bit the run
that never stopped; Ctrl-C and SIGTERM save and say how to resume; bad resumes are refused."""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    SAMPLE_TEXT,
    TINY_CONFIG,
    assert_clean_error,
    assert_same_weights,
    charlm_exe,
    run_charlm,
    run_cli,
)

from charlm.config import apply_sets, load_toml
from charlm.data.batching import Batcher, as_tensor, load_corpus, split
from charlm.runs.directory import read_metrics
from charlm.storage import checkpoint
from charlm.training.setup import train

WALL_CLOCK = ("elapsed", "chars_per_sec", "save_seconds")

# About 500 characters: with 4 streams of 16 the epochs last 6 or 7 steps, so 30 steps
# cross several epoch boundaries.
SHORT_TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak!\n" * 6

# Two layers with dropout, so the dropout masks (the torch RNG) matter to the weights.
SETS = ["model.num_layers=2", "model.dropout=0.3", "train.batch_size=4", "train.seq_len=16",
        "train.max_steps=30", "train.log_every=4", "train.eval_every=10", "train.warmup_steps=5",
        "train.sample_chars=0", "train.threads=1"]


def config(cell: str, *extra: str):
    cfg = load_toml(TINY_CONFIG)
    apply_sets(cfg, [f"model.cell={cell}", *SETS, *extra])
    return cfg


@pytest.fixture
def short_text(tmp_path) -> Path:
    path = tmp_path / "short.txt"
    path.write_text(SHORT_TEXT, encoding="utf-8")
    return path


def metric_lines(run: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK}
            for r in read_metrics(run / "metrics.jsonl")]


def assert_same_training(a: dict, b: dict) -> None:
    """Two checkpoints hold bit-identical weights, optimizer and training state."""
    assert_same_weights(a, b)
    ta, tb = a["train_state"], b["train_state"]
    for field in ("step", "epoch", "batcher", "chars_seen", "best_val_loss", "evals_since_best",
                  "loss_sum", "loss_count"):
        assert ta[field] == tb[field], field
    for sa, sb in zip(ta["carried_state"][0], tb["carried_state"][0], strict=True):
        assert torch.equal(sa, sb)
    assert torch.equal(ta["rng"][0]["torch"], tb["rng"][0]["torch"])


def one_go(text: Path, cfg, out: Path) -> dict:
    result = train(text, cfg, out_dir=out, progress=False)
    assert result.step == cfg.train.max_steps
    return checkpoint.load(out / "last.pt")


# ------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize(("cell", "stops"), [
    ("lstm", [13]),  # mid-epoch, between log lines (13 % 4) and evaluations
    ("gru", [6, 10]),  # two pauses, the second at an evaluation
])
def test_stop_and_resume_is_bit_identical(tmp_path, short_text, cell, stops):
    reference = one_go(short_text, config(cell), tmp_path / "one-go")

    run = tmp_path / "paused"
    result = train(short_text, config(cell), out_dir=run, stop_at_step=stops[0], progress=False)
    assert (result.step, result.stopped) == (stops[0], "stop_at_step")
    for stop in [*stops[1:], 0]:
        paused = checkpoint.load(run / "last.pt")
        ts = paused["train_state"]
        if stop == 0:
            # Paused inside an epoch, and the rest of the run crosses an epoch boundary.
            assert 0 < ts["batcher"]["index"] and ts["epoch"] % 1 != 0
            assert int(ts["epoch"]) < int(reference["train_state"]["epoch"])
            # The loss accumulators carry a partial log interval across the pause.
            assert (ts["loss_count"] > 0) == (ts["step"] % 4 != 0)
        result = train(short_text, config(cell), out_dir=run, resume=paused,
                       stop_at_step=stop, progress=False)
        assert result.step == (stop or 30)

    assert_same_training(reference, checkpoint.load(run / "last.pt"))
    assert metric_lines(run) == metric_lines(tmp_path / "one-go")
    assert any(r["kind"] == "eval" for r in metric_lines(run))


def test_exactness_needs_the_restored_random_state(tmp_path, short_text, monkeypatch):
    """With the dropout RNG not restored, the resumed run differs: the test above can fail."""
    reference = one_go(short_text, config("lstm"), tmp_path / "one-go")
    run = tmp_path / "paused"
    train(short_text, config("lstm"), out_dir=run, stop_at_step=13, progress=False)
    monkeypatch.setattr("charlm.training.state.set_rng_state", lambda state: None)
    train(short_text, config("lstm"), out_dir=run, resume=checkpoint.load(run / "last.pt"),
          progress=False)
    resumed = checkpoint.load(run / "last.pt")
    assert not all(torch.equal(reference["model"][k], resumed["model"][k]) for k in resumed["model"])


def test_resume_from_an_earlier_checkpoint_rewrites_the_later_metrics(tmp_path, short_text):
    reference = one_go(short_text, config("gru"), tmp_path / "one-go")
    run = tmp_path / "run"
    train(short_text, config("gru", "train.keep_last=5"), out_dir=run, stop_at_step=22,
          progress=False)
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) == 20
    older = checkpoint.load(run / "step-00000010.pt")
    train(short_text, config("gru"), out_dir=run, resume=older, progress=False)
    assert_same_training(reference, checkpoint.load(run / "last.pt"))
    assert metric_lines(run) == metric_lines(tmp_path / "one-go")


def test_resume_accumulates_wall_time_and_keeps_the_config(tmp_path, short_text):
    run = tmp_path / "run"
    train(short_text, config("lstm"), out_dir=run, stop_at_step=12, progress=False)
    first = checkpoint.load(run / "last.pt")["train_state"]["elapsed"]
    config_text = (run / "config.toml").read_text()
    result = train(short_text, config("lstm"), out_dir=run,
                   resume=checkpoint.load(run / "last.pt"), progress=False)
    final = checkpoint.load(run / "last.pt")["train_state"]["elapsed"]
    assert first < final <= result.elapsed
    assert (run / "config.toml").read_text() == config_text
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [4, 8, 12, 16, 20, 24, 28, 30]  # and a record of the last steps at the end
    # A longer run: the new limit is recorded in the run's config and checkpoint.
    proc = run_cli("train", "--resume", run, "--max-steps", "34", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "max_steps = 34" in (run / "config.toml").read_text()
    resumed = checkpoint.load(run / "last.pt")
    assert resumed["train_state"]["step"] == 34
    assert resumed["config"]["train"]["max_steps"] == 34
    info = run_cli("info", run / "last.pt")
    assert info.returncode == 0, info.stderr
    assert re.search(r"steps\s*│\s*34\s", info.stdout), info.stdout
    assert re.search(rf"training time\s*│\s*{resumed['train_state']['elapsed']:,.1f} s", info.stdout)


def test_the_real_command_pauses_and_resumes_exactly(tmp_path, short_text):
    """`charlm train --stop-at-step`, then the real `charlm train --resume RUN_DIR` (no file
    given: the run's own file is used), matches a run that never stopped."""
    cfg = config("lstm")
    reference = one_go(short_text, cfg, tmp_path / "one-go")
    run = tmp_path / "run"
    sets = [x for s in SETS for x in ("--set", s)]
    proc = run_cli("train", short_text, "--config", TINY_CONFIG, "--cell", "lstm", *sets,
                   "--out", run, "--stop-at-step", "9", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert checkpoint.load(run / "last.pt")["train_state"]["step"] == 9
    proc = run_charlm("train", "--resume", run, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert_same_training(reference, checkpoint.load(run / "last.pt"))
    assert metric_lines(run) == metric_lines(tmp_path / "one-go")


# ---------------------------------------------------------------------------- interruption
def _start_training(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    text = tmp_path / "input.txt"
    text.write_text(SAMPLE_TEXT, encoding="utf-8")
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(
        [*charlm_exe(), "train", str(text), "--config", str(TINY_CONFIG), "--out", str(run),
         "--max-steps", "1000000", "--no-progress", "--no-samples",
         "--set", "train.log_every=1", "--set", "train.threads=1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    return proc, run


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"training ended early: {proc.communicate()[1]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("training did not start in time")
        time.sleep(0.05)


def _metric_count(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(read_metrics(path)) if path.exists() else 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_last_checkpoint_and_says_how_to_resume(tmp_path, sig):
    proc, run = _start_training(tmp_path, "--eval-every", "1000")
    _wait_for(proc, lambda: _metric_count(run) >= 3)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stdout + stderr
    # On one line, so it can be copied whole.
    assert any(line.endswith(f"Resume with: charlm train --resume {run}")
               for line in stderr.splitlines()), stderr
    ckpt = checkpoint.load(run / "last.pt")
    step = ckpt["train_state"]["step"]
    assert step >= 3 and step == max(r["step"] for r in read_metrics(run / "metrics.jsonl"))
    assert not (run / "best.pt").exists()  # no evaluation happened: the save was the signal's
    if sig == signal.SIGTERM:
        return
    result = run_cli("train", "--resume", run, "--max-steps", str(step + 3), "--no-progress")
    assert result.returncode == 0, result.stderr
    resumed = checkpoint.load(run / "last.pt")["train_state"]
    assert resumed["step"] == step + 3 and resumed["elapsed"] > ckpt["train_state"]["elapsed"]
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, step + 4))


def test_second_sigint_quits_at_once_and_leaves_loadable_checkpoints(tmp_path):
    # A model whose steps take a good fraction of a second, so the second Ctrl-C lands
    # while the first one is still waiting for the step to end.
    proc, run = _start_training(tmp_path, "--hidden-size", "256", "--num-layers", "2",
                                "--batch-size", "16", "--seq-len", "64", "--eval-every", "2")
    _wait_for(proc, lambda: (run / "last.pt").exists() and _metric_count(run) >= 4)
    proc.send_signal(signal.SIGINT)
    # The handler announces itself; then press Ctrl-C again.
    seen = []
    while not seen or ("press Ctrl-C again" not in seen[-1] and seen[-1]):
        seen.append(proc.stderr.readline())
    assert "press Ctrl-C again" in seen[-1], seen
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 10
    assert proc.returncode == 130
    assert "Traceback" not in stdout + stderr
    assert "Resume with" not in stderr  # it did not wait to finish the step and save
    checkpoints = sorted(run.glob("*.pt"))
    assert {p.name for p in checkpoints} >= {"last.pt", "best.pt"}
    for path in checkpoints:
        checkpoint.load(path)
    step = checkpoint.load(run / "last.pt")["train_state"]["step"]
    result = run_cli("train", "--resume", run, "--max-steps", str(step + 1), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert not list(run.glob(".*.tmp"))  # a temporary file the kill left behind is gone


# ------------------------------------------------------------------------ refused resumes
@pytest.fixture
def paused_run(tmp_path, tiny_run) -> Path:
    """A private copy of the shared tiny run (hidden size 32), to resume or to fail to."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(".lock"))
    return run


def _unchanged(run: Path):
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    return lambda: {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_resume_with_another_model_shape_is_refused(paused_run):
    unchanged = _unchanged(paused_run)
    proc = run_cli("train", "--resume", paused_run, "--hidden-size", "64", "--cell", "gru")
    assert_clean_error(proc, "model.cell 'lstm' -> 'gru'", "model.hidden_size 32 -> 64")
    proc = run_cli("train", "--resume", paused_run / "best.pt", "--set", "model.num_layers=2")
    assert_clean_error(proc, "model.num_layers 1 -> 2")
    assert unchanged()


def test_resume_on_another_file_needs_allow_other_data(paused_run, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(SAMPLE_TEXT.replace("speak", "Speak"), encoding="utf-8")
    unchanged = _unchanged(paused_run)
    proc = run_cli("train", other, "--resume", paused_run, "--no-progress")
    assert_clean_error(proc, "other.txt is not the text this run was trained on",
                       "--allow-other-data")
    assert unchanged()
    proc = run_cli("train", other, "--resume", paused_run, "--allow-other-data",
                   "--max-steps", "45", "--no-progress", "--no-samples")
    assert proc.returncode == 0, proc.stderr
    ckpt = checkpoint.load(paused_run / "last.pt")
    assert ckpt["train_state"]["step"] == 45
    assert ckpt["train_file"]["name"] == "other.txt"


def test_other_bad_resumes_are_one_line_errors(paused_run, tmp_path, text_file):
    assert_clean_error(run_cli("train", "--resume", tmp_path / "nowhere"), "checkpoint not found")
    assert_clean_error(run_cli("train", text_file, "--resume", paused_run, "--init-from",
                               paused_run / "best.pt"), "cannot be used together")
    weights = checkpoint.load(paused_run / "best.pt")
    del weights["train_state"]
    checkpoint.save(tmp_path / "weights.pt", weights)
    assert_clean_error(run_cli("train", "--resume", tmp_path / "weights.pt"), "no training state")
    moved = checkpoint.load(paused_run / "last.pt")
    moved["train_file"]["path"] = str(tmp_path / "gone.txt")
    checkpoint.save(tmp_path / "moved.pt", moved)
    assert_clean_error(run_cli("train", "--resume", tmp_path / "moved.pt"), "gone.txt is not there",
                       f"charlm train FILE --resume {tmp_path / 'moved.pt'}")
    broken = checkpoint.load(paused_run / "last.pt")
    broken["optimizer"] = {"state": {}, "param_groups": []}
    checkpoint.save(tmp_path / "broken.pt", broken)
    proc = run_cli("train", text_file, "--resume", tmp_path / "broken.pt", "--out",
                   tmp_path / "out")
    assert_clean_error(proc, "training state cannot be restored")
    assert "internal error" not in proc.stderr


# ----------------------------------------------------------------------------- fine-tuning
def test_init_from_starts_a_new_run_from_the_weights(tiny_run, tmp_path):
    new = tmp_path / "new.txt"
    new.write_text("All:\nSpeak, speak. You are resolved.\n" * 60, encoding="utf-8")
    out = tmp_path / "tuned"
    # fp32: the first loss is compared with an fp32 forward pass computed here.
    proc = run_cli("train", new, "--init-from", tiny_run / "best.pt", "--config", TINY_CONFIG,
                   "--precision", "fp32", "--max-steps", "3", "--set", "train.log_every=1",
                   "--out", out, "--no-progress", "--no-samples")
    assert proc.returncode == 0, proc.stderr
    base = checkpoint.load(tiny_run / "best.pt")
    tuned = checkpoint.load(out / "last.pt")
    assert tuned["train_state"]["step"] == 3  # a new step count...
    assert all(int(s["step"]) == 3 for s in tuned["optimizer"]["state"].values())  # ...optimizer
    assert tuned["vocab"] == base["vocab"]
    assert tuned["train_file"]["name"] == "new.txt"

    # The first step's loss is the base model's loss on the first batch: training began
    # from its weights (a fresh model would be near ln(V)).
    cfg = checkpoint.config_of(tuned)
    corpus = load_corpus(new, vocab=checkpoint.vocab_of(base))
    train_ids, _ = split(corpus.ids, cfg.data.val_fraction)
    batcher = Batcher(as_tensor(train_ids, torch.device("cpu")), cfg.train.batch_size,
                      cfg.train.seq_len, cfg.train.seed)
    x, y = batcher.next()
    model = checkpoint.model_of(base)  # dropout is 0: train and eval mode agree
    with torch.no_grad():
        logits, _ = model(x, model.init_state(x.size(0)))
        expected = float(F.cross_entropy(logits.flatten(0, 1), y.flatten()))
    first = read_metrics(out / "metrics.jsonl")[0]
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(expected, rel=1e-5)
    assert first["loss"] < math.log(len(base["vocab"])) - 0.5


def test_init_from_refuses_unknown_characters_unless_dropped(tiny_run, tmp_path):
    new = tmp_path / "new.txt"
    new.write_text("Zounds! Quoth the jovial zany.\n" * 50, encoding="utf-8")
    args = ["train", new, "--init-from", tiny_run / "best.pt", "--config", TINY_CONFIG,
            "--max-steps", "2", "--out", tmp_path / "tuned", "--no-progress", "--no-samples"]
    proc = run_cli(*args)
    assert_clean_error(proc, "outside the vocabulary", "--drop-unknown")
    assert not (tmp_path / "tuned" / "last.pt").exists()
    proc = run_cli(*args, "--drop-unknown")
    assert proc.returncode == 0, proc.stderr
    assert "dropped" in proc.stderr
    assert checkpoint.load(tmp_path / "tuned" / "last.pt")["train_state"]["step"] == 2

