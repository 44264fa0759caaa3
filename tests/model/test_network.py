"""Model: full-sequence output equals step-by-step output for every cell; state shapes."""

from __future__ import annotations

import pytest
import torch

from charlm.config import ModelConfig
from charlm.model.network import (
    Stepper,
    build_model,
    detach_state,
    select_state,
    state_from_tensors,
    state_tensors,
    step_context,
)

CELLS = ["rnn", "lstm", "gru"]
V, B, T = 13, 3, 11


pytestmark = pytest.mark.usefixtures("one_thread")


def make(cell: str, num_layers: int = 2, dropout: float = 0.3):
    torch.manual_seed(0)
    cfg = ModelConfig(cell=cell, embed_size=8, hidden_size=16, num_layers=num_layers,
                      dropout=dropout)
    return build_model(V, cfg).eval()


def step_by_step(model, ids, state=None):
    outputs = []
    for t in range(ids.size(1)):
        logits, state = model(ids[:, t : t + 1], state)  # (B, 1, V)
        outputs.append(logits)
    return torch.cat(outputs, dim=1), state


def assert_states_close(a, b):
    for x, y in zip(state_tensors(a), state_tensors(b), strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("stepping", ["plain", "step_context"])
def test_full_sequence_equals_step_by_step(cell, stepping):
    model = make(cell)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, full_state = model(ids)
        assert full.shape == (B, T, V)
        if stepping == "step_context":
            with step_context(torch.device("cpu")):
                steps, step_state = step_by_step(model, ids)
        else:
            steps, step_state = step_by_step(model, ids)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-4)
    assert_states_close(step_state, full_state)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("num_layers", [1, 3])
def test_sampling_stepper_equals_full_sequence(cell, num_layers):
    """The sampler's single-step path (plain matrix products) computes the same function."""
    model = make(cell, num_layers=num_layers)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full, full_state = model(ids)
        step = Stepper(model)
        state = model.init_state(B)
        outputs = []
        for t in range(T):
            logits, state = step(ids[:, t], state)  # (B, V)
            outputs.append(logits)
    torch.testing.assert_close(torch.stack(outputs, 1), full, atol=1e-5, rtol=1e-4)
    assert_states_close(state, full_state)
    # It carries on from a state the full model produced (the warmed-up seed).
    with torch.no_grad():
        _, warm = model(ids[:, :4])
        logits, _ = step(ids[:, 4], warm)
    torch.testing.assert_close(logits, full[:, 4], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cell", CELLS)
def test_carried_state_equals_one_long_window(cell):
    """Two windows with the state carried equal one window over both (truncated BPTT only
    cuts gradients, never the forward computation)."""
    model = make(cell, num_layers=1, dropout=0.0)
    ids = torch.randint(0, V, (B, 2 * T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole, _ = model(ids)
        first, state = model(ids[:, :T])
        second, _ = model(ids[:, T:], detach_state(state))
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cell", CELLS)
def test_init_state(cell):
    model = make(cell, num_layers=3)
    state = model.init_state(5)
    tensors = state_tensors(state)
    assert len(tensors) == (2 if cell == "lstm" else 1)
    assert isinstance(state, tuple) == (cell == "lstm")
    for t in tensors:
        assert t.shape == (3, 5, 16) and t.dtype == torch.float32 and not t.any()
    # A zero state is the same as no state.
    ids = torch.randint(0, V, (5, 4))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, state)[0], model(ids)[0])
    # The pieces rebuild the same kind of state.
    rebuilt = state_from_tensors(tensors, cell)
    assert isinstance(rebuilt, tuple) == (cell == "lstm")
    picked = select_state(state, torch.tensor([0, 2]))
    assert all(t.shape == (3, 2, 16) for t in state_tensors(picked))


def test_init_state_follows_model_dtype():
    model = make("gru").double()
    assert model.init_state(2).dtype == torch.float64


def test_detach_state_cuts_graph_and_keeps_fp32():
    model = make("lstm").train()
    _, state = model(torch.randint(0, V, (2, 3)))
    assert all(t.requires_grad for t in state)
    h, c = detach_state((state[0].bfloat16(), state[1]))
    assert not h.requires_grad and not c.requires_grad and h.dtype == torch.float32


def test_dropout_only_in_training():
    model = make("lstm", num_layers=2, dropout=0.5)
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        assert torch.equal(model(ids)[0], model(ids)[0])
        model.train()
        assert not torch.equal(model(ids)[0], model(ids)[0])


def test_single_layer_accepts_dropout_without_warning(recwarn):
    make("gru", num_layers=1, dropout=0.2)
    assert not [w for w in recwarn if "dropout" in str(w.message)]


def test_parameter_count():
    model = make("rnn", num_layers=1, dropout=0.0)
    # embedding + W_ih, W_hh, b_ih, b_hh + head weight and bias
    assert model.num_parameters() == V * 8 + (16 * 8 + 16 * 16 + 16 + 16) + (V * 16 + V)
