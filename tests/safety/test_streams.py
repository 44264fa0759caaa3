"""Issue 30, streams and consoles: training never stops because of its output (a reader that
goes away, a closed stderr), a console that cannot encode the text gets escapes and one hint,
and closed or full standard streams end the other commands with one line.

Every test runs the real console script with real pipes and closed descriptors."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import TINY_CONFIG, assert_clean_error, charlm_exe, run_charlm

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
CHINESE = "中文字符训练文本，你好世界。😀\n" * 120


def _train_args(text: Path, out: Path, *extra) -> list[str]:
    return [*charlm_exe(), "train", str(text), "--config", str(TINY_CONFIG), "--out", str(out),
            "--max-steps", "20", *extra]


def _trained_to_the_end(run: Path) -> None:
    """last.pt and best.pt written, and the metrics log reached the last step."""
    assert (run / "last.pt").is_file() and (run / "best.pt").is_file()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 20, steps


def _shell(command: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def _cmd(*args) -> str:
    return " ".join(shlex.quote(str(a)) for a in [*charlm_exe(), *args])


@pytest.fixture(scope="module")
def chinese_run(tmp_path_factory) -> Path:
    """A run trained (on a UTF-8 console) on a Chinese text with an emoji, in 中文/运行."""
    root = tmp_path_factory.mktemp("zh") / "中文"
    root.mkdir()
    text = root / "中文.txt"
    text.write_text(CHINESE, encoding="utf-8")
    proc = run_charlm("train", text, "--config", TINY_CONFIG, "--out", root / "运行",
                      "--max-steps", "20", "--no-progress",
                      env={"CHARLM_CACHE_DIR": str(root / "cache")})
    assert proc.returncode == 0, proc.stderr
    return root / "运行"


# ----------------------------------------------------------------- 1. lost output in training
def test_training_goes_on_when_the_reader_of_stdout_leaves(text_file, tmp_path):
    """charlm train ... | head -c 20: samples at every 5 steps; the reader takes 20 bytes of
    the first and leaves; training ends at its checkpoint with status 0."""
    err = tmp_path / "err.txt"
    with err.open("w") as err_file:
        proc = subprocess.Popen(
            _train_args(text_file, tmp_path / "run", "--eval-every", "5", "--no-progress"),
            stdout=subprocess.PIPE, stderr=err_file, env=ENV)
        first = proc.stdout.read(20)
        proc.stdout.close()  # the reader goes away
        code = proc.wait(timeout=180)
    log = err.read_text()
    assert first.startswith(b"--- sample"), first
    assert code == 0, log
    _trained_to_the_end(tmp_path / "run")
    assert log.count("standard output failed (broken pipe)") == 1, log
    assert "Traceback" not in log and "Exception ignored" not in log, log


@pytest.mark.parametrize("progress", ["--no-progress", "--progress"])
def test_training_goes_on_when_the_reader_of_stderr_leaves(progress, text_file, tmp_path):
    """charlm train ... 2>&1 | head -3, with the plain log lines and with the progress bar."""
    proc = subprocess.Popen(_train_args(text_file, tmp_path / "run", progress),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
    lines = [proc.stdout.readline() for _ in range(3)]
    proc.stdout.close()
    code = proc.wait(timeout=180)
    assert lines[0].startswith(b"text: "), lines
    assert code == 0
    _trained_to_the_end(tmp_path / "run")


def test_training_goes_on_with_stderr_closed(text_file, tmp_path):
    """charlm train ... 2>&- (sys.stderr is None): trains on, says so once on stdout."""
    proc = _shell(_cmd("train", text_file, "--config", TINY_CONFIG, "--out", tmp_path / "run",
                       "--max-steps", "20") + " 2>&-")
    assert proc.returncode == 0, proc.stdout
    _trained_to_the_end(tmp_path / "run")
    assert proc.stdout.count("standard error is closed") == 1, proc.stdout
    assert "--- sample at step 20" in proc.stdout  # samples still printed


def test_training_goes_on_with_stdout_closed(text_file, tmp_path):
    """charlm train ... >&-: no samples, one note on stderr, the run trains to its end."""
    proc = _shell(_cmd("train", text_file, "--config", TINY_CONFIG, "--out", tmp_path / "run",
                       "--max-steps", "20", "--no-progress") + " >&-")
    assert proc.returncode == 0, proc.stderr
    _trained_to_the_end(tmp_path / "run")
    assert proc.stderr.count("standard output is closed") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------- 2. unencodable console
def _hinted_once(stderr: str) -> None:
    assert stderr.count("PYTHONIOENCODING=utf-8") == 1, stderr
    assert "internal error" not in stderr and "Traceback" not in stderr, stderr


@pytest.mark.parametrize("encoding", ["cp1252", "ascii"])
def test_training_on_chinese_text_on_a_cp1252_console(encoding, tmp_path):
    text = tmp_path / "zh.txt"
    text.write_text(CHINESE, encoding="utf-8")
    proc = run_charlm("train", text, "--config", TINY_CONFIG, "--out", tmp_path / "run",
                      "--max-steps", "20", "--no-progress",
                      env={"PYTHONIOENCODING": encoding})
    assert proc.returncode == 0, proc.stderr
    _trained_to_the_end(tmp_path / "run")
    assert "--- sample at step 20" in proc.stdout
    assert "\\u" in proc.stdout  # the Chinese characters, escaped
    _hinted_once(proc.stderr)


def test_sample_info_runs_eval_on_a_cp1252_console(chinese_run):
    env = {"PYTHONIOENCODING": "cp1252"}
    text = chinese_run.parent / "中文.txt"
    sample = run_charlm("sample", "-c", chinese_run, "-s", "中文", "-n", "30", "-t", "0", env=env)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("\\u4e2d\\u6587"), sample.stdout  # the seed, escaped
    _hinted_once(sample.stderr)
    for args in (("info", chinese_run), ("info", chinese_run, "--json"),
                 ("runs", chinese_run.parent), ("runs", chinese_run.parent, "--json"),
                 ("eval", chinese_run, text, "--no-progress")):
        proc = run_charlm(*args, env=env)
        assert proc.returncode == 0, (args, proc.stderr)
        assert "\\u" in proc.stdout, (args, proc.stdout)  # 中文 / 运行, escaped
        _hinted_once(proc.stderr)


# ---------------------------------------------------------------- 3. closed stdin and stdout
@pytest.mark.parametrize("how", [("-i",), ("--seed-file", "-")])
def test_sample_from_a_closed_stdin_is_one_line(how, tiny_run):
    proc = _shell(_cmd("sample", "-c", tiny_run, "-n", "20", *how) + " <&-")
    assert_clean_error(proc, "standard input is closed")
    assert proc.returncode == 1


@pytest.mark.parametrize("command", ["sample", "info", "runs", "eval"])
def test_output_commands_with_stdout_closed_or_full(command, tiny_run, text_file):
    args = {"sample": ("sample", "-c", tiny_run, "-n", "50"), "info": ("info", tiny_run),
            "runs": ("runs", tiny_run.parent), "eval": ("eval", tiny_run, text_file)}[command]
    closed = _shell(_cmd(*args) + " >&-")
    assert_clean_error(closed, "cannot write the output", "standard output is closed")
    assert closed.returncode == 1
    if Path("/dev/full").exists():
        full = _shell(_cmd(*args) + " >/dev/full")
        assert_clean_error(full, "cannot write the output", "No space left on device")
        assert full.returncode == 1


# --------------------------------------------------------------------- 4. export to a full disk
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("command", ["export", "plot"])
def test_a_full_stdout_says_the_file_was_written(command, tiny_run, tmp_path):
    target = tmp_path / ("model.safetensors" if command == "export" else "loss.png")
    args = (("export", tiny_run, "--format", "safetensors", "-o", target) if command == "export"
            else ("plot", tiny_run, "-o", target))
    proc = _shell(_cmd(*args) + " >/dev/full")
    assert_clean_error(proc, "cannot write the output", "No space left on device",
                       f"{target} itself was written")
    assert proc.returncode == 1
    assert target.stat().st_size > 0
    assert "Exception ignored" not in proc.stderr


# ------------------------------------------------------------------------ the library's guard
def test_guarded_streams_in_process():
    """The guard itself: a lost stream raises outside keep_going (stdout only) and never
    inside it; an unencodable character is escaped."""
    import io

    from charlm.streams import GuardedStream, OutputLost, guarded, keep_going

    class Broken(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    class Full(io.StringIO):
        def write(self, text):
            raise OSError(28, "No space left on device")

    for stream, raised in ((Broken(), BrokenPipeError), (Full(), OutputLost)):
        guard = GuardedStream("stdout", stream)
        with pytest.raises(raised):
            guard.write("x")
        with keep_going():
            guard = GuardedStream("stdout", stream)
            assert guard.write("x") == 1 and guard.lost
            guard.flush()
    raw = io.BytesIO()
    narrow = io.TextIOWrapper(raw, encoding="cp1252")
    with guarded():
        GuardedStream("stdout", narrow).write("中 ok\n")
    narrow.flush()
    assert raw.getvalue() == b"\\u4e2d ok\n"
