"""Training through the library: a learning test for each cell, run directories, metrics,
config.toml, checkpoints, schedule and stopping limits."""

from __future__ import annotations

import json
import math
import tomllib

import pytest
import torch

from charlm.config import Config, TrainConfig, load_toml
from charlm.errors import CharlmError
from charlm.runs.directory import new_run_dir, read_metrics
from charlm.storage import checkpoint
from charlm.training.setup import lr_at, planned_progress, train

PATTERN = "abcdefg\n" * 500


@pytest.fixture(autouse=True)
def restore_threads():
    """train() sets torch's thread count from the config (1 here: tiny models train fastest
    on one thread); put it back for the other tests."""
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def tiny_config(cell: str = "lstm", max_steps: int = 80) -> Config:
    cfg = Config()
    cfg.model.cell, cfg.model.embed_size, cfg.model.hidden_size = cell, 16, 32
    t = cfg.train
    t.batch_size, t.seq_len, t.lr, t.warmup_steps = 8, 16, 1e-2, 5
    t.max_steps, t.eval_every, t.log_every = max_steps, 20, 10
    t.eval_streams, t.eval_seq_len, t.sample_chars = 4, 64, 0
    t.threads, t.device, t.precision = 1, "cpu", "fp32"
    return cfg


@pytest.fixture
def pattern_file(tmp_path):
    path = tmp_path / "pattern.txt"
    path.write_text(PATTERN, encoding="utf-8")
    return path


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_learns_a_repeating_pattern(cell, pattern_file, tmp_path):
    """Every character of the pattern follows from the one before: the loss must reach ~0."""
    cfg = tiny_config(cell)
    run = tmp_path / "run"
    result = train(pattern_file, cfg, out_dir=run, progress=False)
    assert result.stopped == "max_steps" and result.step == 80
    assert result.best_val_loss < 0.05, result
    assert result.train_loss < 0.05
    assert result.elapsed < 30  # a few seconds on an idle CPU
    assert result.vocab_size == 8 and result.chars_seen == 80 * 8 * 16

    records = read_metrics(run / "metrics.jsonl")
    kinds = [r["kind"] for r in records]
    assert kinds.count("train") == 8 and kinds.count("eval") == 4
    first_train = next(r for r in records if r["kind"] == "train")
    assert first_train["loss"] > 0.5  # it did start from scratch
    for r in records:
        if r["kind"] == "train":
            assert math.isclose(r["bpc"], r["loss"] / math.log(2))
            assert {"step", "lr", "chars_per_sec", "grad_norm", "elapsed"} <= r.keys()
        else:
            assert math.isclose(r["val_bpc"], r["val_loss"] / math.log(2))
    val = [r["val_loss"] for r in records if r["kind"] == "eval"]
    assert min(val) == result.best_val_loss

    best = checkpoint.load(run / "best.pt")
    last = checkpoint.load(run / "last.pt")
    assert best["train_state"]["best_val_loss"] == result.best_val_loss
    assert last["train_state"]["step"] == 80
    assert checkpoint.config_of(best) == cfg
    assert "".join(best["vocab"]) == "\nabcdefg"


def test_config_toml_written_and_loadable(pattern_file, tmp_path):
    cfg = tiny_config("gru", max_steps=3)
    cfg.data.encoding = "utf-8"
    run = tmp_path / "run"
    train(pattern_file, cfg, out_dir=run, progress=False)
    assert load_toml(run / "config.toml") == cfg
    assert tomllib.loads((run / "config.toml").read_text())["model"]["cell"] == "gru"


