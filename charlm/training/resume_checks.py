"""Checks of the training state a ``--resume`` checkpoint claims, before anything uses it.

A checkpoint loads with ``weights_only=True``, so it cannot run code, but its tensors can still
lie: an optimizer moment that is a broadcast view (``torch.zeros(1).expand(128, 16)``) or has
the wrong size passes ``Optimizer.load_state_dict``, and the fused AdamW kernel then writes past
its buffer (heap corruption, a crash at best). So every tensor is checked against what this
run expects (shape, dtype, kind) and copied into fresh contiguous memory; anything else is a
one-line :class:`CheckpointError`.

Shapes: L layers, B streams per process, H hidden.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch

from charlm.config import ModelConfig
from charlm.errors import CheckpointError
from charlm.model.cells import CELLS

ADAMW_KEYS = {"step", "exp_avg", "exp_avg_sq"}
# Larger counts than any run reaches, small enough for every int64 computation on them.
MAX_COUNT = 2**62


def _bad(what: str) -> CheckpointError:
    return CheckpointError(f"the checkpoint's training state cannot be restored ({what})")


def _copy(t: Any, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> torch.Tensor:
    """A fresh contiguous CPU copy of ``t``, which must be a dense tensor of ``shape`` whose
    dtype converts to ``dtype`` without changing kind (float to float, bytes to bytes)."""
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
        raise _bad(f"{what} is not a tensor")
    if tuple(t.shape) != tuple(shape):
        raise _bad(f"{what} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype.is_floating_point != dtype.is_floating_point or t.is_complex():
        raise _bad(f"{what} has dtype {t.dtype}, expected {dtype}")
    if t.dtype != dtype and not dtype.is_floating_point:
        raise _bad(f"{what} has dtype {t.dtype}, expected {dtype}")
    return torch.empty(shape, dtype=dtype).copy_(t.detach().cpu())


def _number(value: Any, what: str, kind: type = int, low: float = 0, inf_ok: bool = False):
    """``value`` as ``kind``: an int (or a float, for float fields) >= ``low``, finite."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and kind is float:
        value = value.item()
    ok = isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        ok = ok or isinstance(value, float)
    if not ok:
        raise _bad(f"{what} is {type(value).__name__}, expected {kind.__name__}")
    if isinstance(value, int) or math.isfinite(value):  # ints may be beyond any float
        ok = low <= value <= MAX_COUNT
    else:  # no evaluation yet: the best loss is still inf
        ok = inf_ok and value == math.inf
    if not ok:
        raise _bad(f"{what} is out of range: {value!r}")
    return kind(value)


