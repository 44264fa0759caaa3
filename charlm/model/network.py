"""The model: Embedding -> nn.RNN / nn.LSTM / nn.GRU -> Linear, returning raw logits.

Shapes: B batch, T time, V vocabulary, E embedding, H hidden, L layers.
The recurrent state is a tensor (L, B, H) for rnn and gru, and a pair of them (h, c) for lstm.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torch import nn

from charlm.config import ModelConfig
from charlm.model.cells import CELLS

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

def _layer(cell: str, input_size: int, hidden_size: int, num_layers: int) -> nn.RNNBase:
    return getattr(nn, CELLS[cell].torch_class)(input_size, hidden_size, num_layers,
                                                batch_first=True)


# nn.RNN/LSTM/GRU parameter names: weight_ih_l0, bias_hh_l1, ...
_FLAT_NAME = re.compile(r"(?P<kind>(?:weight|bias)_(?:ih|hh))_l(?P<layer>\d+)")


class StackedRNN(nn.Module):
    """``num_layers`` one-layer ``nn.RNN``/``LSTM``/``GRU`` modules with ``nn.Dropout`` between
    them: the same computation as one multi-layer module with ``dropout``, but with the masks
    drawn from torch's generator, which a checkpoint saves.

    cuDNN draws a multi-layer RNN's between-layer masks from a dropout state of its own that
    ``torch.cuda.get_rng_state_all()`` does not capture, so a resumed run would draw other
    masks. One layer per call costs no speed (measured on an H100, 3x1024 LSTM, fp16: 0.94M
    chars/s stacked against 0.89M fused). Parameters keep the multi-layer module's names
    (``weight_ih_l1``, ...) in state dicts and as attributes, so checkpoints and exports of
    either layout load into the other.

    Inputs: x (B, T, E), state as for :class:`CharRNN`. Returns: out (B, T, H), new state.
    """

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int,
                 dropout: float):
        super().__init__()
        self.cell = cell
        self.layers = nn.ModuleList(
            _layer(cell, input_size if k == 0 else hidden_size, hidden_size, 1)
            for k in range(num_layers)
        )
        self.drop = nn.Dropout(dropout)
        self._register_state_dict_hook(_flat_names)
        self._register_load_state_dict_pre_hook(_layer_names)

    def __getattr__(self, name: str):
        match = _FLAT_NAME.fullmatch(name)
        if match and int(match["layer"]) < len(self._modules["layers"]):
            return getattr(self._modules["layers"][int(match["layer"])], f"{match['kind']}_l0")
        return super().__getattr__(name)

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        lstm = self.cell == "lstm"
        new_h, new_c = [], []
        for k, layer in enumerate(self.layers):
            if k:
                x = self.drop(x)
            layer_state = None
            if state is not None:
                layer_state = (state[0][k : k + 1], state[1][k : k + 1]) if lstm else state[k : k + 1]
            x, out = layer(x, layer_state)
            new_h.append(out[0] if lstm else out)
            if lstm:
                new_c.append(out[1])
        h = torch.cat(new_h)  # (L, B, H)
        return x, ((h, torch.cat(new_c)) if lstm else h)


def _flat_names(module, state_dict, prefix, local_metadata):
    """state_dict hook: ``layers.K.weight_ih_l0`` -> ``weight_ih_lK``, in place and in order."""
    inner = prefix + "layers."
    for key in [k for k in state_dict if k.startswith(inner)]:
        layer, name = key[len(inner):].split(".", 1)
        match = _FLAT_NAME.fullmatch(name)
        state_dict[f"{prefix}{match['kind']}_l{layer}"] = state_dict.pop(key)


def _layer_names(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                 error_msgs):
    """load_state_dict pre-hook: ``weight_ih_lK`` -> ``layers.K.weight_ih_l0``."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        match = _FLAT_NAME.fullmatch(key[len(prefix):])
        if match:
            state_dict[f"{prefix}layers.{match['layer']}.{match['kind']}_l0"] = state_dict.pop(key)

