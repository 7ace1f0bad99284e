"""preserved_state: one helper leaves the user's model, optimizer and RNG as found, bitwise."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from nndiag.capture.state import preserved_state


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(8, 3))


def _trained(model: nn.Module) -> torch.optim.Optimizer:
    """An optimizer with state (Adam moments, step counts) and .grad on every parameter."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(10, 6)).pow(2).mean().backward()
        optimizer.step()
    return optimizer


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "buffers": [b.clone() for b in model.buffers()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "groups": [dict(g, params=None) for g in optimizer.state_dict()["param_groups"]],
        "opt_state": [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                      for s in optimizer.state.values()],
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
    }


def _assert_same(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved["state"][key]), key
    for buf, before in zip(model.buffers(), saved["buffers"], strict=True):
        assert torch.equal(buf, before)
    for p, g in zip(model.parameters(), saved["grads"], strict=True):
        assert (g is None and p.grad is None) or torch.equal(p.grad, g)
    assert [m.training for m in model.modules()] == saved["modes"]
    assert [p.requires_grad for p in model.parameters()] == saved["requires_grad"]
    groups = [dict(g, params=None) for g in optimizer.state_dict()["param_groups"]]
    assert groups == saved["groups"]
    for now, before in zip(optimizer.state.values(), saved["opt_state"], strict=True):
        assert now.keys() == before.keys()
        for key, value in before.items():
            assert torch.equal(now[key], value) if torch.is_tensor(value) else now[key] == value
    assert torch.equal(torch.get_rng_state(), saved["torch_rng"])
    assert random.getstate() == saved["python_rng"]
    numpy_now, numpy_before = np.random.get_state(), saved["numpy_rng"]
    assert numpy_now[0] == numpy_before[0] and np.array_equal(numpy_now[1], numpy_before[1])
    assert numpy_now[2:] == numpy_before[2:]


def _meddle(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Change everything the helper promises to restore."""
    model.train()
    model[1].eval()
    for _ in range(3):  # trains: weights, BN running stats, .grad and Adam moments all move
        optimizer.zero_grad()
        model(torch.randn(10, 6)).pow(2).mean().backward()
        optimizer.step()
    optimizer.param_groups[0]["lr"] = 123.0
    model[0].weight.grad = None
    model[4].bias.requires_grad_(False)
    random.random()
    np.random.rand(3)
    torch.rand(3)


@pytest.mark.parametrize("interrupt", [RuntimeError("boom"), KeyboardInterrupt()])
def test_everything_comes_back_after_an_exception(interrupt):
    model = _model()
    optimizer = _trained(model)
    model.eval()
    model[3].train()
    model[0].bias.requires_grad_(False)
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    saved = _snapshot(model, optimizer)

    with pytest.raises(type(interrupt)):
        with preserved_state(model, optimizer, weights=True, grads=True):
            _meddle(model, optimizer)
            raise interrupt

    _assert_same(model, optimizer, saved)


def test_default_restores_modes_buffers_requires_grad_and_rng_but_not_weights():
    """The probe's use: nothing is trained, so weights and .grad are left to the block."""
    model = _model()
    optimizer = _trained(model)
    model.eval()
    saved = _snapshot(model, optimizer)

    with preserved_state(model):
        model.train()
        model[4].bias.requires_grad_(False)
        model(torch.randn(10, 6))  # BN running stats move in train mode
        random.random()
        np.random.rand(3)
        with torch.no_grad():
            model[0].weight.add_(1.0)

    assert [m.training for m in model.modules()] == saved["modes"]
    assert [p.requires_grad for p in model.parameters()] == saved["requires_grad"]
    for buf, before in zip(model.buffers(), saved["buffers"], strict=True):
        assert torch.equal(buf, before)
    assert torch.equal(torch.get_rng_state(), saved["torch_rng"])
    assert random.getstate() == saved["python_rng"]
    assert not torch.equal(model[0].weight, saved["state"]["0.weight"])  # not asked for


def test_a_block_that_changes_nothing_leaves_everything_identical():
    model = _model()
    optimizer = _trained(model)
    saved = _snapshot(model, optimizer)
    with preserved_state(model, optimizer, weights=True, grads=True):
        pass
    _assert_same(model, optimizer, saved)
