"""Data: the id cache, the train/validation split, the batcher and the evaluation windows."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import charlm.data.batching
import charlm.data.text
from charlm.data.batching import Batcher, as_tensor, eval_windows, load_corpus, split
from charlm.data.vocab import Vocab
from charlm.errors import DataError


@st.composite
def batcher_args(draw):
    streams = draw(st.integers(1, 8))
    seq_len = draw(st.integers(1, 12))
    n = draw(st.integers(streams * seq_len + 1, streams * seq_len * 4 + 40))
    return n, streams, seq_len, draw(st.integers(0, 2**31))


def random_ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 50, n, dtype=np.uint8))


def windows(batcher: Batcher, count: int) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
    out = []
    for _ in range(count):
        new_epoch = batcher.new_epoch
        x, y = batcher.next()
        out.append((x, y, new_epoch))
    return out


@settings(max_examples=150, deadline=None)
@given(batcher_args())
def test_batcher_invariants(args):
    n, S, T, seed = args
    ids = random_ids(n, seed % 1000)
    # A twin batcher over positions 0..n-1 shows where each window came from.
    pos = Batcher(torch.arange(n), S, T, seed)
    data = Batcher(ids, S, T, seed)
    steps = pos.steps_per_epoch * 2 + 3  # crosses at least two epoch boundaries
    prev = None
    seen: set[int] = set()
    for (px, py, new_epoch), (x, y, _) in zip(windows(pos, steps), windows(data, steps), strict=True):
        assert x.shape == y.shape == (S, T) and x.dtype == y.dtype == torch.int64
        # y is x shifted by one, both read from the same contiguous stretch of the ids.
        assert torch.equal(py, px + 1)
        assert torch.equal(px[:, 1:], px[:, :-1] + 1)
        assert int(py.max()) < n  # no wrap-around
        assert torch.equal(x, ids[px].long()) and torch.equal(y, ids[py].long())
        if new_epoch:
            assert 0 <= int(px[0, 0]) < T  # the epoch's random offset
            seen.clear()
        else:
            # Each stream carries on exactly where it stopped.
            assert torch.equal(px[:, 0], prev[:, -1] + 1)
        # No prediction is made twice within an epoch: the streams are disjoint.
        preds = set(px.flatten().tolist())
        assert not preds & seen
        seen |= preds
        prev = px


@settings(max_examples=60, deadline=None)
@given(batcher_args())
def test_epoch_uses_nearly_all_text(args):
    n, S, T, seed = args
    b = Batcher(torch.arange(n), S, T, seed)
    assert b.steps_per_epoch >= 1
    used = b.steps_per_epoch * S * T
    # Lost per epoch: the offset (< T), the ragged end of each stream (< T) and the
    # remainder of the division into streams (< S).
    assert n - 1 - used < T + S * T + S


@settings(max_examples=60, deadline=None)
@given(batcher_args(), st.integers(0, 30), st.integers(1, 20))
def test_state_dict_resumes_identical_sequence(args, before, after):
    n, S, T, seed = args
    ids = random_ids(n)
    first = Batcher(ids, S, T, seed)
    windows(first, before)
    state = first.state_dict()
    expected = windows(first, after)
    resumed = Batcher(ids, S, T, seed)
    resumed.load_state_dict(state)
    got = windows(resumed, after)
    for (ex, ey, en), (gx, gy, gn) in zip(expected, got, strict=True):
        assert torch.equal(ex, gx) and torch.equal(ey, gy) and en == gn


@settings(max_examples=60, deadline=None)
@given(batcher_args(), st.sampled_from([1, 2, 4]))
def test_sharding_gives_disjoint_rows(args, world):
    n, S, T, seed = args
    S_total = S * world
    n = max(n, S_total * T + 1)
    positions = torch.arange(n)
    single = windows(Batcher(positions, S_total, T, seed), 5)
    shards = [windows(Batcher(positions, S_total, T, seed, rank, world), 5) for rank in range(world)]
    for step, (x, y, _) in enumerate(single):
        parts = [shard[step][0] for shard in shards]
        assert all(p.shape == (S, T) for p in parts)
        assert torch.equal(torch.cat(parts), x)
        assert torch.equal(torch.cat([shard[step][1] for shard in shards]), y)
        rows = [set(p.flatten().tolist()) for p in parts]
        assert sum(map(len, rows)) == len(set().union(*rows))


def test_batcher_errors():
    with pytest.raises(DataError, match="needs at least 33"):
        Batcher(torch.arange(32), 4, 8, 0)
    with pytest.raises(DataError, match="cannot be split evenly over 2"):
        Batcher(torch.arange(100), 3, 8, 0, rank=0, world=2)


def test_batcher_epoch_offset_varies_with_seed():
    offsets = {Batcher(torch.arange(1000), 4, 16, seed).offset for seed in range(40)}
    assert len(offsets) > 4 and all(0 <= o < 16 for o in offsets)


def test_split_is_nanogpt_cut():
    n = 1_115_394  # tiny Shakespeare
    ids = np.arange(n)
    train, val = split(ids, 0.1)
    assert len(train) == int(n * 0.9) == 1_003_854 and len(val) == 111_540
    assert train[-1] + 1 == val[0] and val[-1] == n - 1


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 5000), st.floats(0.01, 0.9))
def test_split_is_contiguous(n, fraction):
    ids = np.arange(n)
    train, val = split(ids, fraction)
    assert len(train) == int(n * (1 - fraction))
    assert np.array_equal(np.concatenate([train, val]), ids)


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 400), st.integers(1, 40), st.integers(1, 50), st.sampled_from([1, 2, 3]))
def test_eval_windows_cover_every_prediction_once(n, streams, seq_len, world):
    ids = torch.arange(n)
    predictions = []
    for rank in range(world):
        prev = None
        for x, y, reset in eval_windows(ids, streams, seq_len, rank, world):
            assert x.shape == y.shape and x.shape[1] <= seq_len
            assert torch.equal(y, x + 1)
            if not reset:
                # The state carried from the previous window belongs to the same streams.
                assert torch.equal(x[:, 0], prev[:, -1] + 1)
            predictions += x.flatten().tolist()
            prev = x
    assert sorted(predictions) == list(range(n - 1))


# --------------------------------------------------------------------------- id cache
def test_load_corpus_encodes(text_file):
    corpus = load_corpus(text_file)
    text = text_file.read_text(encoding="utf-8")
    assert corpus.vocab == Vocab.from_text(text)
    assert corpus.ids.dtype == np.uint8
    assert corpus.vocab.decode(corpus.ids) == text
    assert corpus.unknown == 0 and not corpus.crlf


def test_cache_hit_skips_decoding_and_memory_maps(text_file, monkeypatch):
    """A second load of the same text neither scans it for its vocabulary nor encodes it.
    (Ids above IN_MEMORY_IDS_BYTES are memory-mapped; the bound is lowered to test that.)"""
    monkeypatch.setattr(charlm.data.batching, "IN_MEMORY_IDS_BYTES", 0)
    crlf_file = text_file.with_name("crlf.txt")
    crlf_file.write_bytes(b"one\r\ntwo\r\n" * 20)
    first, first_crlf = load_corpus(text_file), load_corpus(crlf_file)
    assert list((Path(os.environ["CHARLM_CACHE_DIR"]) / "ids").glob("*.bin"))

    def fail(*args, **kwargs):
        raise AssertionError("encoded again instead of using the cache")

    def no_scan(*args, **kwargs):
        raise AssertionError("scanned again instead of using the cache")

    monkeypatch.setattr(charlm.data.batching, "_encode_to", fail)
    with monkeypatch.context() as m:
        m.setattr(charlm.data.batching, "_scan", no_scan)
        m.setattr(charlm.data.text, "iter_text", no_scan)
        second = load_corpus(text_file)
        assert isinstance(second.ids, np.memmap)
        assert np.array_equal(second.ids, first.ids) and second.vocab == first.vocab
        again = load_corpus(crlf_file)
        assert again.crlf and first_crlf.crlf and again.vocab == first_crlf.vocab
    # Changed content means a different key: the cache is not used for it.
    text_file.write_text(text_file.read_text() + "Z", encoding="utf-8")
    with pytest.raises(AssertionError, match="encoded again"):
        load_corpus(text_file)
    with pytest.raises(AssertionError, match="encoded again"):
        load_corpus(text_file, use_cache=False)


@pytest.mark.parametrize("damaged", [
    '{"code_points": [',
    '{"code_points": [-5, 99999999], "total": 10, "crlf": false}',
    '{"code_points": [97], "total": -3, "crlf": false}',
    '{"code_points": [[97]], "total": 10, "crlf": false}',
    '{"code_points": [97], "total": 10, "crlf": "no"}',
    '[]',
])
def test_damaged_scan_cache_reads_the_text_again(text_file, damaged):
    first = load_corpus(text_file)
    for path in (Path(os.environ["CHARLM_CACHE_DIR"]) / "scan").glob("*.json"):
        path.write_text(damaged)
    for path in (Path(os.environ["CHARLM_CACHE_DIR"]) / "ids").glob("*"):
        path.unlink()
    again = load_corpus(text_file)
    assert again.vocab == first.vocab and np.array_equal(again.ids, first.ids)


def test_cache_tensor_matches(text_file):
    corpus = load_corpus(text_file)
    t = as_tensor(corpus.ids, torch.device("cpu"))
    assert t.dtype == torch.uint8 and t.tolist() == corpus.ids.tolist()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 999), st.integers(0, 1000))
def test_cache_slices_map_their_own_characters(tmp_path_factory, a, b):
    """A slice of the cached memmap (the train/validation split) must map to its own ids,
    not to the start of the file: numpy slices inherit the parent's ``offset``."""
    path = tmp_path_factory.mktemp("slices") / "t.txt"
    path.write_text("".join(chr(97 + i % 26) for i in range(1000)), encoding="utf-8")
    with pytest.MonkeyPatch.context() as m:  # memory-mapped above IN_MEMORY_IDS_BYTES
        m.setattr(charlm.data.batching, "IN_MEMORY_IDS_BYTES", 0)
        corpus = load_corpus(path)
    assert isinstance(corpus.ids, np.memmap)
    lo, hi = sorted((a, b))
    for part in (corpus.ids[lo:hi], *split(corpus.ids, 0.1), corpus.ids[lo:][: hi - lo]):
        assert as_tensor(part, torch.device("cpu")).tolist() == np.asarray(part).tolist()


