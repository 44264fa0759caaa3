"""Evaluation speed vs training speed, per character, for one config on this device: the
training loop (``charlm.train``, as ``charlm bench`` times it) and ``charlm.evaluate`` (as
``charlm eval`` and the evaluations during training run it) on the same model shape, device
and precision.

    python benchmarks/eval_speed.py                       # configs/cpu.toml
    python benchmarks/eval_speed.py --config configs/tiny.toml --steps 10 --chars 20000

Evaluation runs the config's precision (``train.precision``; auto is bf16 on a CPU with bf16
instructions, as training runs it) with ``train.eval_streams`` streams of
``train.eval_seq_len``; ``--precision fp32`` also times exact fp32 evaluation, the default of
``charlm eval``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from charlm.config import load_toml
from charlm.data.vocab import Vocab
from charlm.device import resolve_device, resolve_precision, set_threads
from charlm.evaluate import evaluate_model
from charlm.model.network import build_model
from charlm.training.bench import synthetic_text, train_speed

REPO = Path(__file__).resolve().parents[1]


def eval_speed(cfg, vocab: Vocab, text: str, precision: str, repeats: int = 3) -> float:
    """Best chars/s of charlm.evaluate over ``text`` (after one warm-up run)."""
    device = resolve_device(cfg.train.device, cfg.model.cell)
    torch.manual_seed(0)
    model = build_model(len(vocab), cfg.model).to(device)
    shape = {"streams": cfg.train.eval_streams, "seq_len": cfg.train.eval_seq_len}
    evaluate_model(model, vocab, text[:20_000], precision, **shape)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        r = evaluate_model(model, vocab, text, precision, **shape)
        best = max(best, r.chars / (time.perf_counter() - t))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "cpu.toml")
    parser.add_argument("--steps", type=int, default=40, help="training steps to time")
    parser.add_argument("--chars", type=int, default=400_000, help="characters to evaluate")
    parser.add_argument("--precision", default=None, help="also time this eval precision")
    args = parser.parse_args()

    cfg = load_toml(args.config)
    device = resolve_device(cfg.train.device, cfg.model.cell)
    precision = resolve_precision(cfg.train.precision, device)
    threads = set_threads(cfg.train.threads) if device.type == "cpu" else 0
    text = synthetic_text(args.chars)
    vocab = Vocab(tuple(sorted(set(text))))
    m = cfg.model
    print(f"{args.config.name}: {m.cell} {m.hidden_size}x{m.num_layers}, batch "
          f"{cfg.train.batch_size}x{cfg.train.seq_len}; eval {cfg.train.eval_streams} streams x "
          f"{cfg.train.eval_seq_len}; {device} ({precision}), {threads or '-'} threads", flush=True)
    train_cps = train_speed(cfg, args.steps)
    print(f"training:   {train_cps:>10,.0f} chars/s", flush=True)
    for p in dict.fromkeys([precision, *([args.precision] if args.precision else [])]):
        cps = eval_speed(cfg, vocab, text, p)
        print(f"evaluation: {cps:>10,.0f} chars/s ({p}) = {cps / train_cps:.1f}x training",
              flush=True)


if __name__ == "__main__":
    main()
