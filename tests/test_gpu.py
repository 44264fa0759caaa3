"""The CUDA path on a real GPU (skipped without CUDA; `benchmarks/gpu_check.py` runs these
first): the dtype the recurrent layers run in, exact resume with dropout between layers and
fp16 loss scaling, graph-captured sampling, a real out-of-memory error."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CONFIG

from charlm.api import load
from charlm.config import load_toml
from charlm.device import amp_plan, autocast
from charlm.errors import CharlmError
from charlm.model.network import Stepper, build_model
from charlm.model.stepper import GraphStep, make_step
from charlm.sampling.sampler import generate
from charlm.storage import checkpoint
from charlm.training.setup import train

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def gpu_cfg(**train_fields):
    cfg = load_toml(TINY_CONFIG)
    cfg.model.num_layers, cfg.model.dropout = 2, 0.3
    cfg.train.device, cfg.train.precision, cfg.train.sample_chars = "cuda", "fp16", 0
    cfg.train.max_steps, cfg.train.eval_every, cfg.train.log_every = 30, 10, 5
    for key, value in train_fields.items():
        setattr(cfg.train, key, value)
    return cfg


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_recurrent_layers_run_in_the_planned_dtype(cell, precision):
    cfg = load_toml(TINY_CONFIG).model
    cfg.cell = cell
    model = build_model(20, cfg).to(CUDA)
    seen = {}
    model.rnn.register_forward_hook(lambda mod, inp, out: seen.update(dtype=out[0].dtype))
    with autocast(CUDA, precision):
        model(torch.zeros(2, 5, dtype=torch.long, device=CUDA))
    assert seen["dtype"] == amp_plan(precision, CUDA, cell).rnn_dtype


def test_resume_with_dropout_between_layers_is_exact_on_cuda(text_file, tmp_path):
    train(text_file, gpu_cfg(), out_dir=tmp_path / "whole", progress=False)
    train(text_file, gpu_cfg(), out_dir=tmp_path / "parts", stop_at_step=15, progress=False)
    paused = checkpoint.load(tmp_path / "parts" / "last.pt")
    scaler = paused["train_state"]["scaler"]
    assert scaler["scale"] > 0 and set(scaler) >= {"scale", "_growth_tracker"}
    train(text_file, checkpoint.config_of(paused), out_dir=tmp_path / "parts", resume=paused,
          progress=False)
    whole = checkpoint.load(tmp_path / "whole" / "last.pt")
    parts = checkpoint.load(tmp_path / "parts" / "last.pt")
    for name, tensor in whole["model"].items():
        assert torch.equal(parts["model"][name], tensor), name
    assert whole["train_state"]["scaler"] == parts["train_state"]["scaler"]


def test_best_pt_holds_no_optimizer_state_and_last_pt_resumes(text_file, tmp_path):
    train(text_file, gpu_cfg(max_steps=10), out_dir=tmp_path / "r", progress=False)
    assert "optimizer" not in checkpoint.load(tmp_path / "r" / "best.pt")
    assert "optimizer" in checkpoint.load(tmp_path / "r" / "last.pt")


def test_graph_sampling_equals_eager_stepping(text_file, tmp_path, monkeypatch):
    train(text_file, gpu_cfg(max_steps=20), out_dir=tmp_path / "r", progress=False)
    model = load(tmp_path / "r" / "last.pt", "auto")
    assert model.device.startswith("cuda")  # auto is the GPU
    net, vocab = model.network, model.vocab
    assert isinstance(make_step(net, 2, net.init_state(2)), GraphStep)
    seed = vocab.encode("First").tolist()
    for streams in (1, 8):
        graph = generate(net, vocab, seed, 200, temperature=0.9, num_samples=streams,
                         random_seed=3)
        with monkeypatch.context() as m:
            m.setattr("charlm.sampling.sampler.make_step", lambda model, batch, state: Stepper(model))
            eager = generate(net, vocab, seed, 200, temperature=0.9, num_samples=streams,
                             random_seed=3)
        assert graph == eager


def test_out_of_gpu_memory_is_one_clear_error(text_file, tmp_path):
    cfg = gpu_cfg(batch_size=64, seq_len=64)
    cfg.model.hidden_size = 4096
    total = torch.cuda.get_device_properties(CUDA).total_memory
    torch.cuda.set_per_process_memory_fraction(256 * 2**20 / total)
    try:
        with pytest.raises(CharlmError, match="out of GPU memory.*--batch-size.*--hidden-size"):
            train(text_file, cfg, out_dir=tmp_path / "r", progress=False)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
