"""Running an exported ONNX model with onnxruntime and numpy only: no torch import anywhere on
this path, so ``charlm sample --checkpoint model.onnx`` works where torch is not installed.

The file (written by export.py) is the single-step model. Shapes: B batch, V vocabulary,
H hidden, L layers.
  inputs:  ids (B, 1) int64; h (L, B, H) float32; c (L, B, H) float32 for lstm only
  outputs: logits (B, V) float32; h_out (L, B, H); c_out (L, B, H) for lstm only
Its metadata_props hold ``format``, ``format_version``, ``charlm_version``, ``config`` (the run
config as JSON; ``config["model"]`` describes the network) and ``vocab`` (a JSON list of
characters; the id of a character is its index).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from charlm.config import Config, validate
from charlm.data.vocab import Vocab
from charlm.errors import CharlmError, CheckpointError, first_line, path_error
from charlm.extras import require
from charlm.model.cells import state_names
from charlm.sampling.options import BEAM_NEEDS_TORCH, StopScan, start_ids

FORMAT = "charlm-onnx-step"
FORMAT_VERSION = 1


@dataclass
class OnnxModel:
    """An onnxruntime session of the single-step model, with its vocabulary and config."""

    session: Any
    vocab: Vocab
    config: Config
    path: Path

    @property
    def cell(self) -> str:
        return self.config.model.cell

    def init_state(self, batch_size: int) -> list[np.ndarray]:
        """Zero state: one (L, B, H) float32 array per state input."""
        m = self.config.model
        shape = (m.num_layers, batch_size, m.hidden_size)
        return [np.zeros(shape, dtype=np.float32) for _ in state_names(m.cell)]

    def step(self, ids: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Inputs: ids (B,) ints; state from :meth:`init_state` or a previous step.
        Returns: logits (B, V) float32 and the new state."""
        feeds = {"ids": np.asarray(ids, dtype=np.int64).reshape(-1, 1)}
        feeds.update(zip(state_names(self.cell), state, strict=True))
        logits, *new_state = self.session.run(None, feeds)
        return logits, new_state


def read_metadata(path: Path, meta: dict[str, str], fmt: str, newest: int,
                  kind: str) -> tuple[int, dict, Vocab]:
    """Check the charlm metadata of an export (ONNX or safetensors): its format and version,
    and parse its config (a dict) and vocabulary. Returns (version, config, vocab)."""
    if meta.get("format") != fmt:
        raise CheckpointError(f"{path} is not a charlm {kind} export (no charlm metadata)")
    version = meta.get("format_version", "")
    if not (version.isascii() and version.isdigit()) or not 1 <= int(version) <= newest:
        raise CheckpointError(
            f"{path} has {kind} export format {version[:20]!r}; this charlm reads formats 1 to "
            f"{newest} (a newer one needs a newer charlm: pip install -U charlm)"
        )
    try:
        config = json.loads(meta["config"])
        vocab = Vocab.from_json(meta["vocab"])
    except (KeyError, ValueError, TypeError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:160]
        raise CheckpointError(f"{path} has invalid charlm metadata: {why}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} has invalid charlm metadata: its config is not a table")
    if not len(vocab):
        raise CheckpointError(f"{path} has invalid charlm metadata: an empty vocabulary")
    return int(version), config, vocab


def _check_signature(path: Path, session: Any, config: Config, vocab: Vocab) -> None:
    """The inputs and outputs, in order, with the shapes the config and vocabulary give:
    the state arrays are allocated from the config, and ids are read from the logits."""
    m = config.model
    state = [m.num_layers, "B", m.hidden_size]
    names = state_names(m.cell)
    want_in = {"ids": ["B", 1], **{n: state for n in names}}
    want_out = {"logits": ["B", len(vocab)], **{f"{n}_out": state for n in names}}
    for what, args, want in (("inputs", session.get_inputs(), want_in),
                             ("outputs", session.get_outputs(), want_out)):
        found = [a.name for a in args]
        if found != list(want):
            raise CheckpointError(f"{path} has {what} {found}; a charlm export has {list(want)}")
        for arg in args:
            shape = list(arg.shape)
            ok = len(shape) == len(want[arg.name]) and all(
                w == "B" or g == w for g, w in zip(shape, want[arg.name], strict=False))
            if not ok:
                raise CheckpointError(
                    f"{path}: its {arg.name} has shape {shape}, which does not fit its config "
                    f"and vocabulary ({want[arg.name]})"
                )


def read_bytes(path: Path, what: str) -> bytes:
    """An export's bytes, read by Python, so that any file name the OS allows works (the
    Rust and C++ readers are never given the name)."""
    try:
        if not path.is_file():
            raise CheckpointError(f"{what} not found: {path}")
        return path.read_bytes()
    except OSError as exc:
        raise (path_error(exc, path)
               or CheckpointError(f"cannot read {path}: {exc.strerror}")) from None


