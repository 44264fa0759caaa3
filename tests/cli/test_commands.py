"""End to end: the installed ``charlm`` command in a subprocess (train, sample, eval, info).

Each subprocess pays for importing torch, so the checks are grouped into few calls.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
import torch
from conftest import TINY_CONFIG, assert_clean_error, run_charlm

from charlm.cli.commands import main
from charlm.evaluate import evaluate_file
from charlm.runs.directory import read_metrics
from charlm.sampling.sampler import generate, seed_ids
from charlm.storage import checkpoint

SAMPLE_OPTIONS = ("--seed", "All:", "--length", "30", "--temperature", "0.9", "--top-k", "10",
                  "--top-p", "0.95", "--num-samples", "2", "--random-seed", "11")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_run):
    """A directory with an older run (a copy of tiny_run) and a newer one trained with named
    options, as ``charlm train`` leaves them under ``runs/``."""
    root = tmp_path_factory.mktemp("cli")
    old = root / "runs" / "old-lstm"
    shutil.copytree(tiny_run, old)
    for path in old.iterdir():
        os.utime(path, (1_000_000_000, 1_000_000_000))
    text = tiny_run.parent / "input.txt"
    proc = run_charlm(
        "train", text, "--config", TINY_CONFIG, "--cell", "gru", "--hidden-size", "24",
        "--num-layers", "2", "--embed-size", "8", "--dropout", "0.1", "--batch-size", "4",
        "--seq-len", "8", "--lr", "0.02", "--max-steps", "12", "--max-time", "300",
        "--eval-every", "6", "--seed", "5", "--device", "cpu", "--set", "train.log_every=4",
        "--set", "train.threads=1", "--no-progress", cwd=root,
    )
    assert proc.returncode == 0, proc.stderr
    return root, proc


def test_train_with_named_options(workdir):
    root, proc = workdir
    run = root / "runs" / "input-gru"  # default name: <file stem>-<cell>
    assert {"best.pt", "last.pt", "config.toml", "metrics.jsonl"} <= {p.name for p in run.iterdir()}
    cfg = tomllib.loads((run / "config.toml").read_text())
    assert cfg["model"] == {"cell": "gru", "embed_size": 8, "hidden_size": 24, "num_layers": 2,
                            "dropout": 0.1}
    t = cfg["train"]
    assert (t["batch_size"], t["seq_len"], t["lr"], t["max_steps"], t["max_time"]) == (
        4, 8, 0.02, 12, 300.0)
    assert (t["eval_every"], t["seed"], t["device"], t["log_every"], t["threads"]) == (
        6, 5, "cpu", 4, 1)
    assert t["eval_streams"] == 4  # from configs/tiny.toml, not overridden
    records = read_metrics(run / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 4), ("eval", 6), ("train", 8), ("eval", 12), ("train", 12)
    ] or [(r["kind"], r["step"]) for r in records] == [
        ("train", 4), ("eval", 6), ("train", 8), ("train", 12), ("eval", 12)
    ]
    # The summary table goes to stderr; the samples at evaluations (tqdm.write) to stdout.
    assert "charlm train" in proc.stderr and "val loss (best)" in proc.stderr
    assert "stopped by" in proc.stderr and "max_steps" in proc.stderr
    assert "--- sample at step 6" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_sample_options_and_default_checkpoint(workdir):
    root, _ = workdir
    best = root / "runs" / "input-gru" / "best.pt"
    explicit = run_charlm("sample", "--checkpoint", best, *SAMPLE_OPTIONS, cwd=root)
    assert explicit.returncode == 0, explicit.stderr
    # No --checkpoint: the newest run's best.pt, named on stderr; same seed, same text.
    default = run_charlm("sample", *SAMPLE_OPTIONS, cwd=root)
    assert default.returncode == 0, default.stderr
    assert f"using {os.path.join('runs', 'input-gru', 'best.pt')}" in default.stderr
    assert default.stdout == explicit.stdout
    samples = re.findall(r"--- sample (\d) ---\n(.*?)(?=\n\n--- sample|\n$)", explicit.stdout,
                         re.DOTALL)
    assert [n for n, _ in samples] == ["1", "2"]
    vocab = set(checkpoint.load(best)["vocab"])
    for _, text in samples:
        assert text.startswith("All:") and len(text) == 4 + 30
        assert set(text) <= vocab


def test_eval_reports_loss_and_unknown(tiny_run, tmp_path):
    path = tmp_path / "other.txt"
    path.write_text("First Citizen:\nZounds! 42 quiz.\n" * 20, encoding="utf-8")
    proc = run_charlm("eval", tiny_run / "best.pt", path, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    expected = evaluate_file(tiny_run / "best.pt", path, device="cpu")
    # Outside the training text's vocabulary: Z, 4, 2, q, z (5 per line, 20 lines).
    assert expected.unknown == 100
    out = proc.stdout
    assert re.search(rf"loss\s*│\s*{expected.loss:.4f} nats/char", out), out
    assert re.search(rf"bits per char\s*│\s*{expected.loss / math.log(2):.4f}", out), out
    assert re.search(rf"perplexity\s*│\s*{math.exp(expected.loss):.3f}", out), out
    assert re.search(r"outside vocabulary\s*│\s*100 \(15\.6%, dropped\)", out), out
    assert "warning: 100 characters (15.6%) of the text are outside" in proc.stderr
    assert re.search(rf"characters\s*│\s*{expected.chars:,}", out), out


def test_info_table(tiny_run):
    proc = run_charlm("info", tiny_run / "best.pt")
    assert proc.returncode == 0, proc.stderr
    ckpt = checkpoint.load(tiny_run / "best.pt")
    params = sum(t.numel() for t in ckpt["model"].values())
    out = proc.stdout
    assert re.search(r"cell\s*│\s*lstm", out)
    assert re.search(r"embedding / hidden / layers\s*│\s*16 / 32 / 1", out)
    assert re.search(rf"parameters\s*│\s*{params:,}", out)
    assert re.search(rf"vocabulary\s*│\s*{len(ckpt['vocab'])} characters", out)
    assert re.search(r"steps\s*│\s*40", out)
    best = ckpt["train_state"]["best_val_loss"]
    assert re.search(rf"best val loss\s*│\s*{best:.4f} nats", out)
    assert re.search(r"training file\s*│\s*input\.txt \(\d[\d,]* bytes\)", out)


def test_python_m_charlm_help():
    proc = subprocess.run([sys.executable, "-m", "charlm", "--help"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "COLUMNS": "120"})
    assert proc.returncode == 0, proc.stderr
    for command in ("train", "sample", "eval", "info", "runs", "bench"):
        assert command in proc.stdout


def test_bad_text_is_a_clean_error(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello world\n" * 3 + b"\xff\xfe oops")
    proc = run_charlm("train", bad, "--config", TINY_CONFIG, "--out", tmp_path / "run")
    assert_clean_error(proc, "not valid utf-8", "offset 36")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_unknown_seed_characters(tiny_run, capsys):
    """In process (the same code path as the console script, without a torch import)."""
    best = str(tiny_run / "best.pt")
    with pytest.raises(SystemExit) as info:
        main(["sample", "-c", best, "--seed", "Zebra 42", "-n", "5"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 1 and len(err.splitlines()) == 1 and err.startswith("error: ")
    for needle in ("not in the model's vocabulary", "'Z'", "'2'", "'4'", "--drop-unknown"):
        assert needle in err
    with pytest.raises(SystemExit) as info:
        main(["sample", "-c", best, "--seed", "Zebra 42", "-n", "5", "--drop-unknown",
              "--random-seed", "1"])
    assert info.value.code == 0
    ckpt = checkpoint.load(best)
    vocab = checkpoint.vocab_of(ckpt)
    kept = seed_ids(vocab, "Zebra 42", drop_unknown=True)
    assert vocab.decode(kept) == "era "  # Z, b, 4 and 2 are not in the training text
    text = generate(checkpoint.model_of(ckpt), vocab, kept, 5, temperature=0.8,
                    random_seed=1)[0]
    captured = capsys.readouterr()
    assert captured.out == "era " + text + "\n"  # the seed the model continues from
    assert "dropped 4 seed characters outside the vocabulary" in captured.err


def test_train_encoding_option(tmp_path, capsys):
    """``--encoding`` reaches the reader (in process: the same code as the console script)."""
    path = tmp_path / "latin.txt"
    path.write_bytes(("Café crème, naïve façade.\n" * 40).encode("latin-1"))
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as info:
            main(["train", str(path), "--config", str(TINY_CONFIG), "--encoding", "latin-1",
                  "--max-steps", "2", "--batch-size", "4", "--out", str(tmp_path / "run"),
                  "--no-progress", "--no-samples", "--set", "train.threads=1"])
    finally:
        torch.set_num_threads(threads)
    assert info.value.code in (0, None), capsys.readouterr().err
    ckpt = checkpoint.load(tmp_path / "run" / "last.pt")
    assert {"é", "è", "ï", "ç"} <= set(ckpt["vocab"])
    assert checkpoint.config_of(ckpt).data.encoding == "latin-1"
