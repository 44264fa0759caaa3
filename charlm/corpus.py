"""The default corpus: tiny Shakespeare, fetched from karpathy/char-rnn and checksum-verified."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from charlm.atomic import atomic_write
from charlm.errors import CharlmError

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINY_SHAKESPEARE_SIZE = 1_115_394


def data_dir() -> Path:
    return Path(os.environ.get("CHARLM_DATA_DIR") or Path.home() / ".cache" / "charlm" / "data")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def download(
    url: str = TINY_SHAKESPEARE_URL,
    dest: Path | None = None,
    sha256: str | None = TINY_SHAKESPEARE_SHA256,
    timeout: float = 30.0,
) -> Path:
    """Download ``url`` to ``dest`` (atomically), checking its SHA-256 when given.

    A file already at ``dest`` with the right checksum is kept and not downloaded again.
    """
    dest = dest or data_dir() / "tinyshakespeare.txt"
    if dest.is_file() and (sha256 is None or sha256_of(dest) == sha256):
        return dest
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise CharlmError(
            f"could not download {url} ({reason}); check the network, "
            "or pass a text file to train on"
        ) from None
    got = hashlib.sha256(body).hexdigest()
    if sha256 is not None and got != sha256:
        raise CharlmError(
            f"download from {url} has checksum {got[:16]}..., expected {sha256[:16]}...; "
            "not saved"
        )
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CharlmError(f"cannot create {dest.parent}: {exc.strerror}") from None
    atomic_write(dest, lambda f: f.write(body))
    return dest


def default_corpus() -> Path:
    """Tiny Shakespeare, downloaded on first use (``CHARLM_CORPUS_URL`` names a mirror)."""
    return download(os.environ.get("CHARLM_CORPUS_URL") or TINY_SHAKESPEARE_URL)
