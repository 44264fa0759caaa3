"""Sampling: warm the state on a seed string in one pass, then generate one character per
step, carrying the state, for several streams at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from charlm.data.vocab import Vocab
from charlm.model.network import CharRNN, State
from charlm.model.stepper import make_step, own, warm  # noqa: F401 - warm re-exported
from charlm.sampling.options import StopScan, check_options, seed_ids, start_ids  # noqa: F401 - re-exported
from charlm.signals import stop_requested

# Below this temperature the logits are scaled in float64 with the largest moved to 0 first.
SMALL_TEMPERATURE = 0.01


def scaled(logits: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """``logits / temperature``. A tiny temperature is scaled in float64 with the largest
    logit moved to 0 first, so every other logit goes to -inf (greedy decoding) instead of
    overflowing to inf - inf = NaN; otherwise float32 is exact enough, and a step on a GPU
    launches three kernels fewer."""
    small = temperature < SMALL_TEMPERATURE
    if bool(small.any()) if isinstance(small, torch.Tensor) else small:
        z = logits.double()
        return (z - z.max(dim=-1, keepdim=True).values) / temperature
    z = logits.float()
    return z if isinstance(temperature, float | int) and temperature == 1 else z / temperature


def pick(
    logits: torch.Tensor, temperature: float | torch.Tensor, top_k: int, top_p: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Inputs: logits (B, V); temperature a number or one per row (B,). Returns the next ids
    (B,): greedy where the temperature is 0, else sampled from the softmax at that temperature,
    limited to the ``top_k`` most likely characters and to the smallest set whose probability
    reaches ``top_p``."""
    if not isinstance(temperature, torch.Tensor):
        if temperature == 0:
            return logits.argmax(dim=-1)
        logits = scaled(logits, temperature)
    else:
        greedy = temperature == 0  # (B,)
        if greedy.all():
            return logits.argmax(dim=-1)
        argmax = logits.argmax(dim=-1)
        logits = scaled(logits, temperature.masked_fill(greedy, 1.0).unsqueeze(-1))
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a character when the ones before it already reach top_p (keeps at least one).
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop_sorted[:, 0] = False  # the most likely always stays, however small top_p is
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    picked = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return picked if not isinstance(temperature, torch.Tensor) else torch.where(greedy, argmax, picked)


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
    the batch runs until every row has ended (or ``length``)."""
    device = model.head.weight.device
    g = torch.Generator(device=device)
    g.manual_seed(random_seed if random_seed is not None else torch.seed())
    B = num_samples * len(temperatures)
    logits, state = logits.expand(B, -1), repeat_state(state, B)  # (B, V)
    temp: float | torch.Tensor = temperatures[0]
    if len(temperatures) > 1:
        temp = torch.tensor(temperatures, device=device).repeat_interleave(num_samples)  # (B,)
    scan = StopScan(list(stop), B) if stop else None
    step = make_step(model, B, state)  # a CUDA graph on a GPU
    out = torch.empty(B, length, dtype=torch.long, device=device)
    steps = 0
    for t in range(length):
        nxt = pick(logits, temp, top_k, top_p, g)  # (B,)
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
