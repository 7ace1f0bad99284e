"""Forward-signal rules: scale drift through depth, dead ReLU units, saturation."""

from __future__ import annotations

from dataclasses import dataclass

from nndiag.findings import Finding, worst_severity
from nndiag.records import LayerRecord, ProbeRecord
from nndiag.rules.thresholds import MIN_SAMPLES_FOR_DEAD_UNITS, Threshold


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

    Layers with all-zero weights (a deliberately zero-initialized head or residual branch)
    and layers whose output is exactly constant are skipped: their scale says nothing about
    the signal's propagation.
    """
    layers = [r for r in probe.layers
              if r.fan_in is not None and r.weight_rms and r.std and r.std == r.std]
    drift = Drift(1.0, None, None, 1.0, None, None, layers)
    low = high = None
    for record in layers:
        assert record.std is not None
        if low is not None and record.std / low.std > drift.growth:
            drift.growth, drift.growth_from, drift.growth_to = record.std / low.std, low, record
        if high is not None and record.std / high.std < drift.collapse:
            drift.collapse, drift.collapse_from, drift.collapse_to = (record.std / high.std,
                                                                      high, record)
        low = record if low is None or record.std < low.std else low
        high = record if high is None or record.std > high.std else high
    return drift


def drift_headline(probe: ProbeRecord) -> dict[str, float | None]:
    """Largest growth and collapse of activation scale through depth."""
    drift = activation_drift(probe)
    return {"activation_growth": drift.growth, "activation_collapse": drift.collapse}


def poor_initialization(probe: ProbeRecord, thresholds: dict[str, Threshold]) -> Finding | None:
    """The activation scale drifts by orders of magnitude through depth."""
    drift = activation_drift(probe)
    growth = thresholds["activation_growth"].severity(drift.growth)
    collapse = thresholds["activation_collapse"].severity(drift.collapse)
    severity = worst_severity(growth, collapse)
    if severity is None:
        return None
    scales = [r.init_scale for r in drift.layers if r.init_scale is not None]
    evidence: dict[str, object] = {
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
    return Finding("poor_initialization", severity, span, summary, evidence=evidence)


def _enough_samples(probe: ProbeRecord) -> bool:
    return (probe.batch_size or 0) * probe.batches >= MIN_SAMPLES_FOR_DEAD_UNITS


def dead_headline(probe: ProbeRecord) -> dict[str, float | None]:
    """The largest dead-unit fraction of any ReLU-family layer."""
    fractions = [r.dead_fraction for r in probe.layers if r.dead_fraction is not None]
    return {"max_dead_fraction": max(fractions, default=None)}


def dead_relu(probe: ProbeRecord, thresholds: dict[str, Threshold]) -> Finding | None:
    """ReLU-family layers where a large share of units never fire on the probe."""
    if not _enough_samples(probe):
        return None
    rule = thresholds["dead_fraction"]
    flagged = [(r, rule.severity(r.dead_fraction)) for r in probe.layers]
    flagged = [(r, s) for r, s in flagged if s is not None]
    if not flagged:
        return None
    severity = worst_severity(*(s for _, s in flagged))
    assert severity is not None
    top = max(flagged, key=lambda item: item[0].dead_fraction or 0.0)[0]
    evidence = {
        "dead_fraction": {r.name: r.dead_fraction for r, _ in flagged},
        "max_dead_fraction": top.dead_fraction,
        "samples": (probe.batch_size or 0) * probe.batches,
    }
    summary = (f"{len(flagged)} ReLU layer(s) with dead units; worst {top.label}: "
               f"{top.dead_fraction:.0%} of units never fire")
    return Finding("dead_relu", severity, [r.name for r, _ in flagged], summary,
                   evidence=evidence)


def saturation_headline(probe: ProbeRecord) -> dict[str, float | None]:
    """The largest saturated fraction of any saturating activation."""
    fractions = [r.saturated_fraction for r in probe.layers if r.saturated_fraction is not None]
    return {"max_saturated_fraction": max(fractions, default=None)}


def saturated_activations(probe: ProbeRecord,
                          thresholds: dict[str, Threshold]) -> Finding | None:
    """Sigmoid/tanh-family layers with much of their output in the flat tails."""
    rule = thresholds["saturated_fraction"]
    flagged = [(r, rule.severity(r.saturated_fraction)) for r in probe.layers]
    flagged = [(r, s) for r, s in flagged if s is not None]
    if not flagged:
        return None
    severity = worst_severity(*(s for _, s in flagged))
    assert severity is not None
    top = max(flagged, key=lambda item: item[0].saturated_fraction or 0.0)[0]
    evidence = {
        "saturated_fraction": {r.name: r.saturated_fraction for r, _ in flagged},
        "preact_std": {r.name: r.preact_std for r, _ in flagged},
        "max_saturated_fraction": top.saturated_fraction,
    }
    summary = (f"{len(flagged)} {top.activation} layer(s) saturated; worst {top.label}: "
               f"{top.saturated_fraction:.0%} of outputs in the flat tails")
    return Finding("saturated_activations", severity, [r.name for r, _ in flagged], summary,
                   evidence=evidence)
