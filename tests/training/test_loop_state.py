"""Training state in one place: the NaN guard, the rate meter and the checkpoint policy are
small objects of their own (tested here without a model); sizing times the loop's own step
function; one helper synchronises every device; ``Loop`` keeps few attributes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG, run_cli

import charlm

# Imported in each test, so that on older code each test fails on its own.
PACKAGE = Path(charlm.__file__).resolve().parent


# ------------------------------------------------------------------------------ NaN guard
def test_nan_guard_stops_at_once_by_default_without_looking_at_the_weights():
    from charlm.training.loop import NanGuard

    asked = []
    guard = NanGuard("stop")
    assert guard.skip(7, lambda: asked.append(1) or True) is False
    assert guard.nan_step == 7 and guard.skipped == 0 and asked == []
    assert guard.note() == ""


def test_nan_guard_skips_while_the_weights_are_finite_up_to_a_limit_in_a_row():
    from charlm.training.loop import NanGuard

    guard = NanGuard("skip", max_in_row=3)
    assert [guard.skip(step, lambda: True) for step in (1, 2, 3)] == [True] * 3
    guard.ok()  # a finite step starts the count again
    assert [guard.skip(step, lambda: True) for step in (5, 6, 7)] == [True] * 3
    assert guard.nan_step == 0 and guard.skipped == 6
    assert guard.skip(8, lambda: True) is False  # the fourth in a row: diverged
    assert guard.nan_step == 8
    assert guard.note() == "skipped 6 step(s) with a non-finite loss (train.on_nan=skip)"


def test_nan_guard_stops_when_the_weights_are_not_finite():
    from charlm.training.loop import NanGuard

    guard = NanGuard("skip")
    assert guard.skip(4, lambda: False) is False
    assert guard.nan_step == 4 and guard.skipped == 0
    guard.diverged(9)
    assert guard.nan_step == 9


# ----------------------------------------------------------------------------- rate meter
def test_rate_meter_counts_training_time_only():
    from charlm.training.pacing import RateMeter

    meter = RateMeter(chars=1_000, now=10.0)
    assert meter.rate(3_000, 12.0) == pytest.approx(1_000.0)  # 2,000 chars in 2 s
    meter.pause(3.0)  # an evaluation: not training
    assert meter.rate(5_000, 16.0) == pytest.approx(2_000.0)  # 2,000 chars in 4 - 3 s
    assert meter.rate(5_000, 16.0) == 0.0  # no time, no characters: no division by zero
    assert meter.overall(5_000, training_seconds=8.0) == pytest.approx(500.0)


# ------------------------------------------------------------------------ checkpoint policy
def test_policy_first_evaluation_writes_best_last_and_a_step_file():
    from charlm.training.saver import SavePolicy

    policy = SavePolicy(keep_last=2)
    assert policy.full_due(now=1.0, evaluated=True)  # nothing copied yet: it is cheap
    plan = policy.plan(step=50, evaluated=True, improved=True, full=True)
    assert plan.names() == ["best.pt", "last.pt", "step-00000050.pt"] and plan.keep == 2
    assert policy.saved(50) and policy.evaluated(50)


def test_policy_skips_a_dear_last_pt_until_it_costs_under_one_percent():
    from charlm.training.saver import SavePolicy

    policy = SavePolicy(keep_last=0)
    policy.plan(10, evaluated=True, improved=False, full=True)
    policy.copied(now=100.0, seconds=2.0)  # a 2 s copy: due again 200 s later
    assert not policy.full_due(now=150.0, evaluated=True)
    assert policy.plan(20, evaluated=True, improved=False, full=False) is None
    assert policy.evaluated(20) and not policy.saved(20) and policy.saved(10)
    only_best = policy.plan(30, evaluated=True, improved=True, full=False)
    assert only_best.names() == ["best.pt"] and not policy.saved(30)
    assert policy.full_due(now=300.0, evaluated=True)
    assert not policy.full_due(now=150.0, evaluated=True)
    policy.finish()  # the end of training: whatever it costs
    assert policy.full_due(now=150.0, evaluated=True)


def test_policy_cheap_copies_are_written_at_every_evaluation():
    from charlm.training.saver import SavePolicy

    policy = SavePolicy(keep_last=0)
    policy.copied(now=100.0, seconds=0.01)
    assert policy.full_due(now=100.1, evaluated=True)


def test_policy_between_evaluations_writes_last_pt_without_a_step_file():
    from charlm.training.saver import SavePolicy

    policy = SavePolicy(keep_last=3, saved_step=40)  # resumed at step 40
    assert policy.saved(40) and not policy.evaluated(40)
    policy.copied(now=100.0, seconds=50.0)
    assert policy.full_due(now=101.0, evaluated=False)  # a pause or an interrupt
    plan = policy.plan(45, evaluated=False, improved=False, full=True)
    assert plan.names() == ["last.pt"] and plan.keep == 0
    assert policy.saved(45) and not policy.evaluated(45)


def test_keep_last_rotation_keeps_the_newest(tmp_path):
    from charlm.training.saver import _prune_steps, stale_steps

    names = [Path(f"step-{n:08d}.pt") for n in (300, 100, 1000, 200)]
    assert stale_steps(names, 2) == [Path("step-00000100.pt"), Path("step-00000200.pt")]
    assert stale_steps(names, 4) == [] and stale_steps(names, 0) == []
    for name in names:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "last.pt").write_bytes(b"")
    _prune_steps(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "step-00001000.pt"]


# --------------------------------------------------------------- one training step, shared
def test_sizing_and_the_loop_take_the_same_step(monkeypatch, tmp_path, text_file, one_thread):
    import charlm.training.step as step_module
    from charlm.training import sizing

    calls = []
    real = step_module.optimizer_step

    def counted(*args, **kwargs):
        calls.append(kwargs.get("forward") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(step_module, "optimizer_step", counted)
    speed = sizing.measure(sizing.LADDER[0], 20, torch.device("cpu"), "fp32", seconds=0.0,
                           min_steps=2, eval_streams=2)
    assert speed.train > 0 and calls == [False] * 3  # one untimed step, two timed
    calls.clear()
    proc = run_cli("train", text_file, "--config", TINY_CONFIG, "--precision", "fp32",
                   "--max-steps", "4", "--out", tmp_path / "run", "--no-progress",
                   "--no-samples")
    assert proc.returncode == 0, proc.stderr
    assert calls == [True] * 4


def test_the_step_is_written_once():
    """Nothing but the shared step function calls backward or steps an optimizer."""
    found = []
    for path in (PACKAGE / "training").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        found += [(path.name, m) for m in re.findall(r"\.backward\(|scaler\.step\(", text)]
    assert found == [("step.py", ".backward("), ("step.py", "scaler.step(")]


# ------------------------------------------------------------------ device synchronisation
def test_synchronize_waits_for_each_device(monkeypatch):
    from charlm.device import synchronize

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("cuda", device)))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append(("mps", None)))
    synchronize(torch.device("cpu"))
    assert calls == []
    synchronize(torch.device("mps"))
    assert calls == [("mps", None)]
    synchronize(torch.device("cuda", 1))
    assert calls[1] == ("cuda", torch.device("cuda", 1))


def test_sizing_and_bench_sync_through_the_one_helper(monkeypatch):
    from charlm.training import bench, sizing

    seen = []
    monkeypatch.setattr(sizing, "synchronize", seen.append)
    sizing.measure(sizing.LADDER[0], 20, torch.device("cpu"), "fp32", seconds=0.0,
                   min_steps=1, eval_streams=2)
    assert seen and all(d == torch.device("cpu") for d in seen)
    seen.clear()
    monkeypatch.setattr(bench, "synchronize", seen.append)
    bench.matmul_gflops(torch.device("cpu"), "fp32", n=8, seconds=0.0)
    assert seen
    others = [p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py")
              if p.name != "device.py"
              and re.search(r"(cuda|mps)\.synchronize\(", p.read_text(encoding="utf-8"))]
    assert others == []


# ------------------------------------------------------------------------------ the loop
def loop_attributes() -> set[str]:
    """Every ``self.X = ...`` (or ``+=``) anywhere in class Loop."""
    tree = ast.parse((PACKAGE / "training" / "loop.py").read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Loop")
    names = set()
    for node in ast.walk(cls):
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AugAssign | ast.AnnAssign) else [])
        for target in targets:
            for t in ast.walk(target):
                if (isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                        and t.value.id == "self"):
                    names.add(t.attr)
    return names


def test_loop_keeps_a_dozen_attributes_at_most():
    names = loop_attributes()
    assert len(names) <= 12, sorted(names)
