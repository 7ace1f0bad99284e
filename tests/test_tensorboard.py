"""TensorBoard events from Monitor and ``nndiag export``, read back with TensorBoard's reader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from nndiag.cli.app import app
from nndiag.export import FINDINGS_TAG
from nndiag.monitor import Monitor
from nndiag.runlog import read_run

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

RUNS = Path(__file__).resolve().parent.parent / "sample_runs"


def _read(directory: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def _text(accumulator: EventAccumulator) -> str:
    events = accumulator.Tensors(FINDINGS_TAG)
    assert len(events) == 1
    return events[0].tensor_proto.string_val[0].decode("utf-8")


def test_monitor_writes_per_layer_scalars_and_findings(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    nn.init.constant_(model[0].bias, -10.0)  # every ReLU unit dead: a finding to write
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with Monitor(model, optimizer, every=2, log_dir=tmp_path / "run",
                 tensorboard=tmp_path / "tb") as monitor:
        for step in range(12):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss)
    events = _read(tmp_path / "tb")
    tags = set(events.Tags()["scalars"])
    for tag in ("loss", "learning_rate", "grad_norm/global", "grad_norm/0", "grad_norm/2",
                "update_ratio/0", "update_ratio/2", "activation_std/0", "activation_std/1",
                "dead_fraction/1"):
        assert tag in tags, tag
    log = read_run(tmp_path / "run")
    losses = events.Scalars("loss")
    assert [e.step for e in losses] == list(range(12))
    assert [e.value for e in losses] == pytest.approx(log.losses, rel=1e-5)
    ratio = events.Scalars("update_ratio/2")
    assert [e.step for e in ratio] == [s.step for s in log.samples] == [0, 2, 4, 6, 8, 10]
    assert [e.value for e in ratio] == pytest.approx(
        [s.layers[2].update_ratio for s in log.samples], rel=1e-4)
    assert [e.value for e in events.Scalars("dead_fraction/1")] == [1.0] * 6
    text = _text(events)
    assert "dead_relu" in text and "[error]" in text and monitor.report.finding("dead_relu")


def test_monitor_without_a_run_log_still_writes_findings(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = Monitor(model, optimizer, every=5, tensorboard=tmp_path / "tb")
    for _ in range(20):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        monitor.step(loss)
    monitor.close()
    events = _read(tmp_path / "tb")
    assert len(events.Scalars("loss")) == 20
    assert len(events.Scalars("grad_norm/0")) == 4
    assert monitor.report is not None
    assert _text(events).startswith(f"**{monitor.report.status.upper()}**")


def test_export_command_writes_a_recorded_run(tmp_path):
    run = RUNS / "dying_relu"
    result = CliRunner().invoke(app, ["export", str(run), "--tensorboard", str(tmp_path)])
    assert result.exit_code == 0, result.stderr
    events = _read(tmp_path)
    log = read_run(run)
    assert len(events.Scalars("loss")) == len(log.losses)
    dead = events.Scalars("dead_fraction/5")
    last = next(layer for layer in log.samples[-1].layers if layer.name == "5")
    assert len(dead) == len(log.samples) and dead[-1].value == pytest.approx(last.dead_fraction)
    text = _text(events)
    assert "dead_relu" in text and "lower_learning_rate" in text


def test_export_of_a_missing_run_is_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["export", str(tmp_path / "missing"), "--tensorboard",
                                      str(tmp_path / "tb")])
    assert result.exit_code == 2 and "not found" in result.stderr
