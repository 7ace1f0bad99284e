"""Time and peak memory of ``nndiag check`` on a long recorded run (target: 1M steps < 10 s).

Writes a synthetic run log the way ``Monitor`` does on the CPU (``RunWriter``: one
``steps.jsonl`` line per step, the worst case for reading; a sampled step every ``--every``
steps with 8 layers), then runs ``nndiag check RUN_DIR --json`` in a fresh process, as a
user would, and prints its wall time, CPU time and peak resident memory (``ru_maxrss`` of the
child, from ``resource.getrusage(RUSAGE_CHILDREN)``). It also times reading the run log
alone (``read_run``) in this process.

The loss falls with noise and stays finite, so every rule over the loss reads all of it.

Usage: python benchmarks/check_long_run.py [--steps 1000000] [--every 50] [--keep DIR]
"""

from __future__ import annotations

import argparse
import math
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nndiag.records import LayerRecord, StepRecord
from nndiag.runlog import RunWriter, read_run

LAYERS = 8
TARGET_S = 10.0


def sample(step: int, loss: float, rng: random.Random) -> StepRecord:
    """A sampled step of an MLP of ``LAYERS`` Linear/ReLU pairs, statistics with some noise."""
    layers = []
    for i in range(LAYERS):
        linear = i % 2 == 0
        layers.append(LayerRecord(
            name=str(i), module=str(i), kind="Linear" if linear else "ReLU", index=i,
            activation=None if linear else "relu", mean=rng.gauss(0, 0.1),
            std=1 + rng.gauss(0, 0.05), absmax=4 + rng.random(),
            dead_fraction=None if linear else 0.1 * rng.random(),
            weight_norm=10.0 if linear else None, grad_norm=0.5 * rng.random() if linear else None,
            update_ratio=1e-3 * (1 + rng.random()) if linear else None))
    return StepRecord(step, loss=loss, grad_norm=1 + rng.random(), layers=layers)


def write_run(directory: Path, steps: int, every: int, seed: int = 0) -> Path:
    """A run of ``steps`` steps: a loss falling from 2.5 with noise, sampled every ``every``."""
    rng = random.Random(seed)
    writer = RunWriter(directory, {"model": "Sequential", "optimizer": "SGD", "every": every,
                                   "world_size": 1})
    for step in range(steps):
        loss = 0.3 + 2.2 * math.exp(-5 * step / steps) + 0.05 * rng.gauss(0, 1)
        writer.write_steps(step, [loss], [0.01])
        if step % every == 0:
            writer.write_sample(sample(step, loss, rng))
    writer.close()
    return directory


def time_check(run: Path) -> tuple[float, float, float, int]:
    """Wall s, CPU s and peak RSS (MiB) of ``nndiag check RUN --json`` in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    code = subprocess.run([sys.executable, "-m", "nndiag", "check", str(run), "--json"],
                          stdout=subprocess.DEVNULL).returncode
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    # ru_maxrss of the children is the largest of any child so far, in KiB on Linux: this is
    # the only child this process has started.
    return wall, cpu, after.ru_maxrss / 1024, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--keep", type=Path, help="Write the run here and keep it.")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="nndiag-long-run-"))
    run = args.keep or root / "run"
    try:
        start = time.perf_counter()
        write_run(run, args.steps, args.every)
        size = sum(p.stat().st_size for p in run.iterdir()) / 2**20
        print(f"wrote {args.steps:,} steps ({args.steps // args.every + 1:,} sampled, "
              f"{size:.0f} MiB) in {time.perf_counter() - start:.1f}s")
        start, cpu = time.perf_counter(), time.process_time()
        read_run(run)
        print(f"read_run alone: {time.perf_counter() - start:.2f}s wall, CPU "
              f"{time.process_time() - cpu:.2f}s")
        wall, cpu, peak, code = time_check(run)
        print(f"nndiag check on {args.steps:,} steps: {wall:.2f}s wall, CPU {cpu:.2f}s, "
              f"peak RSS {peak:.0f} MiB, exit code {code} (target < {TARGET_S:.0f} s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
