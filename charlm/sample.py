"""Sampling: warm the state on a seed string in one pass, then generate one character per
step, carrying the state, for several streams at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from charlm.decoding import check_options, seed_ids, start_ids  # noqa: F401 - re-exported
from charlm.model import CharRNN, Stepper
from charlm.vocab import Vocab


def pick(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator
) -> torch.Tensor:
    """Inputs: logits (B, V). Returns the next ids (B,): greedy when ``temperature == 0``,
    else sampled from the softmax at that temperature, limited to the ``top_k`` most likely
    characters and to the smallest set whose probability reaches ``top_p``."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # float64, and the largest logit moved to 0 first: a tiny temperature then sends every
    # other logit to -inf, which is greedy decoding, instead of overflowing to inf - inf = NaN.
    logits = logits.double()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
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
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: CharRNN,
    vocab: Vocab,
    seed: list[int],
    length: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_samples: int = 1,
    random_seed: int | None = None,
    on_step: Callable[[list[int]], None] | None = None,
) -> list[str]:
    """Generate ``num_samples`` continuations of ``length`` characters of the seed ids.

    All samples run as one batch. ``on_step`` receives the new ids (one per sample) after
    each step, for streaming. Returns the generated texts (without the seed).
    """
    device = model.head.weight.device
    g = torch.Generator(device=device)
    g.manual_seed(random_seed if random_seed is not None else torch.seed())
    seed = start_ids(vocab, seed)
    ids = torch.tensor([seed], device=device).expand(num_samples, -1)  # (B, T_seed)
    logits, state = model(ids)  # the seed warms the state in one pass
    logits = logits[:, -1]  # (B, V)
    step = Stepper(model)
    out = torch.empty(num_samples, length, dtype=torch.long, device=device)
    for t in range(length):
        nxt = pick(logits, temperature, top_k, top_p, g)  # (B,)
        out[:, t] = nxt
        if on_step is not None:
            on_step(nxt.tolist())
        if t + 1 < length:
            logits, state = step(nxt, state)
    return [vocab.decode(row) for row in out.cpu()]
