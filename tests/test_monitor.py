"""Monitor: every recorded statistic against a plain reference, the run log, crash safety."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nndiag import UsageError, examples
from nndiag.monitor import Monitor
from nndiag.runlog import SAMPLES, STEPS, RunWriter, read_run


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 4))


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(24, 16, generator=g) * 2, torch.randint(0, 4, (24,), generator=g)


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=0.01),
], ids=["sgd_momentum", "adam"])
def test_every_statistic_against_a_plain_reference(make_optimizer):
    model = _model()
    optimizer = make_optimizer(model.parameters())
    monitor = Monitor(model, optimizer, every=2)
    reference = []
    for step in range(4):
        x, y = _batch(step)
        outputs: dict[str, torch.Tensor] = {}
        handles = [m.register_forward_hook(
            lambda m, a, o, n=name, kept=outputs: kept.__setitem__(n, o.detach().clone()))
            for name, m in model.named_modules() if name]
        loss = F.cross_entropy(model(x), y)
        for h in handles:
            h.remove()
        optimizer.zero_grad()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)  # recorded norms are pre-clip
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.step()
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
        monitor.step(loss)
        reference.append((loss.item(), outputs, grads, before, after))
    monitor.close()

    assert [s.step for s in monitor.samples] == [0, 2]
    for sample in monitor.samples:
        loss, outputs, grads, before, after = reference[sample.step]
        assert sample.loss == pytest.approx(loss, rel=1e-6)
        assert [layer.name for layer in sample.layers] == ["0", "1", "2", "3", "4"]
        for layer in sample.layers:
            out = outputs[layer.name]
            assert layer.mean == pytest.approx(out.mean().item(), rel=1e-4, abs=1e-6)
            assert layer.std == pytest.approx(out.std(unbiased=False).item(), rel=1e-4)
            assert layer.absmax is None  # not measured in the lean mode
            if layer.name == "1":
                dead = (out == 0).all(0).float().mean().item()
                assert layer.dead_fraction == pytest.approx(dead)
            if layer.name == "3":
                sat = (1 - out ** 2 < 0.05).float().mean().item()
                assert layer.saturated_fraction == pytest.approx(sat)
                assert layer.preact_std == pytest.approx(
                    outputs["2"].std(unbiased=False).item(), rel=1e-4)
        assert sample.grad_norm == pytest.approx(
            math.sqrt(sum(g.norm().item() ** 2 for g in grads.values())), rel=1e-5)
        weighted = [layer for layer in sample.layers if layer.has_weights]
        assert [layer.name for layer in weighted] == ["0", "2", "4"]
        for layer in weighted:
            w = f"{layer.name}.weight"
            assert layer.grad_norm == pytest.approx(grads[w].norm().item(), rel=1e-5)
            assert layer.weight_norm == pytest.approx(after[w].norm().item(), rel=1e-5)
            ratio = (after[w] - before[w]).norm().item() / before[w].norm().item()
            assert layer.update_ratio == pytest.approx(ratio, rel=1e-4)


def test_gradient_accumulation_reads_the_accumulated_gradient():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = Monitor(model, optimizer, every=1)
    optimizer.zero_grad()
    for seed in range(3):  # three micro-batches, one optimizer step
        x, y = _batch(seed)
        (F.cross_entropy(model(x), y) / 3).backward()
    total = math.sqrt(sum(p.grad.norm().item() ** 2 for p in model.parameters()))
    optimizer.step()
    monitor.step(torch.tensor(1.0))
    monitor.close()
    assert monitor.samples[0].grad_norm == pytest.approx(total, rel=1e-5)
    relu = next(layer for layer in monitor.samples[0].layers if layer.name == "1")
    assert relu.mean > 0


def test_gradient_norms_read_in_hooks_are_the_gradients_at_the_end_of_backward():
    # Weights of 4,096 elements are read in their gradient hook (step_capture.SMALL_GRADIENT),
    # while in cache: accumulated over passes, and re-read when a later pass did not touch them.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = Monitor(model, optimizer, every=1)
    x, y = torch.randn(8, 64), torch.randint(0, 4, (8,))
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(model(x * 2), y).backward()  # accumulated into the same gradients
    model[0].weight.grad.mul_(0.5)  # changed after its hook read it...
    F.cross_entropy(model[4](torch.randn(8, 64)), y).backward()  # ...by a pass not reaching it
    total = math.sqrt(sum(p.grad.norm().item() ** 2 for p in model.parameters()
                          if p.grad is not None))
    first, middle = model[0].weight.grad.norm().item(), model[2].weight.grad.norm().item()
    optimizer.step()
    monitor.step(torch.tensor(1.0))
    monitor.close()
    sample = monitor.samples[0]
    layers = {layer.name: layer for layer in sample.layers}
    assert sample.grad_norm == pytest.approx(total, rel=1e-5)
    assert layers["2"].grad_norm == pytest.approx(middle, rel=1e-5)
    assert layers["0"].grad_norm == pytest.approx(first, rel=1e-5)


def test_hooks_are_removed_and_unsampled_steps_leave_none_attached():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = Monitor(model, optimizer, every=3)
    x, y = _batch()
    for _ in range(2):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        monitor.step(loss)
    assert all(not m._forward_hooks for m in model.modules())  # step 2 is not sampled
    monitor.close()
    assert all(not m._forward_hooks for m in model.modules())
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    with pytest.raises(UsageError, match="after close"):
        monitor.step(1.0)


def test_run_log_round_trip_and_partial_last_line(tmp_path):
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with Monitor(model, optimizer, every=4, log_dir=tmp_path / "run") as monitor:
        for step in range(10):
            x, y = _batch(step)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss)
    log = read_run(tmp_path / "run")
    assert log.steps == list(range(10)) and len(log.samples) == 3
    assert log.lrs == [1e-3] * 10
    assert log.meta["optimizer"] == "Adam" and log.meta["every"] == 4
    with open(tmp_path / "run" / SAMPLES, "a") as handle:
        handle.write('{"step": 12, "sites": {"na')  # a write cut by a crash
    again = read_run(tmp_path / "run")
    assert len(again.samples) == 3 and again.skipped_lines == 1
    with pytest.raises(UsageError, match="already holds a run"):
        Monitor(model, optimizer, log_dir=tmp_path / "run")
    with pytest.raises(UsageError, match="not a run directory"):
        read_run(tmp_path)


def test_log_of_a_long_run_of_a_50_layer_model_stays_small(tmp_path):
    """Measure the bytes of real records, then project 10,000 steps at every=50."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(25):
        layers += [nn.Linear(8, 8), nn.ReLU()]
    model = nn.Sequential(*layers)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(16, 8)
    with Monitor(model, optimizer, every=50, log_dir=tmp_path / "run") as monitor:
        for _ in range(100):
            loss = model(x).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss)
    per_sample = (tmp_path / "run" / SAMPLES).stat().st_size / 2
    per_step = (tmp_path / "run" / STEPS).stat().st_size / 100
    projected = 200 * per_sample + 10_000 * per_step
    assert len(read_run(tmp_path / "run").samples[0].layers) == 50
    assert projected < 5 * 1024 * 1024, projected


