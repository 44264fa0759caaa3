"""Shared fixtures: an isolated cache, small corpora, a trained tiny checkpoint, and a helper
that runs the installed ``charlm`` console script in a subprocess."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.toml"
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

SAMPLE_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\n"
) * 40


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own id cache and data directory, and no network corpus."""
    root = tmp_path_factory.mktemp("charlm-home")
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(root / "cache"))
    monkeypatch.setenv("CHARLM_DATA_DIR", str(root / "data"))
    monkeypatch.setenv("CHARLM_CORPUS_URL", "http://127.0.0.1:9/unreachable")


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and a second OpenMP thread competing for a
    busy core can make each step ~100x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "input.txt"
    path.write_text(SAMPLE_TEXT, encoding="utf-8")
    return path


def charlm_exe() -> list[str]:
    exe = shutil.which("charlm")
    return [exe] if exe else [sys.executable, "-m", "charlm"]


def run_charlm(*args, cwd=None, env=None, timeout=120, input=None) -> subprocess.CompletedProcess:
    """Run the real ``charlm`` command; returns the completed process (text mode)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [*charlm_exe(), *map(str, args)], cwd=cwd, env=full_env, capture_output=True,
        text=True, timeout=timeout, input=input,
    )


def run_cli(*args) -> subprocess.CompletedProcess:
    """Run ``charlm`` inside this process, for speed; returns what :func:`run_charlm` returns.

    Unexpected exceptions still end in the CLI's last-resort handler, so pair it with
    :func:`assert_clean_error` and check for "internal error" where that matters.
    """
    from charlm.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """A non-zero exit with a one-line 'error:' message and no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="session")
def exports(tmp_path_factory, tiny_run) -> dict[str, Path]:
    """The tiny run's best.pt exported as safetensors and ONNX (verified; seconds, once)."""
    from charlm import export

    root = tmp_path_factory.mktemp("tiny-exports")
    pt = root / "model.pt"
    pt.write_bytes((tiny_run / "best.pt").read_bytes())
    return {fmt: export.export_checkpoint(pt, fmt).path for fmt in ("safetensors", "onnx")}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run directory trained with configs/tiny.toml by the real command (shared, read-only)."""
    root = tmp_path_factory.mktemp("tiny-run")
    text = root / "input.txt"
    text.write_text(SAMPLE_TEXT, encoding="utf-8")
    env = {"CHARLM_CACHE_DIR": str(root / "cache")}
    proc = run_charlm("train", text, "--config", TINY_CONFIG, "--out", root / "run",
                      "--no-progress", env=env)
    assert proc.returncode == 0, proc.stderr
    return root / "run"
