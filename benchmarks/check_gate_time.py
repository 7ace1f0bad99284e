"""Wall time of the CI gate on the README's healthy example (target: under 10 s).

Runs ``nndiag check --model nndiag.examples:he_mlp --data nndiag.examples:classification_data``
as a user would (a fresh process each time, torch import included) and prints the median of
--repeats runs.

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    times, codes = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        codes.append(subprocess.run(COMMAND, capture_output=True).returncode)
        times.append(time.perf_counter() - start)
    print(f"nndiag check on the healthy example: median {statistics.median(times):.2f}s over "
          f"{args.repeats} runs (exit codes {codes}; target < 10 s)")


if __name__ == "__main__":
    main()
