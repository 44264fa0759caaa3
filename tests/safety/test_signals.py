"""Stop signals, with real signals sent to the real command: SIGINT, SIGTERM and SIGHUP are
handled alike in every command (exit 130; training saves last.pt and says how to resume); a
second signal never leaves a temporary file; a sample in progress ends at a signal; an
interrupted export leaves no output file. Every wait here is bounded."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from charlm.storage import checkpoint
from tests.conftest import SAMPLE_TEXT, TINY_CONFIG, charlm_exe

STOPS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGHUP": signal.SIGHUP}


def _defaults() -> None:
    # A shell may start jobs with SIGINT ignored, nohup ignores SIGHUP: the child starts
    # with the dispositions a terminal gives.
    for sig in STOPS.values():
        signal.signal(sig, signal.SIG_DFL)


class Command:
    """The real ``charlm`` in a subprocess; its stdout and stderr are read by threads, so a
    test can wait (with a deadline) for what it prints."""

    def __init__(self, *args, cwd=None, preexec=_defaults):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "CUDA_VISIBLE_DEVICES": ""}
        self.proc = subprocess.Popen([*charlm_exe(), *map(str, args)], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     preexec_fn=preexec)
        self.out, self.err = bytearray(), bytearray()
        self.readers = [threading.Thread(target=self._read, args=(s, b), daemon=True)
                        for s, b in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self.readers:
            t.start()

    @staticmethod
    def _read(stream, into: bytearray) -> None:
        while chunk := stream.read1(65536):
            into += chunk

    def wait_for(self, ready, what: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                self.finish(10)
                pytest.fail(f"ended before {what}: {self.proc.returncode}\n{self.stderr[-2000:]}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no {what} within {timeout} s")
            time.sleep(0.002)

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def finish(self, timeout: float = 120.0) -> int:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"did not end within {timeout} s of the signal")
        for t in self.readers:
            t.join(timeout=10)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    @property
    def stdout(self) -> str:
        return self.out.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self.err.decode("utf-8", "replace")


@pytest.fixture
def command():
    started: list[Command] = []

    def start(*args, **kwargs) -> Command:
        started.append(Command(*args, **kwargs))
        return started[-1]

    yield start
    for c in started:
        c.kill()


def _train(command, tmp_path: Path, *extra, preexec=_defaults) -> tuple[Command, Path]:
    path = tmp_path / "input.txt"
    path.write_text(SAMPLE_TEXT, encoding="utf-8")
    run = tmp_path / "run"
    c = command("train", path, "--config", TINY_CONFIG, "--out", run, "--max-steps", "1000000",
                "--no-progress", "--set", "train.log_every=1", "--set", "train.threads=1", *extra,
                preexec=preexec)
    return c, run


def _records(run: Path, kind: str) -> int:
    path = run / "metrics.jsonl"
    try:
        return path.read_text(encoding="utf-8").count(f'"kind": "{kind}"')
    except OSError:
        return 0


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _interrupted_cleanly(c: Command, sig) -> None:
    """Exit 130, no traceback, and one line naming the signal."""
    assert c.returncode == 130, c.stderr[-2000:]
    assert "Traceback" not in c.stderr and "error:" not in c.stderr, c.stderr[-2000:]
    assert f"interrupted by {sig.name}" in c.stderr.splitlines(), c.stderr[-2000:]


# -------------------------------------------------------------------------------- training
def test_sighup_in_training_saves_last_pt_and_says_how_to_resume(command, tmp_path):
    c, run = _train(command, tmp_path, "--no-samples", "--eval-every", "1000")
    c.wait_for(lambda: _records(run, "train") >= 3, "three steps")
    c.signal(signal.SIGHUP)
    assert c.finish() == 130, c.stderr[-2000:]
    assert "Traceback" not in c.stderr
    assert any(line.endswith(f"Resume with: charlm train --resume {run}")
               for line in c.stderr.splitlines()), c.stderr[-2000:]
    step = checkpoint.load(run / "last.pt")["train_state"]["step"]
    assert step >= 3
    assert _temporaries(run) == []


def test_an_ignored_sighup_stays_ignored_in_training(command, tmp_path):
    """``nohup charlm train ...``: the hangup is not a stop signal there."""
    def nohup():
        _defaults()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    c, run = _train(command, tmp_path, "--no-samples", "--eval-every", "1000", preexec=nohup)
    c.wait_for(lambda: _records(run, "train") >= 3, "three steps")
    c.signal(signal.SIGHUP)
    seen = _records(run, "train")
    c.wait_for(lambda: _records(run, "train") >= seen + 3, "three steps after the hangup")
    c.signal(signal.SIGTERM)
    assert c.finish() == 130, c.stderr[-2000:]
    assert "Resume with" in c.stderr


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_second_signal_while_last_pt_is_written_leaves_no_temporary_file(command, tmp_path, name):
    # A model whose last.pt (with the optimizer state) takes a while to write, and no
    # evaluation: the only save is the one the first signal asks for.
    c, run = _train(command, tmp_path, "--no-samples", "--eval-every", "1000000",
                    "--hidden-size", "1024", "--num-layers", "3", "--batch-size", "2",
                    "--seq-len", "8")
    c.wait_for(lambda: _records(run, "train") >= 2, "two steps", timeout=180)
    c.signal(STOPS[name])
    c.wait_for(lambda: _temporaries(run), "the temporary file of last.pt", timeout=180)
    c.signal(STOPS[name])  # while it is being written
    assert c.finish() == 130, c.stderr[-2000:]
    assert _temporaries(run) == []
    assert "Traceback" not in c.stderr
    if (run / "last.pt").exists():  # the write finished before the process quit
        assert checkpoint.load(run / "last.pt")["train_state"]["step"] >= 2


def test_a_signal_ends_the_sample_in_progress(command, tmp_path):
    # A sample of a million characters takes many seconds; the signal ends it at once.
    c, run = _train(command, tmp_path, "--eval-every", "2", "--set", "train.sample_chars=1048576")
    c.wait_for(lambda: _records(run, "eval") >= 1, "the first evaluation")
    c.signal(signal.SIGTERM)
    assert c.finish() == 130, c.stderr[-2000:]
    assert "Resume with" in c.stderr
    # What was printed is the part generated before the signal, not the whole sample.
    assert len(c.out) + len(c.err) < 500_000, len(c.out) + len(c.err)
    assert checkpoint.load(run / "last.pt")["train_state"]["step"] >= 2


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_signal_during_setup_and_sizing_exits_130(command, tmp_path, name):
    """Automatic sizing times shapes for seconds before training starts: a signal there
    stops the command as Ctrl-C does (130, one line), and leaves no temporary file."""
    path = tmp_path / "input.txt"
    path.write_text(SAMPLE_TEXT, encoding="utf-8")
    run = tmp_path / "run"
    c = command("train", path, "--out", run, "--max-time", "120", "--device", "cpu",
                "--no-progress", "--no-samples")
    started = time.monotonic()
    c.wait_for(lambda: time.monotonic() - started > 4, "four seconds")  # imports, reading, sizing
    c.signal(STOPS[name])
    assert c.finish() == 130, c.stderr[-2000:]
    assert "Traceback" not in c.stderr and "error:" not in c.stderr, c.stderr[-2000:]
    assert f"interrupted by {name}" in c.stderr or "Resume with" in c.stderr, c.stderr[-2000:]
    if run.exists():
        assert _temporaries(run) == []


# ---------------------------------------------------------------------- the other commands
@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_signal_stops_sample_as_ctrl_c_does(command, tiny_run, name):
    c = command("sample", "-c", tiny_run / "best.pt", "-n", "100000000")
    c.wait_for(lambda: len(c.out) >= 20, "the first characters")
    c.signal(STOPS[name])
    c.finish(60)
    _interrupted_cleanly(c, STOPS[name])


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_stops_eval(command, tiny_run, tmp_path, name):
    text = tmp_path / "long.txt"
    text.write_text(SAMPLE_TEXT * 200, encoding="utf-8")  # seconds of evaluation
    c = command("eval", tiny_run / "best.pt", text, "--progress")
    c.wait_for(lambda: "evaluating" in c.stderr, "the evaluation")
    c.signal(STOPS[name])
    c.finish(60)
    _interrupted_cleanly(c, STOPS[name])
    assert c.stdout == ""  # no result table


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_during_onnx_export_leaves_no_file_and_reports_no_failure(
        command, tiny_run, tmp_path, name):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    c = command("export", tiny_run, "-f", "onnx", "-o", out)
    # "using RUN/best.pt" comes before the checkpoint is read and exported (seconds).
    c.wait_for(lambda: "using" in c.stderr, "the export")
    time.sleep(0.5)  # into the exporter
    c.signal(STOPS[name])
    c.finish(120)
    if c.returncode == 0:
        pytest.skip("the export finished before the signal")
    _interrupted_cleanly(c, STOPS[name])
    assert "export failed" not in c.stderr
    assert not out.exists()
    assert _temporaries(tmp_path) == []
