"""Loss curves from ``metrics.jsonl``: a PNG figure comparing runs (matplotlib, an optional
extra imported only here), and a small character grid the CLI draws at the end of training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charlm.errors import CharlmError, ConfigError
from charlm.files import atomic_write
from charlm.runs.directory import read_metrics
from charlm.units import LN2

INSTALL_HINT = 'charlm plot needs matplotlib: pip install "charlm[plot]"'


@dataclass
class Point:
    chars: int  # characters seen (all processes) when the value was logged
    elapsed: float  # seconds of training
    bpc: float  # bits per character


@dataclass
class Curves:
    """The train and validation curves of one run."""

    name: str
    path: Path
    train: list[Point]
    val: list[Point]
    warnings: list[str] = field(default_factory=list)  # bad lines of its metrics file skipped


def _bpc(record: dict[str, Any], bits_key: str, nats_key: str) -> float | None:
    for key, scale in ((bits_key, 1.0), (nats_key, 1.0 / LN2)):
        value = record.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value) * scale
    return None


def _point(record: dict[str, Any], bits_key: str, nats_key: str) -> Point | None:
    chars, elapsed = record.get("chars"), record.get("elapsed")
    bpc = _bpc(record, bits_key, nats_key)
    if bpc is None or not math.isfinite(bpc):
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (chars, elapsed)):
        return None
    return Point(int(chars), float(elapsed), bpc)


def curves_of(records: list[dict[str, Any]], name: str = "", path: Path = Path(".")) -> Curves:
    """Split metrics records into train and validation curves, skipping malformed ones."""
    train = [_point(r, "bpc", "loss") for r in records if r.get("kind") == "train"]
    val = [_point(r, "val_bpc", "val_loss") for r in records if r.get("kind") == "eval"]
    return Curves(name, path, [p for p in train if p], [p for p in val if p])


def load_curves(run_dir: str | Path) -> Curves:
    """The curves of a run directory (or of a ``metrics.jsonl`` path)."""
    path = Path(run_dir)
    if not path.exists():
        raise CharlmError(f"run directory not found: {path}")
    metrics = path if path.is_file() and path.name == "metrics.jsonl" else path / "metrics.jsonl"
    if not path.is_dir() and metrics is not path:
        raise CharlmError(f"{path} is not a run directory")
    if not metrics.is_file():
        raise CharlmError(f"{path} has no metrics.jsonl; is it a charlm run directory?")
    warnings: list[str] = []
    try:
        records = read_metrics(metrics, warnings)
    except OSError as exc:
        raise CharlmError(f"cannot read {metrics}: {exc.strerror}") from None
    run = metrics.parent
    curves = curves_of(records, run.resolve().name, run)
    curves.warnings = warnings
    if not curves.train and not curves.val:
        raise CharlmError(f"{metrics} holds no metrics yet (the run has not logged a step)")
    return curves


# ------------------------------------------------------------------------------------ PNG
@dataclass
class PlotResult:
    path: Path
    runs: int
    curves: int  # lines drawn, over both panels
    width: int  # pixels
    height: int
    skipped: list[str] = field(default_factory=list)  # why each skipped run was skipped
    warnings: list[str] = field(default_factory=list)  # bad metrics lines skipped, per file


FORMATS = ("png", "svg", "pdf")


def _time_unit(seconds: float) -> tuple[str, float]:
    if seconds >= 2 * 3600:
        return "h", 3600.0
    if seconds >= 120:
        return "min", 60.0
    return "s", 1.0


def _labels(curves: list[Curves]) -> list[str]:
    """Directory names, or the paths as given where two runs share a name."""
    names = [c.name for c in curves]
    return [c.name if names.count(c.name) == 1 else str(c.path) for c in curves]


def plot_runs(
    run_dirs: list[str | Path],
    output: str | Path | None = None,
    width: int = 1200,
    height: int = 480,
    dpi: int = 100,
) -> PlotResult:
    """Draw train and validation bits/char against characters seen (left panel) and wall
    time (right panel), one colour per run, and write a ``width`` x ``height`` picture to
    ``output``, a PNG, SVG or PDF by its suffix (default: ``loss.png`` in the run directory,
    or here for several runs). A run without metrics yet is skipped and named in
    ``skipped`` (with why), unless no run has any."""
    if not run_dirs:
        raise ConfigError("give at least one run directory to plot")
    for name, value in (("width", width), ("height", height)):
        if not 100 <= value <= 10_000:
            raise ConfigError(f"--{name} must be in [100, 10000] pixels; got {value}")
    kind = Path(output).suffix.lower().lstrip(".") if output is not None else "png"
    if kind not in FORMATS:
        raise ConfigError(f"--output must be a .png, .svg or .pdf file; got {output}")
    curves, skipped = [], []
    for d in run_dirs:
        try:
            curves.append(load_curves(d))
        except CharlmError as exc:
            skipped.append(str(exc))
    if not curves:
        raise CharlmError(skipped[0] if len(skipped) == 1
                          else f"none of the {len(skipped)} runs has metrics to plot")
    # One run: its picture goes in its directory; several: in the current directory.
    output = Path(output) if output else (curves[0].path if len(curves) == 1 else Path()) / "loss.png"
    if not output.parent.is_dir():
        raise CharlmError(f"cannot write {output}: directory {output.parent} does not exist")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter
    except ImportError:
        raise CharlmError(INSTALL_HINT) from None

    # A Figure with its own Agg canvas: no pyplot, so no global backend or open figures.
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    by_chars, by_time = fig.subplots(1, 2, sharey=True)
    longest = max(p.elapsed for c in curves for p in c.train + c.val)
    unit, scale = _time_unit(longest)
    for i, (run, label) in enumerate(zip(curves, _labels(curves), strict=True)):
        color = f"C{i % 10}"
        for ax, x_of in ((by_chars, lambda p: p.chars), (by_time, lambda p: p.elapsed / scale)):
            if run.train:
                ax.plot([x_of(p) for p in run.train], [p.bpc for p in run.train], color=color,
                        linewidth=1.2, alpha=0.55, label=f"{label} train")
            if run.val:
                ax.plot([x_of(p) for p in run.val], [p.bpc for p in run.val], color=color,
                        linewidth=1.8, marker="o", markersize=3, label=f"{label} val")
    by_chars.set_xlabel("characters seen")
    by_chars.xaxis.set_major_formatter(EngFormatter(sep=""))
    by_chars.set_ylabel("bits per character")
    by_time.set_xlabel(f"wall time ({unit})")
    for ax in (by_chars, by_time):
        ax.grid(alpha=0.3)
    by_time.tick_params(labelleft=True)
    by_chars.legend(fontsize="small", frameon=False)
    fig.suptitle("charlm loss: train (thin) and validation (dots)", fontsize="medium")
    lines = sum(len(ax.get_lines()) for ax in fig.axes)

    atomic_write(output, lambda f: fig.savefig(f, format=kind, dpi=dpi))
    warnings = [w for c in curves for w in c.warnings]
    return PlotResult(output, len(curves), lines, width, height, skipped, warnings)


# ------------------------------------------------------------------------- terminal grid
@dataclass
class Grid:
    """A ``height`` x ``width`` character grid of one run's curves, for a terminal.

    ``rows[0]`` is the top; each cell is " " (empty), "t" (train) or "v" (validation,
    drawn over train). The y axis runs from ``y_max`` (top row) down to ``y_min`` in
    bits/char; the x axis from 0 to ``x_max`` characters seen.
    """

    rows: list[str]
    y_min: float
    y_max: float
    x_max: int


def loss_grid(curves: Curves, width: int = 60, height: int = 10) -> Grid | None:
    """Place the curves on a grid; None when there are fewer than two points to draw.
    Train points falling in one column are averaged, so long runs stay readable, and
    columns between sparse train points are filled by linear interpolation."""
    points = curves.train + curves.val
    if len(points) < 2 or width < 2 or height < 2:
        return None
    x_max = max(p.chars for p in points)
    y_min, y_max = min(p.bpc for p in points), max(p.bpc for p in points)
    if y_max - y_min < 1e-9:
        y_min, y_max = y_min - 0.5, y_max + 0.5
    cells = [[" "] * width for _ in range(height)]

    def col(chars: int) -> int:
        return round(chars / x_max * (width - 1)) if x_max else 0

    def row(bpc: float) -> int:
        return round((y_max - bpc) / (y_max - y_min) * (height - 1))

    columns: dict[int, list[float]] = {}
    for p in curves.train:
        columns.setdefault(col(p.chars), []).append(p.bpc)
    known = sorted((c, sum(v) / len(v)) for c, v in columns.items())
    for (c0, y0), (c1, y1) in zip(known, known[1:], strict=False):
        for c in range(c0 + 1, c1):  # join sparse log points into a line
            cells[row(y0 + (y1 - y0) * (c - c0) / (c1 - c0))][c] = "t"
    for c, y in known:
        cells[row(y)][c] = "t"
    for p in curves.val:
        cells[row(p.bpc)][col(p.chars)] = "v"
    return Grid(["".join(r) for r in cells], y_min, y_max, x_max)
