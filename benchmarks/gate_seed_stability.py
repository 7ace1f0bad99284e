"""The CI gate over many initializations: healthy code must pass every one, bugs fail every one.

Each case builds its model anew from seeds 0..N-1 (the gate's own seed stays fixed) and runs
``check_training`` with its defaults (50 steps). Printed per case: how many initializations
came out as expected (healthy: no warning or error; a bug: its finding at error), and the
findings that broke the expectation.

Usage: python benchmarks/gate_seed_stability.py [--seeds 20] [--cases name,name]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nndiag.training_check import check_training

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fixtures import models, train_steps  # noqa: E402 - the project's test fixtures


def sgd_momentum(params: Any, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


# name: (model, data, options, the finding a bug must raise at error or None for healthy)
MLP = (models.relu_mlp, models.teacher_batches)
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], Any], dict[str, Any],
                       str | None]] = {
    "conv+BN, SGD momentum 0.05": (models.conv_bn, lambda: models.prototype_images(8),
                                   {"optimizer": sgd_momentum, "lr": 0.05}, None),
    "MLP, Adam 1e-3": (*MLP, {"optimizer": "adam", "lr": 1e-3}, None),
    "pre-LN token model, AdamW 1e-3": (models.TokenModel, models.next_token_batches,
                                       {"optimizer": "adamw", "lr": 1e-3}, None),
    "bug: no zero_grad": (*MLP, {"train_step": train_steps.no_zero_grad_step},
                          "zero_grad_missing"),
    "bug: softmax before the loss": (*MLP, {"train_step": train_steps.softmax_step},
                                     "softmax_before_loss"),
    "bug: zero_grad after backward": (
        *MLP, {"train_step": train_steps.zero_grad_after_backward_step}, "parameters_not_updated"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--cases", default="", help="comma-separated substrings of names")
    args = parser.parse_args()
    torch.set_num_threads(1)
    wanted = [c for c in CASES if not args.cases or any(s in c for s in args.cases.split(","))]
    print(f"{'case':36s} {'as expected':>12s}  unexpected findings")
    for name in wanted:
        build, make_data, options, bug = CASES[name]
        data = make_data()
        good, unexpected = 0, collections.Counter()
        start = time.perf_counter()
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = check_training(build(), data, **options)
            loud = [f for f in report.findings if f.severity in ("warning", "error")]
            if bug is None:
                ok = not loud
                unexpected.update(f"{f.severity} {f.id}" for f in loud)
            else:
                found = report.finding(bug)
                ok = found is not None and found.severity == "error"
                if not ok:
                    unexpected[f"missing {bug}"] += 1
            good += ok
        print(f"{name:36s} {good:>5d}/{args.seeds:<6d}  {dict(unexpected) or '-'}  "
              f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
