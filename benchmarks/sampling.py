"""Sampling speed on this device: charlm's generate() (Stepper) vs stepping nn.LSTM directly
(oneDNN on, as a default call runs, and off), one stream and 64 streams.

    python benchmarks/sampling.py
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from charlm.config import ModelConfig, load_toml
from charlm.data.vocab import Vocab
from charlm.device import set_threads
from charlm.model.network import build_model
from charlm.training.bench import sample_speed, synthetic_text

REPO = Path(__file__).resolve().parents[1]


@torch.inference_mode()
def plain_speed(model, streams: int, length: int, onednn: bool) -> float:
    """chars/s of calling the full model one character at a time, as a naive sampler does."""
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = onednn
    try:
        best = 0.0
        for _ in range(3):
            ids = torch.zeros(streams, 1, dtype=torch.long)
            state = None
            t = time.perf_counter()
            for _ in range(length):
                logits, state = model(ids, state)
                ids = torch.multinomial(logits[:, -1].softmax(-1), 1)
                ids.tolist()
            best = max(best, streams * length / (time.perf_counter() - t))
        return best
    finally:
        torch.backends.mkldnn.enabled = previous


def main() -> None:
    print(f"threads: {set_threads(0)}")
    vocab = Vocab(tuple(sorted(set(synthetic_text(10_000)))))
    cases = [("configs/cpu.toml", load_toml(REPO / "configs" / "cpu.toml").model),
             ("lstm 512x2", ModelConfig("lstm", 512, 512, 2)),
             ("gru 512x2", ModelConfig("gru", 512, 512, 2))]
    for name, m in cases:
        model = build_model(len(vocab), m).eval()
        for streams, length in ((1, 2000), (64, 300)):
            ours = sample_speed(model, vocab, streams, length)
            naive_on = plain_speed(model, streams, length // 4, onednn=True)
            naive_off = plain_speed(model, streams, length // 4, onednn=False)
            print(f"{name:>16} {m.cell} {m.hidden_size}x{m.num_layers}, {streams:>2} stream(s): "
                  f"charlm {ours:>9,.0f} chars/s | nn.{m.cell.upper()} oneDNN {naive_on:>8,.0f} "
                  f"| oneDNN off {naive_off:>8,.0f} | speed-up {ours / naive_on:.1f}x",
                  flush=True)


if __name__ == "__main__":
    main()
