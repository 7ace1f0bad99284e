"""Monitor makes no host read on unsampled steps (on an accelerator each one waits for it)."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from nndiag import Monitor, read_run
from nndiag.capture import step_values

# What reads a tensor's value on the host: on an accelerator each waits for the device.
HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
              torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__bool__,
              torch.Tensor.__index__}


class HostReads(TorchFunctionMode):
    """Counts host reads made through Python (``.item()``, ``float(t)``...)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.calls[func.__name__] += 1
        return func(*args, **(kwargs or {}))


class ScalarReads(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense``: every scalar read, from Python or from C++."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.LayerNorm(24), nn.Linear(24, 24),
                         nn.GELU(), nn.Linear(24, 3))


def _reads_per_step(monitored: bool, tmp_path, steps: int = 20, every: int = 10):
    """Host reads of each step (the loop's own included) with and without a Monitor."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
    monitor = Monitor(model, optimizer, every=every, log_dir=tmp_path / "run") \
        if monitored else None
    counts = []
    for step in range(steps):
        python, scalars = HostReads(), ScalarReads()
        with python, scalars:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if monitor is not None:
                monitor.step(loss)
        counts.append((step, sum(python.calls.values()), scalars.count))
    if monitor is not None:
        monitor.close()
    return counts


def test_unsampled_steps_read_nothing_on_the_host(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    # Treat the loop's tensors as an accelerator's: the values must stay where they are.
    monkeypatch.setattr(step_values, "_on_device", lambda v: isinstance(v, torch.Tensor))
    plain = _reads_per_step(False, tmp_path / "plain")
    monitored = _reads_per_step(True, tmp_path / "monitored")
    unsampled = [i for i in range(20) if i % 10]
    for step in unsampled:
        assert monitored[step][1:] == plain[step][1:], (step, monitored[step], plain[step])
    assert monitored[0][1] > plain[0][1]  # a sampled step does read (the counter works)
    log = read_run(tmp_path / "monitored" / "run")
    assert len(log.losses) == 20 and all(v == v for v in log.losses)


def test_on_the_cpu_each_step_is_written_at_the_next_one(tmp_path):
    torch.set_num_threads(1)
    plain = _reads_per_step(False, tmp_path / "plain")
    monitored = _reads_per_step(True, tmp_path / "monitored")
    # On the CPU, reading never waits: each step writes the previous one (crash safety).
    assert any(monitored[i][1] > plain[i][1] for i in range(2, 10))


@pytest.mark.parametrize("flush_every", [1, 4])
def test_losses_copied_in_blocks_arrive_in_order_and_a_killed_run_loses_at_most_a_block(
        tmp_path, monkeypatch, flush_every):
    torch.set_num_threads(1)
    monkeypatch.setattr(step_values, "_on_device", lambda v: isinstance(v, torch.Tensor))
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
    monitor = Monitor(model, optimizer, every=100, log_dir=tmp_path / "run",
                      flush_every=flush_every)
    losses = []
    for _ in range(23):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        monitor.step(loss)
        losses.append(loss.item())
    cut = read_run(tmp_path / "run")  # as a killed run leaves it: never closed
    assert len(losses) - len(cut.losses) <= flush_every
    assert cut.losses == pytest.approx(losses[:len(cut.losses)], rel=1e-5)  # 6 digits
    monitor.close()
    assert read_run(tmp_path / "run").losses == pytest.approx(losses, rel=1e-5)
