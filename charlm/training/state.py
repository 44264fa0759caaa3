"""What a resume restores: the counters of a run (:class:`TrainState`), and their round trip
through a checkpoint's ``train_state`` (:func:`snapshot`, :func:`restore`).

A resumed run goes on bit for bit as if it had never stopped: the optimizer, every random
generator, the batcher's place in its epoch, the recurrent state carried by each stream and
the partial sums of the current log interval are all saved and restored. When the number
of processes changes over the same streams, each process takes its rows of the carried
state; when the batch layout itself changes, the run goes on from the same point of the
epoch with a fresh state, and says so.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch

from charlm.config import Config
from charlm.data.batching import Batcher
from charlm.errors import CheckpointError, first_line
from charlm.model.network import State, state_from_tensors, state_tensors
from charlm.storage import checkpoint
from charlm.training import resume_checks as resume_state
from charlm.training.distributed import Dist, restack_rows


@dataclass
class TrainState:
    """The counters of a run that a checkpoint carries from one process to the next."""

    step: int = 0
    elapsed: float = 0.0  # seconds trained before this process started
    chars_seen: int = 0  # over all processes
    best_val_loss: float = math.inf
    evals_since_best: int = 0  # for train.patience
    # The current log interval's training loss, summed on the device (no sync per step).
    loss_sum: torch.Tensor | None = None
    loss_count: int = 0
    carried: State | None = None  # the recurrent state each stream carries (truncated BPTT)


def rng_state() -> dict[str, Any]:
    """Every random state, as tensors and plain lists (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


def snapshot(ts: TrainState, batcher: Batcher, model: torch.nn.Module, dist: Dist,
             elapsed: float) -> dict[str, Any]:
    """The checkpoint's ``train_state``. Every process calls it (it gathers each process's
    carried state and random state); rank 0 writes the result."""
    states = dist.gather_objects(
        None if ts.carried is None else [t.cpu() for t in state_tensors(ts.carried)]
    )
    rngs = dist.gather_objects(rng_state())
    replicas = dist.replica_digests(model)  # raises if the processes' copies differ
    return {
        "step": ts.step, "epoch": batcher.progress, "batcher": batcher.state_dict(),
        "carried_state": None if states[0] is None else states,
        "rng": rngs, "elapsed": elapsed, "chars_seen": ts.chars_seen,
        "best_val_loss": ts.best_val_loss, "evals_since_best": ts.evals_since_best,
        # The mean over processes, so that each can go on from it after a resume.
        "loss_sum": float(dist.mean(ts.loss_sum)), "loss_count": ts.loss_count,
        "world": dist.world, "replicas": replicas,
    }


def restore(resume: dict[str, Any], ts: TrainState, batcher: Batcher,
            optimizer: torch.optim.Optimizer, cfg: Config, dist: Dist,
            device: torch.device, scaler: torch.amp.GradScaler | None = None) -> list[str]:
    """Put a checkpoint's training state into ``ts``, ``batcher``, ``optimizer``, the
    gradient ``scaler`` and the random generators. Returns notes for the user; raises
    CheckpointError when it cannot."""
    if "optimizer" not in resume:
        raise CheckpointError(
            "the checkpoint's training state cannot be restored: it holds the weights without "
            "the optimizer state, as best.pt does; resume from last.pt or the run directory, or "
            "start a new run from these weights with --init-from"
        )
    try:
        notes = _restore(resume, ts, batcher, optimizer, cfg, dist, device)
        restore_scaler(resume["train_state"].get("scaler"), scaler)
        return notes
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise CheckpointError(
            f"the checkpoint's training state cannot be restored ({first_line(exc)})"
        ) from None


SCALER_FIELDS = {"scale": float, "growth_factor": float, "backoff_factor": float,
                 "growth_interval": int, "_growth_tracker": int}


def restore_scaler(saved: Any, scaler: torch.amp.GradScaler | None) -> None:
    """Go on at the saved loss scale (fp16). A checkpoint from another precision has none,
    or has one that this run does not use: the scaler then starts afresh."""
    if saved is None or scaler is None or not scaler.is_enabled():
        return
    if not isinstance(saved, dict) or set(saved) != set(SCALER_FIELDS):
        raise ValueError("the saved gradient scaler state has other fields")
    for key, kind in SCALER_FIELDS.items():
        value = saved[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"gradient scaler {key} is a {type(value).__name__}")
        if not (math.isfinite(value) and value >= 0) or (kind is int and value != int(value)):
            raise ValueError(f"gradient scaler {key} is {value!r}")
    if not saved["scale"] > 0:
        raise ValueError("gradient scaler scale must be positive")
    scaler.load_state_dict({k: kind(saved[k]) for k, kind in SCALER_FIELDS.items()})


def _restore(resume, ts, batcher, optimizer, cfg, dist, device) -> list[str]:
    old_cfg = checkpoint.config_of(resume)
    # Every tensor checked against this run and copied: a crafted one (a broadcast view, a
    # wrong size) would otherwise let the fused optimizer step write past its buffers.
    saved = resume_state.train_state(resume["train_state"], old_cfg.model,
                                     old_cfg.train.batch_size)
    optimizer.load_state_dict(resume_state.optimizer_state(resume["optimizer"], optimizer))
    ts.step, ts.elapsed, ts.chars_seen = saved["step"], saved["elapsed"], saved["chars_seen"]
    ts.best_val_loss, ts.evals_since_best = saved["best_val_loss"], saved["evals_since_best"]
    ts.loss_sum += saved["loss_sum"]
    ts.loss_count = saved["loss_count"]
    old_tc = old_cfg.train
    B, T = cfg.train.batch_size, cfg.train.seq_len
    old = (old_tc.batch_size, old_tc.seq_len, saved.get("world", 1))
    notes = []
    if old_cfg.data.val_fraction != cfg.data.val_fraction:
        notes.append(
            f"data.val_fraction changed ({old_cfg.data.val_fraction:g} -> "
            f"{cfg.data.val_fraction:g}): validation losses from before the resume, and "
            "best.pt's, were measured on another split"
        )
    if old == (B, T, dist.world):
        batcher.load_state_dict(saved["batcher"])
        if saved["carried_state"] is not None:
            tensors = [t.to(device) for t in saved["carried_state"][dist.rank]]
            ts.carried = state_from_tensors(tensors, cfg.model.cell)
    elif old[1] == T and old[0] * old[2] == B * dist.world:
        # Another number of processes over the same streams: the same windows, so the data
        # order and each stream's carried state go on exactly.
        batcher.load_state_dict(saved["batcher"])
        if saved["carried_state"] is not None:
            tensors = [t.to(device) for t in restack_rows(saved["carried_state"], dist.rank, B)]
            ts.carried = state_from_tensors(tensors, cfg.model.cell)
        notes.append(
            f"resumed a {old[2]}-process run on {dist.world} process(es) over the same "
            f"{B * dist.world} streams: the data order is unchanged"
        )
    else:
        # The saved (epoch, index) and carried state describe other windows: go on from the
        # same point of the epoch with a fresh state.
        seek(batcher, float(saved["epoch"]))
        notes.append(
            f"batch_size x seq_len x processes changed ({old[0]}x{old[1]}x{old[2]} -> "
            f"{B}x{T}x{dist.world}): resumed at epoch {batcher.progress:.3f} with a fresh "
            "state, not an exact continuation"
        )
    if dist.rank < len(saved["rng"]):  # a new rank keeps its own seed
        set_rng_state(saved["rng"][dist.rank])
    return notes


def seek(batcher: Batcher, progress: float) -> None:
    """Move ``batcher`` to ``progress`` epochs (a fraction), at a window boundary."""
    epoch = int(progress)
    batcher.load_state_dict({"epoch": epoch, "index": 0})
    index = round((progress - epoch) * batcher.steps_per_epoch)
    batcher.load_state_dict({"epoch": epoch, "index": index})
