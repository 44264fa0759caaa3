"""Sampling: greedy, seeded randomness, top-k, top-p, batches, seeds with unknown characters."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from charlm.config import ModelConfig
from charlm.data.vocab import Vocab
from charlm.errors import CharlmError
from charlm.model.network import build_model
from charlm.sampling.sampler import check_options, generate, pick, seed_ids

VOCAB = Vocab.from_text("abcdefghij \nTHE")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["rnn", "lstm", "gru"])
def model(request):
    torch.manual_seed(0)
    cfg = ModelConfig(cell=request.param, embed_size=8, hidden_size=16, num_layers=2)
    return build_model(len(VOCAB), cfg).eval()


def run(model, seed="THE ", length=40, **kwargs):
    return generate(model, VOCAB, seed_ids(VOCAB, seed), length, **kwargs)


def test_greedy_is_deterministic(model):
    a = run(model, temperature=0.0, random_seed=1)
    b = run(model, temperature=0.0, random_seed=2)
    c = run(model, temperature=0.0)
    assert a == b == c and len(a[0]) == 40


def test_greedy_follows_the_full_sequence_argmax(model):
    """The carried state gives the same predictions as re-reading the whole text."""
    seed = seed_ids(VOCAB, "THE ")
    text = generate(model, VOCAB, seed, 30, temperature=0.0)[0]
    ids = torch.tensor([seed + VOCAB.encode(text).tolist()])
    with torch.no_grad():
        logits, _ = model(ids)  # (1, T, V)
    predicted = logits[0, len(seed) - 1 : -1].argmax(-1)
    assert VOCAB.decode(predicted) == text


def test_same_random_seed_same_text(model):
    a = run(model, temperature=1.0, random_seed=7, num_samples=3)
    b = run(model, temperature=1.0, random_seed=7, num_samples=3)
    c = run(model, temperature=1.0, random_seed=8, num_samples=3)
    assert a == b and a != c
    assert len(set(a)) > 1  # the samples of a batch are independent draws


def test_top_k_one_is_greedy(model):
    greedy = run(model, temperature=0.0)
    for seed in (1, 2):
        assert run(model, temperature=1.5, top_k=1, random_seed=seed) == greedy


def test_top_k_limits_choices():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).expand(4000, -1)
    got = pick(logits, 1.0, 2, 1.0, torch.Generator().manual_seed(0))
    assert set(got.tolist()) == {0, 1}


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.3, {0}), (0.45, {0}), (0.55, {0, 1}), (0.79, {0, 1}), (0.81, {0, 1, 2}),
     (0.96, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})],
)
def test_top_p_keeps_smallest_set_reaching_p(top_p, kept):
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    order = torch.tensor([2, 0, 3, 1])  # not sorted: the filter must sort
    logits = probs.log()[:, order].expand(20000, -1)
    got = pick(logits, 1.0, 0, top_p, torch.Generator().manual_seed(0))
    assert {int(order[i]) for i in got.unique()} == kept


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=2, max_size=12), st.floats(0.01, 1.0),
       st.integers(0, 2**31))
def test_top_p_never_samples_outside_the_nucleus(values, top_p, seed):
    logits = torch.tensor([values])
    probs = logits.softmax(-1)[0].double()
    ranked = sorted(range(len(values)), key=lambda i: -float(probs[i]))
    nucleus, total = set(), 0.0
    for i in ranked:
        nucleus.add(i)
        total += float(probs[i])
        if total >= top_p - 1e-6:
            break
    got = pick(logits.expand(200, -1), 1.0, 0, top_p, torch.Generator().manual_seed(seed))
    # Ties between equal probabilities may swap members at the edge: compare by probability.
    floor = min(float(probs[i]) for i in nucleus)
    assert all(float(probs[i]) >= floor - 1e-6 for i in got.tolist())


def test_temperature_zero_is_argmax():
    logits = torch.randn(50, 9, generator=torch.Generator().manual_seed(3))
    got = pick(logits, 0.0, 3, 0.5, torch.Generator())
    assert torch.equal(got, logits.argmax(-1))


def test_low_temperature_approaches_greedy():
    logits = torch.tensor([[1.0, 1.5, 0.5]]).expand(1000, -1)
    got = pick(logits, 0.01, 0, 1.0, torch.Generator().manual_seed(0))
    assert set(got.tolist()) == {1}


def test_num_samples_batched(model):
    texts = run(model, length=25, temperature=0.9, num_samples=5, random_seed=3)
    assert len(texts) == 5 and all(len(t) == 25 for t in texts)
    assert all(set(t) <= set(VOCAB.chars) for t in texts)
    # Greedy samples do not depend on the batch: each equals a run on its own.
    assert run(model, temperature=0.0, num_samples=4) == run(model, temperature=0.0) * 4


def test_on_step_streams_every_character(model):
    steps: list[list[int]] = []
    texts = run(model, length=12, num_samples=2, random_seed=5, on_step=steps.append)
    assert len(steps) == 12 and all(len(s) == 2 for s in steps)
    for i, text in enumerate(texts):
        assert VOCAB.decode([s[i] for s in steps]) == text


def test_empty_seed_and_zero_length(model):
    assert len(run(model, seed="", length=15, random_seed=1)[0]) == 15
    assert run(model, length=0) == [""]


def test_seed_with_unknown_characters():
    with pytest.raises(CharlmError) as info:
        seed_ids(VOCAB, "THE quiz!")
    message = str(info.value)
    assert "'!'" in message and "'q'" in message and "'u'" in message and "'z'" in message
    assert "--drop-unknown" in message and "'T'" not in message
    assert VOCAB.decode(seed_ids(VOCAB, "THE quiz!", drop_unknown=True)) == "THE i"
    assert seed_ids(VOCAB, "") == []
    assert seed_ids(VOCAB, "xyz", drop_unknown=True) == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ((-1, 1.0, 0, 1.0, 1), "--length"),
        ((10, -0.5, 0, 1.0, 1), "--temperature"),
        ((10, 1.0, -2, 1.0, 1), "--top-k"),
        ((10, 1.0, 0, 0.0, 1), "--top-p"),
        ((10, 1.0, 0, 1.5, 1), "--top-p"),
        ((10, 1.0, 0, 1.0, 0), "--num-samples"),
    ],
)
def test_check_options(args, needle):
    with pytest.raises(CharlmError, match=needle):
        check_options(*args)
    check_options(10, 0.0, 0, 1.0, 1)
