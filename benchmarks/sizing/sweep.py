"""The sizing sweeps: real ``charlm train`` runs of a few shapes, budgets and dropouts on two
texts, each appended as one JSON line to a results file that ``fit.py`` reads.

    python benchmarks/sizing/corpora.py CORPORA          # the stdlib texts
    python benchmarks/sizing/sweep.py CORPORA benchmarks/sizing/sweep.jsonl [--workers 2]

A budget is given in seconds of *this* machine, measured quiet: the script first times each
shape here with all cores (``charlm.training.sizing.measure``), then turns "S seconds" into the
characters that shape would train on in a run of S seconds (evaluations take the rest:
``charlm.training.sizing.training_seconds``) and runs it with ``--max-steps``. The loss after C
characters does not depend on how fast they were trained, so the runs themselves may share the
CPU (``--workers 2``, one thread each) without changing their results, and the data fits in
characters, not seconds: it carries over to other machines, where only the speeds differ.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from charlm.data.corpus import tiny_shakespeare
from charlm.device import resolve_precision, set_threads
from charlm.training.sizing import LADDER, Shape, learning_rate, measure, training_seconds


def shape_named(name: str) -> Shape:
    for s in LADDER:
        if s.name == name:
            return s
    raise SystemExit(f"no shape {name}; one of {[s.name for s in LADDER]}")


# (corpus, shape, seconds here, dropout)
RUNS = [
    *[("shakespeare", s, t, 0.0) for s in ("lstm256", "lstm512", "lstm1024") for t in (60, 180, 600)],
    ("shakespeare", "lstm512", 600, 0.2), ("shakespeare", "lstm1024", 600, 0.25),
    *[("stdlib_code", s, t, 0.0) for s in ("lstm256", "lstm512", "lstm1024") for t in (60, 180)],
    ("stdlib_code", "lstm1024", 600, 0.0),
    # session 6: the cell (GRU), 768 units, and dropout below 10 epochs
    ("shakespeare", "lstm512", 180, 0.1), ("shakespeare", "lstm512", 180, 0.2),
    ("shakespeare", "lstm768", 180, 0.0), ("shakespeare", "lstm768", 180, 0.1),
    ("shakespeare", "gru512", 180, 0.0), ("shakespeare", "gru1024", 180, 0.0),
    ("shakespeare", "lstm1024", 180, 0.1), ("shakespeare", "lstm512", 60, 0.1),
    ("stdlib_code", "gru512", 180, 0.0), ("stdlib_code", "lstm768", 180, 0.0),
    ("stdlib_code", "gru768", 180, 0.1),
    # session 7: the near-ties at 180 s on tiny Shakespeare (GRU 768 with and without
    # dropout, LSTM 768 with more), and the GRU 768 without dropout on code
    ("shakespeare", "gru768", 180, 0.0), ("shakespeare", "gru768", 180, 0.15),
    ("shakespeare", "lstm768", 180, 0.2), ("stdlib_code", "gru768", 180, 0.0),
    # where dropout starts to pay: 0.72 and 0.92 parameters per character (LSTM 384, GRU 512)
    ("shakespeare", "lstm384", 180, 0.0), ("shakespeare", "lstm384", 180, 0.1),
    ("shakespeare", "gru512", 180, 0.1),
]


def corpus_path(name: str, corpora: Path) -> Path:
    return tiny_shakespeare() if name == "shakespeare" else corpora / f"{name}.txt"


def run_one(job: dict, threads: int) -> dict:
    s = shape_named(job["shape"])
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "charlm", "train", job["path"], "--out", f"{tmp}/run",
               "--cell", s.cell, "--hidden-size", str(s.hidden_size), "--num-layers", str(s.num_layers),
               "--embed-size", str(s.embed_size), "--batch-size", str(s.batch_size),
               "--seq-len", str(s.seq_len), "--dropout", str(job["dropout"]), "--lr", str(job["lr"]),
               "--max-steps", str(job["steps"]), "--max-time", "0", "--no-progress", "--no-samples",
               "--set", "train.warmup_steps=50", "--set", "train.min_lr_ratio=0.05",
               "--set", f"train.threads={threads}"]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t
        records = [json.loads(line) for line in open(f"{tmp}/run/metrics.jsonl")]
    evals = [r for r in records if r["kind"] == "eval"]
    return {**job, "wall": round(wall, 1), "chars_seen": evals[-1]["chars"],
            "final_val": evals[-1]["val_loss"], "best_val": min(r["val_loss"] for r in evals),
            "curve": [[r["chars"], r["val_loss"]] for r in evals]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("corpora", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated indices into RUNS")
    args = ap.parse_args()
    device = torch.device("cpu")
    precision = resolve_precision("auto", device)
    threads = set_threads(0)
    names = sorted({r[1] for r in RUNS})
    speeds = {}
    for n in names:  # quiet, all cores: the speeds that turn seconds into characters
        measure(shape_named(n), 65, device, precision, seconds=0.5)
        speeds[n] = measure(shape_named(n), 65, device, precision, seconds=2.0)
        print(f"{n}: {speeds[n].train:,.0f} chars/s ({precision}, {threads} threads)", flush=True)
    sizes = {}
    jobs = []
    wanted = {int(i) for i in args.only.split(",") if i}
    for i, (corpus, shape, seconds, dropout) in enumerate(RUNS):
        if wanted and i not in wanted:
            continue
        path = corpus_path(corpus, args.corpora)
        if corpus not in sizes:
            text = path.read_text(encoding="utf-8")
            sizes[corpus] = (len(text), len(set(text)))
        s = shape_named(shape)
        val_chars = sizes[corpus][0] - int(sizes[corpus][0] * 0.9)
        chars = speeds[shape].train * training_seconds(seconds, speeds[shape].eval_seconds(val_chars))
        steps = max(100, round(chars / (s.batch_size * s.seq_len)))
        jobs.append({"corpus": corpus, "path": str(path), "text_chars": sizes[corpus][0],
                     "vocab": sizes[corpus][1], "shape": shape, "params": s.parameters(sizes[corpus][1]),
                     "seconds_here": seconds, "dropout": dropout, "lr": learning_rate(s),
                     "steps": steps, "speed_here": round(speeds[shape].train), "precision": precision,
                     "cpu": platform.processor() or platform.machine(), "torch": torch.__version__})
    jobs.sort(key=lambda j: -j["steps"] * shape_named(j["shape"]).batch_size
              * shape_named(j["shape"]).seq_len / j["speed_here"])
    per_run = 1 if args.workers > 1 else threads

    def go(job):
        try:
            r = run_one(job, per_run)
        except subprocess.CalledProcessError as exc:  # one failed run: report it, go on
            print(f"{job['corpus']} {job['shape']} {job['seconds_here']}s failed: {exc}", flush=True)
            return
        with open(args.out, "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"{r['corpus']} {r['shape']} {r['seconds_here']}s d={r['dropout']}: "
              f"val {r['final_val']:.4f} (best {r['best_val']:.4f}) in {r['wall']:.0f}s", flush=True)

    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(go, jobs))


if __name__ == "__main__":
    main()
