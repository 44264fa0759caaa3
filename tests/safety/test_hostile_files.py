"""Hostile files (issue #15): crafted optimizer, carried and random states in a ``--resume``
checkpoint, crafted configs inside .pt, .safetensors and .onnx files, and crafted export
metadata are refused with one clean line before anything is built from them; harmless oddities
(a broadcast view of the right shape) are copied and train normally.

Resuming a crafted optimizer state runs the real command in a subprocess: before the fix some
of these corrupted the heap, and a crash must fail the test, not the test run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import onnx
import pytest
import safetensors.torch
import torch
from conftest import run_cli
from test_hardening import clean_error

from charlm.storage import checkpoint

RESUME = ("--max-steps", "41", "--no-progress", "--no-samples", "--set", "train.threads=1")


def _zeros_view(shape):
    """A broadcast view: one float of memory that claims ``shape``."""
    return torch.zeros(1).expand(*shape)


def _state(ckpt, index=1):
    return ckpt["optimizer"]["state"][index]


# name: (change to the checkpoint, None when the resume must succeed, else a needle)
OPTIMIZER_CRAFTS = {
    "broadcast-view-of-the-right-shape": (
        lambda c: _state(c).update(exp_avg_sq=_zeros_view(_state(c)["exp_avg_sq"].shape)), None),
    "broadcast-view-of-the-wrong-shape": (
        lambda c: _state(c).update(exp_avg_sq=_zeros_view((128, 16))), "shape (128, 16)"),
    "too-small": (lambda c: _state(c).update(exp_avg=torch.zeros(4)), "expected (128, 32)"),
    "too-large": (lambda c: _state(c, 6).update(exp_avg=torch.zeros(33, 33)), "shape (33, 33)"),
    "integer-moments": (lambda c: _state(c).update(exp_avg=torch.zeros(128, 32, dtype=torch.int64)),
                        "dtype torch.int64"),
    "float64-moments": (lambda c: _state(c).update(exp_avg=torch.zeros(128, 32, dtype=torch.float64)),
                        None),
    "not-a-tensor": (lambda c: _state(c).update(exp_avg=[0.0] * 4), "not a tensor"),
    "step-vector": (lambda c: _state(c).update(step=torch.zeros(5)), "not a single number"),
    "step-negative": (lambda c: _state(c).update(step=torch.tensor(-3.0)), "out of range"),
    "step-nan": (lambda c: _state(c).update(step=torch.tensor(float("nan"))), "out of range"),
    "step-string": (lambda c: _state(c).update(step="40"), "expected float"),
    "missing-moment": (lambda c: _state(c).pop("exp_avg_sq"), "expected ['exp_avg'"),
    "extra-moment": (lambda c: _state(c).update(max_exp_avg_sq=torch.zeros(128, 32)),
                     "max_exp_avg_sq"),
    "unknown-parameter": (lambda c: c["optimizer"]["state"].update({99: _state(c)}),
                          "unknown parameter 99"),
    "regrouped-parameters": (
        lambda c: c["optimizer"]["param_groups"][0].update(params=[1, 0, 2]), "parameter groups"),
    "carried-state-broadcast": (
        lambda c: c["train_state"]["carried_state"][0].__setitem__(0, _zeros_view((1, 8, 32))),
        None),
    "carried-state-wrong-size": (
        lambda c: c["train_state"]["carried_state"][0].__setitem__(0, torch.zeros(1, 99, 32)),
        "shape (1, 99, 32)"),
    "carried-state-missing-cell": (
        lambda c: c["train_state"]["carried_state"][0].pop(), "is not 2 tensor(s)"),
    "rng-too-short": (lambda c: c["train_state"]["rng"][0].update(
        torch=torch.zeros(8, dtype=torch.uint8)), "shape (8,)"),
    "rng-float": (lambda c: c["train_state"]["rng"][0].update(torch=torch.zeros(5056)),
                  "dtype torch.float32"),
    "rng-broadcast": (lambda c: c["train_state"]["rng"][0].update(
        torch=torch.get_rng_state()[:1].expand(5056)), "Invalid mt19937 state"),
    "python-rng-huge": (lambda c: c["train_state"]["rng"][0]["python"][1].__setitem__(0, 2**80),
                        "no valid Python random state"),
    "python-rng-short": (lambda c: c["train_state"]["rng"][0]["python"].__setitem__(1, [1, 2]),
                         "no valid Python random state"),
    "batcher-negative": (lambda c: c["train_state"]["batcher"].update(index=-5), "out of range"),
    "step-count-string": (lambda c: c["train_state"].update(step="40"), "step is str"),
    "step-count-huge": (lambda c: c["train_state"].update(step=10**400), "out of range"),
    "no-evaluation-yet": (lambda c: c["train_state"].update(best_val_loss=math.inf), None),
    "best-loss-nan": (lambda c: c["train_state"].update(best_val_loss=math.nan), "out of range"),
}


# Runs several commands in one fresh process (one torch import, not one per case), each
# through the CLI's main(); a crash of that process ends the list early.
_RUNNER = """
import io, json, sys
from contextlib import redirect_stderr, redirect_stdout
from charlm.cli.commands import main
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        try:
            main(args)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    print(json.dumps([code, err.getvalue()]), flush=True)
