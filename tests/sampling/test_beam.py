"""Beam search against an exhaustive search on a tiny model, greedy decoding, stop texts."""

from __future__ import annotations

import itertools

import pytest
import torch

from charlm.config import ModelConfig
from charlm.data.vocab import Vocab
from charlm.model.network import build_model
from charlm.sampling.beam import beam_search
from charlm.sampling.options import start_ids
from charlm.sampling.sampler import generate, seed_ids

VOCAB = Vocab.from_text("ab \n")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["lstm", "gru"])
def model(request):
    torch.manual_seed(3)
    cfg = ModelConfig(cell=request.param, embed_size=4, hidden_size=8, num_layers=2)
    m = build_model(len(VOCAB), cfg).eval()
    with torch.no_grad():  # sharper distributions than at initialization, so beams differ
        m.head.weight.mul_(6)
    return m


def first_stop_end(text: str, stops: list[str]) -> int | None:
    """Length of ``text`` up to the end of its first stop text (naively, position by position)."""
    for n in range(1, len(text) + 1):
        if any(text[:n].endswith(s) for s in stops):
            return n
    return None


def exhaustive(model, seed: str, length: int, stops: list[str]) -> list[tuple[float, float, str]]:
    """Every text the search may return, with (score, total log-probability, text), best first,
    scored by a full forward pass over seed + text."""
    prefix = start_ids(VOCAB, seed_ids(VOCAB, seed))
    found = []
    for n in range(1, length + 1):
        for seq in itertools.product(range(len(VOCAB)), repeat=n):
            text = VOCAB.decode(list(seq))
            end = first_stop_end(text, stops)
            if end != n and not (n == length and end is None):
                continue
            ids = torch.tensor([prefix + list(seq)])
            with torch.no_grad():
                logits, _ = model(ids[:, :-1])
            logp = torch.log_softmax(logits.double(), -1)[0, len(prefix) - 1:]  # (n, V)
            total = float(logp.gather(1, torch.tensor(seq)[:, None]).sum())
            found.append((total / n, total, text))
    return sorted(found, reverse=True)


@pytest.mark.parametrize("stops", [[], ["\n"], [" a", "bb"]])
def test_wide_beam_equals_exhaustive_search(model, stops):
    length = 5
    ranked = exhaustive(model, "ab", length, stops)
    assert ranked[0][0] - ranked[1][0] > 1e-6  # a unique best, so the comparison means something
    score, total, text = ranked[0]
    r = beam_search(model, VOCAB, seed_ids(VOCAB, "ab"), length, width=len(VOCAB) ** (length - 1),
                    stop=stops)
    assert r.text == text
    assert r.logprob == pytest.approx(total, abs=1e-4)
    assert r.score == pytest.approx(score, abs=1e-4)
    assert r.score == pytest.approx(r.logprob / len(r.text))


def test_narrow_beams_never_beat_the_exhaustive_best(model):
    best = exhaustive(model, "b", 4, ["a "])[0][0]
    scores = [beam_search(model, VOCAB, seed_ids(VOCAB, "b"), 4, k, stop=["a "]).score
              for k in (1, 2, 3)]
    assert all(s <= best + 1e-6 for s in scores)
    # and the search is deterministic
    assert beam_search(model, VOCAB, [], 4, 2).text == beam_search(model, VOCAB, [], 4, 2).text


def test_width_one_without_stops_is_greedy(model):
    seed = seed_ids(VOCAB, "a b")
    greedy = generate(model, VOCAB, seed, 12, temperature=0.0)[0]
    assert beam_search(model, VOCAB, seed, 12, 1).text == greedy
    assert generate(model, VOCAB, seed, 12, beam=1) == [greedy]


def test_beam_text_ends_at_its_first_stop(model):
    for stops in (["b"], ["\n"], ["a", " b"]):
        r = beam_search(model, VOCAB, seed_ids(VOCAB, "ab"), 30, 4, stop=stops)
        end = first_stop_end(r.text, stops)
        assert end == len(r.text) or (end is None and len(r.text) == 30), (stops, r.text)
    assert beam_search(model, VOCAB, [], 0, 3).text == ""
