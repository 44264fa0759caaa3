"""What a resume restores, on made-up training states: no training runs here. The snapshot
and restore of charlm/state.py, for the same batch layout, another number of processes over
the same streams, another layout, and a damaged state."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from charlm.config import Config
from charlm.data.batching import Batcher
from charlm.errors import CheckpointError
from charlm.model.cells import CELLS
from charlm.training.distributed import Dist
from charlm.training.state import TrainState, restore, rng_state, snapshot

IDS = torch.arange(5000) % 50


def config(batch_size=4, seq_len=8, cell="lstm") -> Config:
    cfg = Config()
    cfg.model.cell, cfg.model.hidden_size, cfg.model.num_layers = cell, 3, 2
    cfg.train.batch_size, cfg.train.seq_len = batch_size, seq_len
    return cfg


def optimizer() -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=0.1)


def fake_resume(cfg: Config, world: int = 1, carried=True, **changes) -> dict:
    """A checkpoint as a run of ``world`` processes of cfg's layout saves it at step 37."""
    B, count = cfg.train.batch_size, len(CELLS[cfg.model.cell].states)
    rows = [[torch.full((2, B, 3), 10.0 * r + k) for k in range(count)] for r in range(world)]
    saved = {
        "step": 37, "epoch": 1.25, "batcher": {"epoch": 1, "index": 5},
        "carried_state": rows if carried else None,
        "rng": [rng_state() for _ in range(world)], "elapsed": 12.5, "chars_seen": 4736,
        "best_val_loss": 1.75, "evals_since_best": 2, "loss_sum": 6.0, "loss_count": 3,
        "world": world, "replicas": [],
    }
    saved.update(changes)
    return {"config": cfg.to_dict(), "optimizer": optimizer().state_dict(), "train_state": saved}


def fresh(cfg: Config, dist=None) -> tuple[TrainState, Batcher]:
    dist = dist or Dist()
    batcher = Batcher(IDS, cfg.train.batch_size * dist.world, cfg.train.seq_len, 0, dist.rank,
                      dist.world)
    return TrainState(loss_sum=torch.zeros(())), batcher


def test_same_layout_restores_every_counter_the_batcher_the_state_and_the_rng():
    cfg = config()
    resume = fake_resume(cfg)
    state, batcher = fresh(cfg)
    expected_draw = torch.rand(3)  # the draw right after rng_state() was taken
    torch.rand(5)  # move the generator on; restore must bring it back
    notes = restore(resume, state, batcher, optimizer(), cfg, Dist(), torch.device("cpu"))
    assert notes == []
    assert (state.step, state.elapsed, state.chars_seen) == (37, 12.5, 4736)
    assert (state.best_val_loss, state.evals_since_best, state.loss_count) == (1.75, 2, 3)
    assert float(state.loss_sum) == 6.0
    assert batcher.state_dict() == {"epoch": 1, "index": 5}
    h, c = state.carried
    assert torch.equal(h, torch.full((2, 4, 3), 0.0)) and torch.equal(c, torch.full((2, 4, 3), 1.0))
    assert torch.equal(torch.rand(3), expected_draw)


def test_gru_state_is_one_tensor_and_no_carried_state_stays_none():
    cfg = config(cell="gru")
    state, batcher = fresh(cfg)
    restore(fake_resume(cfg), state, batcher, optimizer(), cfg, Dist(), torch.device("cpu"))
    assert isinstance(state.carried, torch.Tensor) and state.carried.shape == (2, 4, 3)
    state, batcher = fresh(cfg)
    restore(fake_resume(cfg, carried=False), state, batcher, optimizer(), cfg, Dist(),
            torch.device("cpu"))
    assert state.carried is None


def test_another_number_of_processes_over_the_same_streams_takes_its_rows():
    """Saved by 2 processes of 4 streams; resumed as rank 1 of 4 processes of 2 streams:
    that rank carries streams 2 and 3, the second half of old rank 0's rows."""
    old = config(batch_size=4)
    cfg = config(batch_size=2)
    dist = SimpleNamespace(rank=1, world=4)
    state, batcher = fresh(cfg, dist)
    notes = restore(fake_resume(old, world=2), state, batcher, optimizer(), cfg, dist,
                    torch.device("cpu"))
    assert notes == ["resumed a 2-process run on 4 process(es) over the same 8 streams: "
                     "the data order is unchanged"]
    assert batcher.state_dict() == {"epoch": 1, "index": 5}
    h, c = state.carried
    assert h.shape == (2, 2, 3) and torch.equal(h, torch.zeros(2, 2, 3))  # old rank 0, h
    assert torch.equal(c, torch.ones(2, 2, 3))


def test_another_layout_goes_on_from_the_same_point_of_the_epoch_with_a_fresh_state():
    old = config(seq_len=8)
    cfg = config(seq_len=16)
    state, batcher = fresh(cfg)
    notes = restore(fake_resume(old), state, batcher, optimizer(), cfg, Dist(),
                    torch.device("cpu"))
    assert state.carried is None and state.step == 37
    one_window = 1 / batcher.steps_per_epoch
    assert batcher.epoch == 1 and math.isclose(batcher.progress, 1.25, abs_tol=one_window)
    assert len(notes) == 1 and "4x8x1 -> 4x16x1" in notes[0] and "not an exact continuation" in notes[0]


@pytest.mark.parametrize("damage", [
    lambda r: r["train_state"].pop("chars_seen"),
    lambda r: r.pop("optimizer"),
    lambda r: r["train_state"].update(rng="not a list of states"),
    lambda r: r["train_state"].update(carried_state=[[torch.zeros(1)]]),
])
def test_a_damaged_training_state_is_one_clear_error(damage):
    cfg = config()
    resume = fake_resume(cfg)
    damage(resume)
    state, batcher = fresh(cfg)
    with pytest.raises(CheckpointError, match="training state cannot be restored"):
        restore(resume, state, batcher, optimizer(), cfg, Dist(), torch.device("cpu"))


def test_snapshot_then_restore_is_the_identity():
    cfg = config()
    model = torch.nn.Linear(2, 2)
    state, batcher = fresh(cfg)
    batcher.load_state_dict({"epoch": 2, "index": 7})
    state.step, state.elapsed, state.chars_seen = 11, 3.0, 352
    state.best_val_loss, state.evals_since_best, state.loss_count = 2.5, 1, 2
    state.loss_sum += 4.0
    state.carried = (torch.randn(2, 4, 3), torch.randn(2, 4, 3))
    saved = snapshot(state, batcher, model, Dist(), elapsed=3.5)
    assert saved["elapsed"] == 3.5 and saved["world"] == 1 and saved["epoch"] == batcher.progress

    again, batcher2 = fresh(cfg)
    resume = {"config": cfg.to_dict(), "optimizer": optimizer().state_dict(), "train_state": saved}
    restore(resume, again, batcher2, optimizer(), cfg, Dist(), torch.device("cpu"))
    assert batcher2.state_dict() == batcher.state_dict()
    assert (again.step, again.chars_seen, again.loss_count) == (11, 352, 2)
    assert again.elapsed == 3.5 and float(again.loss_sum) == 4.0
    assert all(torch.equal(a, b) for a, b in zip(again.carried, state.carried, strict=True))
