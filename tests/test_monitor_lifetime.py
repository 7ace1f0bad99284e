"""A monitor's lifetime: dropped without close(), sinks that fail, callbacks that raise."""

from __future__ import annotations

import errno
import gc
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_globals

from nndiag.monitor import Monitor
from nndiag.optimizers import unwrap_optimizer


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _attached(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Every hook nndiag could leave behind, counted."""
    return {
        "global forward": len(module_globals._global_forward_hooks)
        + len(module_globals._global_forward_pre_hooks),
        "gradient": sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters()),
        "optimizer": len(optimizer._optimizer_step_pre_hooks)
        + len(optimizer._optimizer_step_post_hooks),
    }


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def test_a_dropped_monitor_removes_its_hooks(tmp_path):
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    clean = _attached(model, optimizer)
    monitor = Monitor(model, optimizer, every=1, log_dir=tmp_path / "run")
    monitor.step(_train_step(model, optimizer))
    model(torch.randn(4, 8))  # a sampled step that raised before its monitor.step
    assert _attached(model, optimizer) != clean
    del monitor
    gc.collect()
    assert _attached(model, optimizer) == clean
    # The run log it wrote so far is closed and readable.
    assert (tmp_path / "run" / "steps.jsonl").read_text().strip()


def test_a_closed_monitor_is_not_closed_again_when_collected(tmp_path):
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = Monitor(model, optimizer, every=2, log_dir=tmp_path / "run")
    monitor.step(_train_step(model, optimizer))
    monitor.close()
    assert not monitor._finalizer.alive


class _FailingSink:
    """A sink whose file cannot grow (``EFBIG``: a file-size limit)."""

    def __init__(self) -> None:
        self.closed = False

    def write_steps(self, first, losses, lrs) -> None:
        raise OSError(errno.EFBIG, "File too large")

    def write_sample(self, record) -> None:
        raise OSError(errno.EFBIG, "File too large")

    def close(self) -> None:
        self.closed = True
        raise OSError(errno.EFBIG, "File too large")


def test_a_sink_that_cannot_write_warns_once_and_training_goes_on(tmp_path):
    pytest.importorskip("tensorboard")
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = Monitor(model, optimizer, every=2, log_dir=tmp_path / "run",
                      tensorboard=tmp_path / "tb")
    failing = _FailingSink()
    monitor._tensorboard.close()
    monitor._sinks[monitor._sinks.index(monitor._tensorboard)] = failing
    monitor._tensorboard = failing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            monitor.step(_train_step(model, optimizer))
        monitor.close()
    messages = [str(w.message) for w in caught if "File too large" in str(w.message)]
    assert len(messages) == 1, messages
    assert failing.closed
    assert len(monitor.samples) == 3
    assert len((tmp_path / "run" / "steps.jsonl").read_text().splitlines()) >= 1


class _RaisesAtCall(nn.Module):
    """A Trainer-style model whose forward raises on its ``fail_at``-th call."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.net, self.calls, self.fail_at = _model(), 0, fail_at

    def forward(self, x, labels=None):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("out of memory (simulated)")
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def test_the_transformers_callback_removes_its_hooks_when_a_forward_raises(tmp_path):
    transformers = pytest.importorskip("transformers")
    from nndiag.integrations.transformers import NndiagCallback

    model = _RaisesAtCall(fail_at=4)
    dataset = [{"x": torch.randn(8), "labels": torch.tensor(i % 3)} for i in range(64)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4,
        learning_rate=0.05, optim="sgd", report_to="none", logging_strategy="no",
        save_strategy="no", eval_strategy="no", disable_tqdm=True, use_cpu=True,
        dataloader_num_workers=0)
    callback = NndiagCallback(every=1, verbose=False, log_dir=tmp_path / "run")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset,
                                   callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="simulated"):
            trainer.train()
    # The trainer (and its callback) are still alive; the model is clean.
    assert callback.monitor is None
    assert len(module_globals._global_forward_hooks) == 0
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    assert not model._forward_hooks
    optimizer = unwrap_optimizer(trainer.optimizer)
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


class _RaisesInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("out of memory (simulated)")


def test_a_backward_the_user_catches_does_not_stop_gradient_norms():
    """A batch skipped after its backward raised: the next steps still record their norms."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    expected = []
    with Monitor(model, optimizer, every=1) as monitor:
        for step in range(4):
            out = model(torch.randn(4, 128))
            optimizer.zero_grad()
            if step == 1:
                with pytest.raises(RuntimeError, match="simulated"):
                    _RaisesInBackward.apply(out).sum().backward()
                continue
            loss = out.pow(2).mean()
            loss.backward()
            expected.append(torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in model.parameters()])).item())
            optimizer.step()
            monitor.step(loss)
    assert [s.grad_norm for s in monitor.samples] == pytest.approx(expected, rel=1e-5)


def test_a_complex_parameter_is_measured_and_does_not_break_the_loop():
    """A complex spectral filter: its gradient norm and update ratio count both parts."""
    torch.manual_seed(0)

    class SpectralFilter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.filter = nn.Parameter(torch.randn(64, 64, dtype=torch.cfloat))  # 4,096 values
            self.head = nn.Linear(64, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head((torch.fft.fft(x) @ self.filter).real)

    model = SpectralFilter()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "casting complex values to real"
        with Monitor(model, optimizer, every=1) as monitor:
            loss = model(torch.randn(8, 64)).pow(2).mean()
            loss.backward()
            expected = torch.linalg.vector_norm(
                torch.stack([p.grad.abs().norm() for p in model.parameters()])).item()
            before = model.filter.detach().clone()
            optimizer.step()
            monitor.step(loss)
    assert monitor.samples[0].grad_norm == pytest.approx(expected, rel=1e-5)
    moved = ((model.filter.detach() - before).abs().norm() / before.abs().norm()).item()
    root = next(layer for layer in monitor.samples[0].layers if layer.name == "(model)")
    assert root.update_ratio == pytest.approx(moved, rel=1e-4)


def test_a_long_run_keeps_its_recent_samples_in_memory_and_all_in_the_log(tmp_path,
                                                                          monkeypatch):
    """With a run log, memory holds a bounded window of samples; the log holds every one."""
    from nndiag import monitor as monitor_module
    from nndiag.runlog import read_run

    monkeypatch.setattr(monitor_module, "KEPT_SAMPLES", 3)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with Monitor(model, optimizer, every=1, log_dir=tmp_path / "run") as monitor:
        for _ in range(10):
            loss = model(torch.randn(2, 4)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss)
            assert len(monitor.samples) < 6
    assert monitor.samples[-1].step == 9
    assert [s.step for s in read_run(tmp_path / "run").samples] == list(range(10))
