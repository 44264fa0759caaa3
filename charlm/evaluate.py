"""Evaluation: mean cross-entropy over every character of a text, in nats and bits.

Evaluation is much cheaper per character than training: no backward pass and no optimizer,
under ``torch.inference_mode``, with many streams at once (``train.eval_streams``), long
windows (on the CPU those run oneDNN's fused RNN kernels) and the run's autocast precision
(bf16 where training runs in bf16). ``benchmarks/eval_speed.py`` measures the ratio.

Characters outside the model's vocabulary cannot be predicted at all: they are dropped and
counted, or (``unknown="charge"``) each is counted at :data:`UNKNOWN_BITS`, the cost of
naming one of Unicode's code points, so figures over texts with such characters compare."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from charlm.config import PRECISIONS
from charlm.data.batching import as_tensor, eval_windows, load_corpus
from charlm.data.text import check_encoding
from charlm.data.vocab import Vocab
from charlm.device import autocast, resolve_device, resolve_precision
from charlm.errors import ConfigError, DataError
from charlm.model.network import CharRNN
from charlm.storage import checkpoint
from charlm.units import LN2, bits

# What an unknown character costs with unknown="charge": log2 of the number of Unicode code
# points, the bits of naming any one of them with no model at all.
UNKNOWN_BITS = math.log2(0x110000)
UNKNOWN_CHOICES = ("drop", "charge")
ERRORS = ("strict", "replace")  # data.errors


def _eval_forward(model: CharRNN, amp) -> Callable:
    """The forward pass evaluation runs: the model's own, except under bf16 autocast on the
    CPU, where autocast leaves a GRU in fp32 (it runs LSTM and RNN layers in bf16): there the
    GRU runs from a bf16 copy of its weights, as oneDNN's bf16 GRU is 2.6x faster (measured on
    a Zen 4, GRU 384, 32 x 256), so bf16 evaluation is bf16 for every cell."""
    bf16_cpu = (isinstance(amp, torch.autocast) and amp.device == "cpu"
                and amp.fast_dtype == torch.bfloat16)
    if not (bf16_cpu and model.cfg.cell == "gru"):
        return model
    rnn = copy.deepcopy(model.rnn).to(torch.bfloat16)

    def forward(ids: torch.Tensor, state):
        x = model.embed(ids).to(torch.bfloat16)  # (S, t, E)
        out, state = rnn(x, None if state is None else state.to(torch.bfloat16))  # (S, t, H)
        return model.head(out), state  # (S, t, V)

    return forward


@torch.inference_mode()
def loss_sums(
    model: CharRNN,
    ids: torch.Tensor,
    streams: int = 64,
    seq_len: int = 256,
    amp=None,
    rank: int = 0,
    world: int = 1,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss (nats) and number of predictions over this process's share of ``ids``.

    Every prediction ``ids[i] -> ids[i + 1]`` is counted once across all ranks; the state is
    carried within each stream. ``on_progress`` receives the number of predictions of each
    window as it is done. Returns two 0-d float64 tensors on the ids' device.
    """
    was_training = model.training
    model.eval()
    forward = _eval_forward(model, amp)
    total = torch.zeros((), dtype=torch.float64, device=ids.device)
    count = torch.zeros((), dtype=torch.float64, device=ids.device)
    state = None
    for x, y, reset in eval_windows(ids, streams, seq_len, rank, world):
        if reset:
            state = None
        with amp or nullcontext():
            logits, state = forward(x, state)  # (S, t, V)
        state = tuple(s.float() for s in state) if isinstance(state, tuple) else state.float()
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        total += loss.double()
        count += y.numel()
        if on_progress is not None:
            on_progress(y.numel())
    model.train(was_training)
    return total, count


