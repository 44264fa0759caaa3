"""What a new user sees (issue 18): short runs that show progress, --max-time as the wall
time, honest summaries, evaluation of other texts, run directories as checkpoints, runs and
plots, sampling output, options and help, line endings."""

from __future__ import annotations

import json
import math
import re
import subprocess
import time

import pytest
import torch
from conftest import SAMPLE_TEXT, TINY_CONFIG, charlm_exe, run_charlm, run_cli

from charlm.config import load_toml
from charlm.data.text import read_text, resolve_source
from charlm.evaluate import UNKNOWN_BITS
from charlm.runs.directory import read_metrics
from charlm.storage import checkpoint
from charlm.training.pacing import EVALS, LOGS, MAX_EVAL_SHARE, Pacer

TINY = ["--config", TINY_CONFIG, "--set", "train.threads=1"]


def records(run, kind):
    return [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == kind]


# ------------------------------------------------------------------------------- pacing
def decisions(pacer: Pacer, steps: int, seconds_per_step: float = 0.0):
    """The steps logged and evaluated, evaluations taking no time."""
    logs, evals = [], []
    for step in range(1, steps + 1):
        now = (step - 1) * seconds_per_step
        due = pacer.due(step, now)
        logs += [step] * due.log
        if due.eval:
            evals.append(step)
            pacer.evaluated(step, now, 0.0)
    return logs, evals


def test_a_step_limit_is_paced_on_a_fixed_grid():
    logs, evals = decisions(Pacer(0, 0, 130, 0.0, 0.0, 50), 130)
    assert len(evals) == EVALS and evals[-1] == 130
    assert LOGS <= len(logs) <= LOGS + EVALS + 1 and logs[0] == 1
    assert set(evals) <= set(logs)  # a train record with every evaluation
    # A resumed run (a new Pacer from step 57) takes the same decisions from there on.
    resumed = Pacer(0, 0, 130, 0.0, 0.0, 50, step=57)
    later = [s for s in range(58, 131) if resumed.due(s, 0.0).eval]
    assert later == [s for s in evals if s > 57]
    # An epoch limit paces like the steps it amounts to.
    assert decisions(Pacer(0, 0, 0, 0.0, 2.6, 50), 130)[1] == evals


def test_explicit_intervals_win():
    logs, evals = decisions(Pacer(25, 10, 100, 60.0, 0.0, 50), 100, 0.1)
    assert evals == [25, 50, 75, 100] and logs == list(range(10, 101, 10))


def test_a_time_limit_paces_in_seconds_whatever_the_speed():
    for seconds_per_step in (0.001, 0.05):  # a fast and a slow machine: the same count
        steps = int(60 / seconds_per_step)
        logs, evals = decisions(Pacer(0, 0, 0, 60.0, 0.0, 50), steps, seconds_per_step)
        assert EVALS - 1 <= len(evals) <= EVALS + 1
        assert LOGS - 1 <= len(logs) <= LOGS + EVALS + 2


def test_slow_evaluations_are_spaced_to_a_share_of_the_time():
    pacer = Pacer(0, 0, 0, 60.0, 0.0, 50)
    pacer.evaluated(step=100, now=5.0, seconds=3.0)  # 3 s per evaluation of a 60 s run
    next_at = next(t / 10 for t in range(50, 600) if pacer.due(1000 + t, t / 10).eval)
    assert next_at == pytest.approx(5.0 + 3.0 / MAX_EVAL_SHARE, abs=0.11)
    # The time kept for the end: a step, the last evaluation's time (measured), no sample yet.
    # 100 steps in 5 s, 3 s of it evaluating: 0.02 s per step.
    assert pacer.reserve(100, 5.0, 64, 10_000) == pytest.approx(0.02 + 3.0)
    fresh = Pacer(0, 0, 0, 60.0, 0.0, 50)  # before any evaluation: as long as training on it
    assert fresh.reserve(100, 2.0, 64, 6_400) == pytest.approx(0.02 + 0.02 * 100)
    assert Pacer(0, 0, 1000, 0.0, 0.0, 50).reserve(100, 2.0, 64, 6_400) == 0.0  # no time limit


