"""Process-group plumbing. A plain :class:`Dist` is the single-process case."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class Dist:
    """One process: rank 0 of a world of 1. Every collective is the identity."""

    rank = 0
    world = 1
    device: torch.device | None = None
    all_reduce_sum = None

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def broadcast_path(self, path: Path) -> Path:
        return path

    def gather_objects(self, obj: Any) -> list[Any]:
        return [obj]

    def any(self, flag: bool) -> bool:
        return flag

    def all_finite(self, loss: torch.Tensor) -> bool:
        return bool(torch.isfinite(loss))

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        return value
