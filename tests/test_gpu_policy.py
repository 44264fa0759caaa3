"""The GPU path's decisions, checked on the CPU: precision plans, stacked layers for exact
dropout, the sampling step. tests/test_gpu.py runs the same paths on a real GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from charlm.config import ModelConfig
from charlm.device import amp_plan, resolve_precision
from charlm.model.network import StackedRNN, Stepper, build_model
from charlm.model.stepper import make_step

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_cuda_autocast_runs_the_recurrent_layers_in_fp16_with_loss_scaling(precision, cell):
    # cuDNN's autocast wrapper casts RNN weights and inputs to fp16 whatever the dtype, so
    # every autocast precision on CUDA needs a GradScaler.
    plan = amp_plan(precision, CUDA, cell)
    assert plan.rnn_dtype == torch.float16
    assert plan.loss_scaling
    assert plan.autocast_dtype == (torch.bfloat16 if precision == "bf16" else torch.float16)
    assert "loss scaling" in plan.describe()


def test_fp32_has_no_autocast_and_no_scaler():
    for device in (CPU, CUDA):
        plan = amp_plan("fp32", device)
        assert (plan.autocast_dtype, plan.rnn_dtype, plan.loss_scaling) == (None, torch.float32,
                                                                               False)
        assert plan.describe() == "fp32"


def test_cpu_bf16_needs_no_scaler_and_gru_stays_fp32():
    assert amp_plan("bf16", CPU, "lstm").rnn_dtype == torch.bfloat16
    assert amp_plan("bf16", CPU, "gru").rnn_dtype == torch.float32
    assert not amp_plan("bf16", CPU, "lstm").loss_scaling


def test_auto_on_cuda_is_fp16():
    assert resolve_precision("auto", CUDA) == "fp16"


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_stacked_layers_keep_the_multi_layer_names_and_numbers(cell, one_thread):
    plain = ModelConfig(cell=cell, embed_size=8, hidden_size=16, num_layers=3, dropout=0.0)
    drop = ModelConfig(cell=cell, embed_size=8, hidden_size=16, num_layers=3, dropout=0.4)
    torch.manual_seed(0)
    fused, stacked = build_model(20, plain), build_model(20, drop)
    assert isinstance(fused.rnn, nn.RNNBase) and isinstance(stacked.rnn, StackedRNN)
    assert list(fused.state_dict()) == list(stacked.state_dict())
    stacked.load_state_dict(fused.state_dict())  # an old checkpoint loads into the new layout
    fused.load_state_dict(stacked.state_dict())  # and back
    ids = torch.randint(0, 20, (3, 9))
    fused.eval(), stacked.eval()
    with torch.no_grad():
        a, state_a = fused(ids, fused.init_state(3))
        b, state_b = stacked(ids, stacked.init_state(3))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for x, y in zip(*(s if isinstance(s, tuple) else (s,) for s in (state_a, state_b)),
                    strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)
    # Attribute access by the flat names (Stepper and the exporters read weights that way).
    assert stacked.rnn.weight_hh_l2 is stacked.rnn.layers[2].weight_hh_l0
    step = Stepper(stacked)
    with torch.no_grad():
        logits, _ = step(ids[:, 0], stacked.init_state(3))
    torch.testing.assert_close(logits, b[:, 0], atol=1e-5, rtol=1e-4)


def test_stacked_dropout_masks_come_from_torchs_generator(one_thread):
    cfg = ModelConfig(cell="lstm", embed_size=8, hidden_size=16, num_layers=2, dropout=0.5)
    model = build_model(20, cfg).train()
    ids = torch.randint(0, 20, (2, 12))
    torch.manual_seed(5)
    first, _ = model(ids)
    torch.manual_seed(5)
    again, _ = model(ids)
    other, _ = model(ids)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_single_layer_and_dropout_free_models_keep_the_fused_module():
    for layers, dropout in ((1, 0.3), (2, 0.0)):
        cfg = ModelConfig(cell="gru", num_layers=layers, dropout=dropout)
        assert isinstance(build_model(10, cfg).rnn, nn.GRU)


def test_sampling_step_is_the_eager_stepper_on_the_cpu():
    model = build_model(10, ModelConfig(cell="lstm", embed_size=4, hidden_size=8))
    assert isinstance(make_step(model, 2, model.init_state(2)), Stepper)


def test_scaler_state_round_trips_and_is_checked():
    from charlm.training.state import restore_scaler

    saved = torch.amp.GradScaler("cpu", init_scale=512.0, growth_interval=7, enabled=True)
    fresh = torch.amp.GradScaler("cpu", enabled=True)
    restore_scaler(saved.state_dict(), fresh)
    assert fresh.get_scale() == 512.0 and fresh.get_growth_interval() == 7
    restore_scaler(None, fresh)  # a checkpoint from fp32 or bf16: nothing to restore
    restore_scaler(saved.state_dict(), torch.amp.GradScaler("cpu", enabled=False))
    for bad in ({**saved.state_dict(), "scale": float("nan")},
                {**saved.state_dict(), "scale": -1.0},
                {**saved.state_dict(), "growth_interval": 2.5},
                {**saved.state_dict(), "_growth_tracker": "0"},
                {"scale": 1.0}, [1.0]):
        with pytest.raises((TypeError, ValueError)):
            restore_scaler(bad, torch.amp.GradScaler("cpu", enabled=True))


def test_out_of_gpu_memory_is_one_line_and_keeps_the_run(tiny_run, tmp_path, monkeypatch):
    import shutil

    from conftest import assert_clean_error, run_cli

    import charlm.training.loop

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = {p.name: p.read_bytes() for p in run.glob("*.pt")}

    def oom(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(charlm.training.loop.Loop, "train_step", oom)
    proc = run_cli("train", "--resume", run, "--max-steps", "60", "--no-progress")
    assert_clean_error(proc, "out of GPU memory", "--batch-size (now 8)", "--seq-len (now 16)",
                       "--hidden-size (now 32)", "unchanged")
    assert {p.name: p.read_bytes() for p in run.glob("*.pt")} == before
    monkeypatch.undo()
    proc = run_cli("train", "--resume", run, "--max-steps", "41", "--no-progress")
    assert proc.returncode == 0, proc.stderr  # the lock was released


def test_best_pt_has_no_optimizer_state_and_resuming_it_says_what_to_do(tiny_run):
    from conftest import assert_clean_error, run_cli

    from charlm.storage import checkpoint

    assert "optimizer" not in checkpoint.load(tiny_run / "best.pt")
    assert "optimizer" in checkpoint.load(tiny_run / "last.pt")
    proc = run_cli("train", "--resume", tiny_run / "best.pt", "--max-steps", "50")
    assert_clean_error(proc, "without the optimizer state", "last.pt", "--init-from")


def test_a_checkpoint_copy_shares_no_memory_with_the_live_tensors():
    from charlm.training.saver import detached_copy

    live = {"w": torch.ones(3), "nested": [torch.zeros(2), {"x": torch.arange(3)}], "n": 5}
    copy = detached_copy(live)
    live["w"].add_(1)
    live["nested"][0].add_(1)
    live["nested"][1]["x"].add_(1)
    assert copy["w"].tolist() == [1, 1, 1] and copy["nested"][0].tolist() == [0, 0]
    assert copy["nested"][1]["x"].tolist() == [0, 1, 2] and copy["n"] == 5
    assert detached_copy(live, clone_cpu=False)["w"].data_ptr() == live["w"].data_ptr()


def test_the_writer_writes_in_order_keeps_the_newest_and_reports_errors(tmp_path):
    from charlm.training.saver import CheckpointWriter

    def load(path):
        return torch.load(path, weights_only=True)

    writer = CheckpointWriter()
    for step in range(5):
        writer.submit({tmp_path / "best.pt": {"step": step}, tmp_path / "last.pt": {"step": step}})
    writer.close()
    assert load(tmp_path / "last.pt")["step"] == 4
    assert load(tmp_path / "best.pt")["step"] == 4
    broken = CheckpointWriter()
    broken.submit({tmp_path / "missing" / "last.pt": {"step": 1}})
    with pytest.raises(Exception, match="could not write|No such file"):
        broken.close()
