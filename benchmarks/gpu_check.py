"""Everything GPU-related in one report: the GPU-marked tests, then measurements.

Run it from a fresh checkout on a machine with CUDA (no package registry needed: PyTorch,
typer, tqdm, rich, numpy and pytest must be there already):

    pip install --no-deps --no-build-isolation -e .
    python benchmarks/gpu_check.py --part speed   --report gpu_speed.json   # ~4 min
    python benchmarks/gpu_check.py --part quality --report gpu_quality.json # ~4 min

``speed`` runs the GPU-marked tests, checks which dtype the recurrent layers really run in
under each precision, and measures training chars/s of the real training loop in fp32 (TF32),
bf16 and fp16 for ``configs/gpu.toml`` and for a 2x512 LSTM, with the fraction of the GPU's
bf16 matmul peak, and sampling chars/s for 1 and 64 streams with the GPU config's model.
``quality`` trains ``configs/gpu.toml`` on the bundled tiny Shakespeare with the real
``charlm train`` command for its 180 s and reports the validation loss (last 10%, whole
split), the share of wall time spent saving checkpoints, and sampling chars/s of the trained
checkpoint. Each part fits in one 10-minute command; ``--part all`` runs both.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from charlm.config import Config, load_toml  # noqa: E402
from charlm.data.corpus import tiny_shakespeare  # noqa: E402
from charlm.data.vocab import Vocab  # noqa: E402
from charlm.device import allow_tf32, amp_plan, autocast  # noqa: E402
from charlm.model.network import build_model  # noqa: E402
from charlm.runs.directory import read_metrics  # noqa: E402
from charlm.storage import checkpoint  # noqa: E402
from charlm.training.bench import matmul_gflops, sample_speed, train_flops_per_char, train_speed  # noqa: E402

GPU_CONFIG = REPO / "configs" / "gpu.toml"
PRECISIONS = ("fp32", "bf16", "fp16")


def small_lstm() -> Config:
    """A 2x512 LSTM at the batch a GPU wants (the second model of the speed table)."""
    cfg = load_toml(GPU_CONFIG)
    m = cfg.model
    m.cell, m.embed_size, m.hidden_size, m.num_layers, m.dropout = "lstm", 256, 512, 2, 0.2
    cfg.train.batch_size, cfg.train.seq_len = 256, 128
    return cfg


def rnn_dtypes(device: torch.device) -> dict[str, dict[str, str]]:
    """The dtype each cell's recurrent layers produce under each precision, and the plan's."""
    out: dict[str, dict[str, str]] = {}
    for cell in ("lstm", "gru", "rnn"):
        cfg = copy.deepcopy(load_toml(GPU_CONFIG).model)
        cfg.cell, cfg.hidden_size, cfg.embed_size = cell, 64, 32
        model = build_model(65, cfg).to(device)
        seen = {}
        model.rnn.register_forward_hook(lambda mod, inp, res, seen=seen: seen.update(dtype=res[0].dtype))
        for precision in PRECISIONS:
            plan = amp_plan(precision, device, cell)
            with autocast(device, precision):
                model(torch.zeros(2, 8, dtype=torch.long, device=device))
            ran = str(seen["dtype"]).removeprefix("torch.")
            planned = str(plan.rnn_dtype).removeprefix("torch.")
            out.setdefault(cell, {})[precision] = (
                f"{ran} (plan {planned}, loss scaling {'on' if plan.loss_scaling else 'off'})")
            assert ran == planned, (cell, precision, ran, planned)
    return out


def part_speed(device: torch.device, report: dict) -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p",
                           "no:cacheprovider", str(REPO / "tests")], cwd=REPO, text=True,
                          capture_output=True)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    report["gpu_tests"] = {"exit": proc.returncode, "summary": tail}
    print(f"GPU tests: {tail}", flush=True)
    if proc.returncode:
        print(proc.stdout[-6000:], proc.stderr[-3000:], flush=True)

    report["rnn_dtype"] = rnn_dtypes(device)
    print("recurrent dtype:", json.dumps(report["rnn_dtype"], indent=1), flush=True)

    peak = matmul_gflops(device, "bf16", n=8192, seconds=2.0)
    report["bf16_matmul_peak_tflops"] = round(peak / 1000, 1)
    print(f"bf16 matmul peak: {peak / 1000:,.0f} TFLOP/s", flush=True)
    training = {}
    for name, cfg in (("gpu.toml", load_toml(GPU_CONFIG)), ("lstm-2x512", small_lstm())):
        for precision in PRECISIONS:
            run = copy.deepcopy(cfg)
            run.train.precision, run.train.device = precision, str(device)
            cps = train_speed(run, steps=60)
            tflops = cps * train_flops_per_char(run.model, 65) / 1e12
            training[f"{name} {precision}"] = {
                "chars_per_sec": round(cps), "tflops": round(tflops, 1),
                "fraction_of_bf16_peak": round(tflops * 1000 / peak, 3)}
            print(f"train {name:11s} {precision}: {cps:>12,.0f} chars/s  {tflops:6.1f} TFLOP/s"
                  f"  {tflops * 1000 / peak:5.1%} of bf16 peak", flush=True)
    report["training"] = training

    cfg = load_toml(GPU_CONFIG)
    vocab = Vocab(tuple(sorted(set(tiny_shakespeare().read_text(encoding="utf-8")))))
    model = build_model(len(vocab), cfg.model).to(device).eval()
    report["sampling_untrained"] = sampling(model, vocab)


def sampling(model, vocab) -> dict[str, int]:
    one = sample_speed(model, vocab, 1, 2000)
    many = sample_speed(model, vocab, 64, 500)
    print(f"sampling: 1 stream {one:,.0f} chars/s, 64 streams {many:,.0f} chars/s", flush=True)
    return {"1_stream": round(one), "64_streams": round(many)}


def part_quality(device: torch.device, report: dict, seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "charlm", "train", "--config", str(GPU_CONFIG),
               "--max-time", str(seconds), "--device", str(device), "--out", str(out),
               "--no-progress"]
        print("$", " ".join(cmd[2:]), flush=True)
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, text=True, capture_output=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wall = time.perf_counter() - t
        print(proc.stderr[-4000:], flush=True)
        if proc.returncode:
            report["quality"] = {"exit": proc.returncode, "stderr": proc.stderr[-2000:]}
            return
        rows = read_metrics(out / "metrics.jsonl")
        evals = [r for r in rows if r["kind"] == "eval"]
        trains = [r for r in rows if r["kind"] == "train"]
        # The summary's "checkpoint saving" row: seconds the training thread spent saving.
        found = re.search(r"checkpoint saving\s*\S\s*([\d,.]+) s", proc.stderr)
        saving = float(found[1].replace(",", "")) if found else trains[-1]["save_seconds"]
        elapsed = max(r["elapsed"] for r in rows)
        report["quality"] = {
            "command": " ".join(cmd[2:]), "wall_s": round(wall, 1),
            "best_val_loss": round(min(r["val_loss"] for r in evals), 4),
            "last_val_loss": round(evals[-1]["val_loss"], 4),
            "evaluations": len(evals), "chars_seen": trains[-1]["chars"],
            "epochs": round(trains[-1]["epoch"], 1),
            "train_chars_per_sec_median": round(statistics.median(
                r["chars_per_sec"] for r in trains[1:] or trains)),
            "save_seconds": round(saving, 2),
            "save_share_of_wall": round(saving / max(elapsed, 1e-9), 4),
        }
        print(json.dumps(report["quality"], indent=1), flush=True)
        ckpt = checkpoint.load(out / "best.pt")
        model = checkpoint.model_of(ckpt).to(device).eval()
        report["sampling_trained"] = sampling(model, checkpoint.vocab_of(ckpt))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["speed", "quality", "all"], default="all")
    parser.add_argument("--report", type=Path, default=None, help="write the report as JSON")
    parser.add_argument("--seconds", type=float, default=180.0, help="training budget (quality)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; run this on a GPU machine")
    device = torch.device("cuda")
    allow_tf32(device)
    report = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version()}
    print(f"{report['device']}, torch {report['torch']}, cuDNN {report['cudnn']}", flush=True)
    if args.part in ("speed", "all"):
        part_speed(device, report)
    if args.part in ("quality", "all"):
        part_quality(device, report, args.seconds)
    if args.report:
        args.report.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