def test_writer_encodes_non_finite_values(tmp_path):
    writer = RunWriter(tmp_path / "r", {"every": 1})
    writer.write_steps(0, [1.0, float("nan"), float("inf")], [0.1, 0.1, 0.1])
    writer.close()
    log = read_run(tmp_path / "r")
    assert log.losses[0] == 1.0 and math.isnan(log.losses[1]) and log.losses[2] == math.inf


CRASHING_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    import torch.nn.functional as F
    from nndiag import examples
    from nndiag.monitor import Monitor
    torch.set_num_threads(1)
    model = examples.he_mlp(depth=3, width=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    data = examples.classification_data(batches=4)
    monitor = Monitor(model, optimizer, every=5, log_dir=sys.argv[1])
    step = 0
    while True:
        x, y = data[step % 4]
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        monitor.step(loss)
        step += 1
""")


def test_sigkill_mid_run_leaves_a_log_check_can_read(tmp_path):
    from typer.testing import CliRunner

    from nndiag.cli.app import app

    script = tmp_path / "train.py"
    script.write_text(CRASHING_SCRIPT)
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, str(script), str(run_dir)], env=env)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            samples = run_dir / SAMPLES
            if samples.exists() and samples.read_text().count("\n") >= 6:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the training subprocess wrote no samples")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    log = read_run(run_dir)
    assert len(log.samples) >= 6 and len(log.losses) >= 25
    result = CliRunner().invoke(app, ["check", str(run_dir), "--json"])
    assert result.exit_code in (0, 1), result.stderr
    import json

    report = json.loads(result.stdout)
    assert report["summary"]["steps"] == len(log.losses)
    assert report["summary"]["samples"] == len(log.samples)


def test_monitor_works_on_a_cnn_with_inplace_relu_and_a_transformer():
    for model, x in ((examples.inplace_relu_cnn(), torch.randn(8, 3, 16, 16)),
                     (examples.transformer_preln(layers=1, dim=32),
                      torch.randint(0, 100, (4, 10)))):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with Monitor(model, optimizer, every=1) as monitor:
            out = model(x)
            loss = out.float().square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss)
        sample = monitor.samples[0]
        assert sample.grad_norm > 0
        weighted = [layer for layer in sample.layers if layer.has_weights]
        assert weighted and all(layer.update_ratio > 0 for layer in weighted)
        assert all(layer.std is not None for layer in sample.layers if layer.activation)


def test_update_ratio_when_sampling_every_step():
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    monitor = Monitor(model, optimizer, every=1)
    expected = []
    for step in range(3):
        x, y = _batch(step)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        before = model[2].weight.detach().clone()
        optimizer.step()
        monitor.step(loss)
        after = model[2].weight.detach()
        expected.append((after - before).norm().item() / before.norm().item())
    monitor.close()
    recorded = [next(layer.update_ratio for layer in s.layers if layer.name == "2")
                for s in monitor.samples]
    assert recorded == pytest.approx(expected, rel=1e-4)


def test_update_ratio_of_a_strided_subset_tracks_the_whole_tensor():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sampled = Monitor(model, optimizer, every=1, update_sample=4096)
    x, y = torch.randn(32, 512), torch.randint(0, 4, (32,))
    before = model[0].weight.detach().clone()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    sampled.step(loss)
    sampled.close()
    whole = (model[0].weight.detach() - before).norm().item() / before.norm().item()
    assert sampled.samples[0].layers[0].update_ratio == pytest.approx(whole, rel=0.03)


class FunctionalReLUNet(nn.Module):
    """ReLUs applied as functions inside forward: no activation module to hook."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def test_functional_relus_killed_in_training_are_reported_by_check_run(tmp_path):
    from nndiag.run_check import check_run

    torch.manual_seed(0)
    model = FunctionalReLUNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    with Monitor(model, optimizer, every=5, log_dir=tmp_path / "run") as monitor:
        for step in range(60):
            x, y = _batch(step % 4)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss)
    names = [layer.name for layer in monitor.samples[0].layers]
    assert names == ["fc1", "(model)/relu", "fc2", "(model)/relu#2", "head"] or \
        names == ["fc1", "relu", "fc2", "relu#2", "head"]
    report = check_run(tmp_path / "run")
    dead = report.finding("dead_relu")
    assert dead is not None, [f.id for f in report.findings]
    assert set(dead.layers) <= {"relu", "relu#2"} and dead.layers


