"""Any OS: no POSIX-only import (training with fcntl unimportable, as on Windows), the
platform's cache folder, and devices (MPS chosen by ``auto`` where it works, refused cleanly
where PyTorch has none)."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import TINY_CONFIG, assert_clean_error, run_charlm_with, run_cli

from charlm.data.batching import cache_dir
from charlm.device import resolve_device
from charlm.storage import checkpoint

# What Windows looks like to Python: `import fcntl` fails.
NO_FCNTL = "import sys\nsys.modules['fcntl'] = None"


def test_train_with_fcntl_unimportable(text_file, tmp_path):
    probe = NO_FCNTL + "\ntry:\n    import fcntl\nexcept ImportError:\n    print('no fcntl')"
    proc = run_charlm_with(probe, "train", text_file, "--config", TINY_CONFIG, "--max-steps", "3",
                           "--out", tmp_path / "run", "--no-progress", "--set", "train.threads=1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("no fcntl")  # the prelude did hide it
    assert "internal error" not in proc.stderr
    assert checkpoint.load(tmp_path / "run" / "last.pt")["train_state"]["step"] == 3
    # The lock still refuses a second training on the same directory.
    again = run_charlm_with(NO_FCNTL, "train", text_file, "--config", TINY_CONFIG,
                            "--out", tmp_path / "run")
    assert_clean_error(again, "already holds a run")


def test_no_module_imports_fcntl():
    # Every charlm module imports with fcntl hidden (runs.py used to import it at the top).
    code = (NO_FCNTL + "\nimport pkgutil, importlib, charlm\n"
            "for m in pkgutil.iter_modules(charlm.__path__):\n"
            "    importlib.import_module('charlm.' + m.name)\n")
    proc = run_charlm_with(code, "--version")
    assert proc.returncode == 0, proc.stderr


def test_cache_folder_follows_the_platform(monkeypatch, tmp_path):
    monkeypatch.delenv("CHARLM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert cache_dir() == tmp_path / "xdg" / "charlm"
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"  # the variable wins


def test_mps_refused_cleanly_where_missing(text_file, tmp_path):
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    proc = run_cli("train", text_file, "--config", TINY_CONFIG, "--device", "mps",
                   "--out", tmp_path / "run")
    assert_clean_error(proc, "'mps'", "no MPS", "--device cpu")
    assert proc.returncode == 2 and not (tmp_path / "run").exists()


def test_auto_prefers_cuda_then_mps_where_the_cell_runs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto", "lstm").type == "mps"
    assert resolve_device("auto", "rnn").type == "mps"
    assert resolve_device("auto", "gru").type == "cpu"  # NaNs on MPS: pytorch#94691
    assert resolve_device("mps", "gru").type == "mps"  # asked for: given
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", "lstm").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto", "lstm").type == "cpu"


def test_cache_folder_without_platformdirs_follows_the_same_convention(monkeypatch, tmp_path):
    import sys

    from charlm.data import batching as data

    monkeypatch.delenv("CHARLM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with_platformdirs = data.cache_dir()
    monkeypatch.setitem(sys.modules, "platformdirs", None)  # not installed (GPU box, --no-deps)
    assert data.cache_dir() == with_platformdirs == tmp_path / "charlm"
