"""Vocabulary: sorted code points, vectorized encode against a naive loop, id dtypes, JSON."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charlm.data.vocab import Vocab, code_points, id_dtype

# Any code point except lone surrogates (which are not valid text), plus a few hand-picked
# CJK characters and emoji so those always appear.
CHARS = st.characters(exclude_categories=("Cs",))
TEXTS = st.text(CHARS, max_size=200) | st.text(st.sampled_from("漢字かな한글😀🐍👍🏽\n a"), max_size=50)


def naive_encode(vocab: Vocab, text: str) -> list[int]:
    index = {c: i for i, c in enumerate(vocab.chars)}
    return [index[c] for c in text]


@settings(max_examples=200, deadline=None)
@given(TEXTS)
def test_round_trip_and_matches_naive_loop(text):
    vocab = Vocab.from_text(text)
    assert list(vocab.chars) == sorted(set(text))
    ids = vocab.encode(text)
    assert ids.tolist() == naive_encode(vocab, text)
    assert vocab.decode(ids) == text
    assert vocab.decode(ids.tolist()) == text


@settings(max_examples=100, deadline=None)
@given(TEXTS, TEXTS)
def test_encode_with_a_larger_vocabulary(text, extra):
    vocab = Vocab.from_text(text + extra)
    assert vocab.encode(text).tolist() == naive_encode(vocab, text)
    assert vocab.decode(vocab.encode(text)) == text


def test_cjk_and_emoji():
    text = "天地玄黃 🐍😀\n👍🏽"
    vocab = Vocab.from_text(text)
    # Code points, not UTF-16 units or bytes: the emoji with a skin tone is two characters.
    assert len(vocab) == len(set(text)) == 10
    assert "🐍" in vocab.chars and "\U0001f3fd" in vocab.chars
    assert vocab.decode(vocab.encode(text)) == text
    assert code_points("😀").tolist() == [0x1F600]


@pytest.mark.parametrize(
    ("size", "dtype"),
    [(1, np.uint8), (255, np.uint8), (256, np.uint8), (257, np.uint16), (65536, np.uint16),
     (65537, np.uint32), (0x110000, np.uint32)],
)
def test_smallest_id_dtype(size, dtype):
    assert id_dtype(size) == np.dtype(dtype)


def test_encode_uses_smallest_dtype():
    small = Vocab.from_text("abc")
    assert small.encode("cab").dtype == np.uint8
    wide = Vocab.from_code_points(np.arange(0x4E00, 0x4E00 + 300))
    ids = wide.encode("\u4e00\u4f2b")
    assert ids.dtype == np.uint16 and ids.tolist() == [0, 299]
    huge = Vocab.from_code_points(np.arange(0x20, 0x20 + 70_000))
    assert huge.encode(chr(0x20 + 69_999)).dtype == np.uint32


def test_json_round_trip():
    vocab = Vocab.from_text('say "hi"\\\n\t漢😀')
    text = vocab.to_json()
    assert "漢" in text and "😀" in text  # readable, not \u escapes
    assert Vocab.from_json(text) == vocab


# Unsorted is allowed: a vocabulary grown for fine-tuning appends its new characters.
@pytest.mark.parametrize("bad", ['{"a": 1}', '["ab"]', "[1, 2]", '["a", "a"]', '["b", "a", "b"]'])
def test_json_rejects_bad_vocabularies(bad):
    with pytest.raises(ValueError):
        Vocab.from_json(bad)


def test_unknown_chars_listed():
    vocab = Vocab.from_text("hello")
    assert vocab.unknown_chars("hello wörld😀") == [" ", "d", "r", "w", "ö", "😀"]
    assert vocab.unknown_chars("hole") == []
    with pytest.raises(KeyError) as info:
        vocab.encode("help!")
    assert info.value.args[0] == ["!", "p"]


def test_lookup_gives_minus_one_outside():
    vocab = Vocab.from_text("ab")
    ids = vocab.lookup(code_points("a\U0010ffffbz"))
    assert ids.tolist() == [0, -1, 1, -1]


def test_empty_text():
    vocab = Vocab.from_text("")
    assert len(vocab) == 0
    assert vocab.encode("").tolist() == []
    assert vocab.decode([]) == ""


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60), st.sampled_from(["", "é", "\U0001f600"]))
def test_code_points_fast_ascii_path_agrees(text, extra):
    """ASCII text takes a byte-copy path (uint8), other text the UTF-32 view (uint32)."""
    for t in (text, text + extra):
        cps = code_points(t)
        assert cps.tolist() == [ord(c) for c in t]
        assert cps.dtype == (np.uint8 if t.isascii() else np.uint32)
        vocab = Vocab.from_text("ab")
        expected = [vocab.chars.index(c) if c in vocab.chars else -1 for c in t]
        assert vocab.lookup(cps).tolist() == expected
