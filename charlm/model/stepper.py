"""The seed in one pass (:func:`warm`), then one character per call: the
:class:`~charlm.model.network.Stepper`, replayed from a CUDA graph on a GPU. Shared by the sampler
and beam search.

A sampling step is about twenty small kernels (per layer: a matrix product and the gate
math; then the head). On a GPU each launch costs more than its arithmetic, so eager stepping
ran at about 1,100 chars/s for one stream of a 3x1024 LSTM on an H100 and 90,000 chars/s for
64 streams, bound by launches, not by the GPU. Captured once into a CUDA graph, the whole step
is one launch. The draw stays eager: it is a handful of kernels and keeps ``pick`` the same
on every device.
"""

from __future__ import annotations

import torch

from charlm.model.network import CharRNN, State, Stepper, state_tensors


def warm(model: CharRNN, ids: list[int], state: State | None = None) -> tuple[torch.Tensor, State]:
    """Run the seed ids through the model in one pass (from ``state``, or a zero state).
    Returns the logits after the last id (1, V) and the state (batch 1). Only the last
    position goes through the output layer, so a long seed costs no (T, V) logits."""
    device = model.head.weight.device
    x = model.embed(torch.tensor([ids], device=device))  # (1, T, E)
    out, state = model.rnn(x, state)  # (1, T, H)
    return model.head(out[:, -1]), state  # (1, V)


class GraphStep:
    """A Stepper step captured for ``batch`` streams; call it as the Stepper itself.

    The returned logits and state live in the graph's own buffers and are overwritten by the
    next call, which is how the sampling loop uses them (it draws from the logits and passes
    the state straight back); :func:`own` copies a state that must outlive the loop.
    """

    def __init__(self, stepper: Stepper, batch: int, state: State):
        self.stepper = stepper  # kept alive: the graph reads its weight buffers
        self.ids = torch.zeros(batch, dtype=torch.long, device=stepper.w_head.device)  # (B,)
        self.state_in = [t.clone() for t in state_tensors(state)]  # each (L, B, H)
        self.lstm = isinstance(state, tuple)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up outside the graph (cuBLAS handles, workspaces)
            for _ in range(2):
                stepper(self.ids, self._state(self.state_in))
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits, out = stepper(self.ids, self._state(self.state_in))
            # The new state goes back into the input buffers inside the graph, so a loop that
            # passes the returned state straight back costs no copies.
            for dst, src in zip(self.state_in, state_tensors(out), strict=True):
                dst.copy_(src)

    def _state(self, tensors: list[torch.Tensor]) -> State:
        return (tensors[0], tensors[1]) if self.lstm else tensors[0]

    def __call__(self, ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        self.ids.copy_(ids)
        for dst, src in zip(self.state_in, state_tensors(state), strict=True):
            if src is not dst:  # a state from elsewhere (the seed's): copy it in
                dst.copy_(src)
        self.graph.replay()
        return self.logits, self._state(self.state_in)


def own(state: State) -> State:
    """A copy of ``state`` that no later step overwrites."""
    if isinstance(state, tuple):
        return tuple(t.clone() for t in state)  # type: ignore[return-value]
    return state.clone()


def make_step(model: CharRNN, batch: int, state: State):
    """The fastest one-character step for ``model`` on its device: a CUDA graph of the
    Stepper on a GPU (falling back to the eager Stepper where capture fails), else the
    Stepper. ``state`` is a state of the right shape and dtype (its values do not matter)."""
    stepper = Stepper(model)
    if model.head.weight.device.type != "cuda":
        return stepper
    try:
        return GraphStep(stepper, batch, state)
    except RuntimeError:  # capture unsupported here (old driver, debug allocator, ...)
        return stepper
