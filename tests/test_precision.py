"""bf16 autocast on the CPU, against fp32, with tolerances derived for bf16.

The rest of the suite either pins fp32 (where it compares numbers tightly) or trains with
``CHARLM_TEST_PRECISION`` (see conftest.py); this file is where bf16 itself is checked, on CPUs
that run it natively, and skipped cleanly elsewhere.

Tolerances: bf16 keeps 8 significant bits, so one rounding is off by at most u = 2**-8 of
the value. The logits here come from a few products of length <= 48, so each logit is within
8u of its size (plus 8u absolute) of the fp32 one. A mean cross-entropy moves by at most twice
the largest change of a logit (logsumexp and the target's logit each move by at most that
much), which is the bound the forward test asserts. Training compounds the differences: after
30 steps the logged losses measured 1e-4 apart (relative) on AVX512-BF16; the test allows 1e-2,
still far below the gap between a trained and an untrained model (> 15%).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CONFIG

from charlm.config import load_toml
from charlm.device import autocast, cpu_has_fast_bf16, resolve_precision
from charlm.model.network import build_model
from charlm.runs.directory import read_metrics
from charlm.training.setup import train

pytestmark = pytest.mark.skipif(
    not cpu_has_fast_bf16(), reason="this CPU has no native bf16 (AVX512-BF16 or AMX)"
)
CPU = torch.device("cpu")


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_bf16_forward_runs_in_bf16_and_stays_close_to_fp32(cell, one_thread):
    cfg = load_toml(TINY_CONFIG)
    cfg.model.cell = cell
    torch.manual_seed(0)
    model = build_model(50, cfg.model).eval()
    x = torch.randint(0, 50, (4, 32))
    y = torch.randint(0, 50, (4, 32))
    with torch.no_grad():
        ref, _ = model(x, model.init_state(4))  # (B, T, V)
        with autocast(CPU, resolve_precision("bf16", CPU)):
            low, _ = model(x, model.init_state(4))
    assert low.dtype == torch.bfloat16  # the head's matmul really ran in bf16
    low = low.float()
    assert not torch.equal(low, ref)
    u = 2.0**-8
    worst = float((low - ref).abs().max())
    assert worst <= 8 * u * (1 + float(ref.abs().max()))
    loss_ref = float(F.cross_entropy(ref.flatten(0, 1), y.flatten()))
    loss_low = float(F.cross_entropy(low.flatten(0, 1), y.flatten()))
    assert abs(loss_low - loss_ref) <= 2 * worst


def test_bf16_training_follows_fp32(text_file, tmp_path, one_thread):
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = load_toml(TINY_CONFIG)
        t = cfg.train
        t.precision, t.device, t.threads = precision, "cpu", 1
        t.max_steps, t.eval_every, t.log_every, t.sample_chars = 30, 30, 10, 0
        result = train(text_file, cfg, out_dir=tmp_path / precision, progress=False)
        assert result.precision == precision
        runs[precision] = {(r["kind"], r["step"]): r.get("loss", r.get("val_loss"))
                           for r in read_metrics(tmp_path / precision / "metrics.jsonl")}
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert set(fp32) == set(bf16)
    assert fp32 != bf16  # bf16 autocast changed the arithmetic
    for key, value in fp32.items():
        assert bf16[key] == pytest.approx(value, rel=1e-2), key
    # It learned: the last train loss is well below the uniform guess, log(V).
    vocab = len(set(text_file.read_text(encoding="utf-8")))
    assert bf16[("train", 30)] < math.log(vocab) - 0.5


def test_bf16_evaluation_runs_a_gru_in_bf16_and_matches_fp32(one_thread):
    from charlm.evaluate import _eval_forward, mean_loss

    cfg = load_toml(TINY_CONFIG).model
    cfg.cell = "gru"
    torch.manual_seed(0)
    model = build_model(30, cfg).eval()
    amp = autocast(CPU, "bf16")
    forward = _eval_forward(model, amp)
    assert forward is not model  # autocast alone would leave the GRU in fp32
    with torch.no_grad(), amp:
        logits, state = forward(torch.randint(0, 30, (2, 9)), None)
    assert state.dtype == torch.bfloat16 and logits.dtype == torch.bfloat16
    ids = torch.randint(0, 30, (5000,))
    ref = mean_loss(model, ids, 8, 64)
    low = mean_loss(model, ids, 8, 64, amp)
    assert low == pytest.approx(ref, rel=1e-2) and low != ref
    assert _eval_forward(model, None) is model  # fp32: the model itself