def test_monitor_refuses_a_directory_with_run_files_it_did_not_create(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / STEPS).write_text('{"first": 0, "loss": [1.0]}\n')
    with pytest.raises(UsageError, match="already holds a run"):
        Monitor(_model(), log_dir=tmp_path / "run")
    assert (tmp_path / "run" / STEPS).read_text() == '{"first": 0, "loss": [1.0]}\n'


def test_a_failing_disk_stops_logging_with_a_warning_but_not_training(tmp_path):
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = Monitor(model, optimizer, every=1, log_dir=tmp_path / "run")

    class FullDisk:
        def write(self, text: str) -> int:
            raise OSError(28, "No space left on device")

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    monitor._writer._samples = FullDisk()
    monitor._writer._steps = FullDisk()
    x, y = _batch()
    with pytest.warns(RuntimeWarning, match="logging stopped"):
        for _ in range(3):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss)
    monitor.close()
    assert len(monitor.samples) == 3


def test_a_run_written_in_the_first_log_format_is_still_read_and_judged():
    from nndiag.run_check import check_run

    fixture = Path(__file__).parent / "fixtures" / "run_v1"
    log = read_run(fixture)
    assert log.meta["schema"] == "nndiag.run/1" and len(log.samples) == 30
    relu = next(layer for layer in log.samples[-1].layers if layer.name == "5")
    assert relu.dead_fraction == 1.0 and relu.activation == "relu"
    ratios = [layer.update_ratio for layer in log.samples[-1].layers if layer.has_weights]
    assert ratios == [0.0] * 4  # dead by then: nothing moves
    assert check_run(fixture).finding("dead_relu").layers == ["3", "5"]


