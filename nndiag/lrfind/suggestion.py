"""The suggestion: learning rates read from a range-test curve, pure functions of the curve.

``suggest_lr`` reads the curve:

1. The curve is cut at the first non-finite loss.
2. It is smoothed in log-lr: a running median over ``MEDIAN_WINDOW_DECADES`` (removes spikes),
   then a Gaussian of ``GAUSS_SIGMA_DECADES`` (removes noise). Derivatives are taken with
   respect to log10(lr), never lr.
3. ``lr_high`` is the learning rate at the minimum of the smoothed curve; past it the loss
   rises. ``lr_low`` is where the smoothed loss has made ``LOW_FRACTION`` of its total drop:
   learning has clearly started.
4. The curve's reading (``Rule.anchor``): ``valley``, fastai's rule read on a debiased EMA
   (``Rule.ema_beta``) of the raw loss, its isolated spikes replaced first (``despiked``):
   the point half-way past the first third of the longest decreasing run, raised by
   ``Rule.valley_shift`` decades for the curve-only suggestion; or ``min``: ``lr_high``
   divided by ``Rule.min_divisor`` (times ``Rule.narrow_divisor`` when the minimum sits at the
   very end of a completed sweep), capped at the steepest point of the descent when
   ``Rule.cap_at_steepest``, never below ``lr_low``.
5. A loss that still falls at the end of the range is warned about: the sweep's own progress
   may dominate such a curve, and the end is no evidence that so high a rate trains from the
   start; the suggestion stays where the rule puts it, well below the end.
6. Noise is the robust spread (1.4826 x MAD) of the raw loss around the smoothed curve; the
   smoothed curve's own noise is that divided by the square root of the points the Gaussian
   averages. A drop smaller than ``FLAT_NOISE_RATIO`` x the curve's noise (or below
   ``FLAT_RELATIVE_DROP`` of the loss) is "flat"; raw noise above a share of the drop
   (``rules.lrcurve.NOISY_FRACTION``) is "noisy": lr-find's rules warn about both. On a flat
   curve the suggestion is the valley as above (``Rule.flat_rule``) or, with ``rise``, where
   the loss starts to rise divided by ``Rule.flat_divisor``; a flat curve that never rises
   gives no suggestion (an error).
7. ``candidates`` are learning rates for short trial trainings (``nndiag.lrfind.sweep``): the
   valley raised by ``Rule.candidate_offset`` decades, then lowered by
   ``Rule.candidate_spacing`` decades each, ``Rule.candidates`` of them, rounded to quarter
   decades (1, 1.78, 3.16, 5.62): the valley and the rates above it, since the valley sits on
   the steep part of the descent and is often below the best constant rate. A flat curve
   holds no valley to centre them on: they start ``Rule.flat_top`` decades below the highest
   learning rate the sweep reached and are ``Rule.flat_spacing`` decades apart, so that the
   trials, not the curve, decide.

``plateau_candidates`` (pure) extends the trials when they saw a plateau: when the best trial's
loss ended less than ``Rule.plateau_drop`` (a fraction of the starting loss) below the loss the
trials started from, nothing was learned at those rates (a task that stays at chance until the
rate is high enough to leave it, as a recall task does); the rates ``Rule.candidate_spacing``
decades apart above the highest candidate, up to ``Rule.plateau_margin`` decades below the
highest rate the sweep reached before it diverged, are trained too.

``choose_lr`` is the second stage's decision, also pure: the candidate whose trial reached the
lowest loss (losses within ``Rule.trial_tie_sigmas`` scatters of it are a tie, won by the
lowest rate), lowered by ``Rule.trial_shrink`` decades; the curve's own suggestion when no trial
fell clearly below the starting loss (``Rule.trial_progress_sigmas``); when every trial
diverged, a step below the lowest candidate, with a warning.

The values of ``RULE`` were chosen by leave-one-problem-out cross-validation over the problems
of ``benchmarks/lr_find_quality.py`` (see ``benchmarks/README.md`` for the held-out regret).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from nndiag.findings import Finding
from nndiag.records.lrcurve import LRCurveRecord, TrialsRecord

MEDIAN_WINDOW_DECADES = 0.4
SPIKE_SIGMAS = 5.0
GAUSS_SIGMA_DECADES = 0.2
LOW_FRACTION = 0.1
FLAT_NOISE_RATIO = 3.0
FLAT_RELATIVE_DROP = 0.01
MIN_POINTS = 8
QUARTER_DECADES = 4
# Trials aimed at a budget train at most this many times the default trial steps.
BUDGET_MAX_TRIAL_FACTOR = 8


@dataclass(frozen=True)
class Rule:
    """The constants of the suggestion, chosen together by cross-validation over problems.

    Attributes:
        anchor: ``valley`` (fastai's rule: halfway down the longest descent of a debiased EMA
            of the loss) or ``min`` (the smoothed minimum).
        ema_beta: Smoothing of the EMA the valley is read on.
        valley_despike: Replace isolated spikes of the loss (``despiked``: outliers from its
            running median) before the EMA, so that they do not move the valley.
        valley_shift: Decades added to the valley learning rate.
        flat_rule: On a flat curve: ``valley`` as on any curve, or ``rise`` (below where the
            loss starts to rise, by ``flat_divisor``).
        min_divisor: Curve-only suggestion: the anchor (smoothed minimum) divided by this.
        cap_at_steepest: Cap the curve-only suggestion at the steepest point of the descent.
        flat_divisor: On a flat curve: where the loss starts to rise divided by this.
        narrow_divisor: When the loss still falls at the end of the range, the curve-only
            suggestion's anchor is the end divided by this.
        candidates: How many learning rates the trial stage trains (0: none).
        candidate_offset: Decades above the curve's suggestion of the first candidate.
        candidate_spacing: Decades between candidates.
        flat_top: On a flat curve, which holds no valley to trust, the candidates start this
            many decades below the highest learning rate the sweep reached ...
        flat_spacing: ... and are this many decades apart.
        trial_fraction: Steps of each trial as a fraction of the sweep's steps.
        trial_shrink: Decades below the best trial's learning rate that are suggested.
        trial_tie_sigmas: Trials whose losses differ by less than this many scatters of the
            eval loss (``eval_scatter``) are a tie, won by the lowest learning rate (0: no
            ties).
        trial_progress_sigmas: When no trial ends this many scatters below the eval loss
            before the trials, the trials say nothing and the curve's own suggestion stands
            (0: the best trial always wins).
        plateau_drop: When the best trial ends less than this fraction of the starting eval
            loss below it, the trials saw a plateau and the rates above them are tried too
            (``plateau_candidates``; 0: never).
        plateau_margin: ... up to this many decades below the highest rate the sweep reached.
        plateau_leave: A rate tried above a plateau counts only when its trial ended this
            fraction of the starting eval loss below it (it left the plateau) ...
        plateau_shrink: ... and the best of those, near the rate where the loss diverges, is
            lowered by this many decades.
        budget_fraction: With a budget (the steps of the user's run), each trial trains this
            fraction of it (``budget_trial_steps``).
        holdout: When the trials cycle the data and no validation data is given, they train on
            all but a held-out slice of one pass and are scored on it
            (``nndiag.lrfind.sweep.holds_out``); False: only with a budget.
    """

    anchor: str = "valley"
    ema_beta: float = 0.98
    valley_despike: bool = True
    valley_shift: float = 0.25
    flat_rule: str = "valley"
    min_divisor: float = 10.0
    cap_at_steepest: bool = True
    flat_divisor: float = 10.0
    narrow_divisor: float = 10.0
    candidates: int = 3
    candidate_offset: float = 1.0
    candidate_spacing: float = 0.5
    flat_top: float = 1.5
    flat_spacing: float = 0.5
    trial_fraction: float = 0.5
    trial_shrink: float = 0.25
    trial_tie_sigmas: float = 0.0
    trial_progress_sigmas: float = 2.0
    plateau_drop: float = 0.02
    plateau_margin: float = 0.0
    plateau_leave: float = 0.1
    plateau_shrink: float = 0.5
    budget_fraction: float = 0.5
    holdout: bool = True


RULE = Rule()


@dataclass
class Suggestion:
    """What ``suggest_lr`` read from a curve.

    Attributes:
        lr: The suggested learning rate (``None`` when the curve does not allow one).
        lr_low: Lower end of the useful range.
        lr_high: Upper end: the learning rate at the smoothed minimum.
        smoothed: The smoothed curve (NaN past the first non-finite loss).
        reason: Why this learning rate, in words.
        findings: Warnings about the curve (flat, noisy, range too narrow).
        noise: Robust spread of the raw loss around the smoothed curve.
        drop: Fall of the smoothed loss from its start to its minimum.
        anchor: The curve's reading before any shift (the valley, or the ``min`` rule's
            learning rate): the trial candidates are placed relative to it.
        candidates: Learning rates for the trial stage, highest first.
        shape: ``valley``, ``falls_to_end``, ``flat``, ``flat_no_rise`` or ``too_short``.
        top: The highest learning rate whose loss was finite (where the sweep stopped).
    """

    lr: float | None
    lr_low: float | None
    lr_high: float | None
    smoothed: list[float]
    reason: str
    findings: list[Finding] = field(default_factory=list)
    noise: float | None = None
    drop: float | None = None
    anchor: float | None = None
    candidates: list[float] = field(default_factory=list)
    shape: str = "valley"
    top: float | None = None


def snap_lr(lr: float) -> float:
    """The nearest quarter decade (1, 1.78, 3.16, 5.62 x a power of ten)."""
    return float(10 ** (round(math.log10(lr) * QUARTER_DECADES) / QUARTER_DECADES))


def candidate_lrs(centre: float, floor: float, rule: Rule = RULE, *,
                  top: float | None = None) -> list[float]:
    """Trial learning rates (highest first, none below ``floor``).

    Args:
        centre: The curve's suggestion: candidates start ``rule.candidate_offset`` decades
            above it, ``rule.candidate_spacing`` decades apart.
        floor: The lowest learning rate allowed (the sweep's first).
        rule: The constants.
        top: For a flat curve, the highest learning rate the sweep reached: candidates start
            ``rule.flat_top`` decades below it, ``rule.flat_spacing`` decades apart.

    Returns:
        The candidates, rounded to quarter decades.
    """
    first, spacing = (centre * 10 ** rule.candidate_offset, rule.candidate_spacing) \
        if top is None else (top * 10 ** -rule.flat_top, rule.flat_spacing)
    out: list[float] = []
    for k in range(rule.candidates):
        lr = snap_lr(first * 10 ** (-k * spacing))
        if lr >= floor * (1 - 1e-9) and lr not in out:
            out.append(lr)
    return out


def _running_median(values: np.ndarray, window: int) -> np.ndarray:
    half = window // 2
    padded = np.pad(values, half, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1)
    return np.median(windows, axis=1)


def _gaussian(values: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return values.copy()
    radius = max(1, int(math.ceil(3 * sigma)))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(values, radius, mode="edge")
    return np.convolve(padded, kernel, mode="valid")


def _log_step(log_lrs: np.ndarray) -> float:
    """The sweep's step in decades (1 when it cannot be read: the smallest windows)."""
    step = float(np.median(np.diff(log_lrs))) if len(log_lrs) > 1 else 1.0
    return step if step > 0 else 1.0


def _median_window(step: float, points: int) -> int:
    """Points in ``MEDIAN_WINDOW_DECADES``: odd, at least 3, at most the curve's."""
    window = max(3, int(round(MEDIAN_WINDOW_DECADES / step)) | 1)
    return min(window, points if points % 2 else points - 1)


def smooth_curve(log_lrs: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Median then Gaussian smoothing with widths in decades of learning rate."""
    if len(losses) < 3:
        return losses.copy()
    step = _log_step(log_lrs)
    return _gaussian(_running_median(losses, _median_window(step, len(losses))),
                     GAUSS_SIGMA_DECADES / step)


def despiked(lrs: Sequence[float], losses: Sequence[float]) -> np.ndarray:
    """The loss with its outliers replaced (a Hampel filter), every other point untouched.

    A point is an outlier when it is more than ``SPIKE_SIGMAS`` robust standard deviations
    (1.4826 x the median absolute residual, over the whole curve) away from the running median
    of ``MEDIAN_WINDOW_DECADES`` around it; it is replaced by that median. A clean curve comes
    out unchanged, so the valley read on it is fastai's.
    """
    values = np.asarray(losses, dtype=float)
    if len(values) < 5:
        return values.copy()
    step = _log_step(np.log10(np.asarray(lrs, dtype=float)))
    median = _running_median(values, _median_window(step, len(values)))
    residual = values - median
    sigma = 1.4826 * float(np.median(np.abs(residual)))
    out = values.copy()
    spikes = np.abs(residual) > SPIKE_SIGMAS * max(sigma, 1e-12)
    out[spikes] = median[spikes]
    return out


def valley_lr(lrs: Sequence[float], losses: Sequence[float], beta: float = 0.98,
              skip_end: int = 5, despike: bool = False) -> float | None:
    """The ``valley`` rule of fastai, read on a debiased EMA of the loss.

    As fastai's ``Learner.lr_find``: the EMA (``beta``) with bias correction, cut at the first
    non-finite value, the first tenth and the last ``skip_end`` points dropped; then the
    longest decreasing subsequence, and the point half-way past its first third.

    Args:
        lrs: Increasing learning rates, one per step.
        losses: The raw loss at each.
        beta: The EMA's smoothing.
        skip_end: Points dropped at the end (they lag the divergence).
        despike: Replace the loss's outliers first (``despiked``, ``Rule.valley_despike``).

    Returns:
        The valley learning rate, or ``None`` when too few points remain.
    """
    values = [float(v) for v in losses]
    cut = next((i for i, v in enumerate(values) if not math.isfinite(v)), len(values))
    if despike and cut >= 5:
        values = despiked(lrs[:cut], values[:cut]).tolist() + values[cut:]
    ema, count, smooth = 0.0, 0, []
    for value in values:
        if not math.isfinite(value):
            break
        count += 1
        ema = beta * ema + (1 - beta) * value
        smooth.append(ema / (1 - beta ** count))
    lo, hi = len(losses) // 10, len(smooth) - skip_end
    xs, ys = list(lrs[lo:hi]), smooth[lo:hi]
    if len(ys) < 2:
        return None
    n = len(ys)
    max_start, max_end = 0, 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(i):
            if ys[i] < ys[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return float(xs[max_start + int(sections) + int(sections / 2)])


def _judge(context: LRCurveRecord | TrialsRecord) -> list[Finding]:
    """The findings of lr-find's rules on a curve or on its trials, with their advice."""
    from nndiag.diagnosis import diagnose

    return diagnose(context).findings


def suggest_lr(lrs: Sequence[float], losses: Sequence[float], rule: Rule = RULE) -> Suggestion:
    """Suggest a learning rate from a range-test curve (a pure function; see module docstring).

    Args:
        lrs: Increasing learning rates, one per step.
        losses: The loss recorded at each learning rate (NaN/Inf allowed at the end).
        rule: The constants (``RULE``, chosen by cross-validation, unless given).

    Returns:
        The suggestion, the range, the smoothed curve, the reason, warnings and the
        candidates for trial trainings.
    """
    lr_arr = np.asarray(lrs, dtype=float)
    loss_arr = np.asarray(losses, dtype=float)
    finite = np.isfinite(loss_arr) & np.isfinite(lr_arr) & (lr_arr > 0)
    cut = len(loss_arr) if finite.all() else int(np.argmin(finite))
    smoothed_full = np.full(len(loss_arr), np.nan)
    if cut < MIN_POINTS:
        return Suggestion(None, None, None, smoothed_full.tolist(),
                          f"only {cut} finite loss values before the curve ended: too few to "
                          "read a learning rate from",
                          _judge(LRCurveRecord(cut, MIN_POINTS)),
                          shape="too_short")
    log_lrs, raw = np.log10(lr_arr[:cut]), loss_arr[:cut]
    smoothed = smooth_curve(log_lrs, raw)
    smoothed_full[:cut] = smoothed
    noise = float(1.4826 * np.median(np.abs(raw - smoothed)))
    step = float(np.median(np.diff(log_lrs)))
    # The smoothed curve averages about 2*sqrt(pi)*sigma points: its own noise is that much lower.
    averaged = max(1.0, 2 * math.sqrt(math.pi) * GAUSS_SIGMA_DECADES / step) if step > 0 else 1.0
    curve_noise = noise / math.sqrt(averaged)
    start = float(smoothed[0])
    low_index = int(np.argmin(smoothed))
    drop = start - float(smoothed[low_index])
    scale = max(abs(start), abs(float(smoothed[low_index])), 1e-12)
    flat = drop <= FLAT_NOISE_RATIO * curve_noise or drop <= FLAT_RELATIVE_DROP * scale
    rise = np.nonzero(smoothed > start + max(FLAT_NOISE_RATIO * curve_noise,
                                             FLAT_RELATIVE_DROP * scale))[0]
    narrow = low_index >= cut - max(2, cut // 20) and cut == len(loss_arr)
    findings = _judge(LRCurveRecord(cut, MIN_POINTS, drop, noise, flat, bool(len(rise)), narrow,
                                    float(lr_arr[cut - 1])))

    if flat:
        valley = valley_lr(lr_arr[:cut], raw, rule.ema_beta, despike=rule.valley_despike) \
            if rule.flat_rule == "valley" else None
        top = float(lr_arr[cut - 1])
        if len(rise) and valley is not None:
            lr = valley * 10 ** rule.valley_shift
            return Suggestion(lr, None, float(lr_arr[rise[0]]), smoothed_full.tolist(),
                              f"flat curve: the valley of its running average ({valley:.2e})"
                              + _shifted(rule.valley_shift), findings, noise, drop, valley,
                              candidate_lrs(lr, float(lr_arr[0]), rule, top=top), "flat", top)
        if len(rise):
            lr_rise = float(lr_arr[rise[0]])
            lr = max(lr_rise / rule.flat_divisor, float(lr_arr[0]))
            return Suggestion(lr, None, lr_rise, smoothed_full.tolist(),
                              f"flat curve: {lr_rise:.2e} (where the loss starts to rise) / "
                              f"{rule.flat_divisor:g}", findings, noise, drop, lr,
                              candidate_lrs(lr, float(lr_arr[0]), rule, top=top), "flat", top)
        return Suggestion(None, None, None, smoothed_full.tolist(),
                          "flat curve with no rise: no learning rate can be read from it",
                          findings, noise, drop, shape="flat_no_rise", top=top)

    lr_high = float(lr_arr[low_index])

    descent = smoothed[: low_index + 1]
    slope = np.gradient(descent, log_lrs[: low_index + 1]) if low_index >= 2 else \
        np.zeros(low_index + 1)
    lr_steep = float(lr_arr[int(np.argmin(slope))])
    started = np.nonzero(descent <= start - LOW_FRACTION * drop)[0]
    lr_low = float(lr_arr[started[0]]) if len(started) else float(lr_arr[0])
    valley = valley_lr(lr_arr[:cut], raw, rule.ema_beta, despike=rule.valley_despike) \
        if rule.anchor == "valley" else None
    anchor = valley
    if valley is not None:
        lr = valley * 10 ** rule.valley_shift
        reason = (f"the valley of the loss's running average ({valley:.2e}: half-way down the "
                  f"longest descent)" + _shifted(rule.valley_shift))
    else:
        divisor = rule.min_divisor * (rule.narrow_divisor if narrow else 1.0)
        where = "the end of the range" if narrow else "where the smoothed loss is lowest"
        lr = lr_high / divisor
        reason = (f"{lr_high:.2e} ({where}, {float(smoothed[low_index]):.4g}, down {drop:.3g} "
                  f"from {start:.4g}) / {divisor:.3g}")
        if rule.cap_at_steepest and lr_steep < lr:
            lr = lr_steep
            reason = (f"the steepest point of the descent ({lr_steep:.2e}), below "
                      f"{lr_high:.2e} ({where}) / {divisor:.3g}")
        lr = anchor = max(lr, lr_low)
    return Suggestion(lr, lr_low, lr_high, smoothed_full.tolist(), reason, findings, noise, drop,
                      anchor, candidate_lrs(anchor, float(lr_arr[0]), rule),
                      "falls_to_end" if narrow else "valley", float(lr_arr[cut - 1]))


def plateau_candidates(candidates: Sequence[float], scores: Sequence[float], start: float | None,
                       top: float | None, rule: Rule = RULE) -> list[float]:
    """More trial rates when the trials saw a plateau (pure; empty when they did not).

    The trials saw a plateau when the best finite score ended within ``rule.plateau_drop`` of
    the starting loss (``abs(start)``: losses may be negative), neither below it nor above it:
    nothing was learned at those rates within the trial, which on a task that stays at chance
    until the rate is high enough says nothing about the rates above them. (When every trial
    ends above that, the rates overfit or are unstable: ``choose_lr`` goes below them.)

    Args:
        candidates: The learning rates tried.
        scores: Loss of each after its trial (``inf`` or NaN: diverged).
        start: The eval loss before any trial (``None``: no plateau can be told).
        top: The highest learning rate the sweep reached with a finite loss.
        rule: The constants.

    Returns:
        Quarter-decade rates ``rule.candidate_spacing`` decades apart above the highest
        candidate, up to ``rule.plateau_margin`` decades below ``top``, highest first.
    """
    if not rule.plateau_drop or start is None or top is None or not candidates:
        return []
    finite = [s for s in scores if math.isfinite(s)]
    if not finite or abs(start - min(finite)) >= rule.plateau_drop * abs(start):
        return []  # the loss fell (learning) or every trial rose (overfitting, instability)
    spacing = max(rule.candidate_spacing, 0.25)
    ceiling = top * 10 ** -rule.plateau_margin * (1 + 1e-9)
    out: list[float] = []
    lr = snap_lr(max(candidates) * 10 ** spacing)
    while lr <= ceiling:
        out.append(lr)
        lr = snap_lr(lr * 10 ** spacing)
    return out[::-1]


def budget_trial_steps(budget: int, default_steps: int, rule: Rule = RULE) -> int:
    """Steps of each trial aimed at a run of ``budget`` steps (pure).

    ``rule.budget_fraction`` of the budget, never fewer than ``default_steps`` (the trials
    without a budget) nor more than ``BUDGET_MAX_TRIAL_FACTOR`` times as many.
    """
    wanted = round(rule.budget_fraction * budget)
    return max(default_steps, min(wanted, BUDGET_MAX_TRIAL_FACTOR * default_steps))


def _shifted(decades: float) -> str:
    return f", times 10^{decades:g}" if decades else ""


@dataclass
class Choice:
    """The second stage's decision (``choose_lr``).

    Attributes:
        lr: The suggested learning rate.
        reason: Why, in words.
        findings: Warnings (every trial diverged).
    """

    lr: float
    reason: str
    findings: list[Finding] = field(default_factory=list)


def eval_scatter(noise: float | None, step_samples: float, eval_samples: float) -> float:
    """How much the trials' eval loss scatters (the unit of the trial ``Rule`` sigmas).

    The curve's noise is the scatter of a training step's loss (``step_samples`` samples);
    the trials are scored on ``eval_samples`` samples, whose loss scatters about
    ``noise x sqrt(step_samples / eval_samples)``.

    Args:
        noise: The curve's robust noise (``Suggestion.noise``; ``None``: 0).
        step_samples: Samples per optimizer step of the sweep.
        eval_samples: Samples the trials are scored on.

    Returns:
        The scatter, in units of the loss.
    """
    if not noise or step_samples <= 0 or eval_samples <= 0:
        return 0.0
    return noise * math.sqrt(step_samples / eval_samples)


def choose_lr(candidates: Sequence[float], scores: Sequence[float], steps: int,
              rule: Rule = RULE, scatter: float = 0.0, start: float | None = None,
              fallback: float | None = None, plateau: Sequence[float] = ()) -> Choice:
    """Pick the learning rate whose short trial training reached the lowest loss (pure).

    Args:
        candidates: The learning rates tried, highest first.
        scores: Loss of each after its trial (``inf`` or NaN: diverged).
        steps: Steps of each trial (for the reason).
        rule: The constants.
        scatter: The eval loss's scatter (``eval_scatter``): losses within
            ``rule.trial_tie_sigmas`` of it from the lowest are a tie, won by the lowest rate.
        start: The eval loss before any trial; with ``fallback`` and
            ``rule.trial_progress_sigmas``, when no trial fell that many scatters below it the
            trials say nothing and ``fallback`` (the curve's own suggestion) is kept.
        fallback: The curve's own suggestion.
        plateau: Those of ``candidates`` tried because the others saw a plateau
            (``plateau_candidates``). Only those that left it (ended ``rule.plateau_leave``
            of ``start`` below it) compete, and the best of them is lowered by
            ``rule.plateau_shrink`` decades instead; when none left it, the reason says that
            nothing was learned within the trials and what to try, and the others decide.

    Returns:
        The suggestion: the best candidate lowered by ``rule.trial_shrink`` decades; when
        every trial diverged, a ``candidate_spacing`` below the lowest, with a warning; when
        every trial ended ``rule.trial_progress_sigmas`` scatters above ``start`` (they
        overfit or are unstable), as far below the lowest.

    Raises:
        ValueError: No candidates, or as many scores as candidates not given.
    """
    if not candidates or len(candidates) != len(scores):
        raise ValueError("choose_lr needs one score per candidate")
    finite = [(s, lr) for lr, s in zip(candidates, scores, strict=True) if math.isfinite(s)]
    tried = ", ".join(f"{lr:.2e}" for lr in candidates)
    if not finite:
        lowest = min(candidates)
        lr = lowest * 10 ** -max(rule.candidate_spacing, 0.5)
        return Choice(lr, f"every trial diverged ({tried}, {steps} steps each): "
                          f"{lr:.2e}, below the lowest",
                      _judge(TrialsRecord(list(candidates), list(scores))))
    if plateau:
        first = ", ".join(f"{lr:.2e}" for lr in candidates if lr not in plateau)
        above = ", ".join(f"{lr:.2e}" for lr in plateau)
        tried = (f"{first} (none fell {rule.plateau_drop:.0%} below the starting loss: a "
                 f"plateau) and {above} above them")
        left = [(s, lr) for s, lr in finite if lr in plateau and start is not None
                and start - s >= rule.plateau_leave * abs(start)]
        if left:
            score, best = min(left)
            lr = best * 10 ** -rule.plateau_shrink
            return Choice(lr, f"of {tried}, trained {steps} steps each from the same start, "
                              f"{best:.2e} left the plateau (the loss fell from {start:.4g} to "
                              f"{score:.4g}), lowered by {rule.plateau_shrink:g} decade: so "
                              "high a rate is near where the loss diverges")
        tried += (f", none of which left it within {steps} steps (fell "
                  f"{rule.plateau_leave:.0%} below the start): the task may need more steps "
                  "before any rate leaves its plateau; try --budget with the steps of your "
                  "run (longer trials). Of the first")
        finite = [(s, lr) for s, lr in finite if lr not in plateau] or finite
    score, best = min(finite)
    margin = rule.trial_progress_sigmas * scatter
    if rule.trial_progress_sigmas and start is not None and score > start + margin:
        lowest = min(lr for _, lr in finite)
        lr = lowest * 10 ** -max(rule.candidate_spacing, 0.5)
        return Choice(lr, f"of {tried} trained {steps} steps each from the same start, every "
                          f"one ended above the starting loss ({start:.4g}; the best reached "
                          f"{score:.4g}): they overfit or are unstable over that many steps; "
                          f"{lr:.2e}, below the lowest")
    if rule.trial_progress_sigmas and start is not None and fallback is not None and \
            not score < start - margin:
        return Choice(fallback, f"of {tried} trained {steps} steps each from the same start, "
                                f"none fell clearly below the starting loss ({start:.4g}; the "
                                f"best reached {score:.4g}): the trials say nothing, the "
                                f"curve's own suggestion {fallback:.2e} stands")
    tolerance = rule.trial_tie_sigmas * scatter
    tied = min(lr for s, lr in finite if s <= score + tolerance)
    lr = tied * 10 ** -rule.trial_shrink
    shrink = f", lowered by {rule.trial_shrink:g} decade" if rule.trial_shrink else ""
    reached = f"{best:.2e} reached the lowest loss ({score:.4g})" if tied == best else \
        (f"{tied:.2e} came within {tolerance:.2g} of the lowest loss ({score:.4g}; the eval "
         "loss scatters that much): a tie, which the lower rate wins")
    return Choice(lr, f"of {tried} trained {steps} steps each from the same start, "
                      f"{reached}{shrink}")
