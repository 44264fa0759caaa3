"""Multi-process training (DistributedDataParallel on CPU with gloo), launched the way users
launch it: ``torchrun -m charlm train``. Each launch starts several Python processes, so the
launches are shared: one chain of runs, compared step by step with a single process.

The chain, all with configs/tiny.toml and 60 planned steps (so the schedule is the same):
  reference  1 process x 8 streams, uninterrupted
  ddp        torchrun 2 processes x 4 streams, from scratch, paused at step 20
             then resumed under torchrun (same 2 processes) to step 35
             then resumed in a single process x 8 streams to step 45
             then resumed under torchrun (2 x 4 again) to step 60
Every segment must match the reference line for line (float tolerance), which covers the
from-scratch equivalence and every resume direction.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_TEXT, TINY_CONFIG

from charlm.cli.commands import main as cli_main
from charlm.config import load_toml
from charlm.data.batching import as_tensor, split
from charlm.errors import ConfigError
from charlm.evaluate import mean_loss
from charlm.storage import checkpoint
from charlm.training.distributed import Dist, DistributedError, from_env, restack_rows, weights_digest
from charlm.training.setup import train

STEPS = 60
# The chain is compared with one process to a tight tolerance, so it pins fp32 (auto would be
# bf16 on CPUs with native bf16, where two ways of summing differ by more).
COMMON = ["--config", TINY_CONFIG, "--device", "cpu", "--precision", "fp32",
          "--max-steps", STEPS, "--set", "train.log_every=1",
          "--set", "train.threads=1", "--no-progress", "--no-samples"]
CHILD_ENV = {"PYTHONUNBUFFERED": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}


def torchrun(*args, env: dict, cwd: Path, nproc: int = 2, timeout: int = 180):
    """``torchrun --standalone --nproc_per_node=N -m charlm ARGS`` (a free port each time)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "charlm", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env={**os.environ, **CHILD_ENV, **env},
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(*args, env: dict, cwd: Path, world: int = 2) -> list[subprocess.Popen]:
    """The processes torchrun would start, started by hand (so a test can kill one)."""
    base = {**os.environ, **CHILD_ENV, **env, "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world)}
    return [
        subprocess.Popen([sys.executable, "-m", "charlm", *map(str, args)], cwd=cwd,
                         env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(world)
    ]


def records(run_dir: Path) -> dict[tuple[str, int], float]:
    """(kind, step) -> loss of a metrics.jsonl."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[(r["kind"], r["step"])] = r["loss"] if r["kind"] == "train" else r["val_loss"]
    return out


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def tiny_cfg(batch_size: int):
    cfg = load_toml(TINY_CONFIG)
    cfg.train.batch_size, cfg.train.max_steps = batch_size, STEPS
    cfg.train.log_every, cfg.train.threads, cfg.train.sample_chars = 1, 1, 0
    cfg.train.precision, cfg.train.device = "fp32", "cpu"
    return cfg


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    text = root / "input.txt"
    text.write_text(SAMPLE_TEXT, encoding="utf-8")
    env = {"CHARLM_CACHE_DIR": str(root / "cache")}
    run = root / "ddp"
    logs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARLM_CACHE_DIR", env["CHARLM_CACHE_DIR"])
        train(text, tiny_cfg(8), out_dir=root / "reference", progress=False)

        logs["fresh"] = torchrun("train", text, *COMMON, "--batch-size", 4, "--out", run,
                                 "--stop-at-step", 20, env=env, cwd=root)
        assert logs["fresh"].returncode == 0, logs["fresh"].stderr[-3000:]
        logs["at20"] = checkpoint.load(run / "last.pt")

        logs["ddp-ddp"] = torchrun("train", "--resume", run, "--stop-at-step", 35,
                                   "--no-progress", env=env, cwd=root)
        assert logs["ddp-ddp"].returncode == 0, logs["ddp-ddp"].stderr[-3000:]

        ckpt = checkpoint.load(run / "last.pt")
        cfg = checkpoint.config_of(ckpt)
        cfg.train.batch_size = 8
        logs["ddp-single"] = train(text, cfg, out_dir=run, resume=ckpt, stop_at_step=45,
                                   progress=False)

        logs["single-ddp"] = torchrun("train", "--resume", run, "--batch-size", 4,
                                      "--no-progress", env=env, cwd=root)
        assert logs["single-ddp"].returncode == 0, logs["single-ddp"].stderr[-3000:]
    return root, logs


def test_torchrun_trains_and_loss_decreases(chain):
    root, logs = chain
    losses = records(root / "ddp")
    first = [losses[("train", s)] for s in range(1, 6)]
    last = [losses[("train", s)] for s in range(STEPS - 4, STEPS + 1)]
    assert sum(last) / 5 < sum(first) / 5 - 0.5, (first, last)
    # Only rank 0 speaks: one summary table, one pause message per launch.
    stderr = logs["fresh"].stderr
    assert stderr.count("charlm train ") - stderr.count("charlm train --resume") == 1
    assert "error:" not in logs["fresh"].stderr


def test_processes_hold_identical_weights(chain):
    root, logs = chain
    for ckpt in (logs["at20"], checkpoint.load(root / "ddp" / "last.pt")):
        ts = ckpt["train_state"]
        assert ts["world"] == 2
        # Each rank hashed its own copy of the weights; the library raises if they differ,
        # and the saved (plain, unwrapped) model is that same model.
        assert len(ts["replicas"]) == 2 and ts["replicas"][0] == ts["replicas"][1]
        assert weights_digest(checkpoint.model_of(ckpt)) == ts["replicas"][0]
        assert all(not k.startswith("module.") for k in ckpt["model"])
        # Per-rank training state: each rank's RNG and its own carried streams.
        assert len(ts["rng"]) == 2 and len(ts["carried_state"]) == 2
        assert ts["carried_state"][0][0].shape == (1, 4, 32)


def test_matches_one_process_with_twice_the_streams(chain):
    """2 processes x 4 streams == 1 process x 8 streams, step by step, including every
    resume direction (torchrun -> torchrun, torchrun -> 1 process, 1 process -> torchrun)
    and the validation loss, which the processes compute as shares and all-reduce."""
    root, _ = chain
    ref, got = records(root / "reference"), records(root / "ddp")
    assert set(ref) == set(got) and len(ref) == STEPS + STEPS // 20
    for key in sorted(ref):
        assert got[key] == pytest.approx(ref[key], rel=1e-4), key
    final_ref = checkpoint.load(root / "reference" / "last.pt")["model"]
    final_got = checkpoint.load(root / "ddp" / "last.pt")["model"]
    for name, tensor in final_ref.items():
        torch.testing.assert_close(final_got[name], tensor, rtol=1e-4, atol=1e-5)


def test_resume_notes_say_what_happened(chain):
    _, logs = chain
    assert any("2-process run on 1 process" in n for n in logs["ddp-single"].notes)
    assert "1-process run on 2 process(es)" in logs["single-ddp"].stderr


def test_validation_loss_equals_a_single_process_evaluation(chain):
    root, logs = chain
    ckpt = logs["at20"]
    val_at_20 = records(root / "ddp")[("eval", 20)]
    cfg = checkpoint.config_of(ckpt)
    _, val = split(checkpoint.vocab_of(ckpt).encode(SAMPLE_TEXT), cfg.data.val_fraction)
    val_ids = as_tensor(val, torch.device("cpu"))
    one = mean_loss(checkpoint.model_of(ckpt), val_ids, cfg.train.eval_streams,
                    cfg.train.eval_seq_len)
    assert val_at_20 == pytest.approx(one, rel=1e-6)


def test_checkpoint_samples_in_one_process(chain, capsys):
    root, _ = chain
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["sample", "-c", str(root / "ddp" / "last.pt"), "--seed", "First", "-n", "30",
                  "--random-seed", "1"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("First") and len(out.rstrip("\n")) == 35


def test_too_many_processes_is_one_error_and_all_exit(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text(SAMPLE_TEXT[:220], encoding="utf-8")  # 198 training chars: 1 x 8 x 16 fits
    env = {"CHARLM_CACHE_DIR": str(tmp_path / "cache")}
    procs = start_ranks("train", text, *COMMON, "--out", tmp_path / "run", env=env, cwd=tmp_path)
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, stderr) in zip(procs, outs, strict=True):
        assert p.returncode != 0 and "Traceback" not in stderr, stderr
    rank0, rank1 = (stderr for _, stderr in outs)
    assert len(error_lines(rank0)) == 1, rank0
    assert "--batch-size 8 x 2 processes x --seq-len 16 needs at least 257" in rank0
    assert "use fewer processes" in rank0
    assert error_lines(rank1) == [], rank1
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("how", ["dies", "stalls"])
def test_a_lost_process_stops_the_others(how, tmp_path):
    """SIGKILL closes the dead rank's connections: rank 0 fails at its next collective.
    SIGSTOP leaves them open: rank 0 gives up after --dist-timeout seconds."""
    text = tmp_path / "input.txt"
    text.write_text(SAMPLE_TEXT, encoding="utf-8")
    env = {"CHARLM_CACHE_DIR": str(tmp_path / "cache")}
    run = tmp_path / "run"
    procs = start_ranks("train", text, *COMMON, "--max-steps", 10**7, "--eval-every", 10**7,
                        "--out", run, "--dist-timeout", 10, env=env, cwd=tmp_path)
    rank0, rank1 = procs
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text()):
            assert time.monotonic() < deadline and rank0.poll() is None, rank0.stderr.read()
            time.sleep(0.2)
        rank1.send_signal(signal.SIGKILL if how == "dies" else signal.SIGSTOP)
        t0 = time.monotonic()
        _, stderr = rank0.communicate(timeout=60)
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert rank0.returncode != 0
    assert "Traceback" not in stderr, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1 and "lost contact with the other training processes" in lines[0], stderr
    assert waited < 40


# ---------------------------------------------------------------------- in-process units
def test_restack_rows_resplits_streams():
    L, H = 2, 3
    whole = torch.arange(L * 8 * H, dtype=torch.float32).reshape(L, 8, H)  # (L, S, H)
    two = [[whole[:, :4].clone()], [whole[:, 4:].clone()]]  # 2 ranks x 4 streams
    assert torch.equal(restack_rows(two, 0, 8)[0], whole)
    four = [restack_rows(two, r, 2)[0] for r in range(4)]  # 4 ranks x 2 streams
    assert torch.equal(torch.cat(four, dim=1), whole)
    assert four[3].shape == (L, 2, H)


def test_plain_process_is_a_world_of_one(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    dist = from_env()
    assert type(dist) is Dist and dist.world == 1 and dist.all_reduce_sum is None
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert type(from_env()) is Dist  # torchrun --nproc_per_node=1: a plain single process
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(DistributedError, match="must be integers"):
        from_env()
    with pytest.raises(ConfigError, match="dist-timeout"):
        from_env(timeout=0)

