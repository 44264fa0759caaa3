"""Where the numbers of a training run go. The loop reports to :class:`Monitor` objects and
knows nothing of terminals or files; each monitor renders what it is told in its own way.

* :class:`ProgressBar`: a tqdm bar on a terminal, samples and notes printed above it.
* :class:`LogLines`: when stderr is a file or a pipe, one flushed line per log step and per
  evaluation, so ``tail -f`` shows progress and the file stays readable.
* :class:`MetricsFile`: ``metrics.jsonl`` in the run directory, always.
* :class:`charlm.training.tensorboard.TensorBoard`: event files for TensorBoard (optional extra).
* :class:`TrainLogs`: keeps the train records in memory (``charlm bench`` reads its speed).

Records are the dicts written to ``metrics.jsonl``: ``kind`` "train" (step, epoch, chars,
lr, loss, bpc, grad_norm, elapsed, chars_per_sec) or "eval" (step, epoch, chars, val_loss,
val_bpc, best, elapsed). Losses are in nats per character, ``bpc`` in bits.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from charlm.errors import printable
from charlm.runs.directory import MetricsLog

Record = dict[str, Any]


@dataclass
class Header:
    """What a run is about to do, reported before its first step."""

    file: str
    chars: int  # characters of text (training and validation)
    vocab_size: int
    model: str  # e.g. "lstm 256 x 1, embedding 128"
    parameters: int
    device: str
    precision: str
    batch_size: int  # streams per process
    seq_len: int
    world: int  # processes
    limits: str  # e.g. "2,000 steps"
    run_dir: Path
    start_step: int = 0
    max_steps: int = 0
    resumed: bool = False
    best_val_loss: float = math.inf  # of the run so far (a resumed run has one)
    notes: list[str] = field(default_factory=list)
    sizing: str = ""  # automatic sizing's choice and reason, when it chose

    def lines(self) -> list[str]:
        per = f" x {self.world} processes" if self.world > 1 else ""
        start = f"resuming at step {self.start_step:,}" if self.resumed else "starting"
        return [
            f"text: {printable(self.file)} ({self.chars:,} characters, vocabulary "
            f"{self.vocab_size:,})",
            f"model: {self.model}, {self.parameters:,} parameters",
            f"device: {self.device} ({self.precision}); batch {self.batch_size}{per} x window "
            f"{self.seq_len}",
            *([f"size: automatic: {self.sizing}"] if self.sizing else []),
            f"limits: {self.limits}",
            f"run: {printable(self.run_dir)} ({start})",
            *(f"note: {printable(note)}" for note in self.notes),
        ]


class Monitor:
    """What the training loop reports to; every method does nothing unless overridden."""

    def on_start(self, header: Header) -> None: ...

    def on_step(self, step: int) -> None: ...  # after every optimizer step

    def on_train_log(self, record: Record) -> None: ...  # every train.log_every steps

    def on_eval(self, record: Record) -> None: ...  # before its checkpoints are written

    def on_saved(self, step: int, names: list[str]) -> None: ...  # checkpoint files written

    def on_sample(self, step: int, val_loss: float, text: str) -> None: ...

    def on_note(self, text: str) -> None: ...  # something the user should know, now

    def on_end(self) -> None: ...  # always called, also when training fails


class Monitors(Monitor):
    """Several monitors as one; a context manager that ends them all, whatever happens."""

    def __init__(self, monitors: list[Monitor]):
        self.monitors = list(monitors)

    def on_start(self, header):
        for m in self.monitors:
            m.on_start(header)

    def on_step(self, step):
        for m in self.monitors:
            m.on_step(step)

    def on_train_log(self, record):
        for m in self.monitors:
            m.on_train_log(record)

    def on_eval(self, record):
        for m in self.monitors:
            m.on_eval(record)

    def on_saved(self, step, names):
        for m in self.monitors:
            m.on_saved(step, names)

    def on_sample(self, step, val_loss, text):
        for m in self.monitors:
            m.on_sample(step, val_loss, text)

    def on_note(self, text):
        for m in self.monitors:
            m.on_note(text)

    def on_end(self):
        errors = []
        for m in self.monitors:
            try:
                m.on_end()
            except Exception as exc:  # noqa: BLE001 - end the others, then raise the first
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> Monitors:
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        self.on_end()
        return False


def sample_block(step: int, val_loss: float, text: str) -> str:
    return f"--- sample at step {step} (val {val_loss:.3f}) ---\n{text}\n---"


def _shown(loss: float) -> str:
    """A loss for the bar: "-" before there is one (not "nan")."""
    return "-" if math.isnan(loss) else f"{loss:.3f}"


class ProgressBar(Monitor):
    """A tqdm bar on stderr with the last losses and speed; samples go to stdout above it."""

    def __init__(self):
        self.bar: tqdm | None = None
        self.last_train = self.last_val = math.nan

    def on_start(self, header):
        for line in header.lines():
            tqdm.write(line, file=sys.stderr)
        self.bar = tqdm(total=header.max_steps or None, initial=header.start_step, unit="step",
                        dynamic_ncols=True, leave=False)

    def on_step(self, step):
        self.bar.update(1)

    def on_train_log(self, r):
        self.last_train = r["loss"]
        self.bar.set_postfix(loss=f"{self.last_train:.3f}", val=_shown(self.last_val),
                             cps=f"{r['chars_per_sec']:,.0f}")

    def on_eval(self, r):
        self.last_val = r["val_loss"]
        self.bar.set_postfix(loss=_shown(self.last_train), val=f"{self.last_val:.3f}")

    def on_sample(self, step, val_loss, text):
        tqdm.write(sample_block(step, val_loss, text))

    def on_note(self, text):
        tqdm.write(text, file=sys.stderr)

    def on_end(self):
        if self.bar is not None:
            self.bar.close()


class LogLines(Monitor):
    """Plain lines for a log file: the header, then one line per log step and one per
    evaluation (written once its checkpoints are), each flushed as it is written."""

    def __init__(self, err: TextIO | None = None, out: TextIO | None = None):
        self.err, self.out = err, out  # None: sys.stderr / sys.stdout at the time of writing
        self.max_steps, self.best = 0, math.inf
        self.pending: Record | None = None  # an evaluation whose checkpoints are not written yet

    def _write(self, line: str, out: bool = False) -> None:
        stream = (self.out or sys.stdout) if out else (self.err or sys.stderr)
        stream.write(line + "\n")
        stream.flush()

    def _step(self, step: int) -> str:
        return f"step {step:,}/{self.max_steps:,}" if self.max_steps else f"step {step:,}"

    def on_start(self, header):
        self.max_steps, self.best = header.max_steps, header.best_val_loss
        for line in header.lines():
            self._write(line)

    def on_train_log(self, r):
        self._write(
            f"{self._step(r['step'])}  epoch {r['epoch']:.2f}  loss {r['loss']:.4f}  "
            f"{r['bpc']:.3f} bpc  lr {r['lr']:.2e}  {r['chars_per_sec']:,.0f} chars/s  "
            f"{r['elapsed']:,.1f} s"
        )

    def on_eval(self, r):
        self._flush_eval([])
        self.pending = r

    def on_saved(self, step, names):
        if self.pending is not None and self.pending["step"] == step:
            self._flush_eval(names)
        else:
            self._write(f"{self._step(step)}  saved {', '.join(names)}")

    def _flush_eval(self, names: list[str]) -> None:
        r, self.pending = self.pending, None
        if r is None:
            return
        self.best = min(self.best, r["val_loss"])
        best = "new best" if r["best"] else f"best {self.best:.4f}"
        saved = f"  saved {', '.join(names)}" if names else ""
        self._write(
            f"{self._step(r['step'])}  val loss {r['val_loss']:.4f}  {r['val_bpc']:.3f} bpc  "
            f"({best}){saved}"
        )

    def on_sample(self, step, val_loss, text):
        self._write(sample_block(step, val_loss, text), out=True)

    def on_note(self, text):
        self._write(text)

    def on_end(self):
        self._flush_eval([])


class MetricsFile(Monitor):
    """``metrics.jsonl``: one JSON object per log step and per evaluation, flushed."""

    def __init__(self):
        self.log: MetricsLog | None = None

    def on_start(self, header):
        # On a resume, lines past the checkpoint's step describe steps trained again: dropped.
        keep = header.start_step if header.resumed else None
        self.log = MetricsLog(header.run_dir / "metrics.jsonl", keep)
        header.notes += self.log.warnings  # the console prints the header next

    def on_train_log(self, record):
        self.log.write(record)

    def on_eval(self, record):
        self.log.write(record)

    def on_end(self):
        if self.log is not None:
            self.log.close()


class TrainLogs(Monitor):
    """The train records of a run, in memory."""

    def __init__(self):
        self.records: list[Record] = []

    def on_train_log(self, record):
        self.records.append(record)


def console(progress: bool | None) -> Monitor:
    """The bar when ``progress`` says so, or (None) when stderr is a terminal; else lines."""
    if progress is None:
        progress = sys.stderr.isatty()
    return ProgressBar() if progress else LogLines()
