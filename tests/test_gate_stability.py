"""The CI gate on healthy code over many initializations: quiet on every one.

A gate that fails healthy code once in a few runs gets switched off. Three healthy models,
each built from 20 seeds (the gate's own seed stays fixed), must pass with no warning and no
error; ``benchmarks/gate_seed_stability.py`` runs the same with the gate's defaults, and
classic bugs, which must fail on every seed.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from nndiag.training_check import check_training
from tests.fixtures.models import TokenModel, conv_bn, next_token_batches, prototype_images

SEEDS = range(20)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4))


def _tabular() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    teacher = torch.randn(12, 4, generator=g)
    inputs = [torch.randn(32, 12, generator=g) for _ in range(4)]
    return [(x, (x @ teacher).argmax(1)) for x in inputs]


@pytest.mark.parametrize(("build", "data", "options"), [
    (lambda: conv_bn(8, 4), lambda: prototype_images(4, 8, 4, 16),
     {"lr": 0.05, "optimizer": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9)}),
    (_mlp, _tabular, {"optimizer": "adam", "lr": 1e-3}),
    (lambda: TokenModel(24, 16), lambda: next_token_batches(24, 4, (8, 8)),
     {"optimizer": "adamw", "lr": 3e-3}),
], ids=["conv_bn_sgd_momentum", "mlp_adam", "token_model_adamw"])
def test_healthy_code_passes_the_gate_on_every_initialization(build, data, options):
    batches = data()
    loud = {}
    for seed in SEEDS:
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = check_training(build(), batches, **options)
        found = [f"{f.severity} {f.id}: {f.summary}" for f in report.findings
                 if f.severity != "info"]
        if found:
            loud[seed] = found
    assert loud == {}
