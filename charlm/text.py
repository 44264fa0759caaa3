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
        offset = 0
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
                        f"{path} looks like binary data (NUL byte at offset {at}); "
                        "charlm trains on text files"
                    )
                pending = len(decoder.getstate()[0])
                try:
                    text = decoder.decode(block, final)
                except UnicodeDecodeError as exc:
                    at = offset - pending + exc.start
                    raise DataError(
                        f"{path} is not valid {encoding}: byte 0x{exc.object[exc.start]:02x} "
                        f"at offset {at}; use --encoding, or --set data.errors=replace "
                        "to replace bad bytes"
                    ) from None
                offset += len(block)
                if first and text:
                    text = text.removeprefix(BOM)
                    first = False
                if text:
                    yield text
                if final:
                    break
