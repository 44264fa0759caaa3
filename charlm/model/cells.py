"""The recurrent cell types, in one table: the model builds its layer from it, the samplers
and the ONNX export name and count their state tensors from it, and the CLI lists the choices.
Plain Python: the ONNX runtime path uses it without torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cell:
    name: str  # the config value, model.cell
    torch_class: str  # the layer in torch.nn
    gates: int  # gate blocks per layer: weight_ih_l0 has gates * H rows
    states: tuple[str, ...]  # the state tensors, each (L, B, H), in the layer's order


CELLS: dict[str, Cell] = {
    "rnn": Cell("rnn", "RNN", 1, ("h",)),
    "lstm": Cell("lstm", "LSTM", 4, ("h", "c")),
    "gru": Cell("gru", "GRU", 3, ("h",)),
}
NAMES = tuple(CELLS)
# For help texts: "rnn, lstm or gru".
CHOICES_TEXT = ", ".join(NAMES[:-1]) + " or " + NAMES[-1]


def state_names(cell: str) -> list[str]:
    """Names of a cell's state tensors (the ONNX inputs; the outputs add ``_out``)."""
    return list(CELLS[cell].states)
