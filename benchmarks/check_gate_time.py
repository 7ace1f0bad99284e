"""Wall time of the CI gate on the CI-gate guide's healthy example (target: under 10 s).

Runs, as a user would (a fresh process each time, torch import included)::

    nndiag check --model nndiag.examples:he_mlp --data nndiag.examples:classification_data
    nndiag check ... --train-step nndiag.examples:train_step

and prints the median of --repeats runs of each: nndiag's own step, and the user's step
watched from outside. The CPU time (user + system) of the process is printed beside the wall
time: on a machine shared with other jobs, it is the steadier of the two.

Usage: python benchmarks/check_gate_time.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import resource
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
        times, cpu, codes = [], [], []
        for _ in range(args.repeats):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            codes.append(subprocess.run(command, capture_output=True).returncode)
            times.append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        print(f"nndiag check on the healthy example, {label}: median "
              f"{statistics.median(times):.2f}s wall over {args.repeats} runs (min "
              f"{min(times):.2f}s, max {max(times):.2f}s; CPU {statistics.median(cpu):.2f}s; "
              f"exit codes {codes}; target < 10 s)")


if __name__ == "__main__":
    main()
