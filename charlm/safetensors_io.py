"""Reading a charlm .safetensors export (weights and metadata) as a checkpoint-shaped dict.

Apart from export.py, which writes these files, so that :func:`charlm.checkpoint.read` can
read them without importing the exporter (and the exporter imports checkpoint, not the
reverse). The optional ``safetensors`` package is imported where it is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from charlm import onnx_runtime
from charlm.errors import CheckpointError, first_line
from charlm.extras import require

SAFETENSORS_FORMAT = "charlm-safetensors"
SAFETENSORS_VERSION = 1


def read_safetensors(path: str | Path) -> dict[str, Any]:
    """A charlm .safetensors file as a checkpoint-shaped dict (config, vocab, model), which
    :func:`charlm.checkpoint.model_of` and ``vocab_of`` read like a .pt checkpoint."""
    safetensors = require("safetensors", "export", "reading a .safetensors file")
    require("safetensors.torch", "export", "reading a .safetensors file")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"safetensors file not found: {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path} is damaged or not a safetensors file ({first_line(exc)})"
        ) from None
    version, config, vocab = onnx_runtime.read_metadata(
        path, meta, SAFETENSORS_FORMAT, SAFETENSORS_VERSION, "safetensors"
    )
    return {
        "format": SAFETENSORS_FORMAT,
        "format_version": version,
        "charlm_version": meta.get("charlm_version"),
        "config": config,
        "vocab": list(vocab.chars),
        "model": tensors,
    }
