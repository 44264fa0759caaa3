"""Automatic sizing (``--size auto``): the choice from measured speeds, when it runs, what it
records, and its errors. Most tests inject the speeds (``sizing.measure`` replaced), so that
they are exact and quick; one runs the real command and measures."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG, assert_clean_error, run_charlm, run_cli

from charlm.config import Config, load_toml
from charlm.model.network import build_model
from charlm.training import sizing

RULE = sizing.Rule.load()
VAL = 110_000  # characters of validation text (tiny Shakespeare's tenth)
BY_NAME = {s.name: s for s in sizing.LADDER}


def speed(v: float) -> sizing.Speed:
    """Training at ``v`` chars/s, 0.85 v with dropout, evaluating at 3 v."""
    return sizing.Speed(v, 0.85 * v, 3 * v)


def speeds_of(**chars_per_sec: float) -> dict[sizing.Shape, sizing.Speed]:
    return {BY_NAME[name]: speed(v) for name, v in chars_per_sec.items()}


@pytest.fixture
def injected(monkeypatch):
    """Replace the timing of shapes with given speeds; returns the dict to fill (by name)."""
    table: dict[str, float] = {}

    def fake(shape, vocab_size, device, precision, **_):
        if shape.name not in table:
            raise torch.OutOfMemoryError("not offered by this test")
        return speed(table[shape.name])

    monkeypatch.setattr(sizing, "measure", fake)
    return table


def test_the_shipped_rule_loads_and_is_fitted():
    data = json.loads(sizing.RULE_FILE.read_text())
    assert "provisional" not in data["fitted_on"]
    assert RULE.alpha > 0 and RULE.beta > 0 and 0 <= RULE.kappa < 1 and RULE.gru > 0


@pytest.mark.parametrize("shape", sizing.LADDER[:6], ids=lambda s: s.name)
def test_parameter_count_matches_the_model(shape):
    with torch.device("meta"):
        model = build_model(65, shape.model_config())
    assert shape.parameters(65) == model.num_parameters()


def test_the_choice_is_a_function_of_the_measured_speeds():
    speeds = speeds_of(gru256=70e3, lstm256=170e3, gru384=53e3, lstm384=75e3, lstm512=51e3)
    a = sizing.choose(speeds, 180, 1_000_000, 65, RULE, val_chars=VAL)
    b = sizing.choose(dict(reversed(list(speeds.items()))), 180, 1_000_000, 65, RULE, val_chars=VAL)
    assert a is not None and (a.shape, a.dropout, a.lr) == (b.shape, b.dropout, b.lr)
    timed = speeds[a.shape]
    seconds = sizing.training_seconds(180, timed.eval_seconds(VAL))
    assert a.speed == (timed.dropout if a.dropout else timed.train)
    assert a.epochs == pytest.approx(a.speed * seconds / 1_000_000)


# Timed on this project's 2-core bf16 CPU for tiny Shakespeare at 180 s (session 6's run)
TS_180 = dict(gru256=98e3, lstm256=219e3, gru384=66e3, lstm384=90e3, gru512=50e3, lstm512=60e3,
              gru768=38e3, lstm768=32e3, gru1024=23e3)


def test_the_lowest_prediction_wins_and_an_exact_tie_goes_to_the_smaller_model():
    speeds = speeds_of(**TS_180)
    found = sizing.predictions(speeds, 180, 1_003_854, 65, RULE, val_chars=VAL)
    chosen = sizing.choose(speeds, 180, 1_003_854, 65, RULE, val_chars=VAL)
    assert len(found) == len(speeds) and chosen.predicted == min(c.predicted for c in found)
    # two shapes the law rates alike: the smaller wins whatever the order
    small, big = BY_NAME["lstm512"], BY_NAME["lstm768"]
    flat = sizing.Rule(**{**vars(RULE), "A": 0.0})  # size no longer matters, only chars
    same = {big: speed(50e3), small: speed(50e3)}
    assert sizing.choose(same, 180, 1_003_854, 65, flat, val_chars=VAL).shape == small


def test_near_ties_are_timed_twice_and_the_faster_timing_kept(monkeypatch):
    calls: dict[str, int] = {}

    def fake(shape, vocab_size, device, precision, **_):
        if shape.name not in TS_180:
            raise torch.OutOfMemoryError("not offered by this test")
        calls[shape.name] = calls.get(shape.name, 0) + 1
        slow = 0.8 if calls[shape.name] == 1 else 1.0  # the first timing was disturbed
        return speed(slow * TS_180[shape.name])

    monkeypatch.setattr(sizing, "measure", fake)
    choice = sizing.size(180, 1_003_854, 65, torch.device("cpu"), "fp32", RULE, val_chars=VAL)
    twice = {name for name, n in calls.items() if n == 2}
    assert choice.shape.name in twice and set(calls.values()) <= {1, 2}
    assert 0 < len(twice) < len(calls)
    assert dict(choice.measured)[choice.shape.name] == TS_180[choice.shape.name]
    once = [name for name, n in calls.items() if n == 1]
    assert all(dict(choice.measured)[name] == 0.8 * TS_180[name] for name in once)


def test_evaluations_cost_a_slow_model_more_of_the_budget_and_at_most_a_fifth():
    from charlm.training.pacing import MAX_EVAL_SHARE

    slow, fast = (sizing.training_seconds(180, speed(v).eval_seconds(100_000)) for v in (15e3, 150e3))
    assert 180 * (1 - MAX_EVAL_SHARE) <= slow < fast < 180
    assert sizing.training_seconds(180, speed(1e3).eval_seconds(100_000)) == pytest.approx(
        180 * (1 - MAX_EVAL_SHARE))
    assert sizing.training_seconds(180, speed(15e3).eval_seconds(0)) == 180
    # a larger validation split leaves less for training, so the same speeds see fewer chars
    few = sizing.choose(speeds_of(lstm512=50e3), 180, 1_000_000, 65, RULE, val_chars=1_000_000)
    many = sizing.choose(speeds_of(lstm512=50e3), 180, 1_000_000, 65, RULE, val_chars=10_000)
    assert few.chars < many.chars


def test_a_slower_dropout_is_charged_its_own_speed():
    big = BY_NAME["lstm1024"]
    cheap = sizing.choose({big: sizing.Speed(15e3, 15e3, 45e3)}, 1800, 1_000_000, 65, RULE,
                          val_chars=VAL)
    dear = sizing.choose({big: sizing.Speed(15e3, 3e3, 45e3)}, 1800, 1_000_000, 65, RULE,
                         val_chars=VAL)
    assert cheap.dropout > 0 and cheap.speed == 15e3
    assert dear.dropout <= cheap.dropout and dear.predicted > cheap.predicted
    assert dear.speed == (3e3 if dear.dropout else 15e3)


def test_measure_times_training_with_and_without_dropout_and_evaluation():
    state = torch.random.get_rng_state()
    timed = sizing.measure(BY_NAME["lstm256"], 65, torch.device("cpu"), "fp32", seconds=0.05,
                           dropout=True, eval_streams=4)
    assert all(0 < v < 1e9 for v in (timed.train, timed.dropout, timed.evaluate))
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's seed is untouched
    plain = sizing.measure(BY_NAME["gru256"], 65, torch.device("cpu"), "fp32", seconds=0.05)
    assert plain.dropout == plain.train


def test_more_time_or_a_faster_machine_never_picks_a_smaller_model():
    speeds = speeds_of(lstm256=170e3, lstm384=75e3, lstm512=51e3, lstm768=30e3, lstm1024=15e3)
    sizes = [sizing.choose(speeds, t, 4_500_000, 100, RULE, val_chars=VAL).shape.parameters(100)
             for t in (30, 60, 180, 600, 1800, 7200)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    faster = {s: sizing.Speed(10 * v.train, 10 * v.dropout, 10 * v.evaluate)
              for s, v in speeds.items()}
    assert (sizing.choose(faster, 180, 4_500_000, 100, RULE, val_chars=VAL).shape.parameters(100)
            >= sizing.choose(speeds, 180, 4_500_000, 100, RULE, val_chars=VAL).shape.parameters(100))


def test_dropout_grows_with_the_epochs():
    drops = [sizing.best_dropout(1e6, e * 1e6, 1e6, RULE)[0] for e in (0.5, 1, 3, 10, 30, 100)]
    assert drops == sorted(drops) and drops[0] == 0.0 and drops[-1] > 0.0


def test_the_law_in_charlm_is_the_law_that_was_fitted():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "sizing"))
    import fit

    p = {k: torch.tensor(getattr(RULE, k), dtype=torch.float64) for k in fit.NAMES}
    t = lambda x: torch.tensor([float(x)], dtype=torch.float64)  # noqa: E731
    for N, C, D, d in [(3e5, 5e5, 1e6, 0.0), (1e6, 3e7, 1e6, 0.2), (4e6, 9e6, 4.5e6, 0.1)]:
        for gru, cell in ((0, "lstm"), (1, "gru")):
            fitted = float(fit.law(p, t(0.0), t(N), t(C), t(D), t(d), t(gru)))
            assert sizing.predicted_loss(N, C, D, d, RULE, cell) == pytest.approx(fitted, rel=1e-9)


def test_a_budget_no_shape_can_use_names_the_smallest_that_works(injected):
    injected.update(gru256=20e3, lstm256=40e3)
    cpu = torch.device("cpu")
    with pytest.raises(sizing.CharlmError) as err:
        sizing.size(3.0, 1_000_000, 65, cpu, "fp32", RULE, val_chars=VAL)
    named = float(re.search(r"give --max-time (\S+) or more", str(err.value)).group(1))
    assert named == sizing.smallest_budget(speeds_of(gru256=20e3, lstm256=40e3), 0.0, VAL)
    assert sizing.size(named, 1_000_000, 65, cpu, "fp32", RULE, val_chars=VAL).shape.name == "lstm256"
    with pytest.raises(sizing.CharlmError):
        sizing.size(named - 1, 1_000_000, 65, cpu, "fp32", RULE, val_chars=VAL)


def test_timing_stops_when_bigger_shapes_stop_helping(injected):
    injected.update({s.name: 1e12 / s.parameters(65) for s in sizing.LADDER})  # fast big models
    many = sizing.size(600, 1_000_000, 65, torch.device("cpu"), "fp32", RULE, val_chars=VAL)
    injected.clear()
    injected.update({s.name: 1e12 / s.parameters(65) ** 1.5 for s in sizing.LADDER})  # slow ones
    few = sizing.size(600, 1_000_000, 65, torch.device("cpu"), "fp32", RULE, val_chars=VAL)
    assert len(few.measured) < len(many.measured)


@pytest.mark.parametrize("key", sizing.SHAPE_KEYS)
def test_any_shape_field_turns_sizing_off(key):
    cfg = Config()
    cfg.train.max_time = 60
    sizing.settle(cfg, {key})
    assert cfg.train.size == "fixed" and not sizing.wanted(cfg)


def test_sizing_is_for_the_front_ends_a_config_built_in_python_keeps_its_shape():
    cfg = Config()
    cfg.train.max_time = 60
    assert not sizing.wanted(cfg)
    sizing.settle(cfg, {"train.max_time"})
    assert sizing.wanted(cfg)
    cfg.train.size = "fixed"
    sizing.settle(cfg, {"train.max_time", "train.size"})
    assert not sizing.wanted(cfg)


def test_with_sizing_the_budget_is_the_limit_and_given_values_stay():
    cfg = Config()
    cfg.train.max_time = 60
    keep = sizing.settle(cfg, {"train.max_time", "train.lr"})
    assert sizing.wanted(cfg) and cfg.train.max_steps == 0 and keep == {"train.lr"}
    cfg.train.lr = 1e-3
    choice = sizing.choose(speeds_of(lstm256=100e3), 60, 1_000_000, 65, RULE, val_chars=VAL)
    sizing.apply(choice, cfg, keep)
    assert (cfg.model.cell, cfg.model.hidden_size, cfg.train.lr) == ("lstm", 256, 1e-3)
    assert cfg.train.size == "fixed" and cfg.train.warmup_steps == sizing.SCHEDULE["train.warmup_steps"]
    given = Config()
    given.train.max_time, given.train.max_steps = 60, 500
    sizing.settle(given, {"train.max_time", "train.max_steps"})
    assert given.train.max_steps == 500


def _budget_args(tmp_path: Path, *extra: str) -> list:
    # tiny.toml without its shape: precision and device only (TINY_CONFIG sets a shape)
    cfg = load_toml(TINY_CONFIG)
    base = tmp_path / "budget.toml"
    base.write_text(f'[train]\nprecision = "{cfg.train.precision}"\ndevice = "cpu"\n'
                    "threads = 1\neval_streams = 8\neval_seq_len = 64\n")
    return ["--config", base, "--no-progress", "--no-samples", *extra]


def test_the_header_and_config_record_the_choice(tmp_path, text_file, injected):
    injected.update(gru256=2e5, lstm256=3e6)
    run = tmp_path / "run"
    proc = run_cli("train", text_file, *_budget_args(tmp_path, "--max-time", "3",
                                                     "--out", run))
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stderr.splitlines() if x.startswith("size: automatic: "))
    assert "LSTM 256, batch 32 x 64" in line and "chars/s here" in line and "epochs in 3 s" in line
    recorded = (run / "config.toml").read_text()
    assert recorded.startswith("# Chosen by automatic sizing for 3 s: LSTM 256")
    cfg = load_toml(run / "config.toml")
    assert (cfg.model.cell, cfg.model.hidden_size, cfg.train.batch_size, cfg.train.size) == (
        "lstm", 256, 32, "fixed")
    assert cfg.train.max_steps == 0 and cfg.train.max_time == 3


def test_a_shape_option_or_size_fixed_trains_the_given_shape(tmp_path, text_file, injected):
    injected.update(gru256=2e5, lstm256=3e6)
    for extra in (["--hidden-size", "24"], ["--size", "fixed"], ["--set", "train.seq_len=32"]):
        run = tmp_path / extra[-1].replace("=", "_")
        proc = run_cli("train", text_file, *_budget_args(tmp_path, "--max-time", "2",
                                                         "--max-steps", "5", "--out", run, *extra))
        assert proc.returncode == 0, proc.stderr
        assert "size: automatic" not in proc.stderr
        assert 'size = "fixed"' in (run / "config.toml").read_text() or extra[0] != "--size"


def test_a_config_file_with_a_shape_turns_sizing_off(tmp_path, text_file, injected):
    proc = run_cli("train", text_file, "--config", TINY_CONFIG, "--max-time", "2", "--max-steps",
                   "5", "--no-progress", "--no-samples", "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert "size: automatic" not in proc.stderr and not injected


def test_a_resumed_run_keeps_its_shape(tmp_path, text_file, injected):
    injected.update(gru256=2e5, lstm256=3e6)
    run = tmp_path / "run"
    first = run_cli("train", text_file, *_budget_args(tmp_path, "--max-time", "30",
                                                      "--stop-at-step", "5", "--out", run))
    assert first.returncode == 0, first.stderr
    before = load_toml(run / "config.toml")
    injected.clear()
    injected.update(gru256=3e6, lstm256=2e5)  # a different machine would choose otherwise
    again = run_cli("train", text_file, "--resume", run, "--stop-at-step", "8", "--no-progress",
                    "--no-samples")
    assert again.returncode == 0, again.stderr
    assert "size: automatic" not in again.stderr and "resuming at step 5" in again.stderr
    assert load_toml(run / "config.toml") == before and before.model.cell == "lstm"


def test_dry_run_says_the_shape_is_chosen_at_the_start(tmp_path, text_file):
    proc = run_charlm("train", text_file, *_budget_args(tmp_path, "--max-time", "60", "--dry-run"))
    assert proc.returncode == 0, proc.stderr
    assert "chosen for the 60 s budget when training starts" in proc.stderr
    assert 'size = "auto"' in proc.stdout and "max_steps = 0" in proc.stdout


def test_the_real_command_sizes_itself(tmp_path, text_file):
    run = tmp_path / "run"
    # 30 s: the smallest shape needs about 12 s on a quiet 2-core CPU; the suite runs two
    # workers at once, and timings taken beside another test read slower
    proc = run_charlm("train", text_file, *_budget_args(tmp_path, "--max-time", "30", "--out", run))
    assert proc.returncode == 0, proc.stderr
    assert "size: automatic: " in proc.stderr
    assert load_toml(run / "config.toml").train.size == "fixed"


def test_the_real_command_refuses_a_budget_too_small(tmp_path, text_file):
    proc = run_charlm("train", text_file, *_budget_args(tmp_path, "--max-time", "0.5",
                                                        "--out", tmp_path / "run"))
    assert_clean_error(proc, "too short to train any model here", "give --max-time ")
    assert not (tmp_path / "run").exists()
