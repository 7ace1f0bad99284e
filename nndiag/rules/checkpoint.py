"""Data-free rules over a checkpoint's weights (no forward pass, no data).

A Linear/conv layer followed by a ReLU multiplies the signal's scale by about
``init_scale_he`` (its weight RMS over the He std). Along a chain of such layers with no
normalization in between the factors multiply; the rule judges the largest growth and
collapse of that product with the same thresholds the live ``poor_initialization`` rule uses
for measured activations. Activations are unknown without the architecture, so ReLU is
assumed (the explanation says so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nndiag.findings import Finding, worst_severity
from nndiag.records import CheckpointRecord, ModuleWeights
from nndiag.rules.thresholds import Threshold


@dataclass
class ChainDrift:
    """The worst predicted growth or collapse of signal scale along one chain of layers."""

    factor: float
    start: ModuleWeights
    end: ModuleWeights
    layers: list[ModuleWeights]
    direction: str


def chain_drifts(record: CheckpointRecord) -> list[ChainDrift]:
    """For each chain, the largest growth and the largest collapse of the predicted scale."""
    chains: dict[int, list[ModuleWeights]] = {}
    for module in record.modules:
        if module.chain is not None and module.init_scale_he:
            chains.setdefault(module.chain, []).append(module)
    drifts = []
    for layers in chains.values():
        log_prefix = 0.0
        low = high = (0.0, 0)  # (log of the product so far, index of the layer after it)
        grow = shrink = None
        for index, module in enumerate(layers):
            log_prefix += math.log(module.init_scale_he or 1.0)
            if grow is None or log_prefix - low[0] > grow[0]:
                grow = (log_prefix - low[0], low[1], index)
            if shrink is None or log_prefix - high[0] < shrink[0]:
                shrink = (log_prefix - high[0], high[1], index)
            if log_prefix < low[0]:
                low = (log_prefix, index + 1)
            if log_prefix > high[0]:
                high = (log_prefix, index + 1)
        for found, direction in ((grow, "grows"), (shrink, "collapses")):
            if found is not None:
                value, first, last = found
                span = layers[first: last + 1]
                drifts.append(ChainDrift(math.exp(value), span[0], span[-1], span, direction))
    return drifts


def predicted_drift(record: CheckpointRecord, thresholds: dict[str, Threshold]
                    ) -> Finding | None:
    """Chains of layers whose weight scales multiply to an exploding or vanishing signal."""
    judged = []
    for drift in chain_drifts(record):
        rule = thresholds["activation_growth" if drift.direction == "grows"
                          else "activation_collapse"]
        severity = rule.severity(drift.factor)
        if severity is not None:
            judged.append((severity, drift))
    if not judged:
        return None
    severity = worst_severity(*(s for s, _ in judged))
    assert severity is not None
    worst = max((d for s, d in judged if s == severity),
                key=lambda d: abs(math.log(d.factor)))
    scales = [m.init_scale_he for m in worst.layers if m.init_scale_he is not None]
    evidence = {
        "predicted_factor": worst.factor,
        "direction": worst.direction,
        "from_layer": worst.start.name,
        "to_layer": worst.end.name,
        "layers_in_chain": len(worst.layers),
        "init_scale_he": {m.name: m.init_scale_he for m in worst.layers},
        "median_init_scale_he": sorted(scales)[len(scales) // 2],
        "assumes": "ReLU-like activations between the layers",
    }
    layers = sorted({m.name for _, d in judged for m in d.layers},
                    key=[m.name for m in record.modules].index)
    summary = (f"weights predict a signal that {worst.direction} {worst.factor:.1e}x from "
               f"{worst.start.name} to {worst.end.name} ({len(worst.layers)} layers, no "
               "normalization between them)")
    return Finding("poor_initialization", severity, layers, summary, evidence=evidence)


def nonfinite_weights(record: CheckpointRecord, thresholds: dict[str, Threshold]
                      ) -> Finding | None:
    """NaN or Inf stored in the weights."""
    bad = [(m, t) for m in record.modules for t in m.tensors if t.nonfinite]
    if not bad:
        return None
    evidence = {"tensors": {t.name: t.nonfinite for _, t in bad},
                "first_layer": bad[0][0].name}
    names = sorted({m.name for m, _ in bad}, key=[m.name for m in record.modules].index)
    summary = (f"{len(bad)} tensor(s) hold NaN/Inf, first {bad[0][1].name} "
               f"({bad[0][1].nonfinite} of {bad[0][1].numel} values)")
    return Finding("nan_inf", "error", names, summary, evidence=evidence)


def dead_channels(record: CheckpointRecord, thresholds: dict[str, Threshold]
                  ) -> Finding | None:
    """BatchNorm layers many of whose channels have near-zero gamma or running variance."""
    rule = thresholds["dead_channel_fraction"]
    judged = []
    for module in record.modules:
        if module.channels and module.dead_channels is not None:
            severity = rule.severity(module.dead_channels / module.channels)
            if severity is not None:
                judged.append((severity, module))
    if not judged:
        return None
    severity = worst_severity(*(s for s, _ in judged))
    assert severity is not None
    worst = max((m for _, m in judged), key=lambda m: (m.dead_channels or 0) / (m.channels or 1))
    evidence = {"dead_channels": {m.name: m.dead_channels for _, m in judged},
                "channels": {m.name: m.channels for _, m in judged}}
    summary = (f"{len(judged)} BatchNorm layer(s) with dead channels; worst {worst.name}: "
               f"{worst.dead_channels} of {worst.channels}")
    return Finding("dead_channels", severity, [m.name for _, m in judged], summary,
                   evidence=evidence)


CHECKPOINT_RULES = (nonfinite_weights, predicted_drift, dead_channels)
