"""Cost of inspect's measurement, as a ratio to a plain forward+backward on the same batch.

For each model the variants are interleaved in the same process (plain step, probe, full
inspect_model), each repeated and summarized by its median. "probe" is the measurement
itself (hooks, statistics, state restore, one host transfer); "inspect" adds the rules,
advice and report. --try-fixes is excluded. Target: probe <= 3x the plain step.

Usage: python benchmarks/inspect_overhead.py [--repeats 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from nndiag import examples, inspect_model
from nndiag.batches import Batch
from nndiag.capture import run_probe

CASES = [
    # name, factory, input shape, integer inputs
    ("he_mlp 8x256, batch 256", examples.he_mlp, (256, 32), False),
    ("resnet_bn CIFAR 32x32, batch 32", examples.resnet_bn, (32, 3, 32, 32), False),
    ("xavier_relu_convnet 30 conv, batch 32", examples.xavier_relu_convnet, (32, 3, 16, 16),
     False),
    ("transformer_preln 4x64, batch 16x64", examples.transformer_preln, (16, 64), True),
    ("lstm_classifier, batch 64x32", examples.lstm_classifier, (64, 32), True),
    ("residual_mlp 24 blocks, batch 256", examples.residual_mlp, (256, 32), False),
]


def _plain_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    out = model(x)
    loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    loss.backward()
    model.zero_grad(set_to_none=True)


def _median_seconds(fn: Callable[[], object], repeats: int, samples: list[float]) -> None:
    start = time.perf_counter()
    fn()
    samples.append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'model':40s} {'plain fwd+bwd':>14s} {'probe':>10s} {'ratio':>7s} "
          f"{'inspect':>10s} {'ratio':>7s}")
    worst = 0.0
    for name, factory, shape, integer in CASES:
        model = factory()
        g = torch.Generator().manual_seed(0)
        x = (torch.randint(0, examples.VOCAB, shape, generator=g) if integer
             else torch.randn(shape, generator=g))
        out = model(x)
        y = torch.randint(0, out.shape[-1], out.shape[:-1], generator=g)
        batch = [Batch(x, y)]
        variants = {
            "plain": lambda m=model, x=x, y=y: _plain_step(m, x, y),
            "probe": lambda m=model, b=batch: run_probe(m, b),
            "inspect": lambda m=model, x=x, y=y: inspect_model(m, (x, y)),
        }
        samples: dict[str, list[float]] = {k: [] for k in variants}
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for key, fn in variants.items():
                _median_seconds(fn, args.repeats, samples[key])
        plain, probe, full = (statistics.median(samples[k]) for k in variants)
        worst = max(worst, probe / plain)
        print(f"{name:40s} {plain * 1e3:11.1f} ms {probe * 1e3:7.1f} ms {probe / plain:6.2f}x "
              f"{full * 1e3:7.1f} ms {full / plain:6.2f}x")
    print(f"worst probe ratio: {worst:.2f}x (target <= 3x)")


if __name__ == "__main__":
    main()
