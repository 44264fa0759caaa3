"""Files written by an earlier release keep working: a run directory, its checkpoints and its
exports made by charlm 0.1.0 load, sample, evaluate and resume with today's code.

The fixture (tests/fixtures/release-0.1.0) was made by the 0.1.0 code with the commands in its
``expected.json``; ``expected.json`` also holds what that code printed and logged. Numbers are
compared with fp32 pinned and a tolerance, and samples greedily, so that the test holds on every
CPU (the recorded figures come from one machine)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_charlm

FIXTURE = Path(__file__).parents[1] / "fixtures" / "release-0.1.0"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


@pytest.fixture
def old_run(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "release", dirs_exist_ok=True)
    return tmp_path / "release"


def test_old_checkpoints_load_as_plain_data():
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(FIXTURE / "run" / name, weights_only=True)
        assert ckpt["charlm_version"] == "0.1.0"


@pytest.mark.parametrize("name", ["last.pt", "best.pt", "model.safetensors", "model.onnx"])
def test_old_files_sample_the_same_text(old_run, name):
    if name.endswith(".onnx"):
        pytest.importorskip("onnxruntime")
    proc = run_charlm("sample", "-c", old_run / "run" / name, "--seed", "The ", "-n", "60",
                      "-t", "0", cwd=old_run)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == EXPECTED["greedy"][name]


def test_old_checkpoint_evaluates_to_the_same_loss(old_run):
    proc = run_charlm("eval", old_run / "run" / "best.pt", old_run / "text.txt", "--precision",
                      "fp32", "--json", cwd=old_run)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["loss"] == pytest.approx(EXPECTED["eval_loss"], rel=1e-5)


def test_old_run_resumes_to_the_same_result(old_run):
    proc = run_charlm("train", "text.txt", "--resume", "run", "--precision", "fp32",
                      "--no-progress", cwd=old_run, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (old_run / "run" / "metrics.jsonl").open()]
    final = [r for r in records if "val_loss" in r][-1]
    want = EXPECTED["resumed_final"]
    assert final["step"] == want["step"]
    assert final["val_loss"] == pytest.approx(want["val_loss"], abs=1e-4)
    assert torch.load(old_run / "run" / "last.pt", weights_only=True)["train_state"]["step"] == 60
