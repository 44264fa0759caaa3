"""The model: Embedding -> nn.RNN / nn.LSTM / nn.GRU -> Linear, returning raw logits.

Shapes: B batch, T time, V vocabulary, E embedding, H hidden, L layers.
The recurrent state is a tensor (L, B, H) for rnn and gru, and a pair of them (h, c) for lstm.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from charlm.config import ModelConfig

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

_CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class CharRNN(nn.Module):
    def __init__(self, vocab_size: int, cfg: ModelConfig):
        super().__init__()
        self.vocab_size, self.cfg = vocab_size, cfg
        self.embed = nn.Embedding(vocab_size, cfg.embed_size)
        # nn.RNN/LSTM/GRU only apply dropout between layers; a single layer warns if given one.
        between = cfg.dropout if cfg.num_layers > 1 else 0.0
        self.rnn = _CELLS[cfg.cell](
            cfg.embed_size, cfg.hidden_size, cfg.num_layers, dropout=between, batch_first=True
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden_size, vocab_size)

    def init_state(self, batch_size: int) -> State:
        """A zero state for ``batch_size`` streams, on the model's device and in its dtype."""
        w = self.head.weight
        h = w.new_zeros(self.cfg.num_layers, batch_size, self.cfg.hidden_size)
        return (h, h.clone()) if self.cfg.cell == "lstm" else h

    def forward(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Inputs: ids (B, T) int64; state from :meth:`init_state` or a previous call.
        Returns: logits (B, T, V) and the new state."""
        x = self.drop(self.embed(ids))  # (B, T, E)
        out, state = self.rnn(x, state)  # (B, T, H)
        return self.head(self.drop(out)), state  # (B, T, V)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(vocab_size: int, cfg: ModelConfig) -> CharRNN:
    return CharRNN(vocab_size, cfg)


def detach_state(state: State) -> State:
    """Cut the graph behind a carried state (truncated BPTT), keeping it in fp32: under
    bf16 autocast the LSTM returns a bf16 state, which the LSTM then refuses as input
    outside autocast on CPU."""
    if isinstance(state, tuple):
        return tuple(s.detach().float() for s in state)  # type: ignore[return-value]
    return state.detach().float()


def state_tensors(state: State) -> list[torch.Tensor]:
    return list(state) if isinstance(state, tuple) else [state]


def state_from_tensors(tensors: list[torch.Tensor], cell: str) -> State:
    return (tensors[0], tensors[1]) if cell == "lstm" else tensors[0]


def select_state(state: State, rows: torch.Tensor) -> State:
    """The state of some streams only (batch dimension is 1)."""
    if isinstance(state, tuple):
        return tuple(s[:, rows] for s in state)  # type: ignore[return-value]
    return state[:, rows]


@contextmanager
def step_context(device: torch.device):
    """Context for single-character steps. On CPU, oneDNN's RNN primitive costs several
    milliseconds per call at sequence length 1 (see ../shared/PERF_NOTES.md); the native
    kernels take a fraction of that, so it is switched off for stepping."""
    previous = torch.backends.mkldnn.enabled
    if device.type == "cpu":
        torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous
