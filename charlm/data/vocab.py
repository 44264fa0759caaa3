"""Vocabulary: the sorted set of code points of the training text, and char <-> id maps.
A vocabulary grown for fine-tuning (:meth:`Vocab.grow`) keeps the old characters and ids and
appends the new characters after them, so it is sorted only within each part.

Encoding is vectorized: the text is viewed as an array of UTF-32 code points and mapped
through a lookup table, so there is no per-character Python loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

UNKNOWN = -1
MAX_CODE_POINT = 0x10FFFF


def code_points(text: str) -> np.ndarray:
    """The code points of ``text``: uint8 for ASCII text (a copy of its bytes, the common and
    fast case), else uint32 (a view of its UTF-32 encoding)."""
    if text.isascii():  # O(1) in CPython: a flag of the string
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    # surrogatepass keeps lone surrogates (from "surrogateescape" decoding) encodable.
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


def show_chars(chars, most: int = 20) -> str:
    """Characters as a readable list of their reprs (escapes for control characters), the
    first ``most`` of them: ``'é', 'ß', ...``."""
    shown = ", ".join(repr(c) for c in list(chars)[:most])
    return shown + (", ..." if len(chars) > most else "")


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds ids ``0 .. vocab_size - 1``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"vocabulary too large: {vocab_size}")


@dataclass(frozen=True)
class Vocab:
    """Unique characters (sorted, unless grown); the id of a character is its index."""

    chars: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("vocabulary characters must be unique")
        cps = np.array([ord(c) for c in self.chars], dtype=np.int64)
        top = int(cps.max()) if len(cps) else 0
        lut = np.full(top + 1, UNKNOWN, dtype=np.int32)
        lut[cps] = np.arange(len(cps), dtype=np.int32)
        object.__setattr__(self, "_lut", lut)
        object.__setattr__(self, "_table", cps.astype("<u4"))

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        return cls.from_code_points(np.unique(code_points(text)))

    @classmethod
    def from_code_points(cls, cps: np.ndarray) -> Vocab:
        return cls(tuple(chr(int(c)) for c in np.sort(cps)))

    def grow(self, cps: np.ndarray) -> Vocab:
        """This vocabulary plus the code points ``cps`` it lacks, appended in sorted order:
        every old character keeps its id."""
        cps = np.asarray(cps, dtype=np.int64)
        new = np.unique(cps[self.lookup(cps) == UNKNOWN])
        return Vocab(self.chars + tuple(chr(int(c)) for c in new))

    def __len__(self) -> int:
        return len(self.chars)

    @property
    def dtype(self) -> np.dtype:
        return id_dtype(max(len(self), 1))

    def lookup(self, cps: np.ndarray) -> np.ndarray:
        """Map code points to ids as int32; code points outside the vocabulary give -1."""
        lut: np.ndarray = self._lut  # type: ignore[attr-defined]
        if cps.size == 0 or int(cps.max()) < len(lut):
            return lut.take(cps)  # 2x faster than the masked indexing below
        inside = cps < len(lut)
        ids = np.full(cps.shape, UNKNOWN, dtype=np.int32)
        ids[inside] = lut[cps[inside]]
        return ids

    def encode(self, text: str) -> np.ndarray:
        """Ids of ``text`` in the smallest dtype; raises KeyError listing unknown characters."""
        ids = self.lookup(code_points(text))
        if (ids == UNKNOWN).any():
            raise KeyError(self.unknown_chars(text))
        return ids.astype(self.dtype)

    def unknown_chars(self, text: str) -> list[str]:
        """The distinct characters of ``text`` that are not in the vocabulary, sorted."""
        cps = code_points(text)
        missing = np.unique(cps[self.lookup(cps) == UNKNOWN])
        return [chr(int(c)) for c in missing]

    def decode(self, ids) -> str:
        """Text of a sequence of ids (any int array, tensor or list)."""
        table: np.ndarray = self._table  # type: ignore[attr-defined]
        cps = table[np.asarray(ids, dtype=np.int64)]
        return cps.tobytes().decode("utf-32-le", "surrogatepass")

    def to_json(self) -> str:
        return json.dumps(list(self.chars), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Vocab:
        chars = json.loads(text)
        if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise ValueError("vocabulary JSON must be a list of single characters")
        return cls(tuple(chars))
