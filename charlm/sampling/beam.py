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

from charlm.data.vocab import Vocab
from charlm.errors import ConfigError
from charlm.model.cells import CELLS
from charlm.model.network import CharRNN, Stepper, select_state
from charlm.model.stepper import warm
from charlm.sampling.options import start_ids


@dataclass
class BeamResult:
    """The best text, its ids, its total log-probability (nats) and its score (that total
    divided by its length, the objective)."""

    text: str
    ids: list[int]
    logprob: float
    score: float


# Beam search prints nothing before it ends and keeps a back-pointer for every live beam at
# every step, so its length and memory are bounded before it starts (``--beam 2 -n 100000000``
# never returned; ``--beam 4096 -n 100000`` took 3.7 GB in 30 s, and more after).
# A beam's text soon repeats itself: it is for short continuations (10,000 steps of 2 beams
# of a tiny model take ~30 s on a busy 2-core CPU; sampling streams longer texts).
MAX_BEAM_LENGTH = 10_000
MAX_BEAM_BYTES = 1 << 30
# A back-pointer: the parent beam (int16 up to 32,768 beams; the CLI allows 4,096) and the
# id added (int32).
POINTER_BYTES = 2 + 4


def _parent_dtype(width: int) -> torch.dtype:
    return torch.int16 if width <= 2**15 else torch.int32


def _max_live(vocab_size: int, length: int, width: int) -> int:
    """The most beams ever live: ``width``, or fewer when the search is exhaustive (after t
    steps there are at most V ** t texts)."""
    n = 1
    for _ in range(max(length - 1, 0)):
        n *= vocab_size
        if n >= width:
            return width
    return min(n, width)


def beam_bytes(model: CharRNN, vocab_size: int, length: int, width: int) -> int:
    """About the most memory a search of ``width`` beams over ``length`` characters takes:
    its back-pointers, plus per step the beams' states (and the cell's gates, a few copies)
    and the (width, V) scores, candidates and sort of the step (in float64)."""
    cfg = model.cfg
    width = _max_live(vocab_size, length, width)
    per_beam_state = len(CELLS[cfg.cell].states) * cfg.num_layers * cfg.hidden_size * 4
    gates = CELLS[cfg.cell].gates * cfg.hidden_size * 4
    step = width * (4 * per_beam_state + 2 * gates + 6 * vocab_size * 8)
    pointer = POINTER_BYTES + (_parent_dtype(width).itemsize - 2)
    return max(length - 1, 0) * width * pointer + step


def check_beam_size(model: CharRNN, vocab_size: int, length: int, width: int) -> None:
    """ConfigError (one line, exit 2) when the search is longer than MAX_BEAM_LENGTH or needs
    more than MAX_BEAM_BYTES: raised before the search starts."""
    if length > MAX_BEAM_LENGTH:
        raise ConfigError(
            f"--beam searches at most {MAX_BEAM_LENGTH:,} characters and prints nothing until "
            f"it ends; got --length {length:,}: lower --length, or sample without --beam"
        )
    need = beam_bytes(model, vocab_size, length, width)
    if need > MAX_BEAM_BYTES:
        raise ConfigError(
            f"--beam {width} over {length:,} characters needs about {need / 2**30:,.1f} GiB, "
            f"more than the {MAX_BEAM_BYTES >> 30} GiB beam search may use; lower --beam or "
            "--length"
        )


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
    check_beam_size(model, len(vocab), length, width)
    stops = [s for s in stop if s]
    keep = max((len(s) for s in stops), default=1) - 1
    logits, state = warm(model, start_ids(vocab, seed))  # (1, V)
    step = Stepper(model)
    totals = torch.zeros(1, dtype=torch.float64)  # (K,) log-probability of each live beam
    # Back-pointers: at each step, the beam each live beam came from and the id it added,
    # kept compactly (6 bytes a beam a step; pages are only touched as steps fill them).
    live_max = _max_live(len(vocab), length, width)
    parents = torch.empty((max(length - 1, 0), live_max), dtype=_parent_dtype(live_max))
    added = torch.empty((max(length - 1, 0), live_max), dtype=torch.int32)
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
        parents[t, : len(order)] = rows
        added[t, : len(order)] = ids
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
