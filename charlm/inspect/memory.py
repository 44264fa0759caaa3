"""How far back a model uses its context: the loss at a sample of positions when the state is
reset (to zeros, the state every text starts from) k characters before each of them, for
k = 1, 2, 4, ..., 512, against the loss with all the text before them ("unlimited", which is
the normal evaluation of those positions). Runs through the model's own ``nn`` layers."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from charlm.model.network import CharRNN

KS = tuple(2 ** e for e in range(10))  # 1 .. 512
POSITIONS = 128  # positions sampled (evenly spaced); the same ones for every k
BATCH_CHARS = 1 << 16  # characters per forward pass


def positions(n: int, most: int = POSITIONS) -> np.ndarray:
    """Evenly spaced positions (indices of predicted characters, >= 1) of a text of ``n``
    characters: past the longest reset where the text allows, so every k truncates."""
    if n < 2:
        return np.zeros(0, dtype=np.int64)
    low = KS[-1] + 1 if n - 1 >= KS[-1] + 1 + most else 1
    return np.unique(np.linspace(low, n - 1, min(most, n - low)).round().astype(np.int64))


@torch.inference_mode()
def curve(model: CharRNN, ids: list[int] | torch.Tensor, unlimited: np.ndarray,
          where: np.ndarray) -> list[dict]:
    """[{"k": k, "loss": nats}] for each k in :data:`KS`, then {"k": None, ...} for unlimited.

    ``unlimited[j]`` is the loss (nats) of predicting character j + 1 from all before it (the
    normal evaluation); ``where`` the positions (characters predicted). A position with fewer
    than k characters before it has nothing to cut: its loss is the unlimited one."""
    was_training = model.training
    model.eval()
    ids = torch.as_tensor(ids, dtype=torch.long).cpu()
    full = unlimited[where - 1]
    points = []
    for k in KS:
        losses = full.copy()
        cut = np.nonzero(where > k)[0]  # positions with more than k characters before them
        rows = max(1, BATCH_CHARS // (k + 1))
        for s in range(0, len(cut), rows):
            sel = cut[s : s + rows]
            starts = torch.as_tensor(where[sel] - k)
            window = ids[starts[:, None] + torch.arange(k + 1)]  # (P, k + 1)
            logits, _ = model(window[:, :-1])  # from a zero state: (P, k, V)
            losses[sel] = F.cross_entropy(logits[:, -1].float(), window[:, -1],
                                          reduction="none").double().numpy()
        points.append({"k": k, "loss": float(losses.mean())})
    points.append({"k": None, "loss": float(full.mean())})
    model.train(was_training)
    return points
