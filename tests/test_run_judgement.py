"""Judgement of recorded runs against noise: healthy runs stay quiet, measures fit the layer."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nndiag.monitor import Monitor
from tests.fixtures.models import TokenModel, conv_bn, prototype_images


class _Bag(nn.Module):
    """Token embedding, mean-pooled, then a classifier: a batch updates few table rows."""

    def __init__(self, vocab: int = 3000, dim: int = 48) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens).mean(1))


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.AdamW(p, lr=5e-4, weight_decay=0.0),
    lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9),
], ids=["adamw", "sgd_momentum"])
def test_an_embedding_update_ratio_is_measured_on_rows_that_moved(make_optimizer):
    torch.manual_seed(0)
    model = _Bag()
    optimizer = make_optimizer(model.parameters())
    monitor = Monitor(model, optimizer, every=2)
    g = torch.Generator().manual_seed(1)
    whole = {}
    for step in range(6):
        tokens = torch.randint(0, 40, (4, 6), generator=g) * 70  # ~24 of 3,000 rows a batch
        before = model.embed.weight.detach().clone()
        loss = F.cross_entropy(model(tokens), torch.randint(0, 2, (4,), generator=g))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        monitor.step(loss)
        whole[step] = ((model.embed.weight.detach() - before).norm() / before.norm()).item()
    monitor.close()
    for sample in monitor.samples:
        (embed,) = [layer for layer in sample.layers if layer.name == "embed"]
        assert embed.update_ratio is not None and embed.update_ratio > 0
        assert whole[sample.step] / 2 <= embed.update_ratio <= whole[sample.step] * 2


def test_a_live_embedding_is_judged_as_one_whatever_its_name():
    from nndiag.inspection import inspect_model

    for seed in range(3):
        torch.manual_seed(seed)
        report = inspect_model(TokenModel(), torch.randint(0, 50, (4, 12)))
        assert report.finding("poor_initialization") is None, report.findings


@pytest.mark.parametrize("seed", [8, 10])  # initializations where a bias rounded to no change
def test_a_bias_cancelled_by_batchnorm_is_not_a_parameter_the_optimizer_missed(seed):
    from nndiag.training_check import check_training

    torch.manual_seed(seed)
    report = check_training(
        conv_bn(), prototype_images(), steps=4, overfit_steps=10, lr=0.05,
        optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9))
    finding = report.finding("parameters_not_updated")
    assert finding is not None and finding.severity == "info", report.findings
    assert finding.layers == ["0.bias"]
    assert finding.evidence["relative_gradients"]["0.bias"] < 1e-4
    assert "BatchNorm" in finding.explanation


def test_a_parameter_left_out_of_the_optimizer_is_still_an_error():
    from nndiag.training_check import check_training

    torch.manual_seed(8)
    report = check_training(
        conv_bn(), prototype_images(), steps=4, overfit_steps=10, lr=0.05,
        optimizer=lambda model: torch.optim.SGD(list(model.parameters())[2:], lr=0.05))
    finding = report.finding("parameters_not_updated")
    assert finding is not None and finding.severity == "error"
    assert finding.layers == ["0.weight"]  # 0.bias: negligible, in the evidence only
    assert "0.bias" in finding.evidence["negligible_gradients"]


def test_the_gate_reports_the_learning_rate_the_optimizer_ran_at():
    from nndiag.training_check import check_training

    torch.manual_seed(0)
    report = check_training(
        conv_bn(), prototype_images(2), steps=2, overfit_steps=4,
        optimizer=lambda model: torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    assert report.summary["lr"] == pytest.approx(0.05)


def test_each_step_is_recorded_with_the_learning_rate_it_ran_at(tmp_path):
    from nndiag.runlog import read_run

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: step / 4)
    monitor = Monitor(model, optimizer, every=2, log_dir=tmp_path / "run")
    used = []
    for _ in range(6):
        loss = model(torch.randn(3, 4)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        warmup.step()  # before monitor.step, as the Hugging Face Trainer does
        monitor.step(loss)
    monitor.close()
    assert used[0] == 0.0
    assert read_run(tmp_path / "run").lrs == pytest.approx(used)


def test_explanations_never_contradict_their_headline():
    from dataclasses import replace

    from nndiag.advice.common import init_story
    from nndiag.diagnosis import diagnose
    from nndiag.records import LayerRecord
    from nndiag.runlog import RunLog

    layer = LayerRecord(name="0", module="0", kind="Linear", index=0, activation=None,
                        functional=False, shape=[4, 8])
    shrinking = [replace(layer, name=str(i), init_reference="he", init_scale=0.41)
                 for i in range(3)]
    assert "0.41^3" in init_story(shrinking, explains="shrinkage")[0]
    assert init_story(shrinking, explains="growth") == ("", pytest.approx(0.41))

    # A loss that climbs from its first steps never went "down to" anything.
    climbing = [2.3 + 0.01 * step for step in range(200)]
    log = RunLog(Path("run"), {"schema": None}, list(range(200)), climbing, [0.1] * 200)
    (finding,) = [f for f in diagnose(log).findings if f.id == "loss_diverging"]
    assert "down to" not in finding.explanation
    assert "never fell below its start" in finding.explanation


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 5))


@pytest.mark.parametrize(("scale", "offset", "expected"), [
    (96.0, 0.0, "warning"), (1e-3, 0.0, "warning"), (1.0, 300.0, "warning"),
    (0.29, 0.5, None), (1.0, 0.0, None)])  # last two: images in [0, 1], standardized data
def test_inputs_far_from_unit_scale_are_named(scale, offset, expected):
    from nndiag.inspection import inspect_model

    torch.manual_seed(0)
    x = torch.randn(64, 20) * scale + offset
    report = inspect_model(_mlp(), (x, torch.randint(0, 5, (64,))))
    finding = report.finding("inputs_not_normalized")
    assert (finding.severity if finding else None) == expected
    if finding is not None:
        assert finding.fixes[0].id == "normalize_inputs"
        assert f"{x.std().item():.3g}" in finding.summary


def test_a_model_that_normalizes_its_input_or_takes_tokens_is_not_judged():
    from nndiag.inspection import inspect_model

    torch.manual_seed(0)
    normalized = nn.Sequential(nn.BatchNorm1d(20), _mlp())
    report = inspect_model(normalized, (torch.randn(64, 20) * 96, torch.randint(0, 5, (64,))))
    assert report.finding("inputs_not_normalized") is None
    report = inspect_model(_Bag(), (torch.randint(0, 3000, (8, 6)), torch.randint(0, 2, (8,))))
    assert report.finding("inputs_not_normalized") is None


def test_the_gate_names_unnormalized_inputs_first():
    from nndiag.training_check import check_training

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 20, generator=g) * 96, torch.randint(0, 5, (32,), generator=g))
            for _ in range(3)]
    report = check_training(_mlp(), data, steps=4, overfit_steps=10)
    finding = report.finding("inputs_not_normalized")
    assert finding is not None and finding.fixes[0].id == "normalize_inputs"
    for other in report.findings:  # every symptom it explains leads with the same fix
        if other.evidence.get("explained_by") == "inputs_not_normalized":
            assert other.fixes[0].id == "normalize_inputs"


def test_sparse_embedding_gradients_are_recorded_not_a_crash():
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(500, 16, mode="mean", sparse=True)
    head = nn.Linear(16, 2)
    model = nn.ModuleDict({"bag": bag, "head": head})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    monitor = Monitor(model, optimizer, every=1)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        tokens = torch.randint(0, 500, (8, 5), generator=g)
        loss = F.cross_entropy(head(bag(tokens)), torch.randint(0, 2, (8,), generator=g))
        optimizer.zero_grad()
        loss.backward()
        expected = bag.weight.grad.coalesce().values().norm().item()
        before = bag.weight.detach().clone()
        optimizer.step()
        monitor.step(loss)
        whole = ((bag.weight.detach() - before).norm() / before.norm()).item()
    monitor.close()
    (table,) = [layer for layer in monitor.samples[-1].layers if layer.name == "bag"]
    assert table.grad_norm == pytest.approx(expected, rel=1e-5)
    assert whole / 2 <= table.update_ratio <= whole * 2


def test_an_embedding_table_moving_only_its_tokens_rows_is_not_update_ratio_low():
    from nndiag.rules.run import run_rules
    from nndiag.runlog import read_run

    log = read_run(Path(__file__).parents[1] / "sample_runs" / "vanishing")
    assert "update_ratio_low" in [f.id for f in run_rules(log)]  # a Linear stack: judged
    log.meta["weight_layers"] = [{"name": layer["name"], "kind": "Embedding"}
                                 for layer in log.meta["weight_layers"]]
    assert "update_ratio_low" not in [f.id for f in run_rules(log)]


class _KwargsClassifier(nn.Module):
    """A Trainer-style classifier taking ``**kwargs``: the Trainer passes num_items_in_batch."""

    def __init__(self, uses_item_count: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        self.uses_item_count = uses_item_count

    def forward(self, x, labels=None, **kwargs):
        logits = self.net(x)
        items = kwargs.get("num_items_in_batch")
        if self.uses_item_count and items is not None:  # normalized over the whole step
            loss = F.cross_entropy(logits, labels, reduction="sum") / items
        else:  # each micro-batch's plain mean, whatever the Trainer passed
            loss = F.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


@pytest.mark.parametrize("uses_item_count", [False, True])
def test_the_transformers_callback_names_gradients_summed_over_micro_batches(
        tmp_path, uses_item_count):
    transformers = pytest.importorskip("transformers")
    from nndiag.integrations.transformers import NndiagCallback

    torch.manual_seed(0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=0.05, optim="sgd", report_to="none",
        logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        use_cpu=True, dataloader_num_workers=0)
    data = [{"x": torch.randn(8), "labels": torch.tensor(i % 3)} for i in range(32)]
    trainer = transformers.Trainer(model=_KwargsClassifier(uses_item_count), args=args,
                                   train_dataset=data,
                                   callbacks=[NndiagCallback(every=1, verbose=False,
                                                             log_dir=tmp_path / "run")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    named = [w for w in caught if "num_items_in_batch" in str(w.message)]
    assert len(named) == (0 if uses_item_count else 1)
    from nndiag.run_check import check_run

    finding = check_run(tmp_path / "run").finding("accumulation_unscaled")
    if uses_item_count:
        assert finding is None
    else:
        assert "2x the mean" in str(named[0].message)
        assert finding.severity == "info" and finding.evidence["micro_batches"] == 2
        assert "accepts_loss_kwargs = False" in finding.fixes[0].code


@pytest.mark.parametrize(("scale", "first_norm", "expected"), [
    (96.0, False, "warning"), (1.0, False, None), (96.0, True, None)])
def test_a_run_names_inputs_far_from_unit_scale_at_its_start(tmp_path, scale, first_norm,
                                                             expected):
    from nndiag.run_check import check_run
    from nndiag.runlog import read_run

    torch.manual_seed(0)
    body = _mlp()
    model = nn.Sequential(nn.BatchNorm1d(20), body) if first_norm else body
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    with Monitor(model, optimizer, every=5, log_dir=tmp_path / "run") as monitor:
        for _ in range(12):
            x = torch.randn(32, 20, generator=g) * scale
            loss = F.cross_entropy(model(x), torch.randint(0, 5, (32,), generator=g))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss)
    meta = read_run(tmp_path / "run").meta
    assert meta["input"]["std"] == pytest.approx(scale, rel=0.1)
    finding = check_run(tmp_path / "run").finding("inputs_not_normalized")
    assert (finding.severity if finding else None) == expected
    if finding is not None:
        assert finding.fixes[0].id == "normalize_inputs"
        assert "first sampled step" in finding.explanation


def _padded_clips(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy tones of 40-100 samples, one frequency per class, zero-padded to 400."""
    labels = torch.randint(0, 5, (n,), generator=generator)
    time_axis = torch.arange(400) / 40
    lengths = torch.randint(40, 100, (n,), generator=generator)
    clips = torch.sin(6.283 * (1 + labels[:, None]) * time_axis) + 0.3 * torch.randn(
        n, 400, generator=generator)
    return (clips * (torch.arange(400)[None] < lengths[:, None]))[:, None], labels


def _clip_cnn(norm: bool) -> nn.Module:
    layers: list[nn.Module] = []
    channels = 1
    for width in (16, 32):
        layers += [nn.Conv1d(channels, width, 9, padding=4, stride=2, bias=not norm)]
        layers += [nn.BatchNorm1d(width)] if norm else []
        layers += [nn.ReLU()]
        channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, 5))


@pytest.mark.parametrize(("norm", "lr", "dying"), [(True, 1e-3, False), (False, 0.2, True)],
                         ids=["healthy_bn", "dying_adam_0.2"])
def test_a_dying_1d_cnn_on_padded_clips_is_caught(tmp_path, norm, lr, dying):
    """Units of a Conv1d's output are channels: the padding of a healthy net's clips does not
    read as dead units, and a net that Adam at 0.2 kills is still caught."""
    from nndiag.run_check import check_run

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = _clip_cnn(norm)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    with Monitor(model, optimizer, every=10, log_dir=tmp_path / "run") as monitor:
        for _ in range(80):
            clips, labels = _padded_clips(32, generator)
            loss = F.cross_entropy(model(clips), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss)
    found = {finding.id for finding in check_run(tmp_path / "run").findings}
    assert ("dead_relu" in found) is dying, found
