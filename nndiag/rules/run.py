"""Rules over a recorded run: pure functions of a ``RunLog`` (no torch).

Each finding carries the first step it appeared at.

The loss is judged on a running median (window ``max(5, steps / 20)``): ``start`` is its value
half a window in (the first full window), ``end`` half a window from the end, ``best`` its
minimum; ``noise`` is the robust spread (1.4826 x MAD) of the raw loss around it. A level read
from the running median is uncertain by ``level_noise``: the step-to-step noise (from the MAD
of successive differences, which a trend does not inflate) x 1.25 (a median's efficiency)
over the square root of the window.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from nndiag.findings import Finding, FindingId, worst_severity
from nndiag.records.layers import (
    LOOKUP_KINDS,
    READING_GAIN,
    READING_PLAIN,
    READING_REPARAMETRIZED,
    READING_ZERO,
    ROLE_KEY,
    ROLE_QUERY,
)
from nndiag.rules.integrity import unnormalized_inputs
from nndiag.rules.thresholds import Threshold
from nndiag.runlog import RunLog

# Optimizers that scale each parameter's step by its own gradient statistics.
ADAPTIVE_OPTIMIZERS = frozenset({"Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad",
                                 "Adadelta", "RMSprop", "SparseAdam", "Adafactor", "Lion",
                                 "LAMB", "Lamb", "AdamWScheduleFree"})
LINEAR_OR_CONV = ("Linear", "Conv1D", "Bilinear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d",
                  "ConvTranspose2d", "ConvTranspose3d", "NonDynamicallyQuantizableLinear")


# A loss that has stalled below this share of its starting level is not judged for swings.
OSCILLATION_MIN_LEVEL = 0.05


def running_median(values: Sequence[float], window: int) -> list[float]:
    """Centered running median (the window shrinks at the edges).

    The median of point i is ``statistics.median(values[max(0, i - window // 2):
    i + window // 2 + 1])``, bit for bit (an even count's is the mean of its two middle values,
    ``(a + b) / 2``), in O(n log n) time and O(n) memory whatever the window: every window's
    middle values are read at once from a wavelet matrix of the values' ranks (``_kth_ranks``).
    Infinities order as numbers; a NaN orders above every number (NumPy's sort order).
    """
    count = len(values)
    if count == 0:
        return []
    data = np.asarray(values, dtype=np.float64)
    order = np.argsort(data, kind="stable")
    ranks = np.empty(count, dtype=np.int64)
    ranks[order] = np.arange(count)
    half = window // 2
    centers = np.arange(count)
    starts = np.maximum(centers - half, 0)
    ends = np.minimum(centers + half + 1, count)
    sizes = ends - starts
    ordered = data[order]
    medians = ordered[_kth_ranks(ranks, starts, ends, sizes // 2)]
    even = np.flatnonzero(sizes % 2 == 0)  # windows cut short at the ends of the run
    if len(even):
        lower = ordered[_kth_ranks(ranks, starts[even], ends[even], sizes[even] // 2 - 1)]
        with np.errstate(over="ignore", invalid="ignore"):  # as Python's floats: inf, nan
            medians[even] = (lower + medians[even]) / 2
    return medians.tolist()


def _kth_ranks(ranks: np.ndarray, starts: np.ndarray, ends: np.ndarray,
               ks: np.ndarray) -> np.ndarray:
    """For each range ``ranks[starts[j]:ends[j]]``, its ``ks[j]``-th smallest value (from 0).

    ``ranks`` is a permutation of ``0..n-1``. A wavelet matrix, one level per bit from the
    highest: at each level the values whose bit is 0 move (stably) before those whose bit is
    1, and a range's k-th smallest has the bit 0 if the range holds more than k values with
    it; the range and k follow it down to the next level. Every range moves at once.
    """
    count = len(ranks)
    index = np.int32 if count < 2**31 else np.int64
    current = ranks.astype(index)
    start, end, k = starts.astype(index), ends.astype(index), ks.astype(index)
    answer = np.zeros(len(ks), dtype=index)
    zeros_before = np.zeros(count + 1, dtype=index)  # values with the bit 0 before each place
    for bit in reversed(range(max(1, int(count - 1).bit_length()))):
        zeros = (current & (1 << bit)) == 0
        np.cumsum(zeros, out=zeros_before[1:])
        zeros_start, zeros_end = zeros_before[start], zeros_before[end]
        in_zeros = zeros_end - zeros_start
        right = k >= in_zeros
        answer[right] |= 1 << bit
        k[right] -= in_zeros[right]
        first_one = zeros_before[-1]  # where the values with the bit 1 begin
        start = np.where(right, start - zeros_start + first_one, zeros_start)
        end = np.where(right, end - zeros_end + first_one, zeros_end)
        current = np.concatenate((current[zeros], current[~zeros]))
    return answer


def _median(values: np.ndarray) -> float:
    """``statistics.median`` of the values, in linear time (an even count's is ``(a + b) / 2``)."""
    with np.errstate(over="ignore"):  # two middle values near the float maximum: inf
        return float(np.median(values))


def _mad(values: np.ndarray) -> float:
    return 1.4826 * _median(np.abs(values)) if len(values) else 0.0


def _finite_prefix(log: RunLog) -> tuple[list[int], list[float], int | None]:
    finite = np.isfinite(np.asarray(log.losses, dtype=np.float64))
    if finite.all():
        return log.steps, log.losses, None
    first_bad = int(np.argmin(finite))
    return log.steps[:first_bad], log.losses[:first_bad], log.steps[first_bad]


def nan_inf(log: RunLog, t: dict[str, Threshold]) -> Finding | None:
    """The first step whose loss, gradient norm or activations are NaN/Inf."""
    _, _, first_bad = _finite_prefix(log)
    where = "the loss"
    for sample in log.samples:
        bad_grad = sample.grad_norm is not None and not math.isfinite(sample.grad_norm)
        bad_act = any(not layer.output_finite for layer in sample.layers)
        if (bad_grad or bad_act) and (first_bad is None or sample.step < first_bad):
            first_bad, where = sample.step, "the gradients" if bad_grad else "activations"
            break
    if first_bad is None:
        return None
    return Finding(FindingId.NAN_INF, "error", [], f"NaN/Inf in {where} from step {first_bad}",
                   evidence={"first_step": first_bad, "where": where})


@dataclass
class LossLevels:
    """The finite prefix of the loss, its running median and the levels read from them."""

    steps: list[int]
    losses: list[float]
    smooth: list[float]
    window: int
    start: float
    end: float
    best: float
    best_step: int
    noise: float
    late_noise: float
    late_level: float
    level_noise: float

    def first_above(self, level: float, after: int = -1) -> int:
        """The first step after ``after`` whose running median exceeds ``level``."""
        for step, value in zip(self.steps, self.smooth, strict=True):
            if step > after and value > level:
                return step
        return self.steps[-1]

    def evidence(self) -> dict[str, float | int]:
        """The levels a loss finding reports."""
        return {"start": self.start, "end": self.end, "best": self.best,
                "best_step": self.best_step, "noise": self.noise}


def loss_levels(log: RunLog) -> LossLevels | None:
    """Running median and levels of the finite loss (``None`` for fewer than 10 steps)."""
    steps, losses, _ = _finite_prefix(log)
    if len(losses) < 10:
        return None
    window = max(5, len(losses) // 20)
    smooth = running_median(losses, window)
    values, smoothed = np.asarray(losses, dtype=np.float64), np.asarray(smooth)
    half = len(losses) // 2
    edge = min(window // 2, len(losses) - 1)
    best_index = edge + int(np.argmin(smoothed[edge:]))
    with np.errstate(over="ignore"):  # differences of values near the float maximum: inf
        step_noise = _mad(np.diff(values)) / math.sqrt(2)
        residuals = values - smoothed
    return LossLevels(
        steps, losses, smooth, window, smooth[edge], smooth[-1 - edge], smooth[best_index],
        steps[best_index], _mad(residuals), _mad(residuals[half:]), _median(values[half:]),
        1.25 * step_noise / math.sqrt(window))


def loss_trend(levels: LossLevels, t: dict[str, Threshold]) -> Finding | None:
    """Judge the loss trend: ``loss_diverging`` or ``loss_not_decreasing``.

    Diverging: the loss ends above its start by three standard deviations of the difference
    of two levels (3 x sqrt(2) ``level_noise``) and 1%, or gives back half of a clear fall.
    The lowest level is the minimum of many noisy ones, biased low, so a fall is clear only
    beyond 6 ``level_noise`` (and 1%). Not decreasing: no fall beyond 3 ``level_noise`` (and
    1%). On a flat loss with white noise (hand-made runs of 30 to 1,000 steps, 300 seeds
    each) this says "not decreasing" for 98-99.7% of seeds; with the first release's edge
    levels and noise it said "diverging" for about half.
    """
    start, end, best = levels.start, levels.end, levels.best
    fall = start - best
    level_noise = levels.level_noise
    evidence = levels.evidence()
    rise = 3 * math.sqrt(2) * level_noise
    if end > start + rise and end - start > 0.01 * abs(start):
        first = levels.first_above(start + rise)
        return Finding(FindingId.LOSS_DIVERGING, "error", [],
                       f"the loss ends higher than it started ({start:.4g} -> {end:.4g}), "
                       f"rising from step {first}",
                       evidence={**evidence, "first_step": first})
    if fall > max(6 * level_noise, 0.01 * abs(start)) and end - best > 0.5 * fall:
        first = levels.first_above(best + 0.5 * fall, after=levels.best_step)
        return Finding(FindingId.LOSS_DIVERGING, "warning", [], f"the loss gave back "
                       f"{(end - best) / fall:.0%} of its fall after step {levels.best_step}",
                       evidence={**evidence, "first_step": first})
    if start - end <= max(3 * level_noise, 0.01 * abs(start)):
        return Finding(FindingId.LOSS_NOT_DECREASING, "warning", [], f"the loss does not fall: "
                       f"{start:.4g} -> {end:.4g} over {len(levels.losses)} steps (noise "
                       f"{levels.noise:.3g})", evidence={**evidence, "first_step": levels.steps[0]})
    return None


def loss_oscillating(levels: LossLevels, t: dict[str, Threshold]) -> Finding | None:
    """The loss swings by a large share of its level, and has stopped falling, late in the run.

    Judged on the second half: the spread around the running median relative to the loss
    level there, while the loss has stopped falling. Two guards keep mini-batch noise out:

    - the level must be at least ``OSCILLATION_MIN_LEVEL`` of the starting loss. Below that
      the model has learned most of the task, and its batch-to-batch noise is that of a few
      hard examples per batch: heavy-tailed, and as large as the level or larger (healthy
      digits classifiers with SGD+momentum, 5-8 epochs at batch 16-32: 0.5-2x their level),
      though small next to where the loss started. Lowering the learning rate would not
      quieten it, only slow the run;
    - the loss has stopped falling: the last quarter's median is neither below half the third
      quarter's nor below it by a fifth of it and by more than two standard errors of the
      difference of the two medians (``1.25 x spread / sqrt(quarter)`` each, as if the steps
      were independent). A loss that is still learning is not oscillating, however noisy;
      lowering the learning rate would slow it down. (The fifth keeps a long run's slow drift,
      significant by the standard error alone, from hiding its swings.)
    """
    amplitude = levels.late_noise
    relative = amplitude / max(abs(levels.late_level), 1e-12)
    severity = t["loss_oscillation"].severity(relative)
    if severity is None or abs(levels.late_level) < OSCILLATION_MIN_LEVEL * abs(levels.start):
        return None
    late = np.asarray(levels.losses[len(levels.losses) // 2:], dtype=np.float64)
    quarter = len(late) // 2
    third, fourth = _median(late[:quarter]), _median(late[quarter:])
    standard_error = 1.25 * amplitude * math.sqrt(2 / max(quarter, 1))
    if third - fourth > min(0.5 * abs(third), max(0.2 * abs(third), 2 * standard_error)):
        return None
    return Finding(FindingId.LOSS_OSCILLATING, severity, [],
                   f"the loss swings by {relative:.0%} of its level in the second half of the "
                   "run without falling further", evidence={
                       "amplitude": amplitude, "level": levels.late_level,
                       "relative_amplitude": relative,
                       "first_step": levels.steps[len(levels.steps) // 2]})


def loss_findings(log: RunLog, t: dict[str, Threshold]) -> list[Finding]:
    """The loss trend and its oscillation, both judged on one reading of ``loss_levels``."""
    levels = loss_levels(log)
    if levels is None:
        return []
    return [f for f in (loss_trend(levels, t), loss_oscillating(levels, t)) if f is not None]


def _grad_to_weight(log: RunLog) -> list[tuple[int, dict[str, float]]]:
    """Per sampled step, the gradient-to-weight ratio of each plain Linear/conv layer.

    Weights a normalization follows, zero-initialized ones and re-parametrized ones are left
    out: their ratio to their own norm says nothing about the step (``LayerRecord``).
    """
    rows = []
    for sample in log.samples:
        ratios = {layer.name: layer.grad_to_weight for layer in sample.layers
                  if layer.kind in LINEAR_OR_CONV and layer.weight_norm
                  and layer.role not in (ROLE_QUERY, ROLE_KEY)
                  and layer.weight_reading in (READING_PLAIN, None)
                  and layer.grad_to_weight is not None and math.isfinite(layer.grad_to_weight)}
        if any(layer.grad_norm is not None for layer in sample.layers):
            rows.append((sample.step, ratios))
    return rows


def gradient_trends(log: RunLog, t: dict[str, Threshold]) -> list[Finding]:
    """Vanishing (early layers' ratio far below the late ones') and exploding gradients."""
    rows = [(step, r) for step, r in _grad_to_weight(log) if len(r) >= 2]
    if not rows:
        return []
    spreads = [(step, min(r.values()) / max(r.values()) if max(r.values()) > 0 else 1.0, r)
               for step, r in rows]
    late = spreads[len(spreads) // 2:]
    findings = []
    spread_rule = t["grad_to_weight_spread"]
    median_spread = statistics.median(s for _, s, _ in late)
    # An adaptive optimizer divides each update by the gradient's own scale: a small
    # gradient-to-weight ratio there does not mean a layer barely learns (its update ratio,
    # judged by update_ratio_low, says whether it does).
    adaptive = str(log.meta.get("optimizer") or "") in ADAPTIVE_OPTIMIZERS
    severity = None if adaptive else spread_rule.severity(median_spread)
    if severity is not None:
        first = next(step for step, s, _ in spreads if spread_rule.severity(s))
        last = late[-1][2]
        weakest = min(last, key=last.get)
        findings.append(Finding(
            FindingId.VANISHING_GRADIENTS, severity, [weakest],
            f"early layers get {median_spread:.1e} of the late layers' gradient-to-weight "
            f"ratio (weakest: {weakest}), from step {first}",
            evidence={"spread": median_spread, "first_step": first, "weakest_layer": weakest,
                      "grad_to_weight": last}))
    high_rule = t["grad_to_weight"]
    peak = statistics.median(max(r.values()) for _, r in rows[len(rows) // 2:])
    severity = high_rule.severity(peak)
    if severity is not None:
        first = next(step for step, r in rows if high_rule.severity(max(r.values())))
        last = rows[-1][1]
        top = max(last, key=last.get)
        findings.append(Finding(
            FindingId.EXPLODING_GRADIENTS, severity, [top],
            f"gradients reach {peak:.1e}x the weights ({top}), from step {first}",
            evidence={"max_grad_to_weight": peak, "first_step": first, "layer": top}))
    return findings


def dead_units(log: RunLog, t: dict[str, Threshold]) -> Finding | None:
    """ReLU layers whose dead fraction reached the thresholds, and when."""
    if not log.samples:
        return None
    rule = t["dead_fraction"]
    flagged = [(layer.name, layer.dead_fraction) for layer in log.samples[-1].layers
               if layer.dead_fraction is not None and rule.severity(layer.dead_fraction)]
    if not flagged:
        return None
    severity = worst_severity(*(rule.severity(d) for _, d in flagged))
    assert severity is not None
    name, worst = max(flagged, key=lambda item: item[1])
    first = log.samples[-1].step
    initial = None
    for sample in log.samples:
        value = next((layer.dead_fraction for layer in sample.layers if layer.name == name),
                     None)
        if initial is None and value is not None:
            initial = value
        if value is not None and rule.severity(value):
            first = sample.step
            break
    return Finding(FindingId.DEAD_RELU, severity, [n for n, _ in flagged],
                   f"{len(flagged)} ReLU layer(s) with dead units; {name}: {worst:.0%} dead "
                   f"(from {initial if initial is not None else 0:.0%} at the start), from "
                   f"step {first}",
                   evidence={"dead_fraction": dict(flagged), "first_step": first,
                             "initial": initial})


def inputs_not_normalized(log: RunLog, t: dict[str, Threshold]) -> Finding | None:
    """The model's floating-point input far from unit scale at the run's first sampled step.

    Not judged when the first weight layer is a normalization (the model standardizes it).
    """
    stats = log.meta.get("input")
    layers = log.meta.get("weight_layers") or []
    if not isinstance(stats, dict) or (layers and "Norm" in str(layers[0].get("kind", ""))):
        return None
    return unnormalized_inputs(stats.get("mean"), stats.get("std"), t)


def accumulation_unscaled(log: RunLog, t: dict[str, Threshold]) -> Finding | None:
    """The framework trained on the sum of the micro-batches' mean losses (its callback said).

    An ``info``: the run's losses and gradients are k times the mean, which the learning rate
    then has to absorb; the rules judge the recorded numbers as they are.
    """
    summed = log.meta.get("loss_summed_over")
    if not isinstance(summed, int) or summed < 2:
        return None
    return Finding(FindingId.ACCUMULATION_UNSCALED, "info", [],
                   f"the loss and gradients are the sum of {summed} micro-batches' mean "
                   f"losses, {summed}x the mean loss", evidence={"micro_batches": summed})


def update_ratios(log: RunLog, t: dict[str, Threshold]) -> list[Finding]:
    """Layers whose median update-to-weight ratio is outside the band around ~1e-3.

    The band is for weight matrices (plain, or followed by a normalization). Not judged:

    - zero-initialized and re-parametrized weights (``weight_reading``), either way: a ratio
      to a norm that is zero on purpose, or is not the computed weight's, says nothing;
    - gains (normalization weights, layer-scales), not low: Adam moves each element by about
      the learning rate, so a gain of 1 moves by ~lr per step (7e-6 for a BERT LayerNorm at a
      fine-tuning rate) while the matrices beside it, of RMS ~0.02, move 50 times more;
    - embedding tables, not low: a batch moves only its tokens' rows, so the whole table's
      ratio is small by construction (fine-tuning a 30,522-token table: ~5e-6).
    """
    lookups = {layer.get("name") for layer in log.meta.get("weight_layers", [])
               if isinstance(layer, dict) and layer.get("kind") in LOOKUP_KINDS}
    findings = []
    for finding_id, rule in ((FindingId.UPDATE_RATIO_HIGH, t["update_ratio_high"]),
                             (FindingId.UPDATE_RATIO_LOW, t["update_ratio_low"])):
        low = finding_id == FindingId.UPDATE_RATIO_LOW
        # Each sampled step's ratio is judged by that step's reading of the weights (a
        # zero-initialized branch grows into plain weights; a collapsing weight reads zero).
        skipped = {READING_ZERO, READING_REPARAMETRIZED} | ({READING_GAIN} if low else set())
        series: dict[str, list[tuple[int, float]]] = {}
        for sample in log.samples:
            for layer in sample.layers:
                value = layer.update_ratio
                if layer.has_weights and value is not None and math.isfinite(value) \
                        and layer.weight_reading not in skipped \
                        and not (low and layer.name in lookups):
                    series.setdefault(layer.name, []).append((sample.step, value))
        judged = {}
        for key, points in series.items():
            median = statistics.median(v for _, v in points)
            severity = rule.severity(median)
            if severity is not None:
                first = next((s for s, v in points if rule.severity(v)), points[0][0])
                judged[key] = (severity, median, first)
        if judged:
            severity = worst_severity(*(s for s, _, _ in judged.values()))
            assert severity is not None
            name = max(judged, key=lambda k: abs(math.log10(max(judged[k][1], 1e-30))))
            word = "above" if finding_id.endswith("high") else "below"
            findings.append(Finding(
                finding_id, severity, list(judged),
                f"{len(judged)} layer(s) with update ratio {word} the band; {name}: "
                f"{judged[name][1]:.1e} per step (rule of thumb ~1e-3)",
                evidence={"median_update_ratio": {k: v[1] for k, v in judged.items()},
                          "first_step": min(v[2] for v in judged.values())}))
    return findings


@dataclass(frozen=True)
class SummedGradientShape:
    """What gradients summed over steps (a missing ``zero_grad``) look like in a run log.

    Without ``zero_grad`` the gradient recorded at step t is the sum of the t + 1 gradients so
    far: its norm grows like (t + 1)^a, a near 0.5 when successive gradients are unrelated and
    near 1 when they agree, and never much faster than linearly (a sum of t + 1 bounded
    terms). On a small MLP (tests and the CI-gate guide's example, AdamW or SGD) it grew 8x to
    12x over 50 steps with a = 0.4 to 0.9, at every sampled step; healthy runs and the sample runs
    fall or wander (none rises at 80% of its samples). Gradient accumulation done right zeroes
    after each optimizer step: its norm saw-tooths around a level and never meets the slope.

    Attributes:
        min_samples: Sampled steps with a finite gradient norm needed for a verdict.
        growth: Least growth of the norm from the first sample to the last.
        rising_share: Least share of consecutive samples whose norm rises.
        min_slope: Least slope of log(norm) against log(step + 1).
        max_slope: Largest such slope (steeper is a blow-up, not a sum).
        min_r2: Least R^2 of that power-law fit (a steady rise, not a jump).
        linear_excess: Largest growth over the linear bound (last step + 1) / (first + 1).
        layer_growth: A weight layer counts as growing from this factor.
        layer_share: Least share of the weight layers that grow (a sum affects them all).
    """

    min_samples: int = 5
    growth: float = 3.0
    rising_share: float = 0.8
    min_slope: float = 0.3
    max_slope: float = 1.5
    min_r2: float = 0.8
    linear_excess: float = 3.0
    layer_growth: float = 2.0
    layer_share: float = 0.75


SUMMED_GRADIENTS = SummedGradientShape()


def zero_grad_missing(log: RunLog, t: dict[str, Threshold],
                      shape: SummedGradientShape = SUMMED_GRADIENTS) -> Finding | None:
    """Gradient norms growing step over step like a sum of every step's gradient.

    See ``SummedGradientShape`` for the signature and the reason for each number.
    """
    points = [(s.step, s.grad_norm) for s in log.samples
              if s.grad_norm is not None and math.isfinite(s.grad_norm) and s.grad_norm > 0]
    if len(points) < shape.min_samples:
        return None
    steps = [p[0] for p in points]
    norms = [p[1] for p in points]
    growth = norms[-1] / norms[0]
    rising = sum(b > a for a, b in zip(norms, norms[1:], strict=False)) / (len(norms) - 1)
    if growth < shape.growth or rising < shape.rising_share:
        return None
    if growth > shape.linear_excess * (steps[-1] + 1) / (steps[0] + 1):
        return None
    xs = [math.log(s + 1) for s in steps]
    ys = [math.log(g) for g in norms]
    x_mean, y_mean = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - x_mean) ** 2 for x in xs)
    syy = sum((y - y_mean) ** 2 for y in ys)
    if sxx <= 0 or syy <= 0:
        return None
    sxy = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys, strict=True))
    slope, r2 = sxy / sxx, sxy * sxy / (sxx * syy)
    if not shape.min_slope <= slope <= shape.max_slope or r2 < shape.min_r2:
        return None
    first_norms: dict[str, float] = {}
    last_norms: dict[str, float] = {}
    for sample in log.samples:
        for layer in sample.layers:
            value = layer.grad_norm
            if layer.has_weights and value is not None and math.isfinite(value) and value > 0:
                first_norms.setdefault(layer.name, value)
                last_norms[layer.name] = value
    growing = [name for name in last_norms
               if last_norms[name] >= shape.layer_growth * first_norms[name]]
    if last_norms and len(growing) < shape.layer_share * len(last_norms):
        return None
    first = next(s for s, g in points if g >= 2 * norms[0])
    return Finding(FindingId.ZERO_GRAD_MISSING, "error", growing,
                   f"the gradient norm grows step over step like a running sum: {norms[0]:.3g} "
                   f"at step {steps[0]} to {norms[-1]:.3g} at step {steps[-1]} "
                   f"(~(step+1)^{slope:.2f}), as when .grad is never zeroed",
                   evidence={"first_step": first, "growth": growth, "slope": slope, "r2": r2,
                             "rising_share": rising, "steps": steps, "grad_norms": norms,
                             "layers_growing": len(growing), "layers": len(last_norms)})


# Above this share of steps skipped by the GradScaler, most updates are lost: a warning.
AMP_SKIPPED_WARN_SHARE = 0.25


def amp_skipped_steps(log: RunLog, t: dict[str, Threshold]) -> Finding | None:
    """Steps a ``GradScaler`` skipped on inf/NaN gradients: loss scaling at work (``info``).

    A ``warning`` when more than a quarter of the steps were skipped: the model barely trains.
    """
    skipped = log.skipped_steps
    if not skipped:
        return None
    count, steps = len(skipped), len(log.losses)
    share = count / max(steps, count, 1)
    severity = "warning" if share > AMP_SKIPPED_WARN_SHARE else "info"
    return Finding(FindingId.AMP_SKIPPED_STEPS, severity, [],
                   f"the GradScaler skipped {count} of {steps} steps ({share:.1%}) on inf/NaN "
                   "gradients",
                   evidence={"skipped": count, "steps": steps, "share": share,
                             "skipped_steps": [row["step"] for row in skipped],
                             "last_scale": skipped[-1]["scale"],
                             "first_step": skipped[0]["step"]})


def run_rules(log: RunLog, thresholds: dict[str, Threshold] | None = None) -> list[Finding]:
    """Every rule over a recorded run, most severe first: the registry's rules of a run."""
    from nndiag.rules import registry

    return registry.run_rules(log, thresholds)
