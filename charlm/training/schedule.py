"""The optimizer and its learning-rate schedule: AdamW with linear warmup, then cosine decay
to a floor over the planned run (the nearest of its limits)."""

from __future__ import annotations

import math

import torch


def lr_at(step: int, progress: float, cfg) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` as
    ``progress`` (fraction of the planned run done) goes from 0 to 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def planned_progress(step: int, elapsed: float, epochs: float, cfg) -> float:
    """How far the run is through its limits (the nearest one wins)."""
    fractions = [0.0]
    if cfg.max_steps:
        fractions.append(step / cfg.max_steps)
    if cfg.max_time:
        fractions.append(elapsed / cfg.max_time)
    if cfg.max_epochs:
        fractions.append(epochs / cfg.max_epochs)
    return max(fractions)


def _param_groups(model, weight_decay: float):
    # Weight decay on matrices only: not on biases, and not on the embedding table.
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def make_optimizer(model, cfg, device: torch.device) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg.weight_decay)
    try:  # fused kernels exist for CPU and CUDA in recent torch
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99))