def optimizer_state(saved: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The AdamW state of a checkpoint, checked entry by entry against ``optimizer``'s
    parameters, with every tensor a fresh contiguous copy; ready for ``load_state_dict``.

    The hyperparameters (betas, eps, weight decay, fused) are this run's own: they come from
    the config, which is the checkpoint's unless overridden, and the learning rate is set at
    every step anyway."""
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
        raise _bad("no valid optimizer state")
    ours = optimizer.state_dict()["param_groups"]
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(ours) or any(
        not isinstance(g, dict) or g.get("params") != o["params"]
        for g, o in zip(groups, ours, strict=True)
    ):
        raise _bad("the optimizer's parameter groups do not match the model")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for index, entry in saved["state"].items():
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(params):
            raise _bad(f"optimizer state for unknown parameter {index!r}")
        if not isinstance(entry, dict) or set(entry) != ADAMW_KEYS:
            keys = sorted(map(str, entry)) if isinstance(entry, dict) else type(entry).__name__
            raise _bad(f"optimizer state of parameter {index} holds {keys}, expected "
                       f"{sorted(ADAMW_KEYS)}")
        p = params[index]
        what = f"optimizer state {{}} of parameter {index}"
        step = entry["step"]
        if isinstance(step, torch.Tensor) and (step.numel() != 1 or step.is_complex()):
            raise _bad(f"{what.format('step')} is not a single number")
        step = _number(float(step.item()) if isinstance(step, torch.Tensor) else step,
                       what.format("step"), float)
        state[index] = {
            # AdamW keeps the step as a float32 tensor (moved to the device when fused).
            "step": torch.tensor(step, dtype=torch.float32),
            "exp_avg": _copy(entry["exp_avg"], tuple(p.shape), p.dtype, what.format("exp_avg")),
            "exp_avg_sq": _copy(entry["exp_avg_sq"], tuple(p.shape), p.dtype,
                                what.format("exp_avg_sq")),
        }
    return {"state": state, "param_groups": ours}


def _rng(state: Any, what: str) -> dict[str, Any]:
    """One process's random states (see ``charlm.training.setup.rng_state``), as fresh copies."""
    if not isinstance(state, dict) or not isinstance(state.get("python"), list | tuple):
        raise _bad(f"{what} is not a random state")
    python = state["python"]
    ours = random.getstate()  # (3, 625 ints below 2**32, the last an index <= 624, gauss)
    ok = (len(python) == 3 and python[0] == ours[0] and isinstance(python[1], list | tuple)
          and len(python[1]) == len(ours[1]) and (python[2] is None or isinstance(python[2], float))
          and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32
                  for v in python[1]))
    if not ok:
        raise _bad(f"{what} has no valid Python random state")
    checked = {"python": [python[0], list(python[1]), python[2]]}
    size = torch.get_rng_state().numel()
    checked["torch"] = _copy(state.get("torch"), (size,), torch.uint8, f"{what} (torch)")
    if "cuda" in state:
        cuda = state["cuda"]
        if not isinstance(cuda, list | tuple):
            raise _bad(f"{what} has no valid CUDA random state")
        checked["cuda"] = [
            _copy(t, tuple(getattr(t, "shape", ())), torch.uint8, f"{what} (cuda)")
            for t in cuda
        ]
        if any(t.dim() != 1 for t in checked["cuda"]):
            raise _bad(f"{what} has no valid CUDA random state")
    return checked


def _carried(saved: Any, model: ModelConfig, rows: int, world: int) -> list | None:
    """The carried states of every process, each ``world`` entries of 1 (2 for lstm) tensors
    (L, rows, H), as fresh float32 copies."""
    if saved is None:
        return None
    n = len(CELLS[model.cell].states)
    if not isinstance(saved, list | tuple) or len(saved) != world:
        raise _bad(f"the carried state does not hold one entry per process ({world})")
    shape = (model.num_layers, rows, model.hidden_size)
    out = []
    for rank, tensors in enumerate(saved):
        if not isinstance(tensors, list | tuple) or len(tensors) != n:
            raise _bad(f"the carried state of process {rank} is not {n} tensor(s)")
        out.append([_copy(t, shape, torch.float32, f"the carried state of process {rank}")
                    for t in tensors])
    return out


def train_state(ts: Any, model: ModelConfig, batch_size: int) -> dict[str, Any]:
    """The ``train_state`` of a checkpoint, every field checked, tensors copied.

    ``model`` and ``batch_size`` are the checkpoint's own (its validated config): the carried
    state was saved with those shapes."""
    if not isinstance(ts, dict):
        raise _bad("no valid training state")
    try:
        out = dict(ts)
        world = out["world"] = _number(ts.get("world", 1), "world", low=1)
        for key in ("step", "chars_seen", "evals_since_best", "loss_count"):
            out[key] = _number(ts[key], key)
        for key in ("elapsed", "epoch"):
            out[key] = _number(ts[key], key, float)
        out["best_val_loss"] = _number(ts["best_val_loss"], "best_val_loss", float, inf_ok=True)
        out["loss_sum"] = _number(ts["loss_sum"], "loss_sum", float, low=-math.inf)
        batcher = ts["batcher"]
        if not isinstance(batcher, dict):
            raise _bad("the data position is not valid")
        out["batcher"] = {k: _number(batcher[k], f"batcher.{k}") for k in ("epoch", "index")}
        out["carried_state"] = _carried(ts["carried_state"], model, batch_size, world)
        rngs = ts["rng"]
        if not isinstance(rngs, list | tuple) or not 1 <= len(rngs) <= world:
            raise _bad("the random states do not match the number of processes")
        out["rng"] = [_rng(s, f"random state {r}") for r, s in enumerate(rngs)]
    except KeyError as exc:
        raise _bad(f"no {exc.args[0]!r}") from None
    return out
