"""lr-find's rules: pure functions of a range test's curve and of its trial trainings."""

from __future__ import annotations

import math

from nndiag.findings import Finding, FindingId
from nndiag.records.lrcurve import LRCurveRecord, TrialsRecord
from nndiag.rules.thresholds import Threshold

# The raw loss scattering by more than this share of the curve's fall makes its reading
# uncertain.
NOISY_FRACTION = 0.3


def curve_too_short(curve: LRCurveRecord, thresholds: dict[str, Threshold]) -> Finding | None:
    """Too few finite losses before the curve ended (it diverged at once) to read a rate."""
    if curve.points >= curve.min_points:
        return None
    return Finding(FindingId.LR_CURVE_TOO_SHORT, "error", [],
                   "too few finite points to suggest a learning rate",
                   evidence={"points": curve.points})


def curve_flat(curve: LRCurveRecord, thresholds: dict[str, Threshold]) -> Finding | None:
    """The loss barely falls over the whole range: no valley to read a rate from."""
    if curve.points < curve.min_points or not curve.flat:
        return None
    return Finding(FindingId.LR_CURVE_FLAT, "warning" if curve.rises else "error", [],
                   "the loss barely falls over the whole range",
                   evidence={"drop": curve.drop, "noise": curve.noise})


def curve_noisy(curve: LRCurveRecord, thresholds: dict[str, Threshold]) -> Finding | None:
    """The raw loss scatters by a large share of the curve's fall."""
    if curve.points < curve.min_points or curve.flat or curve.drop is None or \
            curve.noise is None or not curve.noise > NOISY_FRACTION * curve.drop:
        return None
    return Finding(FindingId.LR_CURVE_NOISY, "warning", [], "the loss is noisy against its fall",
                   evidence={"drop": curve.drop, "noise": curve.noise})


def range_too_narrow(curve: LRCurveRecord, thresholds: dict[str, Threshold]) -> Finding | None:
    """The loss still falls at the end of the sweep."""
    if curve.points < curve.min_points or curve.flat or not curve.narrow:
        return None
    return Finding(FindingId.LR_RANGE_TOO_NARROW, "warning", [],
                   "the loss still falls at the end of the range",
                   evidence={"end_lr": curve.end_lr})


def trials_diverged(trials: TrialsRecord, thresholds: dict[str, Threshold]) -> Finding | None:
    """Every trial training diverged, although the range test read the rates as safe."""
    if not trials.scores or any(math.isfinite(s) for s in trials.scores):
        return None
    return Finding(FindingId.LR_TRIALS_DIVERGED, "warning", [],
                   "every trial learning rate diverged",
                   evidence={"tried": list(trials.candidates)})