def test_a_run_with_no_recorded_step_does_not_pass_the_gate(tmp_path):
    from typer.testing import CliRunner

    from nndiag.cli.app import app

    Monitor(_model(), log_dir=tmp_path / "run").close()
    result = CliRunner().invoke(app, ["check", str(tmp_path / "run"), "--fail-on", "warning"])
    assert result.exit_code == 2 and "no recorded step" in result.stderr


def test_malformed_records_are_skipped_with_a_note(tmp_path):
    from nndiag.run_check import check_run

    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with Monitor(model, optimizer, every=2, log_dir=tmp_path / "run") as monitor:
        for step in range(12):
            x, y = _batch(step % 3)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss)
    with open(tmp_path / "run" / SAMPLES, "a") as handle:
        handle.write('{"step": "x"}\n{"step": 3, "layers": {"name": ["a"], "mean": [1, 2]}}\n')
    with open(tmp_path / "run" / STEPS, "a") as handle:
        handle.write('{"first": "0", "loss": [1.0]}\n')
    report = check_run(tmp_path / "run")
    assert report.summary["samples"] == 6 and report.summary["steps"] == 12
    assert any("3 unreadable line(s) skipped" in note for note in report.notes)


SPARSE_SAMPLING_SCRIPT = textwrap.dedent("""
    import sys, torch
    import torch.nn.functional as F
    from nndiag import examples
    from nndiag.monitor import Monitor
    torch.set_num_threads(1)
    model = examples.he_mlp(depth=2, width=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = examples.classification_data(batches=1)[0]
    monitor = Monitor(model, optimizer, every=1000, log_dir=sys.argv[1])
    done = open(sys.argv[2], "w")
    step = 0
    while True:
        loss = F.cross_entropy(model(x[:, :model[0].in_features]), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        monitor.step(loss)
        step += 1
        done.write(f"{step}\\n"); done.flush()   # steps completed, as the script saw them
""")


def test_sigkill_between_sparse_samples_loses_at_most_one_step(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SPARSE_SAMPLING_SCRIPT)
    run_dir, done = tmp_path / "run", tmp_path / "done.txt"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, str(script), str(run_dir), str(done)], env=env)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:  # let it run past a few hundred steps, then kill it
            if done.exists() and done.read_text().count("\n") >= 300:
                break
            time.sleep(0.02)
        else:
            pytest.fail("the training subprocess did not get going")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    completed = int(done.read_text().split()[-1])
    log = read_run(run_dir)
    assert log.steps == list(range(len(log.losses)))
    assert len(log.losses) >= completed - 1, (len(log.losses), completed)
    assert completed > 100
