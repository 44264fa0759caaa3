"""``charlm train --dry-run``: what a run would train, without training it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from charlm.config import Config, to_toml, validate
from charlm.data.batching import scan_code_points
from charlm.model.network import build_model
from charlm.storage import checkpoint
from charlm.training import sizing


@dataclass
class DryRun:
    config_toml: str  # the resolved config, as the run directory's config.toml would hold it
    vocab_size: int
    num_parameters: int
    sized: bool = False  # the shape is chosen when training starts (charlm.training.sizing)
    config: Config | None = None  # the resolved config itself


def dry_run(text_path: str | Path, cfg: Config, base: dict[str, Any] | None = None) -> DryRun:
    """What ``charlm train`` would train, without training: the resolved config, and the
    vocabulary size (of the text, or of ``base``, a resumed or --init-from checkpoint) and
    the model's parameter count. Reads the text's characters (cached), nothing else."""
    validate(cfg)
    if base is not None:
        vocab_size = len(checkpoint.vocab_of(base))
    else:
        vocab_size = len(scan_code_points(text_path, cfg.data.encoding, cfg.data.errors,
                                          newline=cfg.data.newline))
    with torch.device("meta"):  # shapes only: no memory for the weights of a large model
        model = build_model(vocab_size, cfg.model)
    return DryRun(to_toml(cfg), vocab_size, model.num_parameters(),
                  sized=base is None and sizing.wanted(cfg), config=cfg)
