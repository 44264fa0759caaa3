"""The default corpus: download with a checksum check from a local HTTP server on loopback,
refusal of a wrong file, a clean error without network, and ``charlm train`` with no FILE."""

from __future__ import annotations

import hashlib
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import SHAKESPEARE, TINY_CONFIG, run_charlm

from charlm import checkpoint
from charlm.cli import main
from charlm.corpus import (
    TINY_SHAKESPEARE_SHA256,
    TINY_SHAKESPEARE_SIZE,
    TINY_SHAKESPEARE_URL,
    download,
)
from charlm.errors import CharlmError

UNREACHABLE = "http://127.0.0.1:9/unreachable"  # the discard port: connection refused


@pytest.fixture(scope="module")
def server():
    """Serves /input.txt (tiny Shakespeare, when present) and /wrong.txt on loopback."""
    routes = {"/wrong.txt": b"To be, or not to be: not the file you are looking for.\n"}
    if SHAKESPEARE.is_file():
        routes["/input.txt"] = SHAKESPEARE.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = routes.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def shakespeare_url(server):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is not here")
    return f"{server}/input.txt"


def run_main(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_canonical_address():
    assert TINY_SHAKESPEARE_URL.endswith("karpathy/char-rnn/master/data/tinyshakespeare/input.txt")
    assert TINY_SHAKESPEARE_SIZE == 1_115_394


def test_download_command_verifies_checksum(shakespeare_url, tmp_path, capsys):
    dest = tmp_path / "corpora" / "ts.txt"
    code, out, err = run_main(["download", "--url", shakespeare_url, "--output", str(dest)],
                              capsys)
    assert code == 0, err
    assert out.strip() == str(dest)
    data = dest.read_bytes()
    assert len(data) == TINY_SHAKESPEARE_SIZE
    assert hashlib.sha256(data).hexdigest() == TINY_SHAKESPEARE_SHA256


def test_default_destination_and_no_second_download(shakespeare_url):
    path = download(shakespeare_url)
    assert path == Path(os.environ["CHARLM_DATA_DIR"]) / "tinyshakespeare.txt"
    assert path.stat().st_size == TINY_SHAKESPEARE_SIZE
    # A verified copy is kept: no network needed the second time.
    assert download(UNREACHABLE) == path


def test_wrong_checksum_refused_and_not_saved(server, tmp_path, capsys):
    dest = tmp_path / "ts.txt"
    code, _, err = run_main(["download", "--url", f"{server}/wrong.txt", "--output", str(dest)],
                            capsys)
    line = one_error_line(err)
    assert code != 0
    assert "checksum" in line and TINY_SHAKESPEARE_SHA256[:16] in line and "not saved" in line
    assert not dest.exists() and list(tmp_path.iterdir()) == []
    # A file already there that fails the check is not damaged by a failed download either.
    dest.write_text("my own notes\n")
    with pytest.raises(CharlmError, match="not saved"):
        download(f"{server}/wrong.txt", dest)
    assert dest.read_text() == "my own notes\n"


def test_unreachable_address_is_one_line(capsys, tmp_path):
    # CHARLM_CORPUS_URL (set by conftest) points at a closed loopback port.
    code, out, err = run_main(["download", "--output", str(tmp_path / "ts.txt")], capsys)
    line = one_error_line(err)
    assert code != 0 and out == ""
    assert f"could not download {UNREACHABLE}" in line and "check the network" in line
    assert not (tmp_path / "ts.txt").exists()


def test_http_error_is_one_line(server, tmp_path, capsys):
    code, _, err = run_main(
        ["download", "--url", f"{server}/missing.txt", "--output", str(tmp_path / "x")], capsys)
    assert code != 0 and "Not Found" in one_error_line(err)


def test_train_without_file_and_without_network(capsys, tmp_path):
    code, _, err = run_main(["train", "--config", str(TINY_CONFIG), "--out", str(tmp_path / "r")],
                            capsys)
    assert code != 0 and "could not download" in one_error_line(err)
    assert not (tmp_path / "r").exists()


def test_train_without_file_uses_default_corpus(shakespeare_url, tmp_path):
    proc = run_charlm(
        "train", "--config", TINY_CONFIG, "--max-steps", "2", "--out", tmp_path / "run",
        "--no-progress", "--no-samples", "--set", "train.threads=1",
        # One evaluation window over the 111,540-character validation split.
        "--set", "train.eval_streams=256", "--set", "train.eval_seq_len=512",
        env={"CHARLM_CORPUS_URL": shakespeare_url}, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    corpus = Path(os.environ["CHARLM_DATA_DIR"]) / "tinyshakespeare.txt"
    assert f"training on tiny Shakespeare: {corpus}" in proc.stderr
    ckpt = checkpoint.load(tmp_path / "run" / "last.pt")
    assert ckpt["train_file"]["sha256"] == TINY_SHAKESPEARE_SHA256
    assert ckpt["train_file"]["size"] == TINY_SHAKESPEARE_SIZE
    assert len(ckpt["vocab"]) == 65 and ckpt["train_state"]["step"] == 2
