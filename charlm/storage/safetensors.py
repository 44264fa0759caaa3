"""Reading a charlm .safetensors export (weights and metadata) as a checkpoint-shaped dict.

Apart from export.py, which writes these files, so that :func:`charlm.storage.checkpoint.read` can
read them without importing the exporter (and the exporter imports checkpoint, not the
reverse). The optional ``safetensors`` package is imported where it is used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from charlm.errors import CheckpointError, first_line
from charlm.extras import require
from charlm.storage import onnx as onnx_runtime

SAFETENSORS_FORMAT = "charlm-safetensors"
SAFETENSORS_VERSION = 1


def _metadata(path: Path, data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file: an 8-byte little-endian header length,
    then a JSON header (read here, so the file name never goes to the Rust library)."""
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    try:
        if not 0 < n <= len(data) - 8:
            raise ValueError("no valid header")
        header = json.loads(data[8 : 8 + n])
        meta = (header.get("__metadata__") or {}) if isinstance(header, dict) else None
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError("its metadata is not a table of strings")
    except (ValueError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else first_line(exc)
        raise CheckpointError(f"{path} is damaged or not a safetensors file ({why})") from None
    return meta


def read_safetensors(path: str | Path) -> dict[str, Any]:
    """A charlm .safetensors file as a checkpoint-shaped dict (config, vocab, model), which
    :func:`charlm.storage.checkpoint.model_of` and ``vocab_of`` read like a .pt checkpoint."""
    safetensors = require("safetensors", "export", "reading a .safetensors file")
    st = require("safetensors.torch", "export", "reading a .safetensors file")
    path = Path(path)
    data = onnx_runtime.read_bytes(path, "safetensors file")
    meta = _metadata(path, data)
    version, config, vocab = onnx_runtime.read_metadata(
        path, meta, SAFETENSORS_FORMAT, SAFETENSORS_VERSION, "safetensors"
    )
    try:
        tensors = st.load(data)
    except (safetensors.SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path} is damaged or not a safetensors file ({first_line(exc)})"
        ) from None
    return {
        "format": SAFETENSORS_FORMAT,
        "format_version": version,
        "charlm_version": meta.get("charlm_version"),
        "config": config,
        "vocab": list(vocab.chars),
        "model": tensors,
    }
