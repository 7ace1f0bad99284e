"""Monitor on a model run by torch.compile: no recompile once warm, the eager run's numbers."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from nndiag import Monitor

dynamo = pytest.importorskip("torch._dynamo")


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.ReLU()
        self.norm = nn.LayerNorm(32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.act(self.fc1(x)))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.fc2(h).mean(1)


def _train(model: nn.Module, run: nn.Module, steps: int, every: int, on_step=None):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, 16, generator=generator)
    y = torch.randint(0, 4, (8,), generator=generator)
    with Monitor(run, optimizer, every=every) as monitor:
        for step in range(steps):
            loss = nn.functional.cross_entropy(run(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss)
            if on_step is not None:
                on_step(step)
    return monitor.samples


def test_compiled_model_recompiles_nothing_once_warm_and_matches_eager():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    eager_model = Block()
    compiled_model = copy.deepcopy(eager_model)
    eager = _train(eager_model, eager_model, 30, 10)

    dynamo.reset()
    dynamo.utils.counters.clear()
    frames, breaks = [], []

    def watch(step: int) -> None:
        frames.append(dynamo.utils.counters["frames"]["total"])
        breaks.append(sum(dynamo.utils.counters["graph_break"].values()))
        if step == 1:  # warm: one sampled and one unsampled step have run
            torch.compiler.set_stance("fail_on_recompile")

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled = _train(compiled_model, torch.compile(compiled_model, backend="aot_eager"),
                              30, 10, watch)
    finally:
        torch.compiler.set_stance("default")
    # No global hook fires on the compiled wrapper, and dynamo never gives up on a frame.
    assert not [w for w in caught if "global hooks" in str(w.message)
                or "recompile_limit" in str(w.message)]
    assert frames[1] == frames[-1]  # nothing compiled after the first two steps
    assert breaks[1] == breaks[0]  # the unsampled steps' graph has no break

    assert [s.step for s in compiled] == [s.step for s in eager] == [0, 10, 20]
    for ours, reference in zip(compiled, eager, strict=True):
        assert ours.loss == pytest.approx(reference.loss, rel=1e-4)
        assert ours.grad_norm == pytest.approx(reference.grad_norm, rel=1e-3)
        # Each module once, under the model's own names (not the wrapper's _orig_mod.).
        assert [layer.name for layer in ours.layers] == ["fc1", "act", "norm", "attn", "fc2"]
        by_name = {layer.name: layer for layer in reference.layers}
        for layer in ours.layers:
            expected = by_name[layer.name]
            assert layer.std == pytest.approx(expected.std, rel=1e-3), layer.name
            if expected.update_ratio is not None:
                assert layer.update_ratio == pytest.approx(expected.update_ratio, rel=1e-2)
