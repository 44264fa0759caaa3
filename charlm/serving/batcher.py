"""Continuous batching: every active stream of a model advances one character per batched
model step.

A stream is one generated text (a choice of a request). It carries its own state row,
temperature, top-k, top-p, stop texts, length and random stream (its key in
:mod:`charlm.sampling.draws`: the request's seed and the choice's number, as ``charlm sample
--num-samples`` numbers its rows), so its text is the same whichever streams share its
batch, and the same as ``charlm sample`` with that seed and those options. A new stream is
warmed on its prompt (:func:`charlm.sampling.sampler.warm`, as ``charlm sample`` does) and
joins the batch at the next step; a finished, cancelled (disconnected) or timed-out one
leaves it at that step. The draw is :func:`charlm.sampling.sampler.pick`, the sampler's own.

The model runs in one thread per model (torch work is blocking); the results of each step
go back to the event loop in one call.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from charlm.model.network import Stepper, select_state, state_tensors, step_context
from charlm.sampling.draws import uniforms
from charlm.sampling.sampler import pick, warm

WARM_BUDGET = 4096  # prompt characters warmed between two steps (one prompt at least)
WARM_CACHE_SIZE = 64  # prompts
WARM_CACHE_IDS = 4096  # characters: longer prompts are not kept

# How a stream ended: "stop" (a stop text), "length" (max_tokens), "timeout" (the server's
# time limit), "cancelled" (its client went away), "error" (the model step failed).
Finish = str


class Busy(Exception):
    """More streams than the batch and its queue may hold."""


@dataclass(eq=False)
class Stream:
    """One generated text. ``emit(text, finish)`` is called on the event loop with each new
    piece of text (the stop text itself is never emitted) and, at the end, the finish
    reason."""

    ids: list[int]  # what the state is warmed on (the prompt, or start_ids for an empty one)
    key: int  # its random stream (charlm.sampling.draws)
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    stops: list[str]
    emit: Callable[[str, Finish | None], None]
    deadline: float = float("inf")  # time.monotonic() past which it ends with "timeout"
    cancelled: bool = False  # set from the event loop: the batch drops it at the next step
    t: int = 0  # characters drawn
    held: str = ""  # drawn text not yet emitted: it might be the start of a stop text
    generated: int = 0  # characters drawn, for the usage counts
    finished: Finish | None = field(default=None)

    def take(self, char: str) -> tuple[str, Finish | None]:
        """Add a drawn character: the text that may be emitted now, and the finish reason
        when this character ends the stream."""
        self.t += 1
        self.generated += 1
        held = self.held + char
        for stop in self.stops:
            if held.endswith(stop):
                self.held = ""
                return held[: len(held) - len(stop)], "stop"
        if self.t >= self.max_tokens:
            self.held = ""
            return held, "length"
        keep = 0  # the longest end of ``held`` that begins some stop text
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(held)), keep, -1):
                if held.endswith(stop[:n]):
                    keep = n
                    break
        self.held = held[len(held) - keep:] if keep else ""
        return held[: len(held) - keep], None


class Batcher:
    """Steps the streams of one model. ``deliver(events)`` is called (from the model's
    thread) after each step with [(stream, text, finish)]; the server hands it to its event
    loop. At most ``max_streams`` streams are stepped together; up to ``max_queue`` more
    wait for a place; beyond that :meth:`submit` raises :class:`Busy`."""

    def __init__(self, model, vocab, deliver: Callable[[list], None], max_streams: int = 256,
                 max_queue: int = 1024, name: str = "model"):
        self.model, self.vocab, self.deliver = model, vocab, deliver
        self.max_streams, self.max_queue = max_streams, max_queue
        self.cond = threading.Condition()
        self.pending: list[Stream] = []
        self.active: list[Stream] = []
        self.count = 0  # active + pending, under cond
        self.closing = False
        self.steps = 0
        self.error: Exception | None = None  # the last failed step's, for the log
        # prompt ids -> (logits, state) after it: warm-ups of recent short prompts, reused
        # (the same computation, so the same numbers) by the requests that repeat them
        self.warm_cache: dict[tuple[int, ...], tuple[torch.Tensor, object]] = {}
        self.thread = threading.Thread(target=self._run, name=f"charlm-batch-{name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Cancel every stream and stop the thread."""
        with self.cond:
            self.closing = True
            for s in self.pending + self.active:
                s.cancelled = True
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def load(self) -> tuple[int, int]:
        """(streams being stepped, streams waiting)."""
        with self.cond:
            return len(self.active), self.count - len(self.active)

    def submit(self, streams: list[Stream]) -> None:
        with self.cond:
            if self.closing:
                raise Busy("the server is shutting down")
            if self.count + len(streams) > self.max_streams + self.max_queue:
                raise Busy(f"{self.count} streams are running or waiting (the limit is "
                           f"{self.max_streams} running and {self.max_queue} waiting)")
            self.pending.extend(streams)
            self.count += len(streams)
            self.cond.notify_all()

    # ------------------------------------------------------------------ the model's thread
    def _run(self) -> None:
        engine = engine_of(self.model)
        with torch.inference_mode(), engine.context():
            stepper = engine.stepper()
            batch = _Batch(engine.device)
            while True:
                with self.cond:
                    while not self.active and not self.pending and not self.closing:
                        self.cond.wait()
                    if self.closing and not self.active and not self.pending:
                        return
                    # A request that went away while it waited leaves the queue now.
                    gone = [s for s in self.pending if s.cancelled]
                    if gone:
                        self.pending = [s for s in self.pending if not s.cancelled]
                    room = self.max_streams - len(self.active)
                    # Warm-ups run between steps: at most WARM_BUDGET prompt characters of
                    # new prompts a step (one prompt at least), so that a burst of long
                    # prompts delays the running streams by a step at a time.
                    take, budget, seen = 0, WARM_BUDGET, set()
                    for s in self.pending[:room]:
                        key = tuple(s.ids)
                        cost = 0 if key in self.warm_cache or key in seen else len(key)
                        if take and cost > budget:
                            break
                        budget -= cost
                        seen.add(key)
                        take += 1
                    new, self.pending = gone + self.pending[:take], self.pending[take:]
                try:
                    events = self._step(engine, stepper, batch, new)
                except Exception as exc:  # noqa: BLE001 - a failed step ends its streams, not the server
                    events = [(s, "", "error") for s in batch.streams + new if s.finished is None]
                    for s, _, _ in events:
                        s.finished = "error"
                    batch.clear()
                    self.error = exc
                with self.cond:
                    self.active = [s for s in batch.streams]
                    self.count = len(self.active) + len(self.pending)
                if events:
                    self.deliver(events)
                self.steps += 1

    def _step(self, engine, stepper, batch: _Batch, new: list[Stream]) -> list:
        events: list = []
        now = time.monotonic()
        warmed = self.warm_cache
        joining = []
        for s in new:
            if s.cancelled or now > s.deadline:
                s.finished = "cancelled" if s.cancelled else "timeout"
                events.append((s, "", s.finished))
                continue
            key = tuple(s.ids)
            if key in warmed:  # the choices of a prompt, and prompts seen lately, share it
                warmed[key] = warmed.pop(key)  # most recently used last
            else:
                warmed[key] = engine.warm(s.ids)
                if len(key) > WARM_CACHE_IDS:
                    joining.append((s, *warmed.pop(key)))
                    continue
                while len(warmed) > WARM_CACHE_SIZE:
                    del warmed[next(iter(warmed))]
            joining.append((s, *warmed[key]))
        batch.join(joining)
        if not batch.streams:
            return events
        streams = batch.streams
        u = uniforms(batch.keys, np.fromiter((s.t for s in streams), np.uint64, len(streams)))
        nxt = pick(batch.logits, batch.temps, batch.top_k, batch.top_p, u)
        chars = self.vocab.chars
        now = time.monotonic()
        keep = []
        for i, (s, c) in enumerate(zip(streams, nxt.tolist(), strict=True)):
            if s.cancelled:
                finish, text = "cancelled", ""
            elif now > s.deadline:
                finish, text = "timeout", ""
            else:
                text, finish = s.take(chars[c])
            if finish is not None:
                s.finished = finish
            else:
                keep.append(i)
            if text or finish is not None:
                events.append((s, text, finish))
        batch.advance(stepper, nxt, keep)
        return events


