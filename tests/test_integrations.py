"""Where users train: real Lightning and Hugging Face trainers with the nndiag callbacks, and AMP.

Each trainer run is tiny (CPU, a few optimizer steps, no logger, no checkpoints, no hub).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nndiag.amp import AMP_FILE, FINDING_ID
from nndiag.monitor import Monitor
from nndiag.run_check import check_run
from nndiag.runlog import read_run

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _mlp(width: int = 16, depth: int = 3, killed: bool = False) -> nn.Sequential:
    """An MLP; ``killed``: every hidden bias at -10, so no ReLU unit ever fires."""
    layers: list[nn.Module] = []
    fan_in = 8
    for _ in range(depth):
        linear = nn.Linear(fan_in, width)
        if killed:
            nn.init.constant_(linear.bias, -10.0)
        layers += [linear, nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(fan_in, 3))
    return nn.Sequential(*layers)


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


class _StepCounter:
    """Counts the optimizer steps that really ran (a step post-hook of our own)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.count = 0
        optimizer.register_step_post_hook(self._count)

    def _count(self, *args: object) -> None:
        self.count += 1


def _weight_layers_have_update_ratios(run_dir) -> None:
    log = read_run(run_dir)
    assert log.samples
    for sample in log.samples:
        weighted = [layer for layer in sample.layers if layer.has_weights]
        assert weighted and all(layer.update_ratio is not None and layer.update_ratio > 0
                                for layer in weighted), sample.step


# ---------------------------------------------------------------------- import isolation

