"""Wall time of the CI gate on the README's healthy example (target: under 10 s).

Runs, as a user would (a fresh process each time, torch import included)::

    nndiag check --model nndiag.examples:he_mlp --data nndiag.examples:classification_data
    nndiag check ... --train-step nndiag.examples:train_step

and prints the median of --repeats runs of each: nndiag's own step, and the user's step
watched from outside.

Usage: python benchmarks/check_gate_time.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMAND = [sys.executable, "-m", "nndiag", "check", "--model", "nndiag.examples:he_mlp",
           "--data", "nndiag.examples:classification_data"]
VARIANTS = {"nndiag's own step": COMMAND,
            "--train-step (the user's step)": [*COMMAND, "--train-step",
                                               "nndiag.examples:train_step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for label, command in VARIANTS.items():
        times, codes = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            codes.append(subprocess.run(command, capture_output=True).returncode)
            times.append(time.perf_counter() - start)
        print(f"nndiag check on the healthy example, {label}: median "
              f"{statistics.median(times):.2f}s over {args.repeats} runs (min {min(times):.2f}s, "
              f"max {max(times):.2f}s; exit codes {codes}; target < 10 s)")


if __name__ == "__main__":
    main()
