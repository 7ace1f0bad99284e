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

SEEDS = range(20)


def _conv_bn() -> nn.Module:
    """Small convolutions with their default bias, each followed by BatchNorm."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def _images() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    prototypes = torch.randn(4, 3, 8, 8, generator=g)
    labels = [torch.randint(0, 4, (16,), generator=g) for _ in range(4)]
    return [(prototypes[y] + 0.5 * torch.randn(16, 3, 8, 8, generator=g), y) for y in labels]


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4))


def _tabular() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    teacher = torch.randn(12, 4, generator=g)
    inputs = [torch.randn(32, 12, generator=g) for _ in range(4)]
    return [(x, (x @ teacher).argmax(1)) for x in inputs]


class _TokenModel(nn.Module):
    """A pre-LN encoder layer over a token embedding, predicting the next token id."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(24, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True,
                                                norm_first=True)
        self.head = nn.Linear(16, 24)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.emb(tokens)))


def _tokens() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randint(0, 24, (8, 8), generator=g) for _ in range(4)]
    return [(x, (x + 1) % 24) for x in inputs]


@pytest.mark.parametrize(("build", "data", "options"), [
    (_conv_bn, _images, {"lr": 0.05, "optimizer": lambda params, lr: torch.optim.SGD(
        params, lr=lr, momentum=0.9)}),
    (_mlp, _tabular, {"optimizer": "adam", "lr": 1e-3}),
    (_TokenModel, _tokens, {"optimizer": "adamw", "lr": 3e-3}),
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