class _Batch:
    """The batch of active streams: their rows of logits and state, in one order, and their
    options as tensors (rebuilt when streams join or leave)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.clear()

    def clear(self) -> None:
        self.streams: list[Stream] = []
        self.logits: torch.Tensor | None = None  # (B, V): the next character's
        self.state = None

    def join(self, joining: list) -> None:
        if not joining:
            return
        logits = [row for _, row, _ in joining]
        states = [state for _, _, state in joining]
        self.streams = self.streams + [s for s, _, _ in joining]
        if self.logits is not None:
            logits.insert(0, self.logits)
            states.insert(0, self.state)
        self.logits = torch.cat(logits)
        tensors = [torch.cat(parts, dim=1) for parts in zip(*map(state_tensors, states), strict=True)]
        self.state = (tensors[0], tensors[1]) if len(tensors) == 2 else tensors[0]
        self._options()

    def _options(self) -> None:
        streams, dev = self.streams, self.device
        self.keys = np.fromiter((s.key for s in streams), np.uint64, len(streams))
        self.temps = torch.tensor([s.temperature for s in streams], dtype=torch.float64, device=dev)
        self.top_k = torch.tensor([s.top_k for s in streams], dtype=torch.long, device=dev)
        self.top_p = torch.tensor([s.top_p for s in streams], dtype=torch.float64, device=dev)

    def advance(self, stepper, nxt: torch.Tensor, keep: list[int]) -> None:
        """Feed each kept stream its drawn character; drop the others."""
        if not keep:
            self.clear()
            return
        if len(keep) < len(self.streams):
            rows = torch.tensor(keep, device=self.device)
            self.streams = [self.streams[i] for i in keep]
            nxt, self.state = nxt[rows], select_state(self.state, rows)
            self._options()
        self.logits, self.state = stepper(nxt, self.state)


class TorchEngine:
    """A PyTorch model: the seed in one pass (:func:`warm`), then the :class:`Stepper`, as
    ``charlm sample`` runs it."""

    def __init__(self, model):
        self.model, self.device = model, model.head.weight.device

    def context(self):
        return step_context(self.device)

    def stepper(self):
        return Stepper(self.model)

    def warm(self, ids: list[int]):
        return warm(self.model, ids)


class OnnxEngine:
    """An ONNX export (onnxruntime, on the CPU), stepped one character at a time as
    ``charlm sample`` steps it; its logits and state are handed over as CPU tensors, so the
    batch and the draw are the PyTorch model's."""

    device = torch.device("cpu")

    def __init__(self, net):
        self.net = net

    def context(self):
        return contextlib.nullcontext()

    def stepper(self):
        return self.step

    def warm(self, ids: list[int]):
        state = self.net.init_state(1)
        for i in ids:
            logits, state = self.net.step(np.array([i]), state)
        return torch.from_numpy(np.asarray(logits)), self._state(state)

    def step(self, nxt: torch.Tensor, state):
        logits, new = self.net.step(nxt.numpy(), [t.numpy() for t in state_tensors(state)])
        return torch.from_numpy(np.asarray(logits)), self._state(new)

    @staticmethod
    def _state(arrays):
        tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
        return (tensors[0], tensors[1]) if len(tensors) == 2 else tensors[0]


def engine_of(model):
    """How to run ``model``: a torch module, or an ONNX export's session wrapper."""
    return OnnxEngine(model) if hasattr(model, "session") else TorchEngine(model)
