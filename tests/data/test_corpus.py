"""The default corpus: tiny Shakespeare ships inside the package, and ``charlm train`` with no
FILE trains on it with the network blocked, from any directory."""

from __future__ import annotations

import hashlib
from pathlib import Path

from conftest import REPO, SHAKESPEARE, TINY_CONFIG, run_charlm_with

import charlm
from charlm.data.corpus import (
    TINY_SHAKESPEARE_SHA256,
    TINY_SHAKESPEARE_SIZE,
    TINY_SHAKESPEARE_URL,
    tiny_shakespeare,
)
from charlm.storage import checkpoint

# Every way out to the network fails in the child process, loudly.
NO_NETWORK = """
import socket, urllib.request
def _refuse(*args, **kwargs):
    raise OSError("network blocked by the test")
socket.socket.connect = socket.socket.connect_ex = _refuse
socket.create_connection = socket.getaddrinfo = urllib.request.urlopen = _refuse
"""

# Two steps and one evaluation window over the 111,540-character validation split.
SHORT = ["--config", TINY_CONFIG, "--max-steps", "2", "--no-progress", "--no-samples",
         "--set", "train.threads=1", "--set", "train.eval_streams=256",
         "--set", "train.eval_seq_len=512"]


def test_bundled_copy_is_tiny_shakespeare():
    path = tiny_shakespeare()
    assert path == SHAKESPEARE and path.is_file()
    assert Path(charlm.__file__).parent in path.parents  # package data, not ../shared
    data = path.read_bytes()
    assert len(data) == TINY_SHAKESPEARE_SIZE
    assert hashlib.sha256(data).hexdigest() == TINY_SHAKESPEARE_SHA256
    assert TINY_SHAKESPEARE_URL.endswith("karpathy/char-rnn/master/data/tinyshakespeare/input.txt")


def test_package_data_is_declared():
    # What puts the files into wheels (and editable installs) besides the checkout: the
    # corpus, and the fitted rule of automatic sizing.
    declared = (REPO / "pyproject.toml").read_text()
    assert '"charlm.data" = ["corpora/*.txt"]' in declared
    assert '"charlm.training" = ["sizing_rule.json"]' in declared


def test_train_without_file_needs_no_network(tmp_path):
    elsewhere = tmp_path / "elsewhere"  # not the checkout: the corpus is found from anywhere
    elsewhere.mkdir()
    # A narrow terminal: the line and its path are still printed whole, never broken.
    proc = run_charlm_with(NO_NETWORK, "train", *SHORT, "--out", tmp_path / "run", cwd=elsewhere,
                           env={"COLUMNS": "40"})
    assert proc.returncode == 0, proc.stderr
    assert f"training on tiny Shakespeare: {SHAKESPEARE}" in proc.stderr
    ckpt = checkpoint.load(tmp_path / "run" / "last.pt")
    assert ckpt["train_file"]["sha256"] == TINY_SHAKESPEARE_SHA256
    assert ckpt["train_file"]["size"] == TINY_SHAKESPEARE_SIZE
    assert len(ckpt["vocab"]) == 65 and ckpt["train_state"]["step"] == 2


def test_network_block_is_real(tmp_path):
    # The prelude above does stop a download: a test that passes with it proves no network use.
    proc = run_charlm_with(NO_NETWORK + "urllib.request.urlopen('http://127.0.0.1:9/')", "--help")
    assert proc.returncode != 0 and "network blocked by the test" in proc.stderr
