"""The default corpus: tiny Shakespeare, fetched from karpathy/char-rnn and checksum-verified."""

from __future__ import annotations

import hashlib
import http.client
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from charlm.checkpoint import atomic_write
from charlm.errors import CharlmError

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINY_SHAKESPEARE_SIZE = 1_115_394
# Bounds of any download: its size when the expected one is not known, and its duration.
MAX_BYTES = 256 << 20
DEADLINE = 300.0


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
    size: int | None = TINY_SHAKESPEARE_SIZE,
    deadline: float = DEADLINE,
) -> Path:
    """Download ``url`` to ``dest`` (atomically), checking its SHA-256 when given.

    A file already at ``dest`` with the right checksum is kept and not downloaded again. The
    body may be at most ``size`` bytes (``MAX_BYTES`` when unknown) and the whole download
    may take ``deadline`` seconds (plus one ``timeout`` for a read under way), so neither an
    endless response nor a server sending a byte now and then can hold charlm forever.
    """
    dest = dest or data_dir() / "tinyshakespeare.txt"
    if dest.is_file() and (sha256 is None or sha256_of(dest) == sha256):
        return dest
    limit = size if size is not None else MAX_BYTES
    start = time.monotonic()
    blocks, received = [], 0
    try:
        with urllib.request.urlopen(url, timeout=min(timeout, deadline)) as response:
            read = getattr(response, "read1", response.read)  # what has arrived, not 64 KiB
            while block := read(1 << 16):
                received += len(block)
                if received > limit:
                    raise CharlmError(
                        f"download from {url} is larger than the expected {limit:,} bytes; "
                        "stopped, nothing saved"
                    )
                if time.monotonic() - start > deadline:
                    raise CharlmError(
                        f"download from {url} took more than {deadline:g} s "
                        f"({received:,} bytes so far); stopped, nothing saved: try again, or "
                        "pass a text file to train on"
                    )
                blocks.append(block)
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise CharlmError(
            f"could not download {url} ({reason}); check the network, "
            "or pass a text file to train on"
        ) from None
    body = b"".join(blocks)
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
