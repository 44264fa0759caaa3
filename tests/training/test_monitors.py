"""Monitors: each one on its own (log lines, progress bar, metrics file, TensorBoard, the
in-memory train logs of `charlm bench`), and the real `charlm train` writing to a file."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG, charlm_exe

from charlm.config import load_toml
from charlm.errors import CharlmError
from charlm.runs.directory import read_metrics
from charlm.training.monitors import (
    Header,
    LogLines,
    MetricsFile,
    Monitor,
    Monitors,
    ProgressBar,
    TrainLogs,
    console,
)


@pytest.fixture(autouse=True)
def restore_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def header(run_dir: Path, **changes) -> Header:
    fields = dict(file="input.txt", chars=5960, vocab_size=33, model="lstm 32 x 1, embedding 16",
                  parameters=8017, device="cpu", precision="fp32", batch_size=8, seq_len=16,
                  world=1, limits="40 steps", run_dir=run_dir, max_steps=40)
    fields.update(changes)
    return Header(**fields)


def train_record(step: int, loss: float = 2.0) -> dict:
    return {"kind": "train", "step": step, "epoch": step / 40, "chars": step * 128, "lr": 1e-3,
            "loss": loss, "bpc": loss / math.log(2), "grad_norm": 0.5, "elapsed": step / 10,
            "chars_per_sec": 12345.6}


def eval_record(step: int, val: float, best: bool) -> dict:
    return {"kind": "eval", "step": step, "epoch": step / 40, "chars": step * 128,
            "val_loss": val, "val_bpc": val / math.log(2), "best": best, "elapsed": step / 10}


def feed(monitor: Monitor, run_dir: Path) -> None:
    """A short run: two log steps, an evaluation with its checkpoints, a sample, a note."""
    monitor.on_start(header(run_dir))
    for step in range(1, 21):
        monitor.on_step(step)
        if step % 10 == 0:
            monitor.on_train_log(train_record(step, 3.0 - step / 10))
    monitor.on_eval(eval_record(20, 1.5, True))
    monitor.on_saved(20, ["best.pt", "last.pt"])
    monitor.on_sample(20, 1.5, "First Citizen:\nhello")
    monitor.on_note("skipped a non-finite loss at step 21")
    monitor.on_end()


def test_log_lines_are_plain_and_one_per_log_step_and_evaluation(tmp_path):
    err, out = io.StringIO(), io.StringIO()
    feed(LogLines(err, out), tmp_path)
    lines = err.getvalue().splitlines()
    assert "\r" not in err.getvalue()
    assert lines[:5] == header(tmp_path).lines()
    assert lines[0] == "text: input.txt (5,960 characters, vocabulary 33)"
    assert lines[4] == f"run: {tmp_path} (starting)"
    assert lines[5] == ("step 10/40  epoch 0.25  loss 2.0000  2.885 bpc  lr 1.00e-03  "
                        "12,346 chars/s  1.0 s")
    assert lines[6].startswith("step 20/40  epoch 0.50  loss 1.0000")
    assert lines[7] == "step 20/40  val loss 1.5000  2.164 bpc  (new best)  saved best.pt, last.pt"
    assert lines[8] == "skipped a non-finite loss at step 21"
    assert len(lines) == 9
    assert out.getvalue() == "--- sample at step 20 (val 1.500) ---\nFirst Citizen:\nhello\n---\n"


def test_log_lines_name_the_best_so_far_and_a_save_without_evaluation(tmp_path):
    err = io.StringIO()
    lines = LogLines(err, io.StringIO())
    lines.on_start(header(tmp_path, resumed=True, start_step=20, best_val_loss=1.25, max_steps=0))
    lines.on_eval(eval_record(30, 1.5, False))
    lines.on_saved(30, ["last.pt"])
    lines.on_saved(33, ["last.pt"])  # an interrupt between evaluations
    lines.on_eval(eval_record(40, 1.75, False))  # its checkpoints never written
    lines.on_end()
    text = err.getvalue().splitlines()
    assert f"run: {tmp_path} (resuming at step 20)" in text
    assert text[-3:] == ["step 30  val loss 1.5000  2.164 bpc  (best 1.2500)  saved last.pt",
                         "step 33  saved last.pt",
                         "step 40  val loss 1.7500  2.525 bpc  (best 1.2500)"]


def test_progress_bar_draws_on_stderr_and_prints_samples_above_it(tmp_path, capsys):
    feed(ProgressBar(), tmp_path)
    captured = capsys.readouterr()
    assert captured.err.startswith("text: input.txt")
    assert "\r" in captured.err and "20/40" in captured.err
    assert "skipped a non-finite loss at step 21" in captured.err
    assert "--- sample at step 20 (val 1.500) ---\nFirst Citizen:\nhello\n---" in captured.out
    # Before the first evaluation the bar shows no validation loss, not "nan".
    assert "val=-" in captured.err and "nan" not in captured.err


def test_console_picks_the_bar_on_a_terminal_and_lines_elsewhere(monkeypatch):
    assert isinstance(console(True), ProgressBar) and isinstance(console(False), LogLines)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert isinstance(console(None), ProgressBar)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert isinstance(console(None), LogLines)


def test_metrics_file_writes_records_and_a_resume_drops_the_later_ones(tmp_path):
    feed(MetricsFile(), tmp_path)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [10, 20, 20]
    resumed = MetricsFile()
    resumed.on_start(header(tmp_path, resumed=True, start_step=10))
    resumed.on_train_log(train_record(15))
    resumed.on_end()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in records] == [("train", 10), ("train", 15)]
    assert records[0] == json.loads(json.dumps(train_record(10, 2.0)))


def test_monitors_end_every_monitor_even_when_one_fails():
    ended = []

    class Broken(Monitor):
        def on_end(self):
            ended.append("broken")
            raise OSError("disk gone")

    class Fine(Monitor):
        def on_end(self):
            ended.append("fine")

    with pytest.raises(OSError, match="disk gone"), Monitors([Broken(), Fine()]):
        pass
    assert ended == ["broken", "fine"]


def test_tensorboard_event_files_hold_the_scalars_and_the_samples(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from charlm.training.tensorboard import TensorBoard

    feed(TensorBoard(), tmp_path)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/bits_per_char", "train/lr", "train/grad_norm",
            "train/chars_per_sec", "val/loss", "val/bits_per_char"} <= set(tags["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(10, 2.0), (20, 1.0)]
    assert [(e.step, e.value) for e in events.Scalars("val/loss")] == [(20, 1.5)]
    assert [e.value for e in events.Scalars("train/chars_per_sec")] == pytest.approx([12345.6] * 2)
    text = events.Tensors("sample/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "First Citizen:" in text and "hello" in text

    # A resume from step 10 drops what the first run wrote after it.
    again = TensorBoard()
    again.on_start(header(tmp_path, resumed=True, start_step=10))
    again.on_train_log(train_record(20, 0.25))
    again.on_end()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(10, 2.0), (20, 0.25)]
    assert events.Scalars("val/loss") == []


def test_tensorboard_without_the_package_is_a_clear_error(monkeypatch):
    from charlm.training.tensorboard import TensorBoard

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(CharlmError, match=r'pip install "charlm\[tensorboard\]"'):
        TensorBoard()


def test_given_monitors_replace_the_console_and_bench_reads_its_speed_from_one(
        text_file, tmp_path, capsys):
    from charlm.training.bench import train_speed
    from charlm.training.setup import train

    cfg = load_toml(TINY_CONFIG)
    cfg.train.threads, cfg.train.device, cfg.train.precision = 1, "cpu", "fp32"
    cfg.train.max_steps, cfg.train.log_every, cfg.train.sample_chars = 12, 4, 0
    logs = TrainLogs()
    train(text_file, cfg, out_dir=tmp_path / "run", monitors=[logs])
    assert capsys.readouterr().err == ""  # no console output
    written = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert logs.records == written and [r["step"] for r in written] == [4, 8, 12]
    assert train_speed(cfg, steps=6, workdir=tmp_path) > 0


def run_to_file(tmp_path: Path, *args) -> tuple[int, str, Path]:
    """The real command with stderr (and stdout) going to files, as under nohup."""
    text = tmp_path / "input.txt"
    from conftest import SAMPLE_TEXT

    text.write_text(SAMPLE_TEXT, encoding="utf-8")
    run = tmp_path / "run"
    err_path, out_path = tmp_path / "err.log", tmp_path / "out.log"
    env = {**os.environ, "COLUMNS": "200"}
    with open(err_path, "w") as err, open(out_path, "w") as out:
        code = subprocess.run(
            [*charlm_exe(), "train", str(text), "--config", str(TINY_CONFIG), "--out", str(run),
             "--max-steps", "30", "--eval-every", "10", "--set", "train.log_every=5",
             "--set", "train.threads=1", "--no-samples", *args],
            stdout=out, stderr=err, env=env, timeout=120,
        ).returncode
    # As bytes: reading as text would turn a carriage return into a newline.
    return code, err_path.read_bytes().decode("utf-8"), run


def test_train_into_a_log_file_writes_lines_not_a_bar(tmp_path):
    code, err, run = run_to_file(tmp_path)
    assert code == 0, err
    assert "\r" not in err
    assert re.search(r"^model: lstm \d+ x \d+, embedding \d+, [\d,]+ parameters$", err, re.M), err
    assert f"run: {run} (starting)" in err
    records = read_metrics(run / "metrics.jsonl")
    train_lines = re.findall(r"^step (\d+)/30  epoch [\d.]+  loss [\d.]+  [\d.]+ bpc  lr ", err, re.M)
    eval_lines = re.findall(r"^step (\d+)/30  val loss [\d.]+ .*saved .*last\.pt$", err, re.M)
    assert [int(s) for s in train_lines] == [r["step"] for r in records if r["kind"] == "train"]
    assert [int(s) for s in eval_lines] == [10, 20, 30]
    assert err.index(f"run: {run}") < err.index("step 5/30")


def test_progress_forces_the_bar_even_into_a_file_and_tensorboard_writes_events(tmp_path):
    tensorboard = pytest.importorskip("tensorboard") is not None
    code, err, run = run_to_file(tmp_path, "--progress", *(["--tensorboard"] * tensorboard))
    assert code == 0, err
    assert "\r" in err and not re.search(r"^step \d+/30  epoch", err, re.M)
    assert list(run.glob("events.out.tfevents.*"))
    assert load_toml(run / "config.toml").train.tensorboard


def test_an_error_mid_run_releases_the_run_directory(text_file, tmp_path):
    """The run directory's lock is released however training ends, so the same process can
    resume at once (it used to stay locked until the process ended)."""
    import fcntl

    from charlm.storage import checkpoint
    from charlm.training.setup import train

    class Fails(Monitor):
        def on_train_log(self, record):
            if record["step"] == 8:
                raise CharlmError("the log disk went away")

    cfg = load_toml(TINY_CONFIG)
    cfg.train.threads, cfg.train.device, cfg.train.precision = 1, "cpu", "fp32"
    cfg.train.max_steps, cfg.train.log_every, cfg.train.eval_every = 12, 4, 4
    cfg.train.sample_chars = 0
    run = tmp_path / "run"
    with pytest.raises(CharlmError, match="log disk"):
        train(text_file, cfg, out_dir=run, monitors=[Fails()])
    with open(run / ".lock") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the run still held it
        fcntl.flock(f, fcntl.LOCK_UN)
    result = train(text_file, cfg, out_dir=run, resume=checkpoint.load(run / "last.pt"),
                   monitors=[])
    assert result.step == 12
