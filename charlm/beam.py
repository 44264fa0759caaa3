"""Beam search: the most likely continuation of a seed, instead of a random one.

The objective is the length-normalized log-probability of the generated text: the sum of
log p(char | everything before) over the generated characters, divided by their number. A
text ends at ``length`` characters, or right after its first stop text (the same rule as
sampling with ``stop``), so with stop texts the candidates differ in length and the
normalization keeps short texts from winning only by being short. Without stop texts every
candidate has ``length`` characters and the search maximizes the plain log-probability.

Each step extends every live beam by every character; candidates that complete a stop text
are finished (the best finished one is kept), and the ``width`` most likely others stay live.
Ties are broken by a stable sort (lower beam, then lower id first), so the result is
deterministic. With ``width >= V ** (length - 1)`` nothing is ever pruned and the search is
exhaustive; with ``width == 1`` and no stop texts it is greedy decoding.

Shapes: K live beams, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from charlm.decoding import start_ids
from charlm.model import CharRNN, Stepper, select_state
from charlm.stepping import warm
from charlm.vocab import Vocab


@dataclass
class BeamResult:
    """The best text, its ids, its total log-probability (nats) and its score (that total
    divided by its length, the objective)."""

    text: str
    ids: list[int]
    logprob: float
    score: float


def _completes(tails: list[str], stops: Sequence[str], vocab: Vocab) -> torch.Tensor:
    """(K, V) bool: which next character completes a stop text after each beam's tail."""
    done = torch.zeros(len(tails), len(vocab), dtype=torch.bool)
    index = {c: i for i, c in enumerate(vocab.chars)}
    for k, tail in enumerate(tails):
        for s in stops:
            if s[-1] in index and tail.endswith(s[:-1]) and len(tail) >= len(s) - 1:
                done[k, index[s[-1]]] = True
    return done


@torch.inference_mode()
def beam_search(
    model: CharRNN, vocab: Vocab, seed: list[int], length: int, width: int,
    stop: Sequence[str] = (),
) -> BeamResult:
    """The continuation of the seed ids (at most ``length`` characters, ending at the first
    stop text) with the best length-normalized log-probability found with ``width`` beams."""
    if length == 0:
        return BeamResult("", [], 0.0, 0.0)
    stops = [s for s in stop if s]
    keep = max((len(s) for s in stops), default=1) - 1
    logits, state = warm(model, start_ids(vocab, seed))  # (1, V)
    step = Stepper(model)
    totals = torch.zeros(1, dtype=torch.float64)  # (K,) log-probability of each live beam
    # Back-pointers: at each step, the beam each live beam came from and the id it added.
    parents: list[torch.Tensor] = []
    added: list[torch.Tensor] = []
    tails = [""]  # the last characters of each beam, to spot stop texts
    best: tuple[float, float, int, int, int] | None = None  # (score, total, step, beam, id)
    V = len(vocab)
    for t in range(length):
        logp = torch.log_softmax(logits.double().cpu(), dim=-1)  # (K, V)
        cand = totals[:, None] + logp  # (K, V)
        last = t + 1 == length
        done = torch.ones_like(cand, dtype=torch.bool) if last else _completes(tails, stops, vocab)
        if done.any():
            scores = cand.masked_fill(~done, float("-inf")) / (t + 1)
            flat = int(torch.sort(scores.flatten(), descending=True, stable=True).indices[0])
            score = float(scores.flatten()[flat])
            if best is None or score > best[0]:
                best = (score, float(cand.flatten()[flat]), t, flat // V, flat % V)
        if last:
            break
        live = cand.masked_fill(done, float("-inf")).flatten()  # (K * V,)
        order = torch.sort(live, descending=True, stable=True).indices
        order = order[: min(width, int(torch.isfinite(live).sum()))]
        if len(order) == 0:
            break
        rows, ids = order // V, order % V
        totals = live[order]
        parents.append(rows)
        added.append(ids)
        tails = [(tails[r] + vocab.chars[i])[-keep:] if keep else ""
                 for r, i in zip(rows.tolist(), ids.tolist(), strict=True)]
        device = model.head.weight.device
        state = select_state(state, rows.to(device))
        logits, state = step(ids.to(device), state)
    assert best is not None  # the last step finishes every candidate
    score, total, t, k, last = best
    ids = [last]
    for s in range(t - 1, -1, -1):  # follow the back-pointers to the first step
        ids.append(int(added[s][k]))
        k = int(parents[s][k])
    ids.reverse()
    return BeamResult(vocab.decode(ids), ids, total, score)
