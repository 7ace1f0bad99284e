"""The suggestion: a learning rate read from a range-test curve, a pure function of the curve.

1. The curve is cut at the first non-finite loss.
2. It is smoothed in log-lr: a running median over ``MEDIAN_WINDOW_DECADES`` (removes spikes),
   then a Gaussian of ``GAUSS_SIGMA_DECADES`` (removes noise). Derivatives are taken with
   respect to log10(lr), never lr.
3. ``lr_high`` is the learning rate at the minimum of the smoothed curve; past it the loss
   rises. ``lr_low`` is where the smoothed loss has made ``LOW_FRACTION`` of its total drop:
   learning has clearly started.
4. The suggestion is ``lr_high / MIN_DIVISOR``, capped at the steepest point of the descent
   when that point is lower (on curves whose minimum sits far right of the descent, as for
   transformers).
5. Noise is the robust spread (1.4826 x MAD) of the raw loss around the smoothed curve; the
   smoothed curve's own noise is that divided by the square root of the points the Gaussian
   averages. A drop smaller than ``FLAT_NOISE_RATIO`` x the curve's noise (or below
   ``FLAT_RELATIVE_DROP`` of the loss) is "flat": the suggestion then falls back to a tenth of
   where the loss starts to rise, with a warning. Raw noise above ``NOISY_FRACTION`` of the
   drop is "noisy": a warning.

The constants were chosen on the tasks of ``benchmarks/lr_find_quality.py`` (see
``benchmarks/README.md`` for the regret of each alternative rule).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nndiag.findings import Finding

MEDIAN_WINDOW_DECADES = 0.4
GAUSS_SIGMA_DECADES = 0.2
LOW_FRACTION = 0.1
MIN_DIVISOR = 10.0
FLAT_NOISE_RATIO = 3.0
FLAT_RELATIVE_DROP = 0.01
NOISY_FRACTION = 0.3
MIN_POINTS = 8


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
    """

    lr: float | None
    lr_low: float | None
    lr_high: float | None
    smoothed: list[float]
    reason: str
    findings: list[Finding] = field(default_factory=list)
    noise: float | None = None
    drop: float | None = None


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


def smooth_curve(log_lrs: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Median then Gaussian smoothing with widths in decades of learning rate."""
    if len(losses) < 3:
        return losses.copy()
    step = float(np.median(np.diff(log_lrs))) if len(log_lrs) > 1 else 1.0
    step = step if step > 0 else 1.0
    window = max(3, int(round(MEDIAN_WINDOW_DECADES / step)) | 1)
    window = min(window, len(losses) if len(losses) % 2 else len(losses) - 1)
    return _gaussian(_running_median(losses, window), GAUSS_SIGMA_DECADES / step)


def _finding(finding_id: str, summary: str, explanation: str, severity: str = "warning",
             **evidence: Any) -> Finding:
    return Finding(finding_id, severity, [], summary, explanation, evidence)


def suggest_lr(lrs: Sequence[float], losses: Sequence[float]) -> Suggestion:
    """Suggest a learning rate from a range-test curve (a pure function; see module docstring).

    Args:
        lrs: Increasing learning rates, one per step.
        losses: The loss recorded at each learning rate (NaN/Inf allowed at the end).

    Returns:
        The suggestion, the range, the smoothed curve, the reason and any warnings.
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
                          [_finding("lr_curve_too_short", "too few finite points to suggest a "
                                    "learning rate", "Run more --steps, or lower --start-lr "
                                    "if the loss diverges at once.", "error", points=cut)])
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
    findings: list[Finding] = []

    if drop <= FLAT_NOISE_RATIO * curve_noise or drop <= FLAT_RELATIVE_DROP * scale:
        rise = np.nonzero(smoothed > start + max(FLAT_NOISE_RATIO * curve_noise,
                                                 FLAT_RELATIVE_DROP * scale))[0]
        findings.append(_finding(
            "lr_curve_flat", "the loss barely falls over the whole range",
            "A flat curve (a pretrained model, a task already learned, or too few steps) holds "
            "no valley to read a learning rate from. The suggestion is a tenth of where the "
            "loss starts to rise, a safe upper bound rather than an optimum.",
            "warning" if len(rise) else "error", drop=drop, noise=noise))
        if len(rise):
            lr_rise = float(lr_arr[rise[0]])
            return Suggestion(lr_rise / 10, None, lr_rise, smoothed_full.tolist(),
                              f"flat curve: a tenth of {lr_rise:.2e}, where the loss starts to "
                              "rise", findings, noise, drop)
        return Suggestion(None, None, None, smoothed_full.tolist(),
                          "flat curve with no rise: no learning rate can be read from it",
                          findings, noise, drop)

    if noise > NOISY_FRACTION * drop:
        findings.append(_finding(
            "lr_curve_noisy", "the loss is noisy against its fall",
            f"The raw loss scatters by {noise:.3g} around the smoothed curve against a fall of "
            f"{drop:.3g}: use a larger batch or --accumulate, or more --steps.",
            drop=drop, noise=noise))
    if low_index >= cut - max(2, cut // 20) and cut == len(loss_arr):
        findings.append(_finding(
            "lr_range_too_narrow", "the loss still falls at the end of the range",
            "The minimum sits at the end of the sweep: raise --end-lr to see where the loss "
            "turns up.", end_lr=float(lr_arr[cut - 1])))

    lr_high = float(lr_arr[low_index])
    descent = smoothed[: low_index + 1]
    slope = np.gradient(descent, log_lrs[: low_index + 1]) if low_index >= 2 else \
        np.zeros(low_index + 1)
    steep_index = int(np.argmin(slope))
    lr_steep = float(lr_arr[steep_index])
    started = np.nonzero(descent <= start - LOW_FRACTION * drop)[0]
    lr_low = float(lr_arr[started[0]]) if len(started) else float(lr_arr[0])
    lr = lr_high / MIN_DIVISOR
    reason = (f"a tenth of {lr_high:.2e}, where the smoothed loss is lowest "
              f"({float(smoothed[low_index]):.4g}, down {drop:.3g} from {start:.4g})")
    if lr_steep < lr:
        lr = lr_steep
        reason = (f"the steepest point of the descent ({lr_steep:.2e}), below a tenth of the "
                  f"minimum at {lr_high:.2e}")
    lr = max(lr, lr_low)
    return Suggestion(lr, lr_low, lr_high, smoothed_full.tolist(), reason, findings, noise, drop)
