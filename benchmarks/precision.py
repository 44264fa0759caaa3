"""Validation loss after a fixed number of steps, fp32 vs bf16 autocast (same seed, data).

    python benchmarks/precision.py --steps 300
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

from charlm.config import load_toml
from charlm.data.corpus import tiny_shakespeare
from charlm.training.setup import train

REPO = Path(__file__).resolve().parents[1]
CORPUS = tiny_shakespeare()  # the copy shipped with charlm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "cpu.toml")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    base = load_toml(args.config)
    base.train.max_steps, base.train.max_time = args.steps, 0.0
    base.train.eval_every, base.train.sample_chars = args.steps, 0
    losses = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16"):
            cfg = copy.deepcopy(base)
            cfg.train.precision = precision
            r = train(CORPUS, cfg, out_dir=Path(tmp) / precision, progress=False)
            losses[precision] = r.val_loss
            print(f"{precision}: val loss {r.val_loss:.4f} after {r.step} steps, "
                  f"{r.chars_per_sec:,.0f} chars/s", flush=True)
    diff = abs(losses["bf16"] - losses["fp32"]) / losses["fp32"]
    print(f"bf16 vs fp32: {diff:.2%} apart (target: within 1%)")


if __name__ == "__main__":
    main()