def load(path: str | Path) -> OnnxModel:
    """Open a charlm ONNX export with onnxruntime and check its metadata, inputs and
    outputs against its config before anything is allocated from it."""
    ort = require("onnxruntime", "export", "running an ONNX model")
    path = Path(path)
    data = read_bytes(path, "ONNX model")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: onnxruntime warns about unused initializers
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    # onnxruntime raises its own exception classes (InvalidProtobuf, Fail, ...) for bad files.
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path} is damaged or not an ONNX model ({first_line(exc)})") from None
    meta = session.get_modelmeta().custom_metadata_map
    _, config_dict, vocab = read_metadata(path, meta, FORMAT, FORMAT_VERSION, "ONNX")
    try:
        config = validate(Config.from_dict(config_dict, source="ONNX metadata config"))
    except (TypeError, CharlmError) as exc:
        raise CheckpointError(f"{path} has invalid charlm metadata: {exc}") from None
    _check_signature(path, session, config, vocab)
    return OnnxModel(session, vocab, config, path)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def pick(
    logits: np.ndarray, temperature: float | np.ndarray, top_k: int, top_p: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Inputs: logits (B, V); temperature a number or one per row (B,). Returns the next ids
    (B,) int64, with the rules of :func:`charlm.sampling.sampler.pick`: greedy where the temperature is
    0, else sampled at that
    temperature from the ``top_k`` most likely characters and the smallest set whose
    probability reaches ``top_p``."""
    temps = np.broadcast_to(np.asarray(temperature, dtype=np.float64), logits.shape[:1])  # (B,)
    greedy = temps == 0
    argmax = logits.argmax(axis=-1).astype(np.int64)
    if greedy.all():
        return argmax
    z = logits.astype(np.float64)
    # The largest logit moved to 0 first: a tiny temperature is greedy decoding, not NaN.
    with np.errstate(over="ignore"):  # overflow to -inf is the point
        z = (z - z.max(axis=-1, keepdims=True)) / np.where(greedy, 1.0, temps)[:, None]  # (B, V)
    V = z.shape[-1]
    if 0 < top_k < V:
        kth = np.partition(z, V - top_k, axis=-1)[:, V - top_k : V - top_k + 1]  # (B, 1)
        z = np.where(z < kth, -np.inf, z)
    if top_p < 1.0:
        order = np.argsort(-z, axis=-1, kind="stable")
        p_sorted = _softmax(np.take_along_axis(z, order, axis=-1))
        # Drop a character when the ones before it already reach top_p (keeps at least one).
        drop_sorted = (np.cumsum(p_sorted, axis=-1) - p_sorted) >= top_p
        drop_sorted[:, 0] = False  # the most likely always stays, however small top_p is
        drop = np.empty_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        z = np.where(drop, -np.inf, z)
    cum = np.cumsum(_softmax(z), axis=-1)  # (B, V)
    # Inverse CDF: the first id whose cumulative probability exceeds u; ``<=`` skips ids of
    # probability 0 even when u is exactly 0.
    u = rng.random((z.shape[0], 1)) * cum[:, -1:]
    return np.where(greedy, argmax, np.minimum((cum <= u).sum(axis=-1), V - 1)).astype(np.int64)


def generate(
    model: OnnxModel,
    vocab: Vocab,
    seed: list[int],
    length: int,
    temperature: float | Sequence[float] = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_samples: int = 1,
    random_seed: int | None = None,
    on_step: Callable[[list[int]], None] | None = None,
    *,
    stop: Sequence[str] = (),
    beam: int = 0,
) -> list[str]:
    """Generate ``num_samples`` continuations of ``length`` characters of the seed ids (for
    each temperature when several are given), like :func:`charlm.sampling.sampler.generate` (same
    arguments; numpy's random generator, so a random seed gives other text than the PyTorch
    sampler, while greedy decoding gives the same text). The seed is fed one character per
    step, as the file holds only the single-step model. Beam search needs the PyTorch model."""
    if beam:
        raise CharlmError(BEAM_NEEDS_TORCH)
    temps = [temperature] if isinstance(temperature, (int, float)) else list(temperature)
    B = num_samples * len(temps)
    temp = np.repeat(np.asarray(temps, dtype=np.float64), num_samples)  # (B,)
    rng = np.random.default_rng(random_seed)
    state = model.init_state(B)
    for i in start_ids(vocab, seed):
        logits, state = model.step(np.full(B, i), state)  # (B, V)
    scan = StopScan(list(stop), B) if stop else None
    out = np.empty((B, length), dtype=np.int64)
    steps = 0
    for t in range(length):
        nxt = pick(logits, temp, top_k, top_p, rng)  # (B,)
        out[:, t] = nxt
        steps = t + 1
        if on_step is not None:
            on_step(nxt.tolist())
        if scan is not None and scan.feed([vocab.chars[i] for i in nxt.tolist()]):
            break
        if t + 1 < length:
            logits, state = model.step(nxt, state)
    texts = [vocab.decode(row) for row in out[:, :steps]]
    return [scan.cut(i, text) for i, text in enumerate(texts)] if scan is not None else texts
