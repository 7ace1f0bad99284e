"""The probe (``nndiag inspect``) and ``Monitor`` agree on every statistic they share.

Both run on the same measurement core; this checks it end to end: the same model and batch,
measured once by the probe and once by a Monitor over one training step whose optimizer has a
learning rate of zero (so the weights the Monitor reads after the step are the probe's), must
give the same sites under the same names, and the same numbers.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from nndiag import examples
from nndiag.batches import Batch
from nndiag.capture import ProbeConfig, run_probe
from nndiag.losses import Loss
from nndiag.monitor import Monitor
from nndiag.specs import primary_output
from tests.fixtures.models import example_batch

SHARED = ("mean", "std", "dead_fraction", "saturated_fraction", "preact_std", "weight_norm",
          "weight_rms", "grad_norm", "grad_to_weight", "init_scale", "fan_in", "fan_out",
          "activation", "kind", "functional", "params")

ACTIVATION_FIELDS = ("mean", "std", "dead_fraction", "saturated_fraction", "preact_std",
                     "activation", "kind", "functional")

CASES = ["he_mlp", "functional_dead_relu_mlp", "saturated_tanh_mlp", "inplace_relu_cnn",
         "resnet_bn", "transformer_preln", "lstm_classifier", "shared_weights_mlp",
         "frozen_backbone_mlp", "deep_sigmoid_mlp"]


def _loss(outputs, targets):
    logits = primary_output(outputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def _targets(model, x):
    with torch.no_grad():
        logits = primary_output(copy.deepcopy(model)(x))
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=g)


def _monitor_step(model, x, y):
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.0)
    with Monitor(model, optimizer, every=1, update_sample=0) as monitor:
        loss = _loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        monitor.step(loss)
    return monitor.samples[0]


@pytest.mark.parametrize("name", CASES)
def test_probe_and_monitor_agree(name):
    build = getattr(examples, name)
    x = example_batch(name)
    model = build()
    y = _targets(model, x)
    probe = run_probe(model, [Batch(x, y)], ProbeConfig(Loss("cross_entropy", _loss)))
    step = _monitor_step(build(), x, y)

    assert step.loss == pytest.approx(probe.loss, rel=1e-5)
    recorded = {layer.name: layer for layer in step.layers}
    assert list(recorded) == [layer.name for layer in probe.layers]
    compared = 0
    for layer in probe.layers:
        other = recorded[layer.name]
        # Monitor follows the weights that train: a frozen layer gets activation statistics.
        fields = SHARED if layer.trainable or not layer.has_weights else ACTIVATION_FIELDS
        for field in fields:
            mine, theirs = getattr(layer, field), getattr(other, field)
            if isinstance(mine, float) and isinstance(theirs, float):
                assert theirs == pytest.approx(mine, rel=2e-4, abs=1e-6), (layer.name, field)
                compared += 1
            else:
                assert theirs == mine, (layer.name, field)
        assert other.output_finite == layer.output_finite
    assert compared >= 2 * len(probe.layers)
    grads = [layer.grad_norm for layer in probe.layers if layer.grad_norm is not None]
    assert step.grad_norm >= math.sqrt(sum(g * g for g in grads)) * (1 - 1e-5)
