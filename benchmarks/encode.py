"""Encoding speed and memory on a large corpus.

    python benchmarks/encode.py --mb 1024     # builds a 1 GB text in a temporary directory

Reports: first load (scan + encode + write the id cache) in MB/s, second load (cache hit), and
the peak resident memory of a `charlm train` subprocess taking a few steps on the corpus.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from charlm.training.bench import synthetic_text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=1024)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["CHARLM_CACHE_DIR"] = str(tmp / "cache")
        text = tmp / "big.txt"
        block = synthetic_text(16 << 20).encode()
        with open(text, "wb") as f:
            for _ in range(max(1, args.mb // 16)):
                f.write(block)
        size_mb = text.stat().st_size / 1e6
        from charlm.data.batching import load_corpus

        for label in ("first load (encode + cache)", "second load (cache hit)"):
            t = time.perf_counter()
            corpus = load_corpus(text)
            dt = time.perf_counter() - t
            print(f"{label}: {size_mb:,.0f} MB in {dt:.2f} s = {size_mb / dt:,.0f} MB/s "
                  f"({len(corpus.ids):,} ids, {corpus.ids.dtype})", flush=True)
        del corpus
        cmd = [sys.executable, "-m", "charlm", "train", str(text), "--config",
               str(Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"),
               "--max-steps", "20", "--out", str(tmp / "run"), "--no-progress",
               "--no-samples", "--set", "data.val_fraction=0.0001"]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"charlm train (20 steps) on the {size_mb:,.0f} MB corpus: "
              f"{time.perf_counter() - t:.1f} s, peak resident memory {peak:,.0f} MB")


if __name__ == "__main__":
    main()
