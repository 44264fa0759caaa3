"""Export: a checkpoint as safetensors (weights + metadata) or as an ONNX single-step model,
each verified against PyTorch before it is given its final name.

The export dependencies (safetensors, onnx, onnxscript, onnxruntime) are the ``export`` extra
and are imported here, where they are used. Every file is written to a temporary file next to
the target, reloaded, run at batch sizes 1 and 4 from random ids and states and compared with
the PyTorch model; only when every logit and state is within ``TOLERANCE`` is it renamed into
place, so a failed export leaves nothing behind and never touches an existing file.

Shapes: B batch, V vocabulary, E embedding, H hidden, L layers.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from charlm._version import __version__
from charlm.data.vocab import Vocab
from charlm.errors import CharlmError, ConfigError, first_line
from charlm.extras import require
from charlm.files import remove_stale_temporaries
from charlm.model.cells import state_names
from charlm.model.network import CharRNN, state_from_tensors, state_tensors
from charlm.storage import checkpoint
from charlm.storage import onnx as onnx_runtime
from charlm.storage.safetensors import SAFETENSORS_FORMAT, SAFETENSORS_VERSION, read_safetensors

SUFFIXES = {"safetensors": ".safetensors", "onnx": ".onnx"}
TOLERANCE = 1e-4
VERIFY_BATCHES = (1, 4)
# The exporter fixes the batch dimension to 1 when the example has batch 1
# (../shared/PERF_NOTES.md), so the example batch is larger; the result is checked anyway.
EXAMPLE_BATCH = 3

Runner = Callable[[np.ndarray, list[np.ndarray]], list[np.ndarray]]


@dataclass
class ExportResult:
    path: Path
    format: str
    size: int  # bytes
    cell: str
    max_diff: float  # largest |difference| from PyTorch over logits and states
    batches: tuple[int, ...]


def metadata(ckpt: dict[str, Any], fmt: str, version: int) -> dict[str, str]:
    """String-to-string metadata shared by both formats."""
    return {
        "format": fmt,
        "format_version": str(version),
        "charlm_version": __version__,
        "config": json.dumps(checkpoint.config_of(ckpt).to_dict()),
        "vocab": checkpoint.vocab_of(ckpt).to_json(),
    }


# ---------------------------------------------------------------------------- safetensors
def safetensors_bytes(ckpt: dict[str, Any]) -> bytes:
    """The weights (fp32, the model's state_dict names) and the metadata, serialized."""
    st = require("safetensors.torch", "export", "safetensors export")
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in ckpt["model"].items()}
    return st.save(tensors, metadata=metadata(ckpt, SAFETENSORS_FORMAT, SAFETENSORS_VERSION))


# ----------------------------------------------------------------------------------- ONNX
class SingleStep(nn.Module):
    """The model for one character: ids (B, 1) and the state tensors (L, B, H) in; logits
    (B, V) and the new state tensors out, flat, as ONNX inputs and outputs are."""

    def __init__(self, model: CharRNN):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, *state: torch.Tensor):
        logits, new = self.model(ids, state_from_tensors(list(state), self.model.cfg.cell))
        return (logits[:, -1], *state_tensors(new))  # (B, V), (L, B, H)...


