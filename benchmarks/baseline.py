"""A straightforward fp32 PyTorch character-model loop, as tutorials write it: random windows
built from numpy every step, zero initial state per batch, plain Adam, ``loss.item()`` every
step. It is the baseline the benchmarks compare charlm against (same model, same batch)."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn


class TutorialModel(nn.Module):
    def __init__(self, vocab_size: int, embed: int, hidden: int, layers: int, cell: str = "lstm"):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed)
        self.rnn = getattr(nn, cell.upper())(embed, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, x):
        out, _ = self.rnn(self.embed(x))
        return self.head(out)


def tutorial_train(data: np.ndarray, vocab_size: int, embed: int, hidden: int, layers: int,
                   batch: int, window: int, lr: float = 2e-3, steps: int = 0,
                   seconds: float = 0.0, cell: str = "lstm", seed: int = 0):
    """Train for ``steps`` steps or ``seconds`` seconds; returns (model, chars/s after the
    first 3 steps)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = TutorialModel(vocab_size, embed, hidden, layers, cell)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    step, t0, t_warm = 0, time.perf_counter(), None
    while (steps and step < steps) or (seconds and time.perf_counter() - t0 < seconds):
        ix = rng.integers(0, len(data) - window - 1, batch)
        x = torch.stack([torch.from_numpy(data[i : i + window].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + window].astype(np.int64)) for i in ix])
        logits = model(x)
        loss = nn.functional.cross_entropy(logits.view(-1, vocab_size), y.view(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()
        step += 1
        if step == 3:
            t_warm = time.perf_counter()
    elapsed = time.perf_counter() - (t_warm or t0)
    return model, (step - 3) * batch * window / max(elapsed, 1e-9)


@torch.no_grad()
def tutorial_val_loss(model: TutorialModel, val: np.ndarray, window: int = 256) -> float:
    """Mean loss over every prediction of ``val``, carrying state in 32 streams (the same
    measure as charlm's evaluation)."""
    from charlm.evaluate import mean_loss

    class Adapter(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m
            self.head = m.head

        def forward(self, x, state=None):
            out, state = self.m.rnn(self.m.embed(x), state)
            return self.m.head(out), state

    return mean_loss(Adapter(model), torch.from_numpy(val.astype(np.int64)), 32, window)
