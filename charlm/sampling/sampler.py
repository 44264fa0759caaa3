"""Sampling: warm the state on a seed string in one pass, then generate one character per
step, carrying the state, for several streams at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from charlm.data.vocab import Vocab
from charlm.model.network import CharRNN, State
from charlm.model.stepper import make_step, own, warm  # noqa: F401 - warm re-exported
from charlm.sampling.draws import fresh_seed, stream_keys, uniforms
from charlm.sampling.options import StopScan, check_options, seed_ids, start_ids  # noqa: F401 - re-exported
from charlm.signals import stop_requested


def _rows(value: float | torch.Tensor, B: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A number, or one per row, as a (B, 1) tensor."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype).reshape(B, 1)
    return torch.full((B, 1), value, dtype=dtype, device=device)


def pick(
    logits: torch.Tensor, temperature: float | torch.Tensor, top_k: int | torch.Tensor,
    top_p: float | torch.Tensor, u: torch.Tensor | np.ndarray | torch.Generator,
) -> torch.Tensor:
    """Inputs: logits (B, V); temperature, top_k and top_p a number each or one per row (B,);
    ``u`` one uniform number in [0, 1) per row (B,) (:mod:`charlm.sampling.draws`), or a
    torch.Generator to draw them from. Returns the
    next ids (B,): greedy where the temperature is 0, else drawn by inverse CDF with ``u`` from
    the softmax at that temperature, limited to the ``top_k`` most likely characters (0: all)
    and to the smallest set whose probability reaches ``top_p`` (1: all).

    Every row is computed on its own (float64, the largest logit moved to 0 first, so a tiny
    temperature is greedy decoding rather than NaN; a stable sort), so a row's character never
    depends on the other rows of the batch."""
    B, V = logits.shape
    device = logits.device
    greedy = None  # rows of temperature 0 (a per-row temperature only)
    z = logits.double()
    if isinstance(temperature, torch.Tensor):
        temp = temperature.to(device=device, dtype=torch.float64).reshape(B, 1)
        greedy = (temp == 0).squeeze(-1)  # (B,)
        if bool(greedy.all()):
            return logits.argmax(dim=-1)
        temp = temp.masked_fill(temp == 0, 1.0)
    elif temperature == 0:
        return logits.argmax(dim=-1)
    else:
        temp = float(temperature)
    # (the same float64 division for a number and for a row of numbers: same values)
    z = (z - z.max(dim=-1, keepdim=True).values) / temp
    k_rows = isinstance(top_k, torch.Tensor)
    k_on = bool((top_k > 0).any()) if k_rows else 0 < top_k < V
    p_on = bool((top_p < 1).any()) if isinstance(top_p, torch.Tensor) else top_p < 1.0
    if k_on and not p_on and not k_rows:  # the k-th largest value, without a full sort
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]  # (B, 1)
        z = z.masked_fill(z < kth, float("-inf"))
    elif k_on or p_on:
        sorted_z, order = torch.sort(z, dim=-1, descending=True, stable=True)
        if k_on:
            k = _rows(top_k, B, torch.long, device)
            k = k.masked_fill((k <= 0) | (k > V), V)  # 0 (off) or more than V: all
            kth = sorted_z.gather(-1, k - 1)  # (B, 1)
            z = z.masked_fill(z < kth, float("-inf"))
            sorted_z = sorted_z.masked_fill(sorted_z < kth, float("-inf"))
        if p_on:
            p = _rows(top_p, B, torch.float64, device)
            probs_sorted = sorted_z.softmax(dim=-1)
            # Drop a character when the ones before it already reach top_p (keeps at least one).
            drop_sorted = ((probs_sorted.cumsum(dim=-1) - probs_sorted) >= p) & (p < 1)
            drop_sorted[:, 0] = False  # the most likely always stays, however small top_p is
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            z = z.masked_fill(drop, float("-inf"))
    cdf = z.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    if isinstance(u, torch.Generator):
        u = torch.rand(B, dtype=torch.float64, generator=u, device=u.device)
    u = torch.as_tensor(u, dtype=torch.float64).to(device).reshape(B, 1)
    # Inverse CDF: the first id whose cumulative probability exceeds u (``right``: ids of
    # probability 0 are never picked, even for u = 0).
    picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp_(max=V - 1)
    return picked if greedy is None else torch.where(greedy, logits.argmax(dim=-1), picked)


def repeat_state(state: State, n: int) -> State:
    """A batch-1 state copied to ``n`` streams."""
    if isinstance(state, tuple):
        return tuple(s.repeat(1, n, 1) for s in state)  # type: ignore[return-value]
    return state.repeat(1, n, 1)


@dataclass
class Run:
    """What :func:`sample_from` generated: ids (B, length) on the CPU, each row's text length
    (shorter where a stop text ended it), and the state after the last step (it has seen
    every generated id but the last of each row, which :func:`sample_from` returns apart)."""

    ids: torch.Tensor
    lengths: list[int]
    state: State
    last: list[int]


@torch.inference_mode()
def sample_from(
    model: CharRNN, vocab: Vocab, logits: torch.Tensor, state: State, length: int,
    temperatures: list[float], top_k: int = 0, top_p: float = 1.0, num_samples: int = 1,
    random_seed: int | None = None, on_step: Callable[[list[int]], None] | None = None,
    stop: Sequence[str] = (),
) -> Run:
    """Generate from warm ``logits`` (1, V) and ``state`` (batch 1): ``num_samples`` rows for
    each temperature, in that order, all as one batch. A row ends after its first stop text;
    the batch runs until every row has ended (or ``length``). Row i draws its characters
    from its own random stream (:mod:`charlm.sampling.draws`: the seed and i), so its text does
    not depend on the batch it ran in."""
    device = model.head.weight.device
    B = num_samples * len(temperatures)
    keys = stream_keys(fresh_seed() if random_seed is None else random_seed, B)
    logits, state = logits.expand(B, -1), repeat_state(state, B)  # (B, V)
    temp: float | torch.Tensor = temperatures[0]
    if len(temperatures) > 1:
        temp = torch.tensor(temperatures, device=device).repeat_interleave(num_samples)  # (B,)
    scan = StopScan(list(stop), B) if stop else None
    step = make_step(model, B, state)  # a CUDA graph on a GPU
    out = torch.empty(B, length, dtype=torch.long, device=device)
    steps = 0
    for t in range(length):
        nxt = pick(logits, temp, top_k, top_p, uniforms(keys, t))  # (B,)
        out[:, t] = nxt
        steps = t + 1
        if on_step is not None:
            on_step(nxt.tolist())
        if scan is not None and scan.feed([vocab.chars[i] for i in nxt.tolist()]):
            break
        if stop_requested():  # training was asked to stop: what is there is the sample
            break
        if t + 1 < length:
            logits, state = step(nxt, state)
    ends = scan.ends if scan is not None else [None] * B
    last = out[:, steps - 1].tolist() if steps else [None] * B
    # The state is the graph's own buffer on a GPU: hand back a copy.
    return Run(out[:, :steps].cpu(), [steps if e is None else e for e in ends], own(state), last)


@torch.inference_mode()
def generate(
    model: CharRNN,
    vocab: Vocab,
    seed: list[int],
    length: int,
    temperature: float | Sequence[float] = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_samples: int = 1,
    random_seed: int | None = None,
    on_step: Callable[[list[int]], None] | None = None,
    *,
    stop: Sequence[str] = (),
    beam: int = 0,
) -> list[str]:
    """Generate ``num_samples`` continuations of ``length`` characters of the seed ids.

    ``temperature`` may be several values: then ``num_samples`` texts for each, in order.
    All samples run as one batch. ``on_step`` receives the new ids (one per sample) after
    each step, for streaming (rows that already met a stop text keep being generated until
    all have, and are cut in the result). ``stop``: each text ends right after its first
    occurrence of any of these texts. ``beam`` > 0: the single most likely text by beam
    search of that width (see :mod:`charlm.sampling.beam`); the sampling options must be left unset.
    Returns the generated texts (without the seed).
    """
    temps = [temperature] if isinstance(temperature, (int, float)) else list(temperature)
    if beam:
        from charlm.sampling.beam import beam_search

        return [beam_search(model, vocab, seed, length, beam, stop=stop).text]
    logits, state = warm(model, start_ids(vocab, seed))
    run = sample_from(model, vocab, logits, state, length, temps, top_k, top_p, num_samples,
                      random_seed, on_step, stop)
    return [vocab.decode(row[:n]) for row, n in zip(run.ids, run.lengths, strict=True)]
