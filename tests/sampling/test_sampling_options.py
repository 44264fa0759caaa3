"""Seed files, stop texts, several temperatures and beam search: the library and `charlm sample`."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXT, assert_clean_error, run_charlm, run_cli
from hypothesis import given
from hypothesis import strategies as st

from charlm.config import ModelConfig
from charlm.data.vocab import Vocab
from charlm.errors import CharlmError
from charlm.model.network import build_model
from charlm.sampling.options import StopScan, parse_temperatures, read_seed_file, unescape
from charlm.sampling.sampler import generate, pick, seed_ids, warm
from charlm.storage import checkpoint

VOCAB = Vocab.from_text("abcdefghij \nTHE")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["lstm", "gru"])
def model(request):
    torch.manual_seed(0)
    cfg = ModelConfig(cell=request.param, embed_size=8, hidden_size=16, num_layers=2)
    return build_model(len(VOCAB), cfg).eval()


def blocks(stdout: str) -> list[tuple[str, str]]:
    """(label, text) of each '--- label ---' block of `charlm sample` output; each text ends
    with a newline, its own or one added."""
    parts = re.split(r"(?:^|\n)--- (.*?) ---\n", stdout)
    return [(parts[i], parts[i + 1]) for i in range(1, len(parts), 2)]


# ------------------------------------------------------------------------------ seed file
def test_long_seed_is_warmed_in_one_forward_pass(model):
    rng = np.random.default_rng(0)
    seed = VOCAB.decode(rng.integers(0, len(VOCAB), 100_000))
    calls = []
    hook = model.rnn.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    try:
        texts = generate(model, VOCAB, seed_ids(VOCAB, seed), 20, temperature=0.0, num_samples=3)
    finally:
        hook.remove()
    assert calls == [torch.Size([1, 100_000, 8])]  # the whole seed, once, at batch 1
    # the same as warming on the full sequence through the model's own forward
    ids = seed_ids(VOCAB, seed)
    with torch.no_grad():
        full, _ = model(torch.tensor([ids]))
        last, _ = warm(model, ids)
    torch.testing.assert_close(last, full[:, -1])
    assert len(texts) == 3 and len(set(texts)) == 1 and len(texts[0]) == 20


def test_read_seed_file(tmp_path, monkeypatch):
    path = tmp_path / "seed.txt"
    path.write_bytes("a\r\nb é".encode())
    assert read_seed_file(str(path)) == "a\r\nb é"
    with pytest.raises(CharlmError, match="not found"):
        read_seed_file(str(tmp_path / "missing.txt"))
    with pytest.raises(CharlmError, match="directory"):
        read_seed_file(str(tmp_path))
    path.write_bytes(b"ok \xff")
    with pytest.raises(CharlmError, match="not valid utf-8"):
        read_seed_file(str(path))


def test_cli_seed_file_of_100000_characters(tiny_run, tmp_path):
    best = tiny_run / "best.pt"
    seed = (SAMPLE_TEXT * 20)[:100_000]
    path = tmp_path / "prime.txt"
    path.write_text(seed, encoding="utf-8")
    proc = run_charlm("sample", "-c", best, "--seed-file", path, "-n", 30, "-t", 0)
    assert proc.returncode == 0, proc.stderr
    ckpt = checkpoint.load(best)
    vocab = checkpoint.vocab_of(ckpt)
    want = generate(checkpoint.model_of(ckpt), vocab, vocab.encode(seed).tolist(), 30,
                    temperature=0.0)[0]
    assert proc.stdout == want + "\n"  # only the continuation: the file is not echoed
    # standard input works the same
    piped = run_charlm("sample", "-c", best, "--seed-file", "-", "-n", 30, "-t", 0, input=seed)
    assert piped.returncode == 0 and piped.stdout == proc.stdout


def test_cli_seed_file_checks(tiny_run, tmp_path):
    best = tiny_run / "best.pt"
    path = tmp_path / "prime.txt"
    path.write_text("Zebra: All", encoding="utf-8")
    assert_clean_error(run_cli("sample", "-c", best, "--seed-file", path),
                       "'Z'", "'b'", "--drop-unknown")
    proc = run_cli("sample", "-c", best, "--seed-file", path, "--drop-unknown", "-n", 5)
    assert proc.returncode == 0 and "dropped 2 seed characters" in proc.stderr
    assert_clean_error(run_cli("sample", "-c", best, "--seed-file", path, "--seed", "All"),
                       "--seed and --seed-file")
    assert_clean_error(run_cli("sample", "-c", best, "--seed-file", tmp_path / "nope.txt"),
                       "not found")


# ---------------------------------------------------------------------------------- stop
def naive_stop_end(text: str, stops: list[str]) -> int | None:
    ends = [text.find(s) + len(s) for s in stops if s in text]
    return min(ends) if ends else None


@given(st.lists(st.text("ab c", min_size=6, max_size=6), min_size=1, max_size=5),
       st.lists(st.text("ab c", min_size=1, max_size=3), min_size=1, max_size=3))
def test_stop_scan_finds_the_first_occurrence(rows, stops):
    scan = StopScan(stops, len(rows))
    for t in range(6):
        scan.feed([row[t] for row in rows])
    assert scan.ends == [naive_stop_end(row, stops) for row in rows]
    for i, row in enumerate(rows):
        end = naive_stop_end(row, stops)
        assert scan.cut(i, row) == (row if end is None else row[:end])


def test_stop_texts():
    assert unescape(r"\n\n") == "\n\n" and unescape(r"a\tb\\n\x") == "a\tb\\n\\x"
    with pytest.raises(CharlmError, match="empty"):
        StopScan([""], 1)


def test_eight_batched_samples_each_end_at_their_own_stop(model):
    seed = seed_ids(VOCAB, "THE ")
    free = generate(model, VOCAB, seed, 200, temperature=1.0, num_samples=8, random_seed=4)
    stopped = generate(model, VOCAB, seed, 200, temperature=1.0, num_samples=8, random_seed=4,
                       stop=["e", "ab"])
    ends = []
    for full, text in zip(free, stopped, strict=True):
        firsts = [full.find(s) + len(s) for s in ("e", "ab") if s in full]
        end = min(firsts) if firsts else len(full)
        assert text == full[:end]  # the same sample, cut right after its first stop text
        ends.append(end)
    assert len(set(ends)) >= 3, ends  # the samples stop independently


def test_streaming_stops_with_the_sample(model):
    steps: list[list[int]] = []
    text = generate(model, VOCAB, seed_ids(VOCAB, "THE "), 300, temperature=1.0, random_seed=2,
                    on_step=steps.append, stop=["a"])[0]
    assert text.endswith("a") and text.count("a") == 1
    assert len(steps) == len(text)  # nothing was generated after the stop text


def test_cli_stop_with_batches(tiny_run):
    proc = run_cli("sample", "-c", tiny_run / "best.pt", "--seed", "All:", "-n", 300,
                   "--num-samples", 8, "--random-seed", 3, "--stop", "e", "--stop", r"\n\n")
    assert proc.returncode == 0, proc.stderr
    found = blocks(proc.stdout)
    assert [label for label, _ in found] == [f"sample {i}" for i in range(1, 9)]
    for _, text in found:
        rest = text.removeprefix("All:")
        rest = rest if rest.endswith("\n\n") else rest.removesuffix("\n")
        assert naive_stop_end(rest, ["e", "\n\n"]) == len(rest), rest
    assert len({len(text) for _, text in found}) > 1
    # streaming a single sample: ends at the stop text, with no newline added after one
    one = run_cli("sample", "-c", tiny_run / "best.pt", "--seed", "All", "-n", 300,
                  "--random-seed", 3, "--stop", r"\n")
    assert one.returncode == 0 and one.stdout.endswith("\n") and one.stdout.count("\n") == 1
    assert_clean_error(run_cli("sample", "-c", tiny_run / "best.pt", "--stop", "Zz"),
                       "'Z'", "never occur")


# --------------------------------------------------------------------------- temperatures
def test_parse_temperatures():
    assert parse_temperatures(None) == [0.8]
    assert parse_temperatures(["0.5", "1,1.5"]) == [0.5, 1.0, 1.5]
    with pytest.raises(CharlmError, match="--temperature"):
        parse_temperatures(["hot"])


def test_per_row_temperatures_in_one_batch(model):
    seed = seed_ids(VOCAB, "THE ")
    steps: list[list[int]] = []
    texts = generate(model, VOCAB, seed, 30, temperature=[0.0, 1.0, 0.0], num_samples=2,
                     random_seed=1, on_step=steps.append)
    assert len(texts) == 6 and all(len(s) == 6 for s in steps)  # one batch of 3 x 2 rows
    greedy = generate(model, VOCAB, seed, 30, temperature=0.0)[0]
    assert texts[0] == texts[1] == texts[4] == texts[5] == greedy
    assert texts[2] != greedy or texts[3] != greedy
    # pick: rows at temperature 0 take the argmax, the others sample
    logits = torch.randn(4, 7)
    temps = torch.tensor([0.0, 5.0, 0.0, 5.0])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([pick(logits, temps, 0, 1.0, g) for _ in range(200)])  # (200, 4)
    assert (draws[:, 0] == logits[0].argmax()).all() and (draws[:, 2] == logits[2].argmax()).all()
    assert len(draws[:, 1].unique()) > 1


def test_cli_several_temperatures_are_labelled(tiny_run):
    proc = run_cli("sample", "-c", tiny_run / "best.pt", "--seed", "All", "-n", 20,
                   "-t", "0", "-t", "0.5,1.0", "--num-samples", 2, "--random-seed", 1)
    assert proc.returncode == 0, proc.stderr
    found = blocks(proc.stdout)
    assert [label for label, _ in found] == [
        f"temperature {t}, sample {i}" for t in ("0", "0.5", "1") for i in (1, 2)]
    assert found[0][1] == found[1][1] and all(len(text) in (23, 24) for _, text in found)
    single = run_cli("sample", "-c", tiny_run / "best.pt", "--seed", "All", "-n", 20,
                     "-t", "0,1", "--random-seed", 1)
    assert [label for label, _ in blocks(single.stdout)] == ["temperature 0", "temperature 1"]
    assert_clean_error(run_cli("sample", "-c", tiny_run / "best.pt", "-t", "0.5,x"),
                       "--temperature")


# ---------------------------------------------------------------------------------- beam
def test_cli_beam(tiny_run, tmp_path):
    best = tiny_run / "best.pt"
    seed = tmp_path / "seed.txt"
    seed.write_text(SAMPLE_TEXT[:500], encoding="utf-8")
    proc = run_cli("sample", "-c", best, "--seed-file", seed, "-n", 60, "--beam", 4,
                   "--stop", r"\n")
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"beam 4: log-probability (-[\d.]+) nats over (\d+) characters", proc.stderr)
    assert match, proc.stderr
    n = int(match.group(2))
    body = proc.stdout[:n]  # the beam's text: up to its first newline, or 60 characters
    assert proc.stdout in (body, body + "\n") and "\n" not in body[:-1]
    assert body.endswith("\n") or n == 60
    again = run_cli("sample", "-c", best, "--seed-file", seed, "-n", 60, "--beam", 4,
                    "--stop", r"\n")
    assert again.stdout == proc.stdout  # deterministic
    for clash in (["-t", "0.5"], ["--top-k", "3"], ["--top-p", "0.9"], ["--num-samples", "2"],
                  ["--random-seed", "1"]):
        assert_clean_error(run_cli("sample", "-c", best, "--beam", 3, *clash),
                           "--beam", clash[0])
    assert_clean_error(run_cli("sample", "-c", best, "--beam", -1), "--beam")


def test_onnx_export_stops_and_takes_several_temperatures(tiny_run, tmp_path):
    from charlm.export.writers import export_checkpoint
    from charlm.storage import onnx as onnx_runtime

    best = tiny_run / "best.pt"
    onnx_model = onnx_runtime.load(export_checkpoint(best, "onnx", tmp_path / "m.onnx", False).path)
    model, vocab = checkpoint.load_model(best)
    seed = vocab.encode("All:").tolist()
    args = dict(temperature=[0.0, 1.0, 0.0], num_samples=2, random_seed=1, stop=["e", "\n"])
    texts = onnx_runtime.generate(onnx_model, vocab, seed, 80, **args)
    greedy = generate(model, vocab, seed, 80, **args)
    assert len(texts) == 6 and texts[0] == texts[1] == texts[4] == greedy[0] == greedy[5]
    for text in texts:
        assert naive_stop_end(text, ["e", "\n"]) in (len(text), None)
    proc = run_cli("sample", "-c", tmp_path / "m.onnx", "--beam", 2)
    assert_clean_error(proc, "--beam", ".pt")
