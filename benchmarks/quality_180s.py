"""Validation loss after 180 s of CPU training on tiny Shakespeare (last 10% split).

    python benchmarks/quality_180s.py                 # charlm with configs/cpu.toml
    python benchmarks/quality_180s.py --baseline      # also the tutorial loop, same budget

charlm runs as the real command (`charlm train ... --config configs/cpu.toml --max-time 180`);
the tutorial loop is benchmarks/baseline.py (1-layer LSTM 256, embedding 128, batch 64,
window 30, Adam 2e-3), evaluated with the same full-split measure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from charlm.data.corpus import tiny_shakespeare

REPO = Path(__file__).resolve().parents[1]
CORPUS = tiny_shakespeare()  # the copy shipped with charlm


def run_charlm(config: Path, seconds: float, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "charlm", "train", str(CORPUS), "--config", str(config),
           "--max-time", str(seconds), "--out", str(out), "--no-progress", "--no-samples", *extra]
    subprocess.run(cmd, check=True)
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evals = [r for r in records if r["kind"] == "eval"]
    trains = [r for r in records if r["kind"] == "train"]
    return {
        "final_val": evals[-1]["val_loss"], "best_val": min(r["val_loss"] for r in evals),
        "chars": evals[-1]["chars"], "elapsed": evals[-1]["elapsed"],
        "chars_per_sec": evals[-1]["chars"] / trains[-1]["elapsed"],
    }


def run_baseline(seconds: float) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from baseline import tutorial_train, tutorial_val_loss

    from charlm.data.batching import load_corpus, split

    corpus = load_corpus(CORPUS)
    train, val = split(np.asarray(corpus.ids), 0.1)
    model, cps = tutorial_train(np.asarray(train), len(corpus.vocab), 128, 256, 1, 64, 30,
                                lr=2e-3, seconds=seconds)
    return {"final_val": tutorial_val_loss(model.eval(), np.asarray(val)), "chars_per_sec": cps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "cpu.toml")
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--baseline", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="keep the run directory here")
    ap.add_argument("--set", action="append", default=[], help="extra --set for charlm")
    args = ap.parse_args()
    extra = [x for s in args.set for x in ("--set", s)]
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "run"
        r = run_charlm(args.config, args.seconds, out, extra)
    print(f"charlm {args.config.name}: val loss {r['final_val']:.4f} (best {r['best_val']:.4f}) "
          f"after {r['elapsed']:.0f} s, {r['chars']:,} chars seen, {r['chars_per_sec']:,.0f} chars/s")
    if args.baseline:
        b = run_baseline(args.seconds)
        print(f"tutorial fp32 loop: val loss {b['final_val']:.4f} after {args.seconds:.0f} s, "
              f"{b['chars_per_sec']:,.0f} chars/s")


if __name__ == "__main__":
    main()
