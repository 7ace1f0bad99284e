"""Rules: hand-made records (no torch), the pathology zoo, healthy models at init and trained."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nndiag import examples, inspect_model
from nndiag.capture import run_probe
from nndiag.records import LayerRecord, ProbeRecord
from nndiag.rules import run_probe_rules
from nndiag.rules.thresholds import THRESHOLDS, Threshold
from nndiag.specs import Batch
from tests.fixtures.models import ZOO_HEALTHY, example_batch


def weight_layer(index: int, gain: float, grad_to_weight: float, std: float = 1.0,
                 **extra) -> LayerRecord:
    return LayerRecord(name=f"fc{index}", module=f"fc{index}", kind="Linear", index=index,
                       std=std, mean=0.0, absmax=3.0, grad_out_norm=gain, depth_gain=gain,
                       params=10,
                       trainable=True, weight_norm=1.0, weight_rms=0.1, grad_norm=grad_to_weight,
                       grad_to_weight=grad_to_weight, fan_in=64, fan_out=64,
                       init_reference="he", init_scale=1.0, **extra)


def probe_of(layers: list[LayerRecord], loss: float = 2.3, **extra) -> ProbeRecord:
    return ProbeRecord(layers=layers, loss=loss, loss_name="cross_entropy", num_classes=10,
                       output_grad_norm=1.0, batch_size=64, **extra)


def ids(findings) -> dict[str, str]:
    return {f.id: f.severity for f in findings}


@pytest.mark.parametrize(("value", "expected"), [(0.5, None), (1e-3, "warning"),
                                                 (1e-5, "warning"), (1e-6, "error"),
                                                 (float("nan"), None), (None, None)])
def test_threshold_lower_is_worse(value, expected):
    assert THRESHOLDS["vanishing_depth_gain"].severity(value) == expected


def test_threshold_higher_is_worse():
    rule = Threshold(10, 100, True, "")
    assert [rule.severity(v) for v in (9.9, 10, 99, 100)] == [None, "warning", "warning", "error"]


def test_every_threshold_has_a_reason_and_ordered_levels():
    for name, rule in THRESHOLDS.items():
        assert len(rule.reason) > 40, name
        assert (rule.error > rule.warning) == rule.higher_is_worse, name


def test_vanishing_through_depth_from_records():
    layers = [weight_layer(0, 1e-4, 0.01), weight_layer(1, 1e-2, 0.05), weight_layer(2, 1.0, 0.1)]
    found = run_probe_rules(probe_of(layers))
    assert ids(found) == {"vanishing_gradients": "warning"}
    assert found[0].layers == ["fc0"]
    assert found[0].evidence["judged_by"] == ["depth"]
    layers[0].grad_out_norm = layers[0].depth_gain = 1e-7
    assert ids(run_probe_rules(probe_of(layers))) == {"vanishing_gradients": "error"}


def test_vanishing_in_absolute_scale_only_while_the_loss_is_large():
    layers = [weight_layer(i, 0.5, 3e-7) for i in range(3)]
    found = run_probe_rules(probe_of(layers, loss=2.3))
    assert ids(found) == {"vanishing_gradients": "error"}
    assert found[0].evidence["judged_by"] == ["scale"]
    # the same tiny gradients on a model whose loss is tiny as well: converged, not vanishing
    assert run_probe_rules(probe_of(layers, loss=1e-6)) == []


def test_exploding_from_records():
    layers = [weight_layer(0, 5e3, 0.1), weight_layer(1, 10.0, 0.1), weight_layer(2, 1.0, 0.1)]
    assert ids(run_probe_rules(probe_of(layers))) == {"exploding_gradients": "warning"}
    layers = [weight_layer(0, 1.0, 2e3), weight_layer(1, 1.0, 0.1)]
    found = run_probe_rules(probe_of(layers))
    assert ids(found) == {"exploding_gradients": "error"}
    assert found[0].evidence["judged_by"] == ["scale"]


def test_poor_initialization_from_records_skips_zero_initialized_layers():
    layers = [weight_layer(0, 1, 0.1, std=1.0), weight_layer(1, 1, 0.1, std=0.05),
              weight_layer(2, 1, 0.1, std=0.004)]
    found = run_probe_rules(probe_of(layers))
    assert ids(found) == {"poor_initialization": "warning"}
    assert found[0].evidence["from_layer"] == "fc0" and found[0].evidence["to_layer"] == "fc2"
    # a zero-initialized head (weights all zero, output zero) is a choice, not a collapse
    layers = [weight_layer(0, 1, 0.1), weight_layer(1, 1, 0.1, std=0.0)]
    layers[1].weight_rms = 0.0
    assert run_probe_rules(probe_of(layers)) == []


def test_dead_relu_needs_enough_samples():
    relu = LayerRecord(name="act", module="act", kind="ReLU", index=1, activation="relu",
                       std=0.1, absmax=1.0, dead_fraction=0.95)
    layers = [weight_layer(0, 1, 0.1), relu, weight_layer(2, 1, 0.1)]
    assert ids(run_probe_rules(probe_of(layers))) == {"dead_relu": "error"}
    small = probe_of(layers)
    small.batch_size = 4
    assert run_probe_rules(small) == []


def test_nan_inf_suppresses_the_other_rules():
    bad = weight_layer(1, float("nan"), float("nan"), std=float("nan"))
    bad.absmax = float("nan")
    layers = [weight_layer(0, 1e-9, 1e-9), bad]
    found = run_probe_rules(probe_of(layers, loss=float("nan")))
    assert ids(found) == {"nan_inf": "error"}
    assert found[0].evidence["first_layer"] == "fc1"


def test_records_round_trip_through_plain_data():
    probe = run_probe(examples.dead_relu_mlp(), [Batch(example_batch("dead_relu_mlp"))])
    again = ProbeRecord.from_dict(probe.to_dict())
    assert again == probe
    assert ids(run_probe_rules(again)) == ids(run_probe_rules(probe))


PATHOLOGIES = [
    ("deep_sigmoid_mlp", "vanishing_gradients", "error"),
    ("xavier_relu_convnet", "vanishing_gradients", "error"),
    ("xavier_relu_convnet", "poor_initialization", "error"),
    ("normal_init_mlp", "exploding_gradients", "error"),
    ("normal_init_mlp", "poor_initialization", "error"),
    ("dead_relu_mlp", "dead_relu", "error"),
    ("functional_dead_relu_mlp", "dead_relu", "error"),
    ("saturated_tanh_mlp", "saturated_activations", "error"),
    ("unused_branch_model", "unused_parameters", "warning"),
]


@pytest.mark.parametrize(("name", "finding", "severity"), PATHOLOGIES)
def test_pathology_is_found(name, finding, severity):
    report = inspect_model(getattr(examples, name)(), (example_batch(name), None))
    assert ids(report.findings).get(finding) == severity, [f.summary for f in report.findings]


def test_xavier_convnet_is_caught_although_first_last_weight_gradient_ratio_looks_normal():
    report = inspect_model(examples.xavier_relu_convnet(), (example_batch("xavier_relu_convnet"),
                                                            None))
    weights = [row for row in report.layers if row["grad_norm"] is not None]
    ratio = weights[0]["grad_norm"] / weights[-1]["grad_norm"]
    assert 0.1 < ratio < 10  # a first/last weight-gradient rule would miss it
    vanishing = report.finding("vanishing_gradients")
    assert vanishing is not None and "scale" in vanishing.evidence["judged_by"]
    assert max(row["grad_to_weight"] for row in weights) < 1e-5


def test_normal_init_mlp_is_caught_although_its_first_layer_gradient_is_smaller():
    report = inspect_model(examples.normal_init_mlp(), (example_batch("normal_init_mlp"), None))
    weights = [row for row in report.layers if row["grad_norm"] is not None]
    assert weights[0]["grad_norm"] < weights[-1]["grad_norm"]
    exploding = report.finding("exploding_gradients")
    assert exploding is not None and exploding.severity == "error"
    assert exploding.evidence["max_depth_gain"] > 1e6


def test_dead_relus_are_not_reported_as_vanishing_too():
    report = inspect_model(examples.dead_relu_mlp(), (example_batch("dead_relu_mlp"), None))
    assert set(ids(report.findings)) == {"dead_relu"}


@pytest.mark.parametrize("name", ZOO_HEALTHY)
def test_healthy_model_at_init_is_ok(name):
    report = inspect_model(getattr(examples, name)(), (example_batch(name), None))
    assert report.status == "ok", [f.summary for f in report.findings]


def test_healthy_dict_input_model_is_ok_with_its_loss():
    report = inspect_model(examples.dict_input_model(), examples.dict_input_data(),
                           loss=examples.dict_input_loss, batches=2)
    assert report.status == "ok", [f.summary for f in report.findings]


def _train(model, x, y, steps: int) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


TRAINED = [
    ("he_mlp", lambda x: x[:, :10].argmax(1), 150),
    ("residual_mlp", lambda x: x[:, :10].argmax(1), 150),
    ("lstm_classifier", lambda x: x[:, 0] % 10, 150),
    ("transformer_preln", lambda x: (x + 1) % 100, 120),
]


@pytest.mark.parametrize(("name", "target", "steps"), TRAINED)
def test_healthy_model_trained_to_low_loss_is_ok(name, target, steps):
    model = getattr(examples, name)()
    x = example_batch(name)
    y = target(x)
    final_loss = _train(model, x, y, steps)
    assert final_loss < 0.2
    report = inspect_model(model, (x, y))
    assert report.status == "ok", [f.summary for f in report.findings]


def test_trained_resnet_is_ok():
    model = examples.resnet_bn(widths=(8, 16), blocks=1)
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    assert _train(model, x, y, 60) < 0.2
    report = inspect_model(model, (x, y))
    assert report.status == "ok", [f.summary for f in report.findings]


def test_a_cut_gradient_path_is_explained_without_dividing_by_zero():
    from nndiag.advice import advise

    layers = [weight_layer(0, 0.0, 0.0), weight_layer(1, 1.0, 0.1)]
    probe = probe_of(layers)
    finding = advise(run_probe_rules(probe)[0], probe)
    assert finding.id == "vanishing_gradients" and finding.severity == "error"
    assert "No gradient at all reaches fc0" in finding.explanation
