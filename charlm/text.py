"""Reading training text: files or directories of ``*.txt``, decoded in chunks.

Large files are never held in memory whole: :func:`iter_text` yields decoded chunks, and a
decoding error is reported with the absolute byte offset of the bad byte.
"""

from __future__ import annotations

import codecs
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from charlm.errors import DataError

CHUNK_BYTES = 16 << 20
BOM = "\ufeff"
# A file where more than this share of the characters cannot be decoded is binary data, not
# text with a few bad bytes: it is refused even with errors="replace".
BINARY_SHARE = 0.25


@dataclass(frozen=True)
class Source:
    """The files that make up one training text, read in order as one stream."""

    paths: tuple[Path, ...]
    size: int
    sha256: str

    @property
    def name(self) -> str:
        first = self.paths[0]
        return first.parent.name if len(self.paths) > 1 else first.name

    def describe(self) -> dict:
        return {"name": self.name, "size": self.size, "sha256": self.sha256}


def resolve_source(path: str | Path) -> Source:
    """Check ``path`` and hash its bytes. A directory means all its ``*.txt`` files, sorted."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"training file not found: {path}")
    if path.is_dir():
        paths = tuple(sorted(p for p in path.glob("*.txt") if p.is_file()))
        if not paths:
            raise DataError(f"directory {path} has no *.txt files to train on")
    elif path.is_file():
        paths = (path,)
    else:
        raise DataError(f"not a regular file: {path}")
    digest = hashlib.sha256()
    size = 0
    for p in paths:
        try:
            with open(p, "rb") as f:
                while block := f.read(CHUNK_BYTES):
                    digest.update(block)
                    size += len(block)
        except OSError as exc:
            raise DataError(f"cannot read {p}: {exc.strerror}") from None
    return Source(paths, size, digest.hexdigest())


def iter_text(
    source: Source, encoding: str = "utf-8", errors: str = "strict", chunk_bytes: int = CHUNK_BYTES
) -> Iterator[str]:
    """Decoded text of ``source`` in chunks, with a leading byte-order mark removed.

    Raises DataError for NUL bytes (binary data) and for undecodable bytes when
    ``errors == "strict"``, naming the file and byte offset.
    """
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DataError(f"unknown text encoding: {encoding!r}") from None
    handler = "replace" if errors == "replace" else "strict"
    for path in source.paths:
        decoder = codecs.getincrementaldecoder(encoding)(handler)
        offset = chars = replaced = 0
        first = True
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc.strerror}") from None
        with f:
            while True:
                block = f.read(chunk_bytes)
                final = not block
                if b"\x00" in block and "16" not in encoding and "32" not in encoding:
                    at = offset + block.index(b"\x00")
                    raise DataError(
                        f"{path} looks like binary data (NUL byte at offset {at}); charlm "
                        "trains on text files (for UTF-16 text pass --encoding utf-16)"
                    )
                pending = len(decoder.getstate()[0])
                try:
                    text = decoder.decode(block, final)
                except UnicodeDecodeError as exc:
                    at = offset - pending + exc.start
                    _refuse_binary(path, encoding, _replaced_share(path, encoding, chunk_bytes))
                    raise DataError(
                        f"{path} is not valid {encoding}: byte 0x{exc.object[exc.start]:02x} "
                        f"at offset {at}; use --encoding, or --set data.errors=replace "
                        "to replace bad bytes"
                    ) from None
                offset += len(block)
                chars += len(text)
                replaced += text.count("\ufffd")
                if final and handler == "replace":
                    _refuse_binary(path, encoding, replaced / max(chars, 1))
                if first and text:
                    text = text.removeprefix(BOM)
                    first = False
                if text:
                    yield text
                if final:
                    break


NEWLINES = ("normalize", "keep")


def read_text(source: Source, encoding: str = "utf-8", errors: str = "strict",
              newline: str = "normalize", seen_cr: list[bool] | None = None,
              chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """:func:`iter_text` with line endings as Python's text mode reads them: with ``newline
    = "normalize"``, CRLF and a lone CR become ``\n`` ("keep" leaves them). ``seen_cr``, a
    one-item list, is set to True when the text has a CR at all."""
    pending_cr = False
    for chunk in iter_text(source, encoding, errors, chunk_bytes):
        if seen_cr is not None and not seen_cr[0] and "\r" in chunk:
            seen_cr[0] = True
        if newline == "keep":
            yield chunk
            continue
        if pending_cr:  # a CRLF split between two chunks
            chunk = "\r" + chunk
        pending_cr = chunk.endswith("\r")
        chunk = chunk[:-1] if pending_cr else chunk
        chunk = chunk.replace("\r\n", "\n").replace("\r", "\n")
        if chunk:
            yield chunk
    if pending_cr:
        yield "\n"


def _replaced_share(path: Path, encoding: str, chunk_bytes: int) -> float:
    """The share of the characters of ``path`` that cannot be decoded."""
    decoder = codecs.getincrementaldecoder(encoding)("replace")
    chars = replaced = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            text = decoder.decode(block, not block)
            chars += len(text)
            replaced += text.count("\ufffd")
            if not block:
                return replaced / max(chars, 1)


def _refuse_binary(path: Path, encoding: str, share: float) -> None:
    if share > BINARY_SHARE:
        raise DataError(
            f"{path} looks like binary data ({share:.0%} of it is not valid {encoding}); "
            "charlm trains on text files (if it is text in another encoding, pass --encoding)"
        )