@contextmanager
def _quiet():
    """The exporter warns through both warnings and logging (missing torchvision ops, deprecated
    internals); none of it concerns the user, and failures are raised, not logged."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _shape(value_info) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def check_onnx_shapes(proto, model: CharRNN) -> None:
    """Refuse a graph whose batch dimension is not symbolic, or whose other dims are wrong."""
    cfg, V = model.cfg, model.vocab_size
    names = state_names(cfg.cell)
    state_shape = [cfg.num_layers, "B", cfg.hidden_size]
    expected = {"ids": ["B", 1], "logits": ["B", V]}
    expected.update({n: state_shape for n in names})
    expected.update({f"{n}_out": state_shape for n in names})
    graph = list(proto.graph.input) + list(proto.graph.output)
    found = {v.name: _shape(v) for v in graph}
    if sorted(found) != sorted(expected):
        raise CharlmError(f"ONNX export has inputs/outputs {sorted(found)}; expected {sorted(expected)}")
    for name, want in expected.items():
        got = found[name]
        if len(got) != len(want):
            raise CharlmError(f"ONNX export gave {name!r} the shape {got}; expected {want}")
        pairs = list(zip(got, want, strict=True))
        # A symbolic dim has a dim_param (str); a fixed one only a dim_value (int).
        if any(w == "B" and not isinstance(g, str) for g, w in pairs):
            raise CharlmError(
                f"the ONNX exporter fixed the batch size of {name!r} (shape {got}); the file "
                "would only run at that batch size, so it was not written"
            )
        if any(w != "B" and g != w for g, w in pairs):
            raise CharlmError(f"ONNX export gave {name!r} the shape {got}; expected {want}")


def onnx_bytes(ckpt: dict[str, Any], model: CharRNN) -> bytes:
    """Export the single-step model with torch.onnx (dynamo) and a dynamic batch dimension,
    check its shapes and add the metadata. Returns the serialized ModelProto."""
    onnx = require("onnx", "export", "ONNX export")
    require("onnxscript", "export", "ONNX export")  # the exporter's op library
    cfg, V = model.cfg, model.vocab_size
    names = state_names(cfg.cell)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (EXAMPLE_BATCH, 1), generator=g)
    # Distinct tensors: torch.export merges inputs that alias one tensor, which would wire c to h.
    state = [torch.randn(cfg.num_layers, EXAMPLE_BATCH, cfg.hidden_size, generator=g) for _ in names]
    batch = torch.export.Dim("batch")
    try:
        with _quiet():
            program = torch.onnx.export(
                SingleStep(model).eval(), (ids, *state), dynamo=True, verbose=False,
                input_names=["ids", *names], output_names=["logits", *[f"{n}_out" for n in names]],
                # *state arrives as one tuple argument, hence the nested tuple.
                dynamic_shapes=({0: batch}, tuple({1: batch} for _ in names)),
            )
            proto = program.model_proto
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; all mean "failed"
        cause = exc.__cause__ or exc  # the exporter wraps the error of the step that failed
        raise CharlmError(f"ONNX export failed: {type(cause).__name__}: {first_line(cause)}") from None
    check_onnx_shapes(proto, model)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise CharlmError(f"ONNX export produced an invalid model: {first_line(exc)}") from None
    for key, value in metadata(ckpt, onnx_runtime.FORMAT, onnx_runtime.FORMAT_VERSION).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


# ------------------------------------------------------------------------------- verifying
@torch.no_grad()
def compare(reference: CharRNN, run: Runner, batches=VERIFY_BATCHES) -> float:
    """Run ``run`` and the PyTorch model on the same random ids and states at each batch size.

    ``run(ids (B, 1) int64, state [(L, B, H)...]) -> [logits (B, V), *state]``, numpy arrays.
    Returns the largest absolute difference; raises CharlmError naming the first output over
    ``TOLERANCE``."""
    cfg, V = reference.cfg, reference.vocab_size
    names = ["logits", *state_names(cfg.cell)]
    worst = 0.0
    for B in batches:
        g = torch.Generator().manual_seed(1000 + B)
        ids = torch.randint(0, V, (B, 1), generator=g)
        state = [torch.randn(cfg.num_layers, B, cfg.hidden_size, generator=g) for _ in names[1:]]
        logits, new = reference(ids, state_from_tensors(state, cfg.cell))
        want = [logits[:, -1], *state_tensors(new)]
        got = run(ids.numpy(), [s.numpy() for s in state])
        for name, w, o in zip(names, want, got, strict=True):
            if tuple(o.shape) != tuple(w.shape):
                raise CharlmError(
                    f"verification failed: {name} has shape {tuple(o.shape)} at batch {B}, "
                    f"PyTorch gives {tuple(w.shape)}"
                )
            diff = float(np.abs(np.asarray(o, dtype=np.float64) - w.double().numpy()).max())
            if not diff < TOLERANCE:  # also catches NaN
                raise CharlmError(
                    f"verification failed: {name} differs from PyTorch by {diff:.3g} at batch "
                    f"{B} (tolerance {TOLERANCE:g})"
                )
            worst = max(worst, diff)
    return worst


def _check_metadata(path: Path, cfg_dict: dict, vocab: Vocab, ckpt: dict[str, Any]) -> None:
    if vocab != checkpoint.vocab_of(ckpt) or cfg_dict != checkpoint.config_of(ckpt).to_dict():
        raise CharlmError(f"verification failed: {path} does not hold the checkpoint's config/vocab")


def verify_safetensors(path: Path, ckpt: dict[str, Any], reference: CharRNN) -> float:
    loaded = read_safetensors(path)
    _check_metadata(path, checkpoint.config_of(loaded).to_dict(), checkpoint.vocab_of(loaded), ckpt)
    model = checkpoint.model_of(loaded)

    def run(ids: np.ndarray, state: list[np.ndarray]) -> list[np.ndarray]:
        tensors = [torch.from_numpy(s) for s in state]
        logits, new = model(torch.from_numpy(ids), state_from_tensors(tensors, model.cfg.cell))
        return [logits[:, -1].numpy(), *(s.numpy() for s in state_tensors(new))]

    return compare(reference, run)


def verify_onnx(path: Path, ckpt: dict[str, Any], reference: CharRNN) -> float:
    loaded = onnx_runtime.load(path)
    _check_metadata(path, loaded.config.to_dict(), loaded.vocab, ckpt)

    def run(ids: np.ndarray, state: list[np.ndarray]) -> list[np.ndarray]:
        logits, new = loaded.step(ids[:, 0], state)
        return [logits, *new]

    return compare(reference, run)


# ---------------------------------------------------------------------------------- export
def default_output(checkpoint_path: str | Path, fmt: str) -> Path:
    return Path(checkpoint_path).with_suffix(SUFFIXES[fmt])


def check_output(out: Path, src: Path, force: bool) -> None:
    """Refuse an export's output that is the checkpoint itself, a directory, an existing file
    without ``force``, or a path in a directory that does not exist (every format)."""
    if out.exists() and out.resolve() == src.resolve():
        raise ConfigError(f"the output {out} is the checkpoint itself; choose another --output")
    if out.is_dir():
        raise CharlmError(f"the output {out} is a directory")
    if out.exists() and not force:
        raise CharlmError(f"{out} already exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise CharlmError(f"the output directory {out.parent} does not exist")


def export_checkpoint(
    checkpoint_path: str | Path, fmt: str, output: str | Path | None = None, force: bool = False
) -> ExportResult:
    """Export a .pt checkpoint (or a .safetensors export) as ``fmt`` ("safetensors" or "onnx")
    to ``output`` (default: next to the checkpoint with the format's suffix), verified.

    An existing ``output`` is replaced only with ``force``, and then atomically."""
    if fmt not in SUFFIXES:
        raise ConfigError(f"--format must be one of {', '.join(SUFFIXES)}, html; got {fmt!r}")
    src = Path(checkpoint_path)
    out = Path(output) if output is not None else default_output(src, fmt)
    if out.suffix.lower() != SUFFIXES[fmt]:
        raise ConfigError(f"the output of --format {fmt} must end in {SUFFIXES[fmt]}: {out}")
    ckpt = checkpoint.read(src)
    check_output(out, src, force)
    model = checkpoint.model_of(ckpt)  # fp32, CPU, eval mode
    if fmt == "safetensors":
        data, verify = safetensors_bytes(ckpt), verify_safetensors
    else:
        data, verify = onnx_bytes(ckpt, model), verify_onnx
    worst: list[float] = []

    def write_and_verify(f) -> None:
        # Verify the temporary file (f.name) before atomic_write renames it: a failed check
        # raises here, atomic_write removes the temporary file and the target is untouched.
        f.write(data)
        f.flush()
        worst.append(verify(Path(f.name), ckpt, model))

    remove_stale_temporaries(out)  # left by an export that was killed
    checkpoint.atomic_write(out, write_and_verify)
    return ExportResult(out, fmt, out.stat().st_size, model.cfg.cell, worst[0], VERIFY_BATCHES)
