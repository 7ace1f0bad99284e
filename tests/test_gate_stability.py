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

from nndiag.training_check import check_training
from tests.fixtures.models import (
    TokenModel,
    conv_bn,
    next_token_batches,
    prototype_images,
    relu_mlp,
    teacher_batches,
)

SEEDS = range(20)


@pytest.mark.parametrize(("build", "data", "options"), [
    (lambda: conv_bn(8, 4), lambda: prototype_images(4, 8, 4, 16),
     {"lr": 0.05, "optimizer": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9)}),
    (lambda: relu_mlp(12, 32, 4), lambda: teacher_batches(12, 4, 4, 32),
     {"optimizer": "adam", "lr": 1e-3}),
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