"""


def run_in_one_process(commands: list[list[str]], timeout: float = 300) -> list[tuple[int, str]]:
    """(exit code, stderr) of each command; fails the calling test if the process crashed."""
    proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(commands)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})
    results = [tuple(json.loads(line)) for line in proc.stdout.splitlines()]
    # A heap corruption ends in SIGABRT or SIGSEGV: a negative return code, results cut short.
    assert proc.returncode == 0 and len(results) == len(commands), (
        f"exit {proc.returncode} after {len(results)} of {len(commands)} commands "
        f"({commands[len(results)] if len(results) < len(commands) else ''}): "
        f"{proc.stderr[-2000:]}"
    )
    return results


def resume_crafted(tiny_run: Path, tmp_path: Path, crafts: list) -> list[tuple[int, str]]:
    """Resume a copy of the tiny run's last.pt changed by each craft, for one step."""
    commands = []
    for i, craft in enumerate(crafts):
        ckpt = torch.load(tiny_run / "last.pt", weights_only=True)
        craft(ckpt)
        bad = tmp_path / f"crafted-{i}.pt"
        torch.save(ckpt, bad)
        commands.append(["train", str(tiny_run.parent / "input.txt"), "--resume", str(bad),
                         "--out", str(tmp_path / f"run-{i}"), *RESUME])
    return run_in_one_process(commands)


def test_crafted_training_states_are_refused_or_copied(tiny_run, tmp_path):
    names = list(OPTIMIZER_CRAFTS)
    results = resume_crafted(tiny_run, tmp_path, [OPTIMIZER_CRAFTS[n][0] for n in names])
    for i, (name, (code, stderr)) in enumerate(zip(names, results, strict=True)):
        needle = OPTIMIZER_CRAFTS[name][1]
        proc = subprocess.CompletedProcess([name], code, "", stderr)
        if needle is None:
            assert code == 0, (name, stderr)
            ckpt = checkpoint.load(tmp_path / f"run-{i}" / "last.pt")
            assert ckpt["train_state"]["step"] == 41, name
            assert all(torch.isfinite(t).all() for t in ckpt["model"].values()), name
        else:
            clean_error(proc, "training state cannot be restored", needle)
            assert not (tmp_path / f"run-{i}" / "last.pt").exists(), name


# ------------------------------------------------------------------ configs inside files
CONFIG_CRAFTS = {
    # name: (change to the config dict, needle)
    "num-layers-100000": (lambda c: c["model"].update(num_layers=100_000), "model.num_layers"),
    "hidden-size-12000": (lambda c: c["model"].update(hidden_size=12_000), "fit its config"),
    "negative-size": (lambda c: c["model"].update(embed_size=-4), "model.embed_size"),
    "unknown-cell": (lambda c: c["model"].update(cell="transformer"), "model.cell"),
    "dropout-5": (lambda c: c["model"].update(dropout=5), "model.dropout"),
    "string-size": (lambda c: c["model"].update(hidden_size="32"), "must be int"),
    "non-text-encoding": (lambda c: c["data"].update(encoding="rot13"), "data.encoding"),
}


def _pt_with_config(tiny_run: Path, tmp_path: Path, craft) -> Path:
    ckpt = torch.load(tiny_run / "best.pt", weights_only=True)
    craft(ckpt["config"])
    path = tmp_path / "crafted.pt"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("case", CONFIG_CRAFTS, ids=list(CONFIG_CRAFTS))
