"""The models a server serves, by name: every file ``charlm sample -c`` takes (a ``.pt``
checkpoint, a ``.safetensors`` export, a run directory), loaded and checked by the same code
(:func:`charlm.api.load`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charlm.errors import ConfigError, printable

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


@dataclass
class Served:
    """One model: its name, its file, the loaded :class:`charlm.api.Model` and its card."""

    name: str
    path: Path
    model: Any  # charlm.api.Model
    card: dict[str, Any] = field(default_factory=dict)


def model_name(path: Path) -> str:
    """The name a model is served under when none is given: its run directory's name for a
    run's checkpoint (runs/input-gru/best.pt -> input-gru), else the file's stem."""
    from charlm.runs.directory import CHECKPOINT_NAMES

    path = Path(path)
    stem = path.parent.name if path.name in CHECKPOINT_NAMES and path.parent.name else path.stem
    name = re.sub(r"[^A-Za-z0-9._:-]", "-", stem).lstrip("-._:")[:64]
    return name or "model"


def parse_model_option(text: str) -> tuple[str, str]:
    """``NAME=PATH`` of ``--model``."""
    name, sep, path = text.partition("=")
    if not sep or not path:
        raise ConfigError(f"--model takes NAME=PATH (e.g. shakespeare=runs/input-gru); got "
                          f"{printable(text)!r}")
    check_name(name)
    return name, path


def check_name(name: str) -> None:
    if not NAME.fullmatch(name):
        raise ConfigError(f"model name {printable(name)!r} must be 1 to 64 letters, digits, "
                          "'.', '_', ':' or '-', starting with a letter or digit")


def card_of(path: Path, model: Any) -> dict[str, Any]:
    """What /v1/models and the page show of a model."""
    from charlm.storage import checkpoint

    if model.device == "onnxruntime":  # the export holds its config and vocabulary only
        m = model.config.model
        return {"cell": m.cell, "embed_size": m.embed_size, "hidden_size": m.hidden_size,
                "num_layers": m.num_layers, "parameters": None, "vocab_size": len(model.vocab),
                "best_val_loss": None, "train_file": None, "steps": None,
                "charlm_version": None, "weights": "onnx"}
    d = checkpoint.describe(checkpoint.read(path))
    return {
        "cell": d["cell"], "embed_size": d["embed_size"], "hidden_size": d["hidden_size"],
        "num_layers": d["num_layers"], "parameters": d["parameters"],
        "vocab_size": d["vocab_size"], "best_val_loss": d["best_val_loss"],
        "train_file": d["train_file"].get("name"), "steps": d["steps"],
        "charlm_version": d["charlm_version"],
    }


def load_models(named: list[tuple[str, Path]], device: str = "auto") -> list[Served]:
    """Load each (name, checkpoint path) with :func:`charlm.api.load`; names must differ."""
    from charlm.api import load

    seen: dict[str, Path] = {}
    served = []
    for name, path in named:
        check_name(name)
        if name in seen:
            raise ConfigError(f"two models are named {name!r} ({seen[name]} and {path}); "
                              "name them with --model NAME=PATH")
        seen[name] = path
        onnx = Path(path).suffix.lower() == ".onnx"
        lm = load(path, "cpu" if onnx and device == "auto" else device)
        served.append(Served(name, Path(path), lm, card_of(Path(path), lm)))
    if not served:
        raise ConfigError("no model to serve; pass a run directory or a checkpoint")
    return served
