"""Loss plots: PNG files read back (size, curves, colours), several runs in one figure, clean
errors for bad inputs and without matplotlib, and the terminal grid."""

from __future__ import annotations

import json
import struct
import sys

import pytest
import torch
from conftest import SAMPLE_TEXT, TINY_CONFIG, assert_clean_error, run_charlm, run_cli

from charlm.config import load_toml
from charlm.errors import CharlmError
from charlm.runs.plot import Curves, Point, load_curves, loss_grid, plot_runs
from charlm.training.setup import train

# matplotlib's default colours for the first three runs (C0, C1, C2), as RGB in [0, 1].
C0, C1, C2 = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny runs trained by the library (different lengths, so different curves)."""
    root = tmp_path_factory.mktemp("plots")
    text = root / "input.txt"
    text.write_text(SAMPLE_TEXT, encoding="utf-8")
    threads = torch.get_num_threads()
    for name, steps in (("short", 20), ("long", 40)):
        cfg = load_toml(TINY_CONFIG)
        t = cfg.train
        t.max_steps, t.eval_every, t.sample_chars = steps, 10, 0
        t.threads, t.device, t.precision = 1, "cpu", "fp32"
        train(text, cfg, out_dir=root / name, progress=False)
    torch.set_num_threads(threads)
    return root / "short", root / "long"


def png_size(path) -> tuple[int, int]:
    """Width and height from the PNG signature and IHDR chunk."""
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def has_colour(pixels, rgb, tol=0.03) -> bool:
    target = torch.tensor(rgb, dtype=torch.float32) / 255
    close = (torch.from_numpy(pixels[..., :3]).float() - target).abs().amax(dim=-1) <= tol
    return bool(close.any())


def write_metrics(run, records) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_png_has_the_requested_size_and_a_curve_per_run_split_and_panel(two_runs, tmp_path):
    from matplotlib.image import imread

    out = tmp_path / "cmp.png"
    result = plot_runs(list(two_runs), out, width=640, height=360)
    # Two runs x (train, validation) x (characters panel, wall-time panel).
    assert (result.path, result.runs, result.curves) == (out, 2, 8)
    assert png_size(out) == (640, 360)
    pixels = imread(out)
    assert pixels.shape == (360, 640, 4)
    assert has_colour(pixels, C0) and has_colour(pixels, C1) and not has_colour(pixels, C2)


def test_a_run_without_evaluations_adds_only_train_curves(two_runs, tmp_path):
    train_only = tmp_path / "train-only"
    write_metrics(train_only, [
        {"kind": "train", "step": s, "chars": s * 128, "loss": 3.0 - s / 100,
         "bpc": (3.0 - s / 100) / 0.6931, "elapsed": s / 10} for s in (10, 20, 30)
    ])
    result = plot_runs([*two_runs, train_only], tmp_path / "three.png", width=500, height=300)
    assert result.curves == 8 + 2 and png_size(result.path) == (500, 300)


def test_plot_command_writes_the_png(two_runs, tmp_path):
    out = tmp_path / "both.png"
    proc = run_charlm("plot", *two_runs, "--output", out, "--width", 800, "--height", 400)
    assert proc.returncode == 0, proc.stderr
    assert png_size(out) == (800, 400)
    assert f"wrote {out}" in proc.stdout and "2 runs, 8 curves" in proc.stdout


def test_one_run_defaults_to_loss_png_in_its_directory(two_runs, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(two_runs[1], run)
    proc = run_cli("plot", run)
    assert proc.returncode == 0, proc.stderr
    assert png_size(run / "loss.png") == (1200, 480)


def test_bad_inputs_are_clean_errors(two_runs, tmp_path):
    assert_clean_error(run_cli("plot", tmp_path / "nope"), "run directory not found")
    (tmp_path / "plain").mkdir()
    assert_clean_error(run_cli("plot", tmp_path / "plain"), "has no metrics.jsonl")
    write_metrics(tmp_path / "empty", [])
    assert_clean_error(run_cli("plot", tmp_path / "empty"), "holds no metrics yet")
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "metrics.jsonl").write_bytes(b'\xff\xfe{"kind": "tra')
    assert_clean_error(run_cli("plot", tmp_path / "torn"), "holds no metrics yet")
    (tmp_path / "file.txt").write_text("x")
    assert_clean_error(run_cli("plot", tmp_path / "file.txt"), "is not a run directory")
    run = two_runs[0]
    assert_clean_error(run_cli("plot", run, "-o", tmp_path / "x.gif"), "must be a .png, .svg or .pdf")
    assert_clean_error(run_cli("plot", run, "-o", tmp_path / "no" / "x.png"), "does not exist")
    assert_clean_error(run_cli("plot", run, "--width", 5), "--width must be in")
    assert not list(tmp_path.glob("**/*.png"))


def test_without_matplotlib_says_how_to_install_it(two_runs, tmp_path, monkeypatch):
    # None in sys.modules makes every import of the package (and its submodules) fail.
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    proc = run_cli("plot", two_runs[0], "-o", tmp_path / "x.png")
    assert_clean_error(proc, 'pip install "charlm[plot]"')
    assert not (tmp_path / "x.png").exists()


def test_load_curves_reads_bits_per_char(two_runs):
    curves = load_curves(two_runs[1])
    assert curves.name == "long" and len(curves.train) == 4 and len(curves.val) == 4
    assert [p.chars for p in curves.val] == [1280, 2560, 3840, 5120]
    assert all(p.bpc > 0 for p in curves.train + curves.val)
    assert curves.val[-1].bpc < curves.val[0].bpc  # it learned something
    with pytest.raises(CharlmError):
        load_curves(two_runs[1] / "last.pt")


def test_loss_grid_places_points():
    train_pts = [Point(c, c / 100, bpc) for c, bpc in ((0, 5.0), (500, 4.0), (1000, 3.0))]
    val_pts = [Point(1000, 10.0, 2.0)]
    grid = loss_grid(Curves("x", None, train_pts, val_pts), width=11, height=4)
    assert len(grid.rows) == 4 and all(len(r) == 11 for r in grid.rows)
    assert (grid.y_max, grid.y_min, grid.x_max) == (5.0, 2.0, 1000)
    assert grid.rows[0][0] == "t"  # 5.0 bits at 0 characters: top left
    assert grid.rows[-1][10] == "v"  # the validation point, lowest, at the right edge
    assert grid.rows[1][5] == "t" and grid.rows[2][10] == "t"  # 4.0 and 3.0 bits
    # Every column between the train points is filled by interpolation.
    assert all("t" in "".join(r[c] for r in grid.rows) for c in range(11))
    assert loss_grid(Curves("x", None, train_pts[:1], []), 11, 4) is None
