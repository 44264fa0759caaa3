"""Training throughput: charlm's loop vs the straightforward fp32 loop, same model and batch.

    python benchmarks/train_vs_baseline.py            # both cases below
    python benchmarks/train_vs_baseline.py --steps 20

Runs baseline and charlm alternately (A B A B) and reports the median of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch
from baseline import tutorial_train

from charlm.config import Config, load_toml
from charlm.device import resolve_precision, set_threads
from charlm.training.bench import synthetic_text, train_speed

REPO = Path(__file__).resolve().parents[1]


def case(name: str, cfg: Config, steps: int, rounds: int) -> None:
    m, t = cfg.model, cfg.train
    data = np.random.default_rng(0).integers(0, 65, 2_000_000).astype(np.uint8)
    base, ours = [], []
    for _ in range(rounds):
        base.append(tutorial_train(data, 65, m.embed_size, m.hidden_size, m.num_layers,
                                   t.batch_size, t.seq_len, steps=steps, cell=m.cell)[1])
        ours.append(train_speed(cfg, steps))
    b, o = statistics.median(base), statistics.median(ours)
    precision = resolve_precision(t.precision, torch.device("cpu"))
    print(f"{name}: {m.cell} {m.hidden_size}x{m.num_layers} emb {m.embed_size}, batch "
          f"{t.batch_size} x {t.seq_len}: baseline fp32 {b:,.0f} chars/s, charlm ({precision}) "
          f"{o:,.0f} chars/s, ratio {o / b:.2f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", choices=["big", "cpu"], default=None)
    args = ap.parse_args()
    print(f"threads: {set_threads(0)}; synthetic text {len(synthetic_text(10))} ok")
    if args.only in (None, "cpu"):
        case("configs/cpu.toml", load_toml(REPO / "configs" / "cpu.toml"), args.steps, args.rounds)
    if args.only in (None, "big"):
        big = Config()
        big.model.embed_size = big.model.hidden_size = 512
        big.model.num_layers = 2
        big.train.batch_size, big.train.seq_len = 64, 128
        case("lstm-512x2", big, max(5, args.steps // 3), args.rounds)


if __name__ == "__main__":
    main()
