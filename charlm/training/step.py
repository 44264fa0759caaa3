"""One training step and what it works with: :class:`Setup` (the model, optimizer, data and
precision that :func:`charlm.training.setup.setup` makes on every process) and
:func:`optimizer_step`, the step the loop takes and automatic sizing times (one definition,
so sizing always times the step that trains)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from charlm.config import Config
from charlm.data.batching import Batcher
from charlm.data.vocab import Vocab
from charlm.device import AmpPlan
from charlm.model.network import CharRNN, State
from charlm.training.distributed import Dist


@dataclass
class Setup:
    """What the loop works with, made once by :func:`charlm.training.setup.setup` on every process."""

    cfg: Config
    dist: Dist
    device: torch.device
    precision: str
    source_info: dict[str, Any]  # name, size, sha256 and path of the training text
    chars: int  # characters of text, training and validation
    vocab: Vocab
    val_ids: torch.Tensor
    batcher: Batcher
    model: CharRNN
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: Any  # the autocast context of the precision
    plan: AmpPlan  # what the precision means here (autocast dtype, recurrent dtype, scaling)
    sample_seed: str  # samples continue the start of the training text
    notes: list[str]
    vocab_growth: list[dict[str, Any]]  # --grow-vocab records, kept through fine-tuning
    sizing: Any = None  # what automatic sizing chose (a training.sizing.Choice), when it ran


@dataclass
class StepResult:
    loss: torch.Tensor  # of the batch, on the device (reading it would sync)
    grad_norm: torch.Tensor  # before clipping
    state: State  # the recurrent state after the batch, not detached
    taken: bool  # False: ``check`` refused the step, and the weights are as they were


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, amp: Any, x: torch.Tensor, y: torch.Tensor,
                   carried: State | None, grad_clip: float, *,
                   forward: torch.nn.Module | None = None,
                   check: Callable[[torch.Tensor, torch.Tensor], bool] | None = None) -> StepResult:
    """The training step, the one the loop takes and automatic sizing times: the forward
    pass from ``carried`` under the precision's autocast context ``amp``, the cross-entropy
    loss of predicting ``y`` from ``x`` (both (B, T)), the backward pass through the gradient
    ``scaler``, the gradient norm clipped to ``grad_clip`` (0: not clipped) and the optimizer
    step, unless ``check(loss, grad_norm)`` refuses it (the NaN guard; the gradients are left
    for the caller). ``forward``: the module to call instead of ``model`` (DDP's wrapper)."""
    with amp:
        logits, new_state = (model if forward is None else forward)(x, carried)  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(
        model.parameters(), grad_clip if grad_clip > 0 else math.inf
    )
    if check is not None and not check(loss, grad_norm):
        return StepResult(loss, grad_norm, new_state, taken=False)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm, new_state, taken=True)
