"""Automatic sizing against fixed shapes: real ``charlm train --max-time`` runs, one line of
results each (appended to a JSON-lines file) and a table.

    python benchmarks/sizing/compare.py --seconds 180                       # tiny Shakespeare
    python benchmarks/sizing/compare.py --seconds 600 --shapes auto,small --side-by-side
    python benchmarks/sizing/compare.py --text CORPORA/stdlib_docs.txt --seconds 300

``auto`` is ``charlm train FILE --max-time S`` with no shape; ``small`` is
``configs/cpu.toml`` (the shipped CPU config: GRU 384, batch 32 x 64), ``medium`` an LSTM
512 and ``large`` an LSTM 1024 (batch 64 x 64) with the dropout their size calls for.
Runs go one after another with all cores, or with ``--side-by-side`` two at a time with one
thread each (both see the same machine; halves the wall time of long budgets).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from charlm.data.corpus import tiny_shakespeare
from charlm.training.sizing import RULE_FILE

REPO = Path(__file__).resolve().parents[2]
CPU = str(REPO / "configs" / "cpu.toml")
SHAPES = {
    "auto": [],
    "small": ["--config", CPU],
    "medium": ["--config", CPU, "--cell", "lstm", "--hidden-size", "512", "--dropout", "0.1"],
    "large": ["--config", CPU, "--cell", "lstm", "--hidden-size", "1024", "--embed-size", "128",
              "--batch-size", "64", "--lr", "2.8e-3", "--dropout", "0.2"],
}


def run(text: Path, shape: str, seconds: float, threads: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "charlm", "train", str(text), *SHAPES[shape],
               "--max-time", str(seconds), "--out", str(out), "--no-progress", "--no-samples",
               "--random-seed", str(seed)]
        if threads:
            cmd += ["--set", f"train.threads={threads}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{shape}: {proc.stderr.strip().splitlines()[-1]}")
        header = [line for line in proc.stderr.splitlines() if line.startswith(("model:", "size:"))]
        summary = [" ".join(line.strip("│┃| ").split()) for line in proc.stderr.splitlines()
                   if any(k in line for k in ("training speed", "evaluating"))]
        records = [json.loads(line) for line in open(out / "metrics.jsonl")]
        chosen = (out / "config.toml").read_text()
    evals = [r for r in records if r["kind"] == "eval"]
    trains = [r for r in records if r["kind"] == "train"]
    return {"text": text.name, "shape": shape, "seconds": seconds, "threads": threads or "all",
            "seed": seed, "best_val": min(r["val_loss"] for r in evals),
            "final_val": evals[-1]["val_loss"], "chars_seen": evals[-1]["chars"],
            "chars_per_sec": round(evals[-1]["chars"] / trains[-1]["elapsed"]),
            "header": header, "summary": summary, "config": chosen,
            "rule": json.loads(RULE_FILE.read_text())["fitted_on"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", type=Path, default=tiny_shakespeare())
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--shapes", default="auto,small")
    ap.add_argument("--side-by-side", action="store_true")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "sizing" / "compare.jsonl")
    args = ap.parse_args()
    shapes = args.shapes.split(",")
    threads = 1 if args.side_by_side else 0
    with ThreadPoolExecutor(2 if args.side_by_side else 1) as pool:
        results = list(pool.map(lambda s: run(args.text, s, args.seconds, threads, args.seed), shapes))
    with open(args.out, "a") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    print(f"{args.text.name}, {args.seconds:g} s, threads {threads or 'all'}:")
    for r in results:
        size = next((h for h in r["header"] if h.startswith("size:")), r["header"][0])
        print(f"  {r['shape']:7} best val {r['best_val']:.4f} (final {r['final_val']:.4f}), "
              f"{r['chars_per_sec']:,} chars/s; {size}")


if __name__ == "__main__":
    main()
