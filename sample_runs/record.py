"""Record the sample runs that `make demo` and CI check: ``python sample_runs/record.py``.

CI checks them with ``nndiag check sample_runs/NAME --fail-on warning``: the healthy run exits
0, every other run exits 1 with its finding (``tests/test_sample_runs.py``).

Each run trains a small built-in model on ``nndiag.examples.classification_data`` with
``nndiag.Monitor`` (every 10 steps) for 300 steps, seeded, on the CPU:

- healthy: a He-initialized ReLU MLP with SGD (lr 0.05, momentum 0.9).
- vanishing: 20 stacked sigmoids with the same optimizer.
- exploding: a 10-layer 256-wide ReLU MLP with N(0, 1) weights, SGD at lr 1e-7: gradients
  millions of times the weights, then NaN.
- dying_relu: the healthy MLP with Adam at lr 0.1: most ReLUs die after the first steps.
- oscillating: the healthy MLP with Adam at lr 0.03 (30x its usual rate): the loss swings
  instead of settling.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from nndiag import examples
from nndiag.monitor import Monitor

HERE = Path(__file__).resolve().parent
RUNS = {
    "healthy": (lambda: examples.he_mlp(depth=4, width=64),
                lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    "vanishing": (examples.deep_sigmoid_mlp,
                  lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    "exploding": (examples.normal_init_mlp, lambda p: torch.optim.SGD(p, lr=1e-7)),
    "dying_relu": (lambda: examples.he_mlp(depth=4, width=64),
                   lambda p: torch.optim.Adam(p, lr=0.1)),
    "oscillating": (lambda: examples.he_mlp(depth=4, width=64),
                    lambda p: torch.optim.Adam(p, lr=0.03)),
}


def record(name: str, out: Path, steps: int = 300, every: int = 10) -> Path:
    """Train one sample run and write its log to ``out / name``."""
    build, make_optimizer = RUNS[name]
    torch.manual_seed(0)
    model = build()
    optimizer = make_optimizer(model.parameters())
    data = examples.classification_data(batches=16, batch_size=64)
    target = out / name
    shutil.rmtree(target, ignore_errors=True)
    with Monitor(model, optimizer, every=every, log_dir=target) as monitor:
        for step in range(steps):
            x, y = data[step % len(data)]
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss)
    return target


def main() -> None:
    """Record the runs named on the command line (all by default)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", default=list(RUNS))
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.names:
        print(record(name, args.out))


if __name__ == "__main__":
    main()