def mean_loss(
    model: CharRNN,
    ids: torch.Tensor,
    streams: int = 64,
    seq_len: int = 256,
    amp=None,
    rank: int = 0,
    world: int = 1,
    all_reduce: Callable[[torch.Tensor], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> float:
    """Mean loss in nats/char over ``ids``; ``all_reduce`` sums the shares of all ranks."""
    total, count = loss_sums(model, ids, streams, seq_len, amp, rank, world, on_progress)
    pair = torch.stack([total, count])
    if all_reduce is not None:
        all_reduce(pair)
    return float(pair[0] / pair[1])


@dataclass
class EvalResult:
    loss: float  # nats/char (with unknown="charge", unknown characters included)
    chars: int  # characters evaluated (the model's predictions; unknown ones not included)
    unknown: int  # characters not in the vocabulary: dropped, or charged
    unknown_mode: str = "drop"

    @property
    def unknown_share(self) -> float:
        return self.unknown / max(self.chars + self.unknown, 1)

    @property
    def bpc(self) -> float:
        return bits(self.loss)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def to_dict(self) -> dict:
        """The fields of ``charlm eval --json``."""
        return {"loss": self.loss, "bits_per_char": self.bpc, "perplexity": self.perplexity,
                "chars": self.chars, "unknown": self.unknown, "unknown_mode": self.unknown_mode,
                "unknown_bits": UNKNOWN_BITS if self.unknown_mode == "charge" else None}


def evaluate_model(
    model: CharRNN,
    vocab: Vocab,
    text: str | Path,
    precision: str = "fp32",
    encoding: str = "utf-8",
    errors: str = "strict",
    unknown: str = "drop",
    on_progress: Callable[[int, int], None] | None = None,
    streams: int = 64,
    seq_len: int = 256,
    newline: str = "normalize",
) -> EvalResult:
    """Loss of ``model`` over a text file (a Path: read like a training file, ids cached) or
    over a string; characters outside the vocabulary are dropped and counted, or (``unknown
    = "charge"``) counted at UNKNOWN_BITS each. ``on_progress(done, total)`` follows the
    predictions; ``streams`` windows of ``seq_len`` are evaluated at once."""
    if unknown not in UNKNOWN_CHOICES:
        raise ConfigError(f"--unknown must be one of {', '.join(UNKNOWN_CHOICES)}; got {unknown!r}")
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if errors not in ERRORS:
        raise ConfigError(f"errors must be one of {', '.join(ERRORS)}; got {errors!r}")
    try:
        check_encoding(encoding)
    except DataError as exc:
        raise ConfigError(f"--encoding: {exc}") from None
    if isinstance(text, Path):
        corpus = load_corpus(text, vocab=vocab, encoding=encoding, errors=errors,
                             drop_unknown=True, newline=newline, evaluating=True)
        ids, dropped, what = corpus.ids, corpus.unknown, str(text)
    else:
        if newline == "normalize":
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        known = set(vocab.chars)
        kept = "".join(c for c in text if c in known)
        ids, dropped, what = vocab.encode(kept), len(text) - len(kept), "the text"
    if len(ids) < 2:
        if unknown == "charge" and dropped:  # no prediction: each character is charged
            return EvalResult(UNKNOWN_BITS * LN2, 0, dropped, unknown)
        if isinstance(text, str) and not text:
            raise DataError("the text is empty; nothing to evaluate")
        few = "no characters" if len(ids) == 0 else "fewer than 2 characters"
        raise DataError(f"{what} has {few} in the model's vocabulary"
                        + ("; --unknown charge counts the others" if dropped else ""))
    device = model.head.weight.device
    amp = autocast(device, resolve_precision(precision, device))
    predictions, done = len(ids) - 1, [0]

    def advance(count: int) -> None:
        done[0] += count
        on_progress(done[0], predictions)

    loss = mean_loss(model, as_tensor(ids, device), streams, seq_len, amp=amp,
                     on_progress=advance if on_progress is not None else None)
    if unknown == "charge" and dropped:
        loss = (loss * predictions + dropped * UNKNOWN_BITS * LN2) / (predictions + dropped)
    return EvalResult(loss, len(ids), dropped, unknown)


def evaluate_file(
    checkpoint_path: str | Path,
    text_path: str | Path,
    device: str = "auto",
    precision: str = "fp32",
    encoding: str = "utf-8",
    errors: str = "strict",
) -> EvalResult:
    """Loss of a checkpoint (.pt or .safetensors) over a whole text file; unknown characters
    are dropped and counted."""
    model, vocab = checkpoint.load_model(checkpoint_path, resolve_device(device))
    return evaluate_model(model, vocab, Path(text_path), precision, encoding, errors)