class CharRNN(nn.Module):
    def __init__(self, vocab_size: int, cfg: ModelConfig):
        super().__init__()
        self.vocab_size, self.cfg = vocab_size, cfg
        self.embed = nn.Embedding(vocab_size, cfg.embed_size)
        if cfg.num_layers > 1 and cfg.dropout > 0:  # masks from torch's generator: see StackedRNN
            self.rnn = StackedRNN(cfg.cell, cfg.embed_size, cfg.hidden_size, cfg.num_layers,
                                  cfg.dropout)
        else:
            self.rnn = _layer(cfg.cell, cfg.embed_size, cfg.hidden_size, cfg.num_layers)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden_size, vocab_size)

    def init_state(self, batch_size: int) -> State:
        """A zero state for ``batch_size`` streams, on the model's device and in its dtype."""
        w = self.head.weight
        zeros = [w.new_zeros(self.cfg.num_layers, batch_size, self.cfg.hidden_size)
                 for _ in CELLS[self.cfg.cell].states]
        return state_from_tensors(zeros, self.cfg.cell)

    def forward(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Inputs: ids (B, T) int64; state from :meth:`init_state` or a previous call.
        Returns: logits (B, T, V) and the new state."""
        x = self.drop(self.embed(ids))  # (B, T, E)
        out, state = self.rnn(x, state)  # (B, T, H)
        return self.head(self.drop(out)), state  # (B, T, V)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def parameter_shapes(vocab_size: int, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The name and shape of every weight of ``CharRNN(vocab_size, cfg)``, without building
    it: what a checkpoint's tensors must match before a model is allocated for them."""
    G = CELLS[cfg.cell].gates  # gate blocks per layer
    V, E, H = vocab_size, cfg.embed_size, cfg.hidden_size
    shapes = {"embed.weight": (V, E)}
    for k in range(cfg.num_layers):
        shapes[f"rnn.weight_ih_l{k}"] = (G * H, E if k == 0 else H)
        shapes[f"rnn.weight_hh_l{k}"] = (G * H, H)
        shapes[f"rnn.bias_ih_l{k}"] = (G * H,)
        shapes[f"rnn.bias_hh_l{k}"] = (G * H,)
    shapes.update({"head.weight": (V, H), "head.bias": (V,)})
    return shapes


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
    """The state a cell's layer takes, from its tensors in :data:`charlm.model.cells.CELLS` order."""
    count = len(CELLS[cell].states)
    if len(tensors) != count:
        raise ValueError(f"a {cell} state is {count} tensor(s), got {len(tensors)}")
    return tuple(tensors) if count > 1 else tensors[0]


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


class Stepper(nn.Module):
    """One character per call, with the same weights as a :class:`CharRNN`, written as plain
    matrix products and pointwise ops.

    Sampling runs at batch 1 and sequence length 1, where ``nn.LSTM``'s per-call overhead
    dominates (about 7x on CPU through oneDNN, see ../shared/PERF_NOTES.md). Here the first
    layer's input projection of every character is precomputed into a (V, G*H) table
    (``embed @ W_ih0.T + biases``), so layer 0 costs one matrix product per step and deeper
    layers one product over ``[x, h]`` each. Used only for inference: weights are copies.

    Inputs: ids (B,) int64, state as for CharRNN. Returns: logits (B, V), new state.
    """

    def __init__(self, model: CharRNN):
        super().__init__()
        cfg = model.cfg
        self.cell, self.num_layers = cfg.cell, cfg.num_layers
        rnn = model.rnn
        with torch.no_grad():
            w_ih0, b_ih0, b_hh0 = rnn.weight_ih_l0, rnn.bias_ih_l0, rnn.bias_hh_l0
            table = model.embed.weight @ w_ih0.T + b_ih0  # (V, G*H)
            if self.cell != "gru":  # GRU keeps b_hh apart: the reset gate scales it
                table = table + b_hh0
            self.register_buffer("table", table.contiguous())
            for k in range(cfg.num_layers):
                w_hh = getattr(rnn, f"weight_hh_l{k}")
                b_hh = getattr(rnn, f"bias_hh_l{k}")
                if k == 0:
                    self.register_buffer(f"w_l{k}", w_hh.T.contiguous())  # (H, G*H)
                    bias = b_hh if self.cell == "gru" else torch.zeros_like(b_hh)
                elif self.cell == "gru":
                    w_ih = getattr(rnn, f"weight_ih_l{k}")
                    self.register_buffer(f"wi_l{k}", w_ih.T.contiguous())
                    self.register_buffer(f"bi_l{k}", getattr(rnn, f"bias_ih_l{k}").clone())
                    self.register_buffer(f"w_l{k}", w_hh.T.contiguous())
                    bias = b_hh
                else:
                    w_ih = getattr(rnn, f"weight_ih_l{k}")
                    self.register_buffer(f"w_l{k}", torch.cat([w_ih, w_hh], 1).T.contiguous())
                    bias = getattr(rnn, f"bias_ih_l{k}") + b_hh
                self.register_buffer(f"b_l{k}", bias.clone())
            self.register_buffer("w_head", model.head.weight.T.contiguous())  # (H, V)
            self.register_buffer("b_head", model.head.bias.clone())

    def forward(self, ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        lstm = self.cell == "lstm"
        hs, cs = (state[0], state[1]) if lstm else (state, None)
        new_h, new_c = [], []
        x = None
        for k in range(self.num_layers):
            h = hs[k]  # (B, H)
            w, b = getattr(self, f"w_l{k}"), getattr(self, f"b_l{k}")
            if self.cell == "gru":
                gi = self.table[ids] if k == 0 else torch.addmm(
                    getattr(self, f"bi_l{k}"), x, getattr(self, f"wi_l{k}"))  # (B, 3H)
                gh = torch.addmm(b, h, w)  # (B, 3H)
                i_r, i_z, i_n = gi.chunk(3, 1)
                h_r, h_z, h_n = gh.chunk(3, 1)
                r = torch.sigmoid(i_r + h_r)
                z = torch.sigmoid(i_z + h_z)
                n = torch.tanh(i_n + r * h_n)
                h = torch.lerp(n, h, z)  # (1 - z) * n + z * h
            else:
                if k == 0:
                    gates = torch.addmm(self.table[ids], h, w)  # (B, G*H)
                else:
                    gates = torch.addmm(b, torch.cat([x, h], 1), w)
                if lstm:
                    i, f, g, o = gates.chunk(4, 1)
                    c = torch.sigmoid(f) * cs[k] + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                    new_c.append(c)
                else:
                    h = torch.tanh(gates)
            new_h.append(h)
            x = h
        logits = torch.addmm(self.b_head, x, self.w_head)  # (B, V)
        h_out = torch.stack(new_h)
        return logits, ((h_out, torch.stack(new_c)) if lstm else h_out)