def test_a_short_timed_run_shows_progress_and_ends_within_its_time(tmp_path):
    """The 60 s run of the README in miniature: a paced tiny run with a time limit logs
    regularly, evaluates several times, samples at the end, and the whole run (final
    evaluation and save included) fits in --max-time."""
    text = tmp_path / "input.txt"
    text.write_text(SAMPLE_TEXT * 5, encoding="utf-8")
    budget = 6.0
    proc = run_charlm("train", text, *TINY, "--max-steps", "0", "--max-time", budget,
                      "--eval-every", "0", "--log-every", "0", "--out", tmp_path / "run",
                      "--no-progress", timeout=120)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    train, evals = records(run, "train"), records(run, "eval")
    assert len(train) >= 10 and len(evals) >= 5, (len(train), len(evals))
    last = checkpoint.load(run / "last.pt")["train_state"]
    assert train[-1]["step"] == evals[-1]["step"] == last["step"]  # a final record of each
    assert re.search(rf"--- sample at step {last['step']} \(val", proc.stdout), proc.stdout
    # The clock of the run, from its first step to its last checkpoint.
    assert last["elapsed"] <= budget * 1.05, last["elapsed"]
    assert re.search(r"time\s*│\s*(\d+\.\d) s", proc.stderr)
    shown = float(re.search(r"time\s*│\s*(\d+\.\d) s", proc.stderr).group(1))
    assert budget * 0.5 <= shown <= budget * 1.05 + 0.1
    assert "log about" in proc.stderr and "evaluate about" in proc.stderr


