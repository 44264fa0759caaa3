"""The model run over a text one character at a time, recording what PyTorch's recurrent
layers keep inside: each layer's hidden state ``h`` (and an LSTM's cell state ``c``) after
every character, and the gate values that produced it.

``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` return only the last layer's outputs and the final state,
so the cells are stepped here with the real model's weights and PyTorch's own equations
(the ones in the ``torch.nn`` documentation, as :class:`charlm.model.network.Stepper` writes
them for sampling). ``tests/inspect/test_inspect.py`` checks the result against the modules to 1e-5.

    LSTM: i, f, g, o = split(W_ih x + b_ih + W_hh h + b_hh)   (order i, f, g, o)
          c' = sigmoid(f) * c + sigmoid(i) * tanh(g);  h' = sigmoid(o) * tanh(c')
    GRU:  r = sigmoid(Wx_r + bx_r + Wh_r h + bh_r);  z = sigmoid(Wx_z + bx_z + Wh_z h + bh_z)
          n = tanh(Wx_n + bx_n + r * (Wh_n h + bh_n));  h' = (1 - z) * n + z * h
    RNN:  h' = tanh(W_ih x + b_ih + W_hh h + b_hh)

The input projection of a whole chunk of characters is one matrix product; only the
recurrent product is stepped. Work goes chunk by chunk, so memory stays bounded on long texts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from charlm.model.network import CharRNN

# The gates recorded per cell (sigmoid gates; the LSTM's g and the GRU's n are tanh
# candidates, not gates), in the order of their blocks in weight_ih.
GATES: dict[str, tuple[str, ...]] = {"lstm": ("input", "forget", "output"), "gru": ("reset", "update"),
                                     "rnn": ()}
# The gate whose distribution is drawn: how much of the old state is kept.
KEEP_GATE = {"lstm": "forget", "gru": "update"}
CHUNK = 2048  # characters per chunk


@dataclass
class Chunk:
    """What one chunk of characters (T of them) left in the model, every tensor fp32 on the CPU.

    ``h[k]``, ``c[k]``: layer k's states after each character (T, H); ``c`` is empty but for
    an LSTM. ``gates[k][name]``: the gate's values (T, H). ``logits``: (T, V), the prediction
    of the next character after each one."""

    start: int
    h: list[torch.Tensor] = field(default_factory=list)
    c: list[torch.Tensor] = field(default_factory=list)
    gates: list[dict[str, torch.Tensor]] = field(default_factory=list)
    logits: torch.Tensor | None = None


def _weights(model: CharRNN, k: int) -> tuple[torch.Tensor, ...]:
    rnn = model.rnn  # nn.RNN/LSTM/GRU or StackedRNN: both name them weight_ih_l{k}, ...
    return tuple(getattr(rnn, f"{name}_l{k}").detach().float()
                 for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))


def _step_layer(cell: str, x: torch.Tensor, w: tuple[torch.Tensor, ...],
                h: torch.Tensor, c: torch.Tensor | None):
    """One layer over a chunk: x (T, in) from state h, c (1, H). Returns outputs (T, H), the
    cell states (T, H) or None, the gates {name: (T, H)}, and the last h, c."""
    w_ih, w_hh, b_ih, b_hh = w
    T, H = x.shape[0], w_hh.shape[1]
    w_hh_t = w_hh.T.contiguous()
    gi = torch.addmm(b_ih, x, w_ih.T)  # (T, G*H): the input side of every step at once
    hs = torch.empty(T, H)
    if cell == "lstm":
        gi += b_hh
        cs = torch.empty(T, H)
        pre = torch.empty(T, 4 * H)  # the gates' pre-activations, squashed after the loop
        for t in range(T):
            gates = torch.addmm(gi[t : t + 1], h, w_hh_t)  # (1, 4H)
            pre[t] = gates[0]
            i, f, g, o = gates.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            hs[t], cs[t] = h[0], c[0]
        i, f, _, o = torch.sigmoid(pre).chunk(4, 1)
        return hs, cs, {"input": i, "forget": f, "output": o}, h, c
    if cell == "gru":
        gh_all = torch.empty(T, 3 * H)
        for t in range(T):
            gh = torch.addmm(b_hh[None], h, w_hh_t)  # (1, 3H)
            gh_all[t] = gh[0]
            i_r, i_z, i_n = gi[t : t + 1].chunk(3, 1)
            h_r, h_z, h_n = gh.chunk(3, 1)
            r = torch.sigmoid(i_r + h_r)
            z = torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            h = (1 - z) * n + z * h
            hs[t] = h[0]
        r, z = torch.sigmoid(gi[:, : 2 * H] + gh_all[:, : 2 * H]).chunk(2, 1)
        return hs, None, {"reset": r, "update": z}, h, c
    gi += b_hh
    for t in range(T):
        h = torch.tanh(torch.addmm(gi[t : t + 1], h, w_hh_t))
        hs[t] = h[0]
    return hs, None, {}, h, c


def run_chunks(model: CharRNN, ids: list[int] | torch.Tensor, chunk: int = CHUNK) -> Iterator[Chunk]:
    """Step ``model`` (on the CPU, fp32, from a zero state) over ``ids``, yielding a
    :class:`Chunk` per ``chunk`` characters with the state carried across chunks."""
    with torch.inference_mode():
        yield from _run_chunks(model, ids, chunk)


def _run_chunks(model: CharRNN, ids: list[int] | torch.Tensor, chunk: int) -> Iterator[Chunk]:
    cfg = model.cfg
    cell, L, H = cfg.cell, cfg.num_layers, cfg.hidden_size
    weights = [_weights(model, k) for k in range(L)]
    embed = model.embed.weight.detach().float()
    w_head, b_head = model.head.weight.detach().float(), model.head.bias.detach().float()
    ids = torch.as_tensor(ids, dtype=torch.long).cpu()
    hs = [torch.zeros(1, H) for _ in range(L)]
    cs = [torch.zeros(1, H) if cell == "lstm" else None for _ in range(L)]
    for start in range(0, len(ids), chunk):
        out = Chunk(start)
        x = embed[ids[start : start + chunk]]  # (T, E)
        for k in range(L):
            x, c_seq, gates, hs[k], cs[k] = _step_layer(cell, x, weights[k], hs[k], cs[k])
            out.h.append(x)
            if c_seq is not None:
                out.c.append(c_seq)
            out.gates.append(gates)
        out.logits = torch.addmm(b_head, x, w_head.T)  # (T, V)
        yield out


def trace(model: CharRNN, ids: list[int] | torch.Tensor) -> Chunk:
    """The whole text as one :class:`Chunk` (for short texts and tests)."""
    parts = list(run_chunks(model, ids))
    whole = Chunk(0)
    L = model.cfg.num_layers
    whole.h = [torch.cat([p.h[k] for p in parts]) for k in range(L)]
    whole.c = [torch.cat([p.c[k] for p in parts]) for k in range(L)] if parts[0].c else []
    whole.gates = [{name: torch.cat([p.gates[k][name] for p in parts]) for name in parts[0].gates[k]}
                   for k in range(L)]
    whole.logits = torch.cat([p.logits for p in parts])
    return whole