def test_run_directory_naming(pattern_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dirs = [train(pattern_file, tiny_config(cell, max_steps=2), progress=False).run_dir
            for cell in ("lstm", "lstm", "gru", "lstm")]
    assert [str(d) for d in dirs] == [
        "runs/pattern-lstm", "runs/pattern-lstm-2", "runs/pattern-gru", "runs/pattern-lstm-3",
    ]
    assert all((tmp_path / d / "best.pt").is_file() for d in dirs)


def test_new_run_dir_never_reuses(tmp_path):
    (tmp_path / "x-rnn-2").mkdir()
    assert new_run_dir("x", "rnn", tmp_path).name == "x-rnn"
    assert new_run_dir("x", "rnn", tmp_path).name == "x-rnn-3"


def test_existing_run_is_not_overwritten(pattern_file, tmp_path):
    run = tmp_path / "run"
    train(pattern_file, tiny_config(max_steps=2), out_dir=run, progress=False)
    before = (run / "best.pt").read_bytes()
    with pytest.raises(CharlmError, match="already holds a run"):
        train(pattern_file, tiny_config(max_steps=2), out_dir=run, progress=False)
    assert (run / "best.pt").read_bytes() == before


def test_max_time_stops(pattern_file, tmp_path):
    cfg = tiny_config(max_steps=0)
    cfg.train.max_time = 0.5
    result = train(pattern_file, cfg, out_dir=tmp_path / "run", progress=False)
    assert result.stopped == "max_time"
    # The final evaluation fits in the limit: training stops a little before it.
    assert 0.25 <= result.elapsed < 10 and result.step > 0


def test_max_epochs_stops(pattern_file, tmp_path):
    cfg = tiny_config(max_steps=0)
    cfg.train.max_epochs = 1.5
    result = train(pattern_file, cfg, out_dir=tmp_path / "run", progress=False)
    assert result.stopped == "max_epochs"
    epoch = checkpoint.load(tmp_path / "run" / "last.pt")["train_state"]["epoch"]
    # 3600 training characters, 8 streams of 16: 28 (or 27) steps per epoch.
    assert 1.5 <= epoch < 1.6 and 40 <= result.step <= 45


def test_same_seed_same_weights(pattern_file, tmp_path):
    runs = [train(pattern_file, tiny_config(max_steps=6), out_dir=tmp_path / name,
                  progress=False) for name in ("a", "b")]
    a, b = (checkpoint.load(r.run_dir / "last.pt")["model"] for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs[0].val_loss == runs[1].val_loss
    other = tiny_config(max_steps=6)
    other.train.seed = 1
    c = checkpoint.load(train(pattern_file, other, out_dir=tmp_path / "c",
                              progress=False).run_dir / "last.pt")["model"]
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_too_little_text_is_a_clear_error(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("abcdefg\n" * 10, encoding="utf-8")
    with pytest.raises(CharlmError, match="lower --batch-size or --seq-len"):
        train(path, tiny_config(), out_dir=tmp_path / "run", progress=False)


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 0.0, cfg) == pytest.approx(0.1)
    assert lr_at(9, 0.0, cfg) == pytest.approx(1.0)
    assert lr_at(10, 0.0, cfg) == pytest.approx(1.0)
    assert lr_at(50, 0.5, cfg) == pytest.approx(0.55)
    assert lr_at(100, 1.0, cfg) == pytest.approx(0.1)
    assert lr_at(200, 2.0, cfg) == pytest.approx(0.1)  # stays at the floor
    values = [lr_at(s, s / 100, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_planned_progress_takes_the_nearest_limit():
    cfg = TrainConfig(max_steps=100, max_time=10.0, max_epochs=0.0)
    assert planned_progress(50, 2.0, 0.3, cfg) == 0.5
    assert planned_progress(10, 8.0, 0.3, cfg) == 0.8
    cfg = TrainConfig(max_steps=0, max_time=0.0, max_epochs=4.0)
    assert planned_progress(10, 8.0, 1.0, cfg) == 0.25


def test_metrics_lines_are_json(pattern_file, tmp_path):
    run = tmp_path / "run"
    train(pattern_file, tiny_config(max_steps=20), out_dir=run, progress=False)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["train", "train", "eval"]


def test_validation_loss_is_measured_on_the_validation_text(tmp_path):
    """The logged validation loss is the loss over the last 10% of the text, recomputed here
    from the checkpoint and a plain Python encoding of that text (the first training run
    reads the ids through the memory-mapped cache, the second from it)."""
    from charlm.evaluate import mean_loss

    text = "abcdefg\n" * 450 + "the quick brown fox jumps over the lazy dog\n" * 25
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    cfg = tiny_config(max_steps=20)
    for name in ("first", "cached"):
        run = tmp_path / name
        train(path, cfg, out_dir=run, progress=False)
        logged = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval"][-1]
        model, vocab = checkpoint.load_model(run / "last.pt")
        val_text = text[int(len(text) * 0.9):]
        ids = torch.tensor([vocab.chars.index(c) for c in val_text])
        expected = mean_loss(model, ids, cfg.train.eval_streams, cfg.train.eval_seq_len)
        assert logged["val_loss"] == pytest.approx(expected, rel=1e-5)
