"""lr-find on problems no constant was chosen on: a held-out check of the shipped rule.

``lr_find_quality.py`` chooses nndiag's constants by leave-one-problem-out over its 28
problems; its held-out figures are honest, but the space searched was shaped by looking at
those problems. The six problems here were built after the rule was fixed (different data,
architectures and optimizer pairings: iris with plain SGD, a BatchNorm MLP with AdamW, a
regression with Adam, a 1D CNN with SGD+momentum, a GRU on digit rows with RMSprop, a GELU +
LayerNorm MLP with Adam) and nothing was tuned on them. Same truth and scoring as
``lr_find_quality.py`` (quarter-decade grid, four training seeds, normalized regret) and the
same three sweeps per finder; truth cached in ``lr_unseen_truth.json``.

Usage: python benchmarks/lr_unseen.py   (about 25 s from the cache; 7 min without it)
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from lr_find_quality import SWEEP_SEEDS, fastai_finder, torch_lr_finder  # noqa: E402
from lr_problems import (  # noqa: E402
    Problem,
    _mlp,
    _Recurrent,
    _split,
    _standardize,
    _target,
    fixed_default,
)
from lr_truth import Truth, regret  # noqa: E402

from nndiag.lrfind import lr_find  # noqa: E402

CACHE = Path(__file__).with_name("lr_unseen_truth.json")
GRID = (-5.0, 1.0)


def make_unseen() -> list[Problem]:
    """The six held-out problems."""
    from sklearn.datasets import (
        load_digits,
        load_iris,
        make_classification,
        make_moons,
        make_regression,
    )

    out = []
    xi, yi = load_iris(return_X_y=True)
    out.append(Problem("iris_mlp_plain_sgd", "MLP", lambda: _mlp([4, 32, 3]),
                       *_split(_standardize(xi), torch.tensor(yi), seed=1),
                       F.cross_entropy, "sgd", 200, 16, grid=GRID))
    xc, yc = make_classification(2000, 20, n_informative=10, n_classes=5, random_state=1)
    out.append(Problem("clf5_bn_mlp4_adamw", "MLP+BN",
                       lambda: _mlp([20, 64, 64, 64, 5], norm="bn"),
                       *_split(_standardize(xc), torch.tensor(yc), seed=1),
                       F.cross_entropy, "adamw", 250, 64, grid=GRID))
    xr, yr = make_regression(2000, 20, n_informative=10, noise=10.0, random_state=1)
    out.append(Problem("make_regression_mlp_adam", "regression", lambda: _mlp([20, 64, 64, 1]),
                       *_split(_standardize(xr), _target(yr), seed=1), F.mse_loss, "adam",
                       200, 32, grid=GRID))
    g = torch.Generator().manual_seed(11)
    n, length = 2000, 64
    freq = 1.0 + 7.0 * torch.rand(n, 1, generator=g)  # cycles per sequence
    phase = 2 * math.pi * torch.rand(n, 1, generator=g)
    t = torch.arange(length) / length
    signal = torch.sin(2 * math.pi * freq * t + phase) + 0.3 * torch.randn(n, length, generator=g)
    out.append(Problem("conv1d_sine_freq_sgdm", "1D CNN", lambda: nn.Sequential(
        nn.Conv1d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(16, 32, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
        nn.Linear(32, 2)), *_split(signal.unsqueeze(1), (freq[:, 0] > 4.5).long(), seed=1),
        F.cross_entropy, "sgdm", 200, 32, grid=GRID))
    xd, yd = load_digits(return_X_y=True)
    rows = torch.tensor(xd / 16.0, dtype=torch.float32).reshape(-1, 8, 8)
    out.append(Problem("digits_rows_gru_rmsprop", "GRU",
                       lambda: _Recurrent("gru", None, 32, 10, inputs=8),
                       *_split(rows, torch.tensor(yd), seed=1), F.cross_entropy, "rmsprop",
                       250, 32, grid=GRID))
    xm, ym = make_moons(1500, noise=0.3, random_state=1)
    out.append(Problem("moons_gelu_ln_adam", "MLP+LN", lambda: _mlp([2, 64, 64, 2], nn.GELU, "ln"),
                       *_split(torch.tensor(xm, dtype=torch.float32), torch.tensor(ym), seed=1),
                       F.cross_entropy, "adam", 300, 32, grid=GRID))
    return out


def main() -> None:
    torch.set_num_threads(1)
    truth = Truth(CACHE)
    finders = {
        "nndiag": lambda p, s: lr_find(p.model(s), p.loader(s), loss=p.loss,
                                       optimizer=p.make_optimizer).suggested_lr,
        "nndiag --budget": lambda p, s: lr_find(p.model(s), p.loader(s), loss=p.loss,
                                                optimizer=p.make_optimizer,
                                                budget=p.steps).suggested_lr,
        "nndiag --no-trials": lambda p, s: lr_find(p.model(s), p.loader(s), loss=p.loss,
                                                   optimizer=p.make_optimizer,
                                                   trials=False).suggested_lr,
        "torch-lr-finder": torch_lr_finder,
        "fastai valley": fastai_finder,
        "fixed default": lambda p, s: fixed_default(p.optimizer),
    }
    table: dict[str, dict[str, float]] = {}
    for problem in make_unseen():
        truth.fill_grid(problem)
        log_lrs, regrets, best, untrained = truth.table(problem)
        row, chosen = {}, {}
        for name, finder in finders.items():
            lrs = [finder(problem, seed) for seed in SWEEP_SEEDS]
            chosen[name] = lrs
            row[name] = statistics.fmean(
                2.0 if not lr or not lr > 0 else regret(truth.loss(problem, lr), best, untrained)
                for lr in lrs)
        truth.save()
        table[problem.label] = row
        best_lr = 10 ** log_lrs[int(regrets.argmin())]
        print(f"{problem.label}: best {best_lr:.2e}; " + "; ".join(
            f"{name} " + " ".join(f"{lr:.2e}" if lr else "none" for lr in lrs)
            for name, lrs in chosen.items()), flush=True)
    names = list(finders)
    print("\nnormalized regret, mean over sweep seeds " + ", ".join(map(str, SWEEP_SEEDS)))
    print("| problem | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label, row in table.items():
        print(f"| {label} | " + " | ".join(f"{row[n]:.3f}" for n in names) + " |")
    print("| mean | " + " | ".join(
        f"{statistics.fmean(r[n] for r in table.values()):.3f}" for n in names) + " |")
    print("| worst | " + " | ".join(
        f"{max(r[n] for r in table.values()):.3f}" for n in names) + " |")
    print("| problems above 0.25 | " + " | ".join(
        str(sum(r[n] > 0.25 for r in table.values())) for n in names) + " |")


if __name__ == "__main__":
    main()
