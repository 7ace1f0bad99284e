"""What to do about a range-test curve that holds no clear answer."""

from __future__ import annotations

from nndiag.advice.common import LR_CURVE, Advisor
from nndiag.findings import Finding, FindingId, Fix
from nndiag.records.lrcurve import LRCurveRecord, TrialsRecord


def curve_too_short(finding: Finding, curve: LRCurveRecord) -> tuple[str, list[Fix]]:
    """A curve that diverged before it said anything."""
    return "Run more --steps, or lower --start-lr if the loss diverges at once.", []


def curve_flat(finding: Finding, curve: LRCurveRecord) -> tuple[str, list[Fix]]:
    """A flat curve: where the suggestion then comes from."""
    return ("A flat curve (a pretrained model, a task already learned, a task whose loss sits "
            "at chance until the rate is high enough, or too few steps) holds no valley to read "
            "a learning rate from: the trials decide, and when they learn nothing the rates up "
            "to where the loss diverges are tried too. The curve's own reading (--no-trials) "
            "sits below where the loss starts to rise: a safe upper bound rather than an "
            "optimum."), []


def curve_noisy(finding: Finding, curve: LRCurveRecord) -> tuple[str, list[Fix]]:
    """A noisy curve: how to quiet it."""
    ev = finding.evidence
    return (f"The raw loss scatters by {ev['noise']:.3g} around the smoothed curve against a "
            f"fall of {ev['drop']:.3g}: use a larger batch or --accumulate, or more --steps."), []


def range_too_narrow(finding: Finding, curve: LRCurveRecord) -> tuple[str, list[Fix]]:
    """A curve still falling at its end."""
    return ("The minimum sits at the end of the sweep: the sweep's own progress may dominate "
            "the curve, and a rate this high may not train from the start. The suggestion is "
            "read well below the end; raise --end-lr to see where the loss turns up."), []


def trials_diverged(finding: Finding, trials: TrialsRecord) -> tuple[str, list[Fix]]:
    """Every trial diverged."""
    tried = ", ".join(f"{lr:.2e}" for lr in trials.candidates)
    return (f"Short trainings at {tried} all diverged although the range test read them as "
            "safe: the suggestion is below the lowest of them. Check it with a short run, or "
            "add warmup."), []


ADVISORS: dict[tuple[str, str], Advisor] = {
    (LR_CURVE, FindingId.LR_CURVE_TOO_SHORT): curve_too_short,
    (LR_CURVE, FindingId.LR_CURVE_FLAT): curve_flat,
    (LR_CURVE, FindingId.LR_CURVE_NOISY): curve_noisy,
    (LR_CURVE, FindingId.LR_RANGE_TOO_NARROW): range_too_narrow,
    (LR_CURVE, FindingId.LR_TRIALS_DIVERGED): trials_diverged,
}
