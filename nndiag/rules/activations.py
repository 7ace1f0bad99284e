"""Forward-signal rules: scale drift through depth, dead ReLU units, saturation."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from nndiag.findings import Finding, FindingId, worst_severity
from nndiag.records import LayerRecord, ProbeRecord
from nndiag.records.layers import ATTENTION_ROLES, ROLE_HEAD, ROLE_NORM
from nndiag.rules.blocks import block_spans
from nndiag.rules.thresholds import (
    LOSS_AT_INIT_FACTOR,
    MIN_SAMPLES_FOR_DEAD_UNITS,
    MIN_UNITS_FOR_DEAD_FRACTION,
    Threshold,
)


@dataclass
class Drift:
    """The largest amplification and attenuation of output std between two weight layers."""

    growth: float
    growth_from: LayerRecord | None
    growth_to: LayerRecord | None
    collapse: float
    collapse_from: LayerRecord | None
    collapse_to: LayerRecord | None
    layers: list[LayerRecord]


def activation_drift(probe: ProbeRecord) -> Drift:
    """Scan Linear/conv outputs in forward order for the largest growth and collapse.

    A normalization layer between two of them resets the comparison: it re-scales whatever
    reaches it (a new head after a pretrained body's final LayerNorm is not compared with
    the body's middle layers).

    Layers with all-zero weights (a deliberately zero-initialized head or residual branch),
    layers whose output is exactly constant and convs on pooled features (a
    squeeze-and-excitation gate beside the feature maps) are skipped: their scale says nothing
    about the signal's propagation.
    """
    layers = [r for r in probe.layers
              if r.fan_in is not None and r.weight_rms and r.std and r.std == r.std
              and not r.pooled]
    if any(r.role in ATTENTION_ROLES for r in probe.layers):
        # In a transformer, branch outputs legitimately differ from the residual stream by
        # orders of magnitude: drift is judged across repeated blocks only (none: no verdict).
        return _block_drift(layers)
    drift = Drift(1.0, None, None, 1.0, None, None, layers)
    # A normalization layer re-scales the signal: drift is judged between two of them.
    resets = {r.index for r in probe.layers if r.role == ROLE_NORM}
    low = high = None
    previous = -1
    for record in layers:
        assert record.std is not None
        if any(previous < i < record.index for i in resets):
            low = high = None
        previous = record.index
        if low is not None and record.std / low.std > drift.growth:
            drift.growth, drift.growth_from, drift.growth_to = record.std / low.std, low, record
        # A head's small output is a deliberate init (logits that start near zero), not a
        # signal that collapses on its way through the body.
        if high is not None and record.role != ROLE_HEAD and \
                record.std / high.std < drift.collapse:
            drift.collapse, drift.collapse_from, drift.collapse_to = (record.std / high.std,
                                                                      high, record)
        low = record if low is None or record.std < low.std else low
        high = record if high is None or record.std > high.std else high
    return drift


def _block_drift(layers: list[LayerRecord]) -> Drift:
    """Drift in a transformer: the same layer's output std from the first block to the last.

    Inside a block, branch outputs legitimately differ by orders of magnitude at init (a
    gated MLP multiplies two small projections); what must not drift is each role's scale
    across the repeated blocks, which the residual stream carries.
    """
    drift = Drift(1.0, None, None, 1.0, None, None, layers)
    stds = [(record, record.std) for record in layers if record.std]
    for span in block_spans(stds):
        ratio = span.last_median / span.first_median if span.first_median > 0 else 1.0
        first, last = span.first[0][0], span.last[0][0]
        if ratio > drift.growth:
            drift.growth, drift.growth_from, drift.growth_to = ratio, first, last
        if ratio < drift.collapse:
            drift.collapse, drift.collapse_from, drift.collapse_to = ratio, first, last
    return drift


def drift_headline(probe: ProbeRecord) -> dict[str, float | None]:
    """Largest growth and collapse of activation scale through depth."""
    drift = activation_drift(probe)
    scales = [r.init_scale for r in probe.layers if r.init_scale is not None and r.trainable]
    return {"activation_growth": drift.growth, "activation_collapse": drift.collapse,
            "median_init_scale": statistics.median(scales) if scales else None,
            "loss": probe.loss}


def oversized_weights(probe: ProbeRecord, thresholds: dict[str, Threshold]) -> Finding | None:
    """Weights far above their fans' scale while the loss is far above an uninformed model's.

    Normalization can keep every activation in range while the weights are tens of times too
    large (a transformer's LayerNorms do): the sign is then the logits, a cross-entropy loss
    far above log(classes) before any training.
    """
    if probe.loss_name not in ("cross_entropy", "nll") or not probe.num_classes or \
            probe.num_classes < 2:
        return None
    expected = math.log(probe.num_classes)
    if probe.loss < LOSS_AT_INIT_FACTOR * expected:
        return None
    layers = [r for r in probe.layers if r.init_scale is not None and r.trainable]
    if len(layers) < 2:
        return None
    rule = thresholds["weight_scale"]
    median = statistics.median(r.init_scale for r in layers)  # type: ignore[misc]
    head = next((r for r in reversed(layers) if r.role == ROLE_HEAD), layers[-1])
    severity, where = rule.severity(median), "median"
    if severity is None:  # the body is fine: is the output layer alone oversized?
        severity, where = rule.severity(head.init_scale), "head"
        layers = [head]
    if severity is None:
        return None
    if probe.loss >= 1.5 * LOSS_AT_INIT_FACTOR * expected:  # three times an uninformed loss
        severity = "error"
    scale = median if where == "median" else head.init_scale
    subject = (f"weights {scale:.2g}x their He/Xavier scale (median of {len(layers)} layers)"
               if where == "median" else
               f"the output layer {head.label} at {scale:.2g}x its He/Xavier scale")
    return Finding(
        FindingId.POOR_INITIALIZATION, severity, [r.name for r in layers],
        f"{subject} and a loss of {probe.loss:.3g} against {expected:.3g} for an uninformed "
        "model", evidence={"judged_by": ["weight_scale"], "where": where,
                           "median_init_scale": scale,
                           "init_scale": {r.name: r.init_scale for r in layers},
                           "loss": probe.loss, "uninformed_loss": expected})


def poor_initialization(probe: ProbeRecord, thresholds: dict[str, Threshold]) -> Finding | None:
    """The activation scale drifts through depth, or the weights are oversized for the loss.

    The second (``oversized_weights``) is judged only when the first finds nothing.
    """
    drift = activation_drift(probe)
    growth = thresholds["activation_growth"].severity(drift.growth)
    collapse = thresholds["activation_collapse"].severity(drift.collapse)
    severity = worst_severity(growth, collapse)
    if severity is None:
        return oversized_weights(probe, thresholds)
    scales = [r.init_scale for r in drift.layers if r.init_scale is not None]
    evidence: dict[str, object] = {
        "judged_by": ["drift"],
        "activation_growth": drift.growth,
        "activation_collapse": drift.collapse,
        "layer_output_std": {r.name: r.std for r in drift.layers},
        "init_scale": {r.name: r.init_scale for r in drift.layers},
        "median_init_scale": sorted(scales)[len(scales) // 2] if scales else None,
    }
    if collapse is not None and (growth is None or collapse == severity):
        start, end, factor, verb = (drift.collapse_from, drift.collapse_to,
                                    drift.collapse, "collapses")
    else:
        start, end, factor, verb = drift.growth_from, drift.growth_to, drift.growth, "grows"
    assert start is not None and end is not None
    evidence.update({"from_layer": start.name, "to_layer": end.name, "factor": factor})
    span = [r.name for r in drift.layers if start.index <= r.index <= end.index]
    summary = (f"activation scale {verb} {factor:.1e}x from {start.label} to {end.label} "
               f"(output std {start.std:.2g} -> {end.std:.2g})")
    return Finding(FindingId.POOR_INITIALIZATION, severity, span, summary, evidence=evidence)


def _enough_samples(probe: ProbeRecord) -> bool:
    return (probe.batch_size or 0) * probe.batches >= MIN_SAMPLES_FOR_DEAD_UNITS


@dataclass
class _Flagged:
    """Layers whose share (dead or saturated) reached a threshold, and the worst of them."""

    layers: list[LayerRecord]
    severity: str
    worst: LayerRecord
    share: float


def _units(record: LayerRecord) -> int | None:
    """Values per sample of a layer's output (``None``: shape unknown)."""
    if not record.shape:
        return None
    return math.prod(record.shape[1:]) if len(record.shape) > 1 else 1


def _flag_shares(probe: ProbeRecord, rule: Threshold, field: str,
                 min_units: int = 0) -> _Flagged | None:
    verdicts = [(r, rule.severity(getattr(r, field))) for r in probe.layers
                if (_units(r) or min_units) >= min_units]
    flagged = [(r, v) for r, v in verdicts if v is not None]
    severity = worst_severity(*(v for _, v in flagged))
    if severity is None:
        return None
    worst = max((r for r, _ in flagged), key=lambda r: getattr(r, field))
    return _Flagged([r for r, _ in flagged], severity, worst, getattr(worst, field))


def _largest(probe: ProbeRecord, field: str) -> float | None:
    return max((getattr(r, field) for r in probe.layers if getattr(r, field) is not None),
               default=None)


def dead_headline(probe: ProbeRecord) -> dict[str, float | None]:
    """The largest dead-unit fraction of any ReLU-family layer."""
    return {"max_dead_fraction": _largest(probe, "dead_fraction")}


def dead_relu(probe: ProbeRecord, thresholds: dict[str, Threshold]) -> Finding | None:
    """ReLU-family layers where a large share of units never fire on the probe."""
    if not _enough_samples(probe):
        return None
    flagged = _flag_shares(probe, thresholds["dead_fraction"], "dead_fraction",
                           MIN_UNITS_FOR_DEAD_FRACTION)
    if flagged is None:
        return None
    evidence = {
        "dead_fraction": {r.name: r.dead_fraction for r in flagged.layers},
        "max_dead_fraction": flagged.share,
        "samples": (probe.batch_size or 0) * probe.batches,
    }
    summary = (f"{len(flagged.layers)} ReLU layer(s) with dead units; worst "
               f"{flagged.worst.label}: {flagged.share:.0%} of units never fire")
    return Finding(FindingId.DEAD_RELU, flagged.severity, [r.name for r in flagged.layers], summary,
                   evidence=evidence)


def saturation_headline(probe: ProbeRecord) -> dict[str, float | None]:
    """The largest saturated fraction of any saturating activation."""
    return {"max_saturated_fraction": _largest(probe, "saturated_fraction")}


def saturated_activations(probe: ProbeRecord,
                          thresholds: dict[str, Threshold]) -> Finding | None:
    """Sigmoid/tanh-family layers with much of their output in the flat tails."""
    flagged = _flag_shares(probe, thresholds["saturated_fraction"], "saturated_fraction")
    if flagged is None:
        return None
    evidence = {
        "saturated_fraction": {r.name: r.saturated_fraction for r in flagged.layers},
        "preact_std": {r.name: r.preact_std for r in flagged.layers},
        "max_saturated_fraction": flagged.share,
    }
    summary = (f"{len(flagged.layers)} {flagged.worst.activation} layer(s) saturated; worst "
               f"{flagged.worst.label}: {flagged.share:.0%} of outputs in the flat tails")
    return Finding(FindingId.SATURATED_ACTIVATIONS, flagged.severity,
                   [r.name for r in flagged.layers], summary, evidence=evidence)
