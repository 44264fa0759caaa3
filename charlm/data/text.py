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


def text_paths(path: str | Path) -> tuple[Path, ...]:
    """The files of a training text: ``path`` itself, or all ``*.txt`` of a directory, sorted."""
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
    return paths


# How much of each file :func:`check_start` reads before the whole file is hashed.
START_BYTES = 64 << 10


def check_start(paths: tuple[Path, ...], encoding: str = "utf-8", errors: str = "strict") -> None:
    """Refuse a file that is not text from its first ``START_BYTES`` bytes, before anything
    reads all of it (hashing a sparse 10 GB file of zeros took 30 s before "NUL byte at
    offset 0"). The messages are those :func:`iter_text` gives for the same bytes; a file
    that fits in the first block is left to it whole."""
    codec = check_encoding(encoding)
    wide = codec.startswith(("utf-16", "utf-32"))
    for path in paths:
        try:
            with open(path, "rb") as f:
                head = f.read(START_BYTES)
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc.strerror}") from None
        if b"\x00" in head and not wide:
            at = head.index(b"\x00")
            raise DataError(
                f"{path} looks like binary data (NUL byte at offset {at}); "
                "charlm trains on text files (for UTF-16 text pass --encoding utf-16)"
            )
        if errors != "strict" or len(head) < START_BYTES:
            continue  # the whole file is checked as it is read: it is small, or may be
        codec_here = _with_byte_order(codec, head)
        try:
            codecs.getincrementaldecoder(codec_here)("strict").decode(head, False)
        except UnicodeDecodeError as exc:
            text = codecs.getincrementaldecoder(codec_here)("replace").decode(head, False)
            _refuse_binary(path, encoding, text.count("\ufffd") / max(len(text), 1))
            raise DataError(
                f"{path} is not valid {encoding}: byte 0x{exc.object[exc.start]:02x} "
                f"at offset {exc.start}; use --encoding, or --set data.errors=replace "
                "to replace bad bytes"
            ) from None
        except ValueError:
            continue  # reported with its context when the file is read


def resolve_source(path: str | Path) -> Source:
    """Check ``path`` and hash its bytes. A directory means all its ``*.txt`` files, sorted."""
    paths = text_paths(path)
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


def check_encoding(name: str) -> str:
    """The codec name of ``name`` when it is a text encoding (bytes to str); raises DataError
    for unknown names and for codecs such as rot13, base64 or zlib, which are not."""
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError, TypeError):  # ValueError: a NUL in the name
        raise DataError(f"unknown text encoding: {name!r}; use one like utf-8, latin-1 or "
                        "utf-16") from None
    if not getattr(info, "_is_text_encoding", True):
        raise DataError(f"{name!r} is not a text encoding (it does not turn bytes into text); "
                        "use one like utf-8, latin-1 or utf-16")
    return info.name


def _with_byte_order(codec: str, head: bytes) -> str:
    """UTF-16/32 without a byte-order mark: Python's incremental decoder refuses it, so pick
    the byte order from where the zero bytes of ASCII characters fall (little-endian if
    unsure, as Windows writes it)."""
    width = {"utf-16": 2, "utf-32": 4}.get(codec)
    boms = {2: (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE),
            4: (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)}
    if width is None or head.startswith(boms[width]):
        return codec
    head = head[:4096]  # a few thousand characters tell
    units = head[: len(head) - len(head) % width]
    big = sum(units[i] == 0 for i in range(0, len(units), width))
    little = sum(units[i + width - 1] == 0 for i in range(0, len(units), width))
    return f"{codec}-{'be' if big > little else 'le'}"


def changed(source: Source) -> DataError:
    return DataError(
        f"{source.name} changed while it was being read (is something still writing it?); "
        "run again once it is complete"
    )


def iter_text(
    source: Source, encoding: str = "utf-8", errors: str = "strict", chunk_bytes: int = CHUNK_BYTES
) -> Iterator[str]:
    """Decoded text of ``source`` in chunks, with a leading byte-order mark removed.

    Raises DataError for NUL bytes (binary data) and for undecodable bytes when
    ``errors == "strict"``, naming the file and byte offset; and when the bytes read are not
    the ones :func:`resolve_source` hashed (the file changed meanwhile), so that what is built
    from the text always belongs to its SHA-256.
    """
    codec = check_encoding(encoding)
    wide = codec.startswith(("utf-16", "utf-32"))
    handler = "replace" if errors == "replace" else "strict"
    digest, size = hashlib.sha256(), 0
    for path in source.paths:
        decoder = None
        offset = chars = replaced = 0
        first = True
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc.strerror}") from None
        with f:
            while True:
                block = f.read(chunk_bytes)
                digest.update(block)
                size += len(block)
                if size > source.size:  # still growing: stop now, not at its end
                    raise changed(source)
                final = not block
                if decoder is None:
                    decoder = codecs.getincrementaldecoder(_with_byte_order(codec, block))(handler)
                if b"\x00" in block and not wide:
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
                except ValueError as exc:  # UnicodeError and the like, without an offset
                    raise DataError(
                        f"{path} cannot be decoded as {encoding} ({exc}); use --encoding, or "
                        "--set data.errors=replace to replace bad bytes"
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
    if size != source.size or digest.hexdigest() != source.sha256:
        raise changed(source)


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
    decoder = None
    chars = replaced = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            if decoder is None:
                codec = _with_byte_order(check_encoding(encoding), block)
                decoder = codecs.getincrementaldecoder(codec)("replace")
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
