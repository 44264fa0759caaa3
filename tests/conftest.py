"""Shared fixtures: an isolated cache, small corpora, a trained tiny checkpoint, and a helper
that runs the installed ``charlm`` console script in a subprocess.

How precision is chosen in tests
--------------------------------
``--precision auto`` means bf16 autocast on CPUs with native bf16 (AVX512-BF16, AMX) and fp32
elsewhere, so a test that inherits it computes different numbers on different CI machines.

* Tests that compare numbers between two computations (one process against two, a resumed
  run against an uninterrupted one computed another way, a logged loss against a loss
  recomputed here) pin ``fp32`` themselves, with ``--precision fp32`` or
  ``cfg.train.precision = "fp32"``, and keep their tight tolerances.
* Every other test trains with ``TEST_PRECISION``: the ``CHARLM_TEST_PRECISION`` environment
  variable (``auto``, ``fp32`` or ``bf16``; default ``auto``, what users get). ``TINY_CONFIG``
  is ``configs/tiny.toml`` with that precision written in, so the real command sees it too.
  ``CHARLM_TEST_PRECISION=bf16`` on a CPU without native bf16 stops the session at once.
* ``tests/test_precision.py`` exercises bf16 autocast on the CPU against fp32 with a tolerance
  derived for bf16 (skipped where the CPU lacks native bf16).

Devices: every test runs on the CPU unless it is marked ``gpu``: ``TINY_CONFIG`` pins
``device = "cpu"`` and the commands a test starts see no GPU (``CUDA_VISIBLE_DEVICES=""``), so
the suite computes the same numbers on a GPU machine. ``gpu`` tests are skipped without CUDA.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from charlm.data.corpus import tiny_shakespeare
from charlm.device import cpu_has_fast_bf16

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = ("auto", "fp32", "bf16")
TEST_PRECISION = os.environ.get("CHARLM_TEST_PRECISION", "auto").strip().lower() or "auto"
if TEST_PRECISION not in PRECISIONS:
    pytest.exit(f"CHARLM_TEST_PRECISION must be one of {', '.join(PRECISIONS)}, "
                f"not {TEST_PRECISION!r}", returncode=4)
if TEST_PRECISION == "bf16" and not cpu_has_fast_bf16():
    pytest.exit("CHARLM_TEST_PRECISION=bf16 needs a CPU with native bf16 (AVX512-BF16 or AMX)",
                returncode=4)


def _tiny_config(precision: str) -> Path:
    """configs/tiny.toml with ``train.precision`` set, in a folder of its own."""
    from charlm.config import load_toml, to_toml

    cfg = load_toml(REPO / "configs" / "tiny.toml")
    cfg.train.precision, cfg.train.device = precision, "cpu"
    path = Path(tempfile.mkdtemp(prefix="charlm-tests-")) / "tiny.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    return path


TINY_CONFIG = _tiny_config(TEST_PRECISION)
SHAKESPEARE = tiny_shakespeare()  # the copy shipped inside the package

SAMPLE_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\n"
) * 40


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path_factory, monkeypatch):
    """Every test gets its own id cache; commands started by a test that is not marked
    ``gpu`` see no GPU."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    root = tmp_path_factory.mktemp("charlm-home")
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(root / "cache"))


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


def run_charlm_with(prelude: str, *args, cwd=None, env=None, timeout=120):
    """Run charlm's ``main`` in a fresh Python after ``prelude`` (code that changes the
    interpreter first: blocks the network, hides a module); returns the completed process."""
    code = f"{prelude}\nfrom charlm.cli.commands import main\nmain()"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=full_env,
        capture_output=True, text=True, timeout=timeout,
    )


def run_cli(*args) -> subprocess.CompletedProcess:
    """Run ``charlm`` inside this process, for speed; returns what :func:`run_charlm` returns.

    Unexpected exceptions still end in the CLI's last-resort handler, so pair it with
    :func:`assert_clean_error` and check for "internal error" where that matters.
    """
    from charlm.cli.commands import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def headless_chromium(*args: str, logs: bool = False):
    """A selenium driver of Debian's headless chromium (the binaries on PATH: no download),
    or a skip that says what is missing. ``args``: more command-line switches; ``logs``:
    keep the performance (network) and browser (console) logs."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium; it is in the dev extra)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip("no chromium/chromedriver on PATH (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", *args):
        options.add_argument(arg)
    if logs:
        options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    return webdriver.Chrome(service=Service(chromedriver), options=options)


def assert_same_weights(a: dict, b: dict) -> None:
    """Two checkpoints hold bit-identical weights and optimizer state."""
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for key in opt_a:
        for field in opt_a[key]:
            assert torch.equal(opt_a[key][field], opt_b[key][field]), (key, field)


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
    from charlm.export import writers as export

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
