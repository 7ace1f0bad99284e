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
import sys
from dataclasses import dataclass

from nndiag.findings import Finding, worst_severity
from nndiag.records import CheckpointRecord, ModuleWeights
from nndiag.rules.thresholds import Threshold


@dataclass
class ChainDrift:
    """The worst predicted growth or collapse of signal scale along one chain of layers.

    Attributes:
        log_factor: Natural log of the predicted factor. A deep chain's product easily leaves
            the range of a float (1e400, 1e-400): it is kept and judged in log space.
        start: The first layer of the span.
        end: The last layer of the span.
        layers: The span's layers, in order.
        direction: ``grows`` or ``collapses``.
    """

    log_factor: float
    start: ModuleWeights
    end: ModuleWeights
    layers: list[ModuleWeights]
    direction: str

    @property
    def factor(self) -> float:
        """The predicted factor (``inf`` or ``0.0`` when it leaves the float range)."""
        return math.exp(self.log_factor) if self.log_factor < _LOG_MAX else math.inf

    @property
    def log10_factor(self) -> float:
        """Base-10 log of the predicted factor."""
        return self.log_factor / math.log(10)


_LOG_MAX = math.log(sys.float_info.max)


def _usable_scale(module: ModuleWeights) -> bool:
    """A finite, positive He scale: zero or non-finite ones have no log (NaN/Inf: own finding)."""
    scale = module.init_scale_he
    return scale is not None and math.isfinite(scale) and scale > 0


def chain_drifts(record: CheckpointRecord) -> list[ChainDrift]:
    """For each chain, the largest growth and the largest collapse of the predicted scale.

    One pass over the chain's layers in log space: the largest rise (fall) of the running log
    product above its lowest (highest) earlier value.
    """
    chains: dict[int, list[ModuleWeights]] = {}
    for module in record.modules:
        if module.chain is not None and _usable_scale(module):
            chains.setdefault(module.chain, []).append(module)
    drifts = []
    for layers in chains.values():
        log_prefix = 0.0
        low = high = (0.0, 0)  # (log of the product so far, index of the layer after it)
        grow = shrink = None
        for index, module in enumerate(layers):
            log_prefix += math.log(module.init_scale_he)  # type: ignore[arg-type]
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
                drifts.append(ChainDrift(value, span[0], span[-1], span, direction))
    return drifts


def format_factor(log10_factor: float) -> str:
    """``3.6e+03`` in the float range, ``1e+412`` / ``1e-412`` beyond it."""
    if abs(log10_factor) < 300:
        return f"{10 ** log10_factor:.1e}"
    return f"1e{round(log10_factor):+d}"


def _positions(record: CheckpointRecord) -> dict[str, int]:
    """Each module's position in stored order (for sorting layer names in linear time)."""
    return {module.name: index for index, module in enumerate(record.modules)}


def predicted_drift(record: CheckpointRecord, thresholds: dict[str, Threshold]
                    ) -> Finding | None:
    """Chains of layers whose weight scales multiply to an exploding or vanishing signal."""
    judged = []
    for drift in chain_drifts(record):
        rule = thresholds["activation_growth" if drift.direction == "grows"
                          else "activation_collapse"]
        severity = rule.severity(drift.factor)  # inf and 0.0 compare as they should
        if severity is not None:
            judged.append((severity, drift))
    if not judged:
        return None
    severity = worst_severity(*(s for s, _ in judged))
    assert severity is not None
    worst = max((d for s, d in judged if s == severity), key=lambda d: abs(d.log_factor))
    scales = sorted(m.init_scale_he for m in worst.layers if m.init_scale_he is not None)
    evidence = {
        "predicted_factor": worst.factor,
        "log10_predicted_factor": worst.log10_factor,
        "direction": worst.direction,
        "from_layer": worst.start.name,
        "to_layer": worst.end.name,
        "layers_in_chain": len(worst.layers),
        "init_scale_he": {m.name: m.init_scale_he for m in worst.layers},
        "median_init_scale_he": scales[len(scales) // 2],
        "assumes": "ReLU-like activations between the layers",
    }
    position = _positions(record)
    layers = sorted({m.name for _, d in judged for m in d.layers}, key=position.__getitem__)
    summary = (f"weights predict a signal that {worst.direction} "
               f"{format_factor(worst.log10_factor)}x from {worst.start.name} to "
               f"{worst.end.name} ({len(worst.layers)} layers, no normalization between them)")
    return Finding("poor_initialization", severity, layers, summary, evidence=evidence)


def nonfinite_weights(record: CheckpointRecord, thresholds: dict[str, Threshold]
                      ) -> Finding | None:
    """NaN or Inf stored in the weights."""
    bad = [(m, t) for m in record.modules for t in m.tensors if t.nonfinite]
    if not bad:
        return None
    evidence = {"tensors": {t.name: t.nonfinite for _, t in bad},
                "first_layer": bad[0][0].name}
    names = sorted({m.name for m, _ in bad}, key=_positions(record).__getitem__)
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
