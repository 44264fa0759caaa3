"""TensorBoard event files in the run directory (``--tensorboard``, the ``tensorboard`` extra).

``tensorboard --logdir runs`` then shows every run under its directory name: training loss,
bits/char, learning rate, gradient norm and chars/s per log step; validation loss and
bits/char per evaluation; samples and notes as text. torch's SummaryWriter needs the
``tensorboard`` package, which is imported here only, when the monitor is created.
"""

from __future__ import annotations

from charlm.extras import require
from charlm.training.monitors import Header, Monitor, Record

TRAIN_SCALARS = {  # record key -> TensorBoard tag
    "loss": "train/loss", "bpc": "train/bits_per_char", "lr": "train/lr",
    "grad_norm": "train/grad_norm", "chars_per_sec": "train/chars_per_sec",
}
EVAL_SCALARS = {"val_loss": "val/loss", "val_bpc": "val/bits_per_char"}


def _markdown_code(text: str) -> str:
    """Text shown as is: TensorBoard renders text summaries as Markdown."""
    return "\n".join("    " + line for line in text.split("\n"))


class TensorBoard(Monitor):
    """Scalars against the step; a resumed run drops the events past its checkpoint."""

    def __init__(self):
        require("tensorboard", "tensorboard", "--tensorboard")  # fail before training starts
        from torch.utils.tensorboard import SummaryWriter

        self.writer_class = SummaryWriter
        self.writer = None

    def on_start(self, header: Header) -> None:
        purge = header.start_step + 1 if header.resumed else None
        self.writer = self.writer_class(log_dir=str(header.run_dir), purge_step=purge)
        self.writer.add_text("run", _markdown_code("\n".join(header.lines())), header.start_step)

    def _scalars(self, record: Record, tags: dict[str, str]) -> None:
        for key, tag in tags.items():
            if key in record:
                self.writer.add_scalar(tag, record[key], record["step"])
        self.writer.flush()

    def on_train_log(self, record: Record) -> None:
        self._scalars(record, TRAIN_SCALARS)

    def on_eval(self, record: Record) -> None:
        self._scalars(record, EVAL_SCALARS)

    def on_sample(self, step: int, val_loss: float, text: str) -> None:
        self.writer.add_text("sample", _markdown_code(text), step)

    def on_note(self, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text("note", text)

    def on_end(self) -> None:
        if self.writer is not None:
            self.writer.close()
