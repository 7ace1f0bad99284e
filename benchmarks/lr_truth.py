"""Grid truth for the lr-find benchmark, cached in ``benchmarks/lr_grid_truth.json``.

For every problem of ``lr_problems.py``: the validation loss after the problem's budget at a
constant learning rate, for each learning rate of a log grid (``PER_DECADE`` points per decade,
the quarter decades 1e-6, 1.78e-6, 3.16e-6, 5.62e-6, ...), the mean over four seeds (model
initialization and data order), and the loss of the untrained model. Four, not two: on problems
whose training is bimodal (one seed learns the task, the other not) two seeds made the truth
itself jump by 0.5 regret between neighbouring grid points. Where four are still too few (the
standard error of the mean at the best grid rate above ``MAX_STANDARD_ERROR`` of the regret
scale, L(untrained) - L(best)), the whole problem is measured again with ``MANY_SEEDS``: a truth
whose own error is a fifth of the regret scale cannot tell a good finder from a lucky one.

The grid is searched outward from 1e-3 and stops on each side once some consecutive points are
hopeless (above, three: diverged or well above the untrained loss; below, two: less than 5% of
the best fall made), so the full range is only paid for where it matters. Any other learning
rate (a finder's suggestion) is trained the same way on demand and cached too.

Each problem's entry carries a fingerprint of its data, model size and budget: a changed
problem is recomputed, an unchanged one is read back; points cached with fewer seeds than the
problem's are extended with the missing ones.

Run directly to fill the cache: ``python benchmarks/lr_truth.py [--problems a,b]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from lr_problems import Problem, make_problems, train_val_loss, val_loss  # noqa: E402

CACHE = Path(__file__).with_name("lr_grid_truth.json")
SEEDS = (0, 1, 2, 3)
MANY_SEEDS = tuple(range(16))  # for problems whose truth is too noisy with SEEDS
MAX_STANDARD_ERROR = 0.1  # of L(untrained) - L(best), at the best grid rate
PER_DECADE = 4


def key(lr: float) -> str:
    return f"{math.log10(lr):.4f}"


class Truth:
    """Cached validation losses; ``loss(problem, lr)`` trains on a miss."""

    def __init__(self, path: Path = CACHE) -> None:
        self.path = path
        self.data: dict = {"seeds": list(SEEDS), "per_decade": PER_DECADE, "problems": {}}
        if path.exists():
            self.data = json.loads(path.read_text())
        self.dirty = False

    def entry(self, problem: Problem) -> dict:
        fp = problem.fingerprint()
        entry = self.data["problems"].get(problem.name)
        if entry is None or entry.get("fingerprint") != fp:
            entry = {"fingerprint": fp, "losses": {}, "seeds": []}
            self.data["problems"][problem.name] = entry
        if len(entry.setdefault("seeds", [])) < len(SEEDS):  # new, or cached with fewer
            self._use_seeds(problem, entry, SEEDS)
        return entry

    def _use_seeds(self, problem: Problem, entry: dict, seeds: tuple[int, ...]) -> None:
        entry["untrained"] = statistics.fmean(val_loss(problem.model(s), problem) for s in seeds)
        entry["seeds"] = list(seeds)
        self.dirty = True

    def losses(self, problem: Problem, lr: float) -> list[float | None]:
        """The validation loss of each of the problem's seeds (None: diverged)."""
        entry = self.entry(problem)
        seeds, losses, k = entry["seeds"], entry["losses"], key(lr)
        known = losses.get(k, [])
        if len(known) < len(seeds):  # a miss, or a point cached with fewer seeds
            values = [train_val_loss(problem, 10 ** float(k), s) for s in seeds[len(known):]]
            losses[k] = known + [v if math.isfinite(v) else None for v in values]
            self.dirty = True
        return losses[k][:len(seeds)]

    def loss(self, problem: Problem, lr: float) -> float:
        """Mean validation loss over the seeds (inf if any seed diverged)."""
        values = self.losses(problem, lr)
        return math.inf if any(v is None for v in values) else statistics.fmean(values)

    def standard_error(self, problem: Problem) -> float:
        """The standard error of the mean loss at the best grid rate, in regret units."""
        log_lrs, regrets, best, untrained = self.table(problem)
        values = self.losses(problem, 10 ** log_lrs[int(np.argmin(regrets))])
        return statistics.stdev(values) / math.sqrt(len(values)) / max(untrained - best, 1e-12)

    def save(self) -> None:
        if self.dirty:
            self.data["seeds"] = list(SEEDS)
            self.path.write_text(json.dumps(self.data, indent=0, sort_keys=True) + "\n")
            self.dirty = False

    def fill_grid(self, problem: Problem) -> None:
        """Evaluate the grid outward from 1e-3 until both sides are hopeless; with
        ``MANY_SEEDS`` if ``SEEDS`` leave the best point's loss too uncertain."""
        self._search(problem)
        entry = self.entry(problem)
        if len(entry["seeds"]) < len(MANY_SEEDS) and \
                self.standard_error(problem) > MAX_STANDARD_ERROR:
            self._use_seeds(problem, entry, MANY_SEEDS)
            self._search(problem)
            for k in list(entry["losses"]):  # every point, grid or not, on the same seeds
                self.losses(problem, 10 ** float(k))
            self.save()

    def _search(self, problem: Problem) -> None:
        lo, hi = problem.grid
        points = [e / PER_DECADE for e in range(int(round(lo * PER_DECADE)),
                                                 int(round(hi * PER_DECADE)) + 1)]
        untrained = self.entry(problem)["untrained"]
        centre = min(range(len(points)), key=lambda i: abs(points[i] + 3))
        best = math.inf
        for direction in (+1, -1):
            hopeless = 0
            i = centre if direction > 0 else centre - 1
            while 0 <= i < len(points) and hopeless < (3 if direction > 0 else 2):
                value = self.loss(problem, 10 ** points[i])
                best = min(best, value)
                if direction > 0:
                    # A plateau at the untrained loss is not hopeless (a higher rate may learn).
                    bad = not math.isfinite(value) or value > untrained + 0.5 * (untrained - best)
                else:
                    bad = value > untrained - 0.05 * (untrained - best)
                hopeless = hopeless + 1 if bad else 0
                i += direction
            self.save()

    def table(self, problem: Problem) -> tuple[np.ndarray, np.ndarray, float, float]:
        """Grid log-lrs, regrets at them, L(best) and L(untrained)."""
        entry = self.entry(problem)
        grid = sorted((float(k), k) for k in entry["losses"]
                      if abs(float(k) * PER_DECADE - round(float(k) * PER_DECADE)) < 1e-6)
        losses = np.array([self.loss(problem, 10 ** g) for g, _ in grid])
        best, untrained = float(np.min(losses)), entry["untrained"]
        regrets = np.array([regret(v, best, untrained) for v in losses])
        return np.array([g for g, _ in grid]), regrets, best, untrained


