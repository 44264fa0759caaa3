"""Interactive sampling: the session and its loop, piped standard input, and a real terminal
(a pseudo-terminal), ended by Ctrl-D or Ctrl-C without a traceback."""

from __future__ import annotations

import os
import select
import sys
import time

import pytest
from conftest import assert_clean_error, charlm_exe, run_charlm, run_cli

from charlm.errors import CharlmError
from charlm.sampling.interactive import Session, run
from charlm.sampling.sampler import generate, seed_ids
from charlm.storage import checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tiny_run):
    """The tiny trained model and its vocabulary (a random model repeats one character)."""
    return checkpoint.load_model(tiny_run / "best.pt")


def greedy(trained, text: str, n: int) -> str:
    model, vocab = trained
    return generate(model, vocab, seed_ids(vocab, text), n, temperature=0.0)[0]


def test_each_line_is_continued_afresh(trained):
    s = Session(*trained, 15, temperature=0.0)
    assert s.reply("All:") == greedy(trained, "All:", 15)
    assert s.reply("Speak") == greedy(trained, "Speak", 15)
    assert s.reply("") == greedy(trained, "", 15)


def test_keep_state_continues_the_whole_conversation(trained):
    s = Session(*trained, 12, temperature=0.0, keep_state=True)
    first = s.reply("All:")
    second = s.reply("You are ")
    third = s.reply("")
    assert first == greedy(trained, "All:", 12)
    assert second == greedy(trained, "All:" + first + "You are ", 12)  # one text, fed in turns
    assert third == greedy(trained, "All:" + first + "You are " + second, 12)
    assert third != greedy(trained, "", 12)


def test_stop_and_streaming_in_a_session(trained):
    streamed: list[str] = []
    s = Session(*trained, 300, temperature=1.0, random_seed=3, stop=["e"])
    text = s.reply("All:", streamed.append)
    assert "".join(streamed) == text and text.endswith("e") and text.count("e") == 1
    with pytest.raises(CharlmError, match="--length"):
        Session(*trained, 0)


def test_loop_reports_bad_lines_and_ends_on_eof_or_ctrl_c(trained):
    s = Session(*trained, 5, temperature=0.0)
    for end in (EOFError, KeyboardInterrupt):
        lines = iter(["All:", "Zap", "Speak"])
        out: list[str] = []
        errors: list[str] = []

        def read_line(lines=lines, end=end):
            try:
                return next(lines)
            except StopIteration:
                raise end from None

        assert run(s, read_line, out.append, errors.append) == 2
        assert len(errors) == 1 and "'Z'" in errors[0]
        text = "".join(out)
        want = greedy(trained, "All:", 5) + "\n" + greedy(trained, "Speak", 5) + "\n"
        assert text in (want, want + "\n")  # Ctrl-C ends the line it interrupted


def test_cli_interactive_on_piped_stdin(tiny_run):
    best = tiny_run / "best.pt"
    proc = run_charlm("sample", "-c", best, "--interactive", "-n", 25, "-t", 0, "--keep-state",
                      input="All:\nSpeak, \n")
    assert proc.returncode == 0, proc.stderr
    ckpt = checkpoint.load(best)
    model, vocab = checkpoint.model_of(ckpt), checkpoint.vocab_of(ckpt)

    def cont(text: str) -> str:
        return generate(model, vocab, vocab.encode(text).tolist(), 25, temperature=0.0)[0]

    first = cont("All:")
    second = cont("All:" + first + "Speak, ")
    assert proc.stdout == first + "\n" + second + "\n"
    for clash in (["--seed", "All"], ["--num-samples", 2], ["-t", "0,1"], ["--beam", 2]):
        assert_clean_error(run_cli("sample", "-c", best, "-i", *clash), "--interactive")
    assert_clean_error(run_cli("sample", "-c", best, "--keep-state"), "--keep-state")


def _read_until(fd: int, needle: bytes, seen: bytearray, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {needle!r} in {bytes(seen)!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            if not chunk:
                assert needle in seen, f"no {needle!r} in {bytes(seen)!r}"
            seen += chunk


def _wait(pid: int, fd: int, seen: bytearray, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if select.select([fd], [], [], 0.1)[0]:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                pass
    os.kill(pid, 9)
    raise AssertionError(f"charlm did not end: {bytes(seen)!r}")


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
@pytest.mark.parametrize("key", [b"\x04", b"\x03"], ids=["ctrl-d", "ctrl-c"])
def test_cli_interactive_in_a_terminal(tiny_run, key):
    import pty

    args = [*charlm_exe(), "sample", "-c", str(tiny_run / "best.pt"), "-i", "-n", "20", "-t", "0"]
    env = {**os.environ, "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
    pid, fd = pty.fork()
    if pid == 0:  # the child: charlm, with the pseudo-terminal as its controlling terminal
        os.execvpe(args[0], args, env)
    seen = bytearray()
    try:
        _read_until(fd, b"> ", seen)
        os.write(fd, b"All:\r")
        _read_until(fd, b"> ", seen := bytearray(seen.split(b"> ", 1)[1]))
        os.write(fd, key)
        code = _wait(pid, fd, seen)
    finally:
        os.close(fd)
    assert code == 0, bytes(seen)
    assert b"Traceback" not in seen and b"error" not in seen