def test_import_nndiag_imports_no_framework():
    code = ("import sys, nndiag, nndiag.integrations, nndiag.monitor, nndiag.export, nndiag.amp\n"
            "from nndiag import Monitor, check_run\n"
            "bad = [m for m in ('pytorch_lightning', 'lightning', 'transformers', 'accelerate',"
            " 'tensorboard') if m in sys.modules]\n"
            "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------- Lightning

def _lit_module(killed: bool):
    pl = pytest.importorskip("pytorch_lightning")

    class LitMLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp(killed=killed)
            self.grad_norms: list[float] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def on_before_optimizer_step(self, optimizer):
            # The global norm of the accumulated gradient, read by hand where Lightning steps.
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            self.grad_norms.append(float(torch.stack([g.norm() for g in grads]).norm()))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return pl, LitMLP()


def _fit_lightning(tmp_path, accumulate: int, killed: bool = False, epochs: int = 2,
                   plugins: list | None = None, **callback_options):
    pl, module = _lit_module(killed)
    from nndiag.integrations.lightning import NndiagCallback

    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    callback = NndiagCallback(verbose=False, **callback_options)
    trainer = pl.Trainer(max_epochs=epochs, accumulate_grad_batches=accumulate,
                         accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[callback], plugins=plugins)
    counter: list[_StepCounter] = []

    class _Count(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            counter.append(_StepCounter(trainer.optimizers[0]))

    trainer.callbacks.append(_Count())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    return trainer, module, callback, counter[0].count


@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_records_one_step_per_optimizer_step(tmp_path, accumulate):
    trainer, module, callback, optimizer_steps = _fit_lightning(tmp_path, accumulate, every=2)
    assert optimizer_steps == trainer.global_step == 16 // accumulate
    run_dir = tmp_path / "nndiag"  # the default: trainer.log_dir (the root without a logger)
    log = read_run(run_dir)
    assert len(log.losses) == optimizer_steps
    assert [s.step for s in log.samples] == list(range(0, optimizer_steps, 2))
    _weight_layers_have_update_ratios(run_dir)
    # Norms are those of the accumulated gradient: equal to the norm read by hand at the step.
    for sample in log.samples:
        assert sample.grad_norm == pytest.approx(module.grad_norms[sample.step], rel=1e-4)
    # The step's loss is the mean over its batches (Lightning divides each by `accumulate`).
    assert all(0.5 < loss < 2.0 for loss in log.losses)
    assert callback.report is not None and callback.report.summary["steps"] == optimizer_steps
    assert callback.monitor is None  # closed: no hook left behind


def test_lightning_16_mixed_with_a_grad_scaler_records_unscaled_norms_and_skips(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    from nndiag.amp import read_skipped

    # fp16 autocast on CPU with a real GradScaler; a scale of 2^20 overflows fp16 at first.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 20)
    plugin = pl.plugins.precision.MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer, module, callback, optimizer_steps = _fit_lightning(tmp_path, 1, plugins=[plugin],
                                                                every=1)
    log = read_run(tmp_path / "nndiag")
    assert len(log.losses) == trainer.global_step == 16
    skipped = [row["step"] for row in read_skipped(tmp_path / "nndiag")]
    assert skipped and optimizer_steps == 16 - len(skipped)  # the steps that really ran
    for sample in log.samples:
        if sample.step in skipped:
            assert sample.grad_norm is None
        else:  # Lightning's own norm, read after unscale_, not 2^k times larger
            assert sample.grad_norm == pytest.approx(module.grad_norms[sample.step], rel=1e-3)
    assert callback.report.finding("nan_inf") is None
    assert callback.report.finding(FINDING_ID).severity == "info"


def test_lightning_reports_killed_relus_at_the_end_and_raises_only_if_asked(tmp_path, capsys):
    pytest.importorskip("pytorch_lightning")
    from nndiag.integrations.lightning import NndiagCallback, TrainingFindingsError

    _, _, callback, _ = _fit_lightning(tmp_path / "a", 1, killed=True, epochs=1, every=2)
    assert callback.report.finding("dead_relu") is not None
    assert callback.report.finding("dead_relu").severity == "error"
    with pytest.raises(TrainingFindingsError, match="dead_relu") as raised:
        _fit_lightning(tmp_path / "b", 1, killed=True, epochs=1, every=4, fail_on="error")
    assert raised.value.report.finding("dead_relu") is not None
    # verbose (the default) prints the findings
    callback = NndiagCallback(every=4)
    assert callback.verbose
    with pytest.raises(Exception, match="every"):
        NndiagCallback(every=0)


# ---------------------------------------------------------------------- Hugging Face

class _HFMLP(nn.Module):
    """A plain module the Trainer can train: returns its loss like a ``PreTrainedModel``."""

    def __init__(self, killed: bool = False) -> None:
        super().__init__()
        self.net = _mlp(killed=killed)

    def forward(self, x, labels=None):
        logits = self.net(x)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def _hf_args(tmp_path, accumulate: int, steps: int):
    transformers = pytest.importorskip("transformers")
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8,
        gradient_accumulation_steps=accumulate, learning_rate=0.05, lr_scheduler_type="constant",
        optim="sgd", weight_decay=0.0, warmup_steps=0, report_to="none",
        logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        use_cpu=True, dataloader_num_workers=0, seed=0, max_grad_norm=1.0)


def _train_hf(model, dataset, tmp_path, accumulate, steps, **callback_options):
    transformers = pytest.importorskip("transformers")
    from nndiag.integrations.transformers import NndiagCallback

    callback = NndiagCallback(verbose=False, **callback_options)
    trainer = transformers.Trainer(model=model, args=_hf_args(tmp_path, accumulate, steps),
                                   train_dataset=dataset, callbacks=[callback])
    counter = _StepCounter(trainer.create_optimizer())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer, callback, counter.count


def test_transformers_bert_with_accumulation(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(1)
    dataset = [{"input_ids": torch.randint(0, 40, (12,), generator=g),
                "attention_mask": torch.ones(12, dtype=torch.long),
                "labels": torch.tensor(i % 2)} for i in range(64)]
    trainer, callback, optimizer_steps = _train_hf(model, dataset, tmp_path, 2, 6, every=2)
    assert optimizer_steps == trainer.state.global_step == 6
    run_dir = tmp_path / "nndiag"  # the default: args.output_dir
    log = read_run(run_dir)
    assert len(log.losses) == 6 and all(math.isfinite(v) and v > 0.1 for v in log.losses)
    assert [s.step for s in log.samples] == [0, 2, 4]
    assert log.meta["optimizer"] == "SGD"  # unwrapped from Accelerate's AcceleratedOptimizer
    _weight_layers_have_update_ratios(run_dir)
    names = {layer.name for layer in log.samples[0].layers}
    assert any("attention.self.query" in n for n in names)
    assert callback.report is not None and callback.report.summary["steps"] == 6


def test_transformers_killed_relus_reported_at_the_end(tmp_path):
    x, y = _data()
    dataset = [{"x": x[i], "labels": y[i]} for i in range(len(x))]
    torch.manual_seed(0)
    trainer, callback, optimizer_steps = _train_hf(_HFMLP(killed=True), dataset, tmp_path, 1,
                                                   6, every=2)
    assert optimizer_steps == trainer.state.global_step == 6
    assert len(read_run(tmp_path / "nndiag").losses) == 6
    assert callback.report.finding("dead_relu") is not None


# ---------------------------------------------------------------------- AMP GradScaler

def test_grad_scaler_norms_are_unscaled_and_skipped_steps_are_info(tmp_path):
    torch.manual_seed(0)
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    assert scaler.is_enabled()
    monitor = Monitor(model, optimizer, every=1, scaler=scaler, log_dir=tmp_path / "run")
    x, y = _data()
    reference, scaled = {}, {}
    for step in range(8):
        batch = slice(8 * step, 8 * step + 8)
        hidden = model[0](x[batch])
        if step in (3, 4):  # an overflow in the scaled backward pass, as fp16 has
            hidden.register_hook(lambda g: g * float("inf"))
        loss = F.cross_entropy(model[1:](hidden), y[batch])
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaled[step] = float(torch.stack([p.grad.norm() for p in model.parameters()]).norm())
        scaler.unscale_(optimizer)  # the usual place for clipping
        reference[step] = float(torch.stack([p.grad.norm() for p in model.parameters()]).norm())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
        scaler.step(optimizer)
        scaler.update()
        monitor.step(loss)
    monitor.close()
    assert monitor.skipped_steps == [3, 4]
    by_step = {s.step: s for s in monitor.samples}
    for step in (0, 1, 2, 5, 6, 7):
        assert scaled[step] > 1e3 * reference[step]  # the raw gradients are scaled
        assert by_step[step].grad_norm == pytest.approx(reference[step], rel=1e-4)
        assert all(layer.update_ratio is not None for layer in by_step[step].layers
                   if layer.has_weights)
    for step in (3, 4):  # skipped: no update, no (non-finite) gradient recorded
        assert by_step[step].grad_norm is None
        assert all(layer.grad_norm is None and layer.update_ratio is None
                   for layer in by_step[step].layers)
    lines = (tmp_path / "run" / AMP_FILE).read_text().splitlines()
    assert len(lines) == 2 and '"step": 3' in lines[0] and '"scale": 16384.0' in lines[1]
    report = check_run(tmp_path / "run")
    assert report.finding("nan_inf") is None
    finding = report.finding(FINDING_ID)
    assert finding.severity == "info" and finding.evidence["skipped_steps"] == [3, 4]
    assert "2 of 8 steps" in finding.summary and finding.explanation


def test_grad_scaler_found_on_a_wrapper_and_read_after_unscale():
    class Wrapper:  # Accelerate's AcceleratedOptimizer carries .optimizer and .scaler
        def __init__(self, optimizer, scaler):
            self.optimizer, self.scaler = optimizer, scaler

    torch.manual_seed(0)
    model = _mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    monitor = Monitor(model, Wrapper(optimizer, scaler), every=1)
    assert monitor.scaler is scaler and monitor.optimizer is optimizer
    x, y = _data(8)
    loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    monitor.read_gradients()  # a no-op outside DDP
    reference = float(torch.stack([p.grad.norm() for p in model.parameters()]).norm())
    monitor._capture._read_grads()  # read again after unscale_: must not divide a second time
    scaler.step(optimizer)
    scaler.update()
    monitor.step(loss)
    monitor.close()
    assert monitor.samples[0].grad_norm == pytest.approx(reference, rel=1e-4)
    assert monitor.skipped_steps == []
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    with Monitor(model, optimizer, scaler=disabled) as unscaled:
        assert unscaled.scaler is None