def test_unknown_characters_with_a_given_vocab(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcxyz abc", encoding="utf-8")
    vocab = Vocab.from_text("abc ")
    with pytest.raises(DataError, match="outside the vocabulary") as info:
        load_corpus(path, vocab=vocab)
    assert "xyz" in str(info.value) and "--drop-unknown" in str(info.value)
    dropped = load_corpus(path, vocab=vocab, drop_unknown=True)
    assert dropped.unknown == 3 and vocab.decode(dropped.ids) == "abc abc"
    # The cached encoding dropped characters: without --drop-unknown it is not reused.
    with pytest.raises(DataError, match="outside the vocabulary"):
        load_corpus(path, vocab=vocab)


def test_empty_and_whitespace_refused(tmp_path):
    for content in ("", " \n\t\n"):
        path = tmp_path / "t.txt"
        path.write_text(content, encoding="utf-8")
        with pytest.raises(DataError, match="empty or only whitespace"):
            load_corpus(path)


def test_crlf_noticed(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"line one\r\nline two\r\n")
    corpus = load_corpus(path)  # read as \n by default, and noticed
    assert corpus.crlf and "\r" not in corpus.vocab.chars and corpus.newline == "normalize"
    kept = load_corpus(path, newline="keep")
    assert kept.crlf and "\r" in kept.vocab.chars