# ------------------------------------------------------------------------------ summaries
def test_summary_of_a_pause_before_any_evaluation(tmp_path, text_file):
    proc = run_charlm("train", text_file, *TINY, "--max-steps", "40", "--eval-every", "20",
                      "--log-every", "2", "--stop-at-step", "7", "--out", tmp_path / "run",
                      "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"val loss \(last\)\s*│\s*not evaluated", proc.stderr), proc.stderr
    assert re.search(r"val loss \(best\)\s*│\s*not evaluated", proc.stderr)
    assert "inf" not in proc.stderr and "nan" not in proc.stderr
    # The recent average, of the last train record (steps 5-6), not the mean from step 0.
    assert re.search(r"train loss \(steps 5-6\)", proc.stderr), proc.stderr
    assert f"Resume with: charlm train --resume {tmp_path / 'run'}" in proc.stderr
    assert re.search(r"training speed\s*│\s*[\d,]+ chars/s", proc.stderr)
    assert re.search(r"evaluating\s*│\s*[\d.]+ s, 0 evaluations", proc.stderr)


def test_summary_train_loss_is_the_last_interval(tmp_path, text_file):
    proc = run_charlm("train", text_file, *TINY, "--max-steps", "23", "--eval-every", "10",
                      "--log-every", "10", "--out", tmp_path / "run", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    # The run ends with a train record of steps 21-23, and the summary reports it.
    train = records(tmp_path / "run", "train")
    assert [r["step"] for r in train] == [10, 20, 23]
    shown = re.search(r"train loss \(steps 21-23\)\s*│\s*(\d+\.\d+) nats", proc.stderr)
    assert shown and float(shown.group(1)) == pytest.approx(train[-1]["loss"], abs=1e-4)
    assert re.search(r"evaluating\s*│\s*[\d.]+ s, 3 evaluations", proc.stderr)
    assert "--- sample at step 23" in proc.stdout  # the final evaluation samples too


# ------------------------------------------------------------------------- evaluation
def test_eval_warns_of_unknown_characters_and_can_charge_them(tiny_run, tmp_path):
    path = tmp_path / "other.txt"
    path.write_text(SAMPLE_TEXT[:2000] + "ЖЖЖЖЖ" * 40, encoding="utf-8")
    dropped = run_charlm("eval", tiny_run / "best.pt", path, "--device", "cpu", "--json")
    assert dropped.returncode == 0, dropped.stderr
    assert re.search(r"warning: 200 characters \(9\.1%\) .*outside the model's vocabulary; "
                     r"dropped", dropped.stderr), dropped.stderr
    charged = run_charlm("eval", tiny_run / "best.pt", path, "--device", "cpu", "--json",
                         "--unknown", "charge")
    assert charged.returncode == 0, charged.stderr
    assert "each charged 20.09 bits" in charged.stderr
    d, c = json.loads(dropped.stdout), json.loads(charged.stdout)
    assert (d["unknown_mode"], c["unknown_mode"], c["unknown_bits"]) == ("drop", "charge", UNKNOWN_BITS)
    predictions = d["chars"] - 1
    expected = (d["loss"] * predictions + 200 * UNKNOWN_BITS * math.log(2)) / (predictions + 200)
    assert c["loss"] == pytest.approx(expected, rel=1e-9)
    bad = run_cli("eval", tiny_run / "best.pt", path, "--unknown", "ignore")
    assert bad.returncode != 0 and "drop, charge" in bad.stderr


def test_eval_shows_a_progress_bar_when_asked(tiny_run, text_file):
    proc = run_charlm("eval", tiny_run, text_file, "--device", "cpu", "--progress")
    assert proc.returncode == 0, proc.stderr
    assert "evaluating" in proc.stderr and "char" in proc.stderr
    quiet = run_charlm("eval", tiny_run, text_file, "--device", "cpu")
    assert "evaluating" not in quiet.stderr  # not a terminal: no bar


def test_eval_is_inference_only(tiny_run, text_file):
    from charlm.evaluate import loss_sums

    model, vocab = checkpoint.load_model(tiny_run / "best.pt", torch.device("cpu"))
    seen = []
    ids = torch.from_numpy(vocab.encode(SAMPLE_TEXT[:3000]).astype("int64"))
    total, count = loss_sums(model, ids, 4, 64,
                             on_progress=seen.append)
    assert sum(seen) == count == 2999 and total.is_inference()


# ------------------------------------------------------------- run directories as checkpoints
@pytest.mark.parametrize("command", ["info", "eval", "export", "sample"])
def test_a_run_directory_stands_for_its_best_checkpoint(tiny_run, text_file, tmp_path, command):
    args = {
        "info": ["info", tiny_run],
        "eval": ["eval", tiny_run, text_file, "--device", "cpu"],
        "export": ["export", tiny_run, "-f", "safetensors", "-o", tmp_path / "m.safetensors"],
        "sample": ["sample", "-c", tiny_run, "-n", "10", "--random-seed", "1"],
    }[command]
    proc = run_charlm(*args)
    assert proc.returncode == 0, proc.stderr
    assert f"using {tiny_run / 'best.pt'}" in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = run_cli(*[empty if a == tiny_run else a for a in args])
    assert bad.returncode != 0 and "no checkpoint (best.pt or last.pt)" in bad.stderr


# -------------------------------------------------------------------------- runs, plots
def test_runs_show_and_filter_by_training_text(tmp_path, text_file):
    other = tmp_path / "treebank.txt"
    other.write_text("( S ( NP a ) ) " * 300, encoding="utf-8")
    for text, name in ((text_file, "a"), (other, "b")):
        proc = run_charlm("train", text, *TINY, "--max-steps", "4", "--eval-every", "4",
                          "--out", tmp_path / "runs" / name, "--no-progress")
        assert proc.returncode == 0, proc.stderr
    listing = run_cli("runs", tmp_path / "runs")
    assert listing.returncode == 0, listing.stderr
    assert "input.txt" in listing.stdout and "treebank.txt" in listing.stdout
    only = run_cli("runs", tmp_path / "runs", "--text", "treebank.txt", "--json")
    assert [r["name"] for r in json.loads(only.stdout)["runs"]] == ["b"]
    assert json.loads(only.stdout)["runs"][0]["text"] == "treebank.txt"
    none = run_cli("runs", tmp_path / "runs", "--text", "nothing.txt")
    assert none.returncode == 0 and "no runs on nothing.txt" in none.stdout


def test_plot_skips_runs_without_metrics_and_writes_svg_and_pdf(tiny_run, tmp_path):
    pytest.importorskip("matplotlib")
    fresh = tmp_path / "fresh-run"
    fresh.mkdir()
    (fresh / "config.toml").write_text("", encoding="utf-8")
    for suffix, magic in ((".svg", b"<?xml"), (".pdf", b"%PDF")):
        out = tmp_path / f"loss{suffix}"
        proc = run_cli("plot", tiny_run, fresh, "-o", out)
        assert proc.returncode == 0, proc.stderr
        assert f"warning: skipped {fresh}" in proc.stderr and "1 run" in proc.stdout
        assert out.read_bytes().startswith(magic)
    only_fresh = run_cli("plot", fresh, "-o", tmp_path / "x.png")
    assert only_fresh.returncode != 0 and "metrics" in only_fresh.stderr
    assert run_cli("plot", tiny_run, "-o", tmp_path / "x.gif").returncode != 0


# ------------------------------------------------------------------------------- sampling
def test_no_echo_prints_the_continuation_only(tiny_run):
    args = ("sample", "-c", tiny_run / "best.pt", "-n", "30", "--seed", "First", "--random-seed", "4")
    echoed, bare = run_cli(*args), run_cli(*args, "--no-echo")
    assert echoed.returncode == bare.returncode == 0, bare.stderr
    assert echoed.stdout == "First" + bare.stdout and not bare.stdout.startswith("First")


def test_several_samples_stream_the_first(tiny_run):
    """`--num-samples 2 -n <huge> | head` returns at once: the first sample is printed as it
    is generated, long before the batch ends."""
    proc = subprocess.Popen([*charlm_exe(), "sample", "-c", str(tiny_run / "best.pt"),
                             "--num-samples", "2", "-n", "5000000", "--random-seed", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        started = time.monotonic()
        first = proc.stdout.readline()
        chars = proc.stdout.read(200)
        assert first == b"--- sample 1 ---\n" and len(chars) == 200
        assert proc.poll() is None and time.monotonic() - started < 60  # still generating
    finally:
        proc.kill()
        proc.wait()


def test_streamed_and_batched_samples_print_the_same(tiny_run):
    args = ("sample", "-c", tiny_run / "best.pt", "-n", "60", "--seed", "Fi", "--random-seed", "2")
    two = run_cli(*args, "--num-samples", "2", "--stop", "e")
    assert two.returncode == 0, two.stderr
    blocks = two.stdout.split("\n--- sample 2 ---\n")
    assert blocks[0].startswith("--- sample 1 ---\nFi") and len(blocks) == 2
    assert all(block.rstrip("\n").endswith("e") for block in blocks)  # each cut at its stop


def test_greedy_samples_are_said_to_be_identical(tiny_run):
    proc = run_cli("sample", "-c", tiny_run / "best.pt", "-n", "20", "-t", "0",
                   "--num-samples", "3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("its 3 samples are identical") == 1
    one = run_cli("sample", "-c", tiny_run / "best.pt", "-n", "20", "-t", "0")
    assert "identical" not in one.stderr


# ----------------------------------------------------------------------- options and help
def help_text(*command: str) -> str:
    proc = run_charlm(*command, "--help", env={"COLUMNS": "250"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_train_help_shows_defaults_descriptions_and_flags():
    text = help_text("train")
    for option, default in (("--hidden-size", "256"), ("--num-layers", "1"),
                            ("--embed-size", "128"), ("--dropout", "0"), ("--lr", "0.003"),
                            ("--eval-every", "0"), ("--log-every", "0"), ("--random-seed", "1337"),
                            ("--device", "auto")):
        line = next(line for line in text.splitlines() if f"{option} " in line)
        assert f"[default: {default}]" in line or f"[default: ({default})]" in line, line
        assert re.search(rf"{option}\s+<\w+>\s+\w", line), line  # a description
    assert "--dry-run " in text and "--seed " not in text


@pytest.mark.parametrize("command", [(), ("train",), ("sample",), ("eval",), ("info",),
                                     ("export",), ("plot",), ("runs",), ("bench",)])
def test_no_option_shows_a_bool_metavar(command):
    assert "<bool>" not in help_text(*command)


def test_every_device_option_defaults_to_auto():
    for command in ("train", "sample", "eval", "bench"):
        line = next(line for line in help_text(command).splitlines() if "--device " in line)
        assert "[default: auto]" in line or "[default: (auto)]" in line, (command, line)


def test_sample_help_is_exact_about_onnx():
    assert "numpy" in help_text("sample")


def test_dry_run_prints_the_config_and_size_without_training(tmp_path, text_file):
    proc = run_charlm("train", text_file, *TINY, "--hidden-size", "48", "--dry-run",
                      "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert "hidden_size = 48" in proc.stdout and "[train]" in proc.stdout
    cfg = load_toml(TINY_CONFIG)
    vocab = len(set(SAMPLE_TEXT))
    E, H = cfg.model.embed_size, 48
    expected = vocab * E + 4 * H * (E + H) + 8 * H + H * vocab + vocab  # LSTM, one layer
    assert f"model: {expected:,} parameters, vocabulary {vocab}" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_log_every_and_random_seed_options(tmp_path, text_file):
    common = ["train", text_file, *TINY, "--max-steps", "6", "--eval-every", "6"]
    new = run_charlm(*common, "--log-every", "2", "--random-seed", "7", "--out", tmp_path / "a",
                     "--no-progress")
    assert new.returncode == 0, new.stderr
    assert [r["step"] for r in records(tmp_path / "a", "train")] == [2, 4, 6]
    old = run_charlm(*common, "--log-every", "2", "--seed", "7", "--out", tmp_path / "b",
                     "--no-progress")
    assert old.returncode == 0, old.stderr
    assert "--seed is deprecated" in old.stderr and "--random-seed" in old.stderr
    a, b = (checkpoint.load(tmp_path / d / "last.pt") for d in "ab")
    assert a["config"]["train"]["seed"] == b["config"]["train"]["seed"] == 7
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    both = run_cli(*common, "--seed", "7", "--random-seed", "7", "--out", tmp_path / "c")
    assert both.returncode != 0 and "only --random-seed" in both.stderr


# ------------------------------------------------------------------------------ line endings
def test_crlf_is_read_as_newline_by_default(tmp_path):
    text = tmp_path / "windows.txt"
    text.write_bytes(SAMPLE_TEXT.replace("\n", "\r\n").encode() + b"old mac\rline\r")
    proc = run_charlm("train", text, *TINY, "--max-steps", "4", "--eval-every", "4",
                      "--out", tmp_path / "run", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "line endings were read as \\n" in proc.stderr
    vocab = checkpoint.load(tmp_path / "run" / "last.pt")["vocab"]
    assert "\r" not in vocab and "\n" in vocab
    kept = run_charlm("train", text, *TINY, "--max-steps", "4", "--eval-every", "4",
                      "--set", "data.newline=keep", "--out", tmp_path / "keep", "--no-progress")
    assert kept.returncode == 0, kept.stderr
    assert "kept as characters" in kept.stderr
    assert "\r" in checkpoint.load(tmp_path / "keep" / "last.pt")["vocab"]


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 7])
def test_line_endings_split_between_chunks(tmp_path, chunk_bytes):
    path = tmp_path / "t.txt"
    path.write_bytes(b"a\r\nb\r\rc\r\n\r\nd\r")
    chunks = list(read_text(resolve_source(path), chunk_bytes=chunk_bytes))
    assert "".join(chunks) == "a\nb\n\nc\n\nd\n"
    kept = read_text(resolve_source(path), newline="keep", chunk_bytes=chunk_bytes)
    assert "".join(kept) == "a\r\nb\r\rc\r\n\r\nd\r"
