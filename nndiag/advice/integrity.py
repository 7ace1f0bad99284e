"""Advice on a live probe's integrity: NaN/Inf, and parameters the loss never reaches."""

from __future__ import annotations

from nndiag.advice.catalog import make_fix
from nndiag.advice.common import (
    PROBE,
    UNNORMALIZED_INPUTS,
    Advisor,
    fmt,
    inputs_off_scale,
    normalize_inputs_fix,
)
from nndiag.findings import Finding, FindingId, Fix
from nndiag.records import ProbeRecord


def nan_inf(finding: Finding, probe: ProbeRecord) -> tuple[str, list[Fix]]:
    """Where non-finite values first appear and whether an overflow leads there."""
    ev = finding.evidence
    parts = ["The inputs were checked and are finite."]
    if ev.get("first_layer"):
        first = probe.layer(ev["first_layer"])
        earlier = [r for r in probe.layers if r.index < first.index and r.absmax is not None]
        peak = max(earlier, key=lambda r: r.absmax or 0.0, default=None)
        parts.append(f"Non-finite values first appear in {first.label}; every "
                     "layer after it inherits them.")
        if peak is not None and peak.absmax and peak.absmax > 1e6:
            parts.append(f"Values before it already reach {fmt(peak.absmax)} "
                         f"({peak.label}): an overflow of an exploding signal.")
        else:
            parts.append("Values before it are moderate: look for a log, division, sqrt or "
                         "exp of an out-of-range value in that layer.")
    # The probe runs the model as given, before any update: no learning rate is involved.
    fixes = [make_fix("gradient_clipping")]
    if inputs_off_scale(probe):
        fixes.append(normalize_inputs_fix(probe))
    return " ".join(parts), fixes


def unused_parameters(finding: Finding, probe: ProbeRecord) -> tuple[str, list[Fix]]:
    """Why trainable parameters the loss ignores are a problem, and the ways out."""
    not_run = finding.evidence.get("modules_not_run") or []
    where = (f" ({', '.join(not_run)} never ran in forward)." if not_run else
             " (their modules ran, but their output does not reach the loss).")
    return ("These parameters are trainable but the loss does not depend on them" + where
            + " Weight decay still shrinks them, they waste optimizer memory, and "
            "DistributedDataParallel fails on them unless find_unused_parameters=True. "
            "Remove them, freeze them with requires_grad_(False), or connect them to the "
            "output."), []


def inputs_not_normalized(finding: Finding, probe: ProbeRecord) -> tuple[str, list[Fix]]:
    """What unnormalized inputs do to the first layer and everything after it."""
    ev = finding.evidence
    return (f"The inputs have mean {fmt(ev['input_mean'])} and std {fmt(ev['input_std'])}. "
            f"{UNNORMALIZED_INPUTS}"), [normalize_inputs_fix(probe)]


ADVISORS: dict[tuple[str, str], Advisor] = {
    (PROBE, FindingId.INPUTS_NOT_NORMALIZED): inputs_not_normalized,
    (PROBE, FindingId.NAN_INF): nan_inf,
    (PROBE, FindingId.UNUSED_PARAMETERS): unused_parameters,
}