def regret(loss: float, best: float, untrained: float) -> float:
    """Normalized regret: 0 the best grid rate, 1 no better than untrained, 2 diverged."""
    if not math.isfinite(loss):
        return 2.0
    return min(2.0, max(0.0, (loss - best) / max(untrained - best, 1e-12)))


def interpolated_regret(log_lrs: np.ndarray, regrets: np.ndarray, lr: float | None) -> float:
    """Regret at any learning rate, linear in log(lr) between grid points (for rule search)."""
    if lr is None or not lr > 0:
        return 2.0
    return float(np.interp(math.log10(lr), log_lrs, regrets))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--problems", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    truth = Truth()
    for problem in make_problems():
        if args.problems and not any(s in problem.name for s in args.problems.split(",")):
            continue
        started = time.perf_counter()
        truth.fill_grid(problem)
        log_lrs, regrets, best, untrained = truth.table(problem)
        print(f"{problem.label:45s} best {10 ** log_lrs[np.argmin(regrets)]:.2e} "
              f"L {best:.4f} untrained {untrained:.4f} points {len(log_lrs)} seeds "
              f"{len(truth.entry(problem)['seeds'])} s.e. {truth.standard_error(problem):.3f} "
              f"[{time.perf_counter() - started:.0f}s]", flush=True)
    truth.save()


if __name__ == "__main__":
    main()