def test_crafted_config_in_a_checkpoint_is_refused_before_building(case, tiny_run, tmp_path):
    craft, needle = CONFIG_CRAFTS[case]
    path = _pt_with_config(tiny_run, tmp_path, craft)
    for args in (("sample", "-c", path, "-n", "5"), ("info", path),
                 ("export", path, "-f", "safetensors"),
                 ("train", tiny_run.parent / "input.txt", "--init-from", path, "--out",
                  tmp_path / "run", *RESUME)):
        start = time.perf_counter()
        clean_error(run_cli(*args), needle)
        assert time.perf_counter() - start < 10, args


def _metadata(path: Path) -> dict[str, str]:
    if path.suffix == ".onnx":
        return {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    with safetensors.safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def _rewrite(src: Path, dest: Path, meta: dict[str, str], proto_change=None) -> Path:
    """A copy of an export with other metadata (and, for ONNX, another graph)."""
    if src.suffix == ".onnx":
        proto = onnx.load(str(src))
        del proto.metadata_props[:]
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        if proto_change is not None:
            proto_change(proto)
        onnx.save(proto, str(dest))
    else:
        safetensors.torch.save_file(safetensors.torch.load_file(str(src)), str(dest), meta)
    return dest


def _with_config(meta: dict[str, str], craft) -> dict[str, str]:
    config = json.loads(meta["config"])
    craft(config)
    return {**meta, "config": json.dumps(config)}


def _drop_last_char(meta):
    return {**meta, "vocab": json.dumps(json.loads(meta["vocab"])[:-1])}


METADATA_CRAFTS = {
    "format-version-0": (lambda m: {**m, "format_version": "0"}, "export format '0'"),
    "format-version-arabic-digit": (lambda m: {**m, "format_version": "\u0661"}, "export format"),
    "format-version-huge": (lambda m: {**m, "format_version": "9" * 40}, "export format"),
    "config-a-list": (lambda m: {**m, "config": "[1, 2]"}, "config is not a table"),
    "config-null": (lambda m: {**m, "config": "null"}, "config is not a table"),
    "vocab-nested-deeply": (lambda m: {**m, "vocab": "[" * 100_000 + "]" * 100_000},
                            "invalid charlm metadata"),
    "vocab-empty": (lambda m: {**m, "vocab": "[]"}, "empty vocabulary"),
    "vocab-shorter-than-logits": (_drop_last_char, "fit its config"),
}


@pytest.mark.parametrize("fmt", ["safetensors", "onnx"])
@pytest.mark.parametrize("case", [*CONFIG_CRAFTS, *METADATA_CRAFTS])
def test_crafted_export_metadata_is_refused(exports, fmt, case, tmp_path):
    meta = _metadata(exports[fmt])
    if case in CONFIG_CRAFTS:
        craft, needle = CONFIG_CRAFTS[case]
        meta = _with_config(meta, craft)
    else:
        craft, needle = METADATA_CRAFTS[case]
        meta = craft(meta)
    path = _rewrite(exports[fmt], tmp_path / f"crafted.{fmt}", meta)
    start = time.perf_counter()
    line = clean_error(run_cli("sample", "-c", path, "-n", "5"))
    assert any(n in line for n in needle.split("|")), line
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("change", ["reorder-outputs", "drop-an-output"])
def test_onnx_with_outputs_reordered_or_missing_is_refused(exports, change, tmp_path):
    def edit(proto):
        outputs = list(proto.graph.output)
        del proto.graph.output[:]
        kept = outputs[::-1] if change == "reorder-outputs" else outputs[:-1]
        proto.graph.output.extend(kept)

    path = _rewrite(exports["onnx"], tmp_path / "crafted.onnx", _metadata(exports["onnx"]), edit)
    clean_error(run_cli("sample", "-c", path, "-n", "5"), "outputs")


def test_compressed_parts_in_a_checkpoint_are_refused(tiny_run, tmp_path):
    # torch.save never compresses; a compressed part could unpack to gigabytes.
    src, path = tiny_run / "best.pt", tmp_path / "packed.pt"
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            new.writestr(info.filename, old.read(info))
    clean_error(run_cli("info", path), "compressed")


def test_weights_that_do_not_fit_name_what_differs(tiny_run, tmp_path):
    ckpt = torch.load(tiny_run / "best.pt", weights_only=True)
    ckpt["model"]["head.bias"] = torch.zeros(7)
    path = tmp_path / "odd.pt"
    torch.save(ckpt, path)
    clean_error(run_cli("sample", "-c", path), "head.bias is (7,), the config needs (33,)")
