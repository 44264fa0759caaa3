"""``charlm bench``: measured speed of the real training and sampling code on this device.

Training speed comes from running :func:`charlm.training.setup.train` itself on synthetic text with a
monitor that keeps the chars/s it logs (skipping the first interval, which holds start-up). Sampling
speed comes from :func:`charlm.sampling.sampler.generate`. The fraction of peak compares the model's
matrix arithmetic per character with a matmul rate measured here, in the same run.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from charlm.config import Config
from charlm.data.vocab import Vocab
from charlm.device import resolve_device, resolve_precision, set_threads, synchronize
from charlm.model.network import build_model
from charlm.sampling.sampler import generate
from charlm.training.monitors import TrainLogs
from charlm.training.sizing import train_flops_per_char

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BenchResult:
    device: str
    precision: str
    threads: int
    params: int
    train_chars_per_sec: float
    sample_one_chars_per_sec: float
    sample_batch_chars_per_sec: float
    sample_batch: int
    matmul_gflops: float
    model_gflops: float

    @property
    def peak_fraction(self) -> float:
        return self.model_gflops / self.matmul_gflops

    def to_dict(self) -> dict:
        """The measurements of ``charlm bench --json``."""
        return {**asdict(self), "peak_fraction": self.peak_fraction}


def matmul_gflops(device: torch.device, precision: str, n: int = 2048, seconds: float = 1.0) -> float:
    """Best rate of n x n matrix products in the training precision, in GFLOP/s."""
    dtype = DTYPES[precision]
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    synchronize(device)
    best, deadline = 0.0, time.perf_counter() + seconds
    while True:
        t = time.perf_counter()
        a @ b
        synchronize(device)
        dt = time.perf_counter() - t
        best = max(best, 2 * n**3 / dt / 1e9)
        if time.perf_counter() > deadline:
            return best


def synthetic_text(chars: int, vocab_size: int = 65, seed: int = 0) -> str:
    """Random text over ``vocab_size`` printable characters (speed does not depend on it)."""
    alphabet = np.array([ord(c) for c in (
        "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    )[:vocab_size]], dtype="<u4")
    picks = np.random.default_rng(seed).integers(0, len(alphabet), chars)
    return alphabet[picks].tobytes().decode("utf-32-le")


def train_speed(cfg: Config, steps: int = 30, workdir: Path | None = None) -> float:
    """Median logged chars/s of the real training loop over ``steps`` steps."""
    from charlm.training.setup import train

    logs = TrainLogs()
    cfg = copy.deepcopy(cfg)
    tc = cfg.train
    tc.max_steps, tc.max_time, tc.max_epochs = steps, 0.0, 0.0
    tc.log_every = max(1, steps // 6)
    tc.eval_every = 10**9
    tc.sample_chars = 0
    tc.patience = tc.keep_last = 0
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        text = Path(tmp) / "bench.txt"
        need = (tc.batch_size * tc.seq_len + 1) * (steps + 2)
        text.write_text(synthetic_text(int(need / (1 - cfg.data.val_fraction)) + 1000))
        train(text, cfg, out_dir=Path(tmp) / "run", monitors=[logs])
    return statistics.median(r["chars_per_sec"] for r in logs.records[1:])


def sample_speed(model, vocab: Vocab, streams: int, length: int) -> float:
    """chars/s of generate() over ``streams`` streams of ``length`` characters (best of 3)."""
    generate(model, vocab, [0], 20, num_samples=streams, random_seed=0)
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        generate(model, vocab, [0], length, num_samples=streams, random_seed=0)
        best = max(best, streams * length / (time.perf_counter() - t))
    return best


def run(cfg: Config, steps: int = 30, sample_length: int = 2000, sample_batch: int = 64) -> BenchResult:
    device = resolve_device(cfg.train.device, cfg.model.cell)
    precision = resolve_precision(cfg.train.precision, device)
    threads = set_threads(cfg.train.threads) if device.type == "cpu" else 0
    vocab = Vocab(tuple(sorted(set(synthetic_text(10_000)))))
    model = build_model(len(vocab), cfg.model).to(device).eval()
    train_cps = train_speed(cfg, steps)
    one = sample_speed(model, vocab, 1, sample_length)
    batch = sample_speed(model, vocab, sample_batch, max(100, sample_length // 10))
    peak = matmul_gflops(device, precision)
    achieved = train_cps * train_flops_per_char(cfg.model, len(vocab)) / 1e9
    return BenchResult(
        device=str(device), precision=precision, threads=threads,
        params=model.num_parameters(), train_chars_per_sec=train_cps,
        sample_one_chars_per_sec=one, sample_batch_chars_per_sec=batch,
        sample_batch=sample_batch, matmul_gflops=peak, model_gflops=achieved,
    )
