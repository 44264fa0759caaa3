"""Reading text: BOM, chunked decoding, byte offsets of bad bytes, encodings, directories."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from charlm.data.text import iter_text, resolve_source
from charlm.errors import DataError


def read(path: Path, **kwargs) -> str:
    return "".join(iter_text(resolve_source(path), **kwargs))


def write(tmp_path: Path, data: bytes, name: str = "input.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@settings(max_examples=60, deadline=None)
@given(st.text(st.characters(exclude_categories=("Cs",)).filter(lambda c: c != "\0"),
               max_size=80),
       st.integers(1, 9), st.booleans())
@example("\ufeffx\ufeff", 1, False)
@example("\ufeffx", 2, True)
def test_chunked_decoding_equals_whole_decoding(text, chunk_bytes, bom):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.txt"
        path.write_bytes(("\ufeff" if bom else "").encode() + text.encode("utf-8"))
        # Only the first U+FEFF of a file is a byte-order mark.
        expected = text if bom else text.removeprefix("\ufeff")
        assert read(path, chunk_bytes=chunk_bytes) == expected


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 1 << 20])
def test_bom_stripped(tmp_path, chunk_bytes):
    path = write(tmp_path, "\ufeffhello\ufeff".encode())
    # Only the leading mark is a BOM; one inside the text is a character.
    assert read(path, chunk_bytes=chunk_bytes) == "hello\ufeff"


def test_invalid_utf8_names_offset(tmp_path):
    path = write(tmp_path, b"abc\xffdef")
    with pytest.raises(DataError, match=r"not valid utf-8: byte 0xff at offset 3;"):
        read(path)


@pytest.mark.parametrize("chunk_bytes", [1, 7, 16, 64])
def test_invalid_byte_after_first_chunk(tmp_path, chunk_bytes):
    path = write(tmp_path, "é".encode() * 50 + b"\xff" + b"tail")
    with pytest.raises(DataError, match=r"byte 0xff at offset 100;") as info:
        read(path, chunk_bytes=chunk_bytes)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("chunk_bytes", [1, 5, 16, 17, 64])
def test_broken_sequence_across_chunks(tmp_path, chunk_bytes):
    # A 3-byte character cut short: the offset is that of its lead byte, even when the
    # lead byte was held back by the decoder at the end of an earlier chunk.
    path = write(tmp_path, b"a" * 16 + b"\xe6\xbc" + b"x" * 20)
    with pytest.raises(DataError, match=r"byte 0xe6 at offset 16;"):
        read(path, chunk_bytes=chunk_bytes)


@pytest.mark.parametrize("chunk_bytes", [1, 2, 64])
def test_truncated_at_end_of_file(tmp_path, chunk_bytes):
    path = write(tmp_path, b"abc\xe6\xbc")
    with pytest.raises(DataError, match=r"byte 0xe6 at offset 3;"):
        read(path, chunk_bytes=chunk_bytes)


def test_replace_errors(tmp_path):
    path = write(tmp_path, b"ab\xffc")
    assert read(path, errors="replace") == "ab\ufffdc"


def test_latin1_encoding(tmp_path):
    path = write(tmp_path, "café naïve\n".encode("latin-1"))
    with pytest.raises(DataError, match="offset 3"):
        read(path)
    assert read(path, encoding="latin-1") == "café naïve\n"


def test_utf16_with_bom(tmp_path):
    path = write(tmp_path, "héllo 😀".encode("utf-16"))  # with its BOM, and NUL bytes
    assert read(path, encoding="utf-16", chunk_bytes=3) == "héllo 😀"


def test_unknown_encoding(tmp_path):
    path = write(tmp_path, b"abc")
    with pytest.raises(DataError, match="unknown text encoding: 'klingon'"):
        read(path, encoding="klingon")


@pytest.mark.parametrize("chunk_bytes", [4, 1 << 20])
def test_nul_bytes_refused(tmp_path, chunk_bytes):
    path = write(tmp_path, b"hello world\x00\x01\x02")
    with pytest.raises(DataError, match=r"binary data \(NUL byte at offset 11\)"):
        read(path, chunk_bytes=chunk_bytes)


def test_directory_read_in_sorted_order(tmp_path):
    corpus = tmp_path / "books"
    corpus.mkdir()
    (corpus / "b.txt").write_text("second\n", encoding="utf-8")
    (corpus / "a.txt").write_bytes("\ufefffirst\n".encode())
    (corpus / "c.txt").write_text("third\n", encoding="utf-8")
    (corpus / "notes.md").write_text("ignored\n", encoding="utf-8")
    (corpus / "sub.txt").mkdir()  # a directory named like a text file is skipped
    source = resolve_source(corpus)
    assert [p.name for p in source.paths] == ["a.txt", "b.txt", "c.txt"]
    assert source.name == "books"
    assert "".join(iter_text(source)) == "first\nsecond\nthird\n"
    raw = b"".join(p.read_bytes() for p in source.paths)
    assert source.size == len(raw)
    assert source.sha256 == hashlib.sha256(raw).hexdigest()


def test_single_file_source(tmp_path):
    path = write(tmp_path, b"hello", name="notes.txt")
    source = resolve_source(path)
    assert source.name == "notes.txt" and source.size == 5
    assert source.describe()["sha256"] == hashlib.sha256(b"hello").hexdigest()


def test_missing_and_empty_directory(tmp_path):
    with pytest.raises(DataError, match="training file not found"):
        resolve_source(tmp_path / "nope.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"has no \*\.txt files"):
        resolve_source(tmp_path / "empty")
