"""Vanishing and exploding gradients, judged through depth and in absolute scale.

Through depth: the gain of the backward signal, ``||dL/d out_l|| / ||dL/d output||``, at every
layer with weights. Absolute: the gradient-to-weight ratio ``||g|| / ||w||`` of every layer,
per unit of loss for vanishing (a converged model has small gradients because its loss is
small) and raw for exploding. Either one can miss a case the other catches: a plain Xavier
ReLU net has all gradients tiny with an unremarkable first/last ratio; an N(0,1) ReLU MLP
explodes although its first layer's weight gradient is smaller than its last.

Each number is read only where it means something for that layer (``LayerRecord``'s
``weight_reading`` and ``output_reading``): a gradient-to-weight ratio judges explosion only on
plain weights (not on weights a normalization follows, zero-initialized ones, gains or
re-parametrized ones); the backward signal is not read at an output a normalization rescales
or at one that feeds only zero-initialized weights. Through depth, the signal is judged against
what the body receives (its largest gain, when below the output's): a head initialized small,
as transformers are, scales every layer's gradient alike, which is not a trend through depth.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from nndiag.findings import Finding, FindingId, worst_severity
from nndiag.records import LayerRecord, ProbeRecord
from nndiag.records.layers import (
    READING_GAIN,
    READING_NORMALIZED,
    READING_PLAIN,
    READING_ZERO,
    ROLE_EMBEDDING,
    ROLE_HEAD,
    ROLE_KEY,
    ROLE_QUERY,
)
from nndiag.rules.blocks import block_spans, place_in_block
from nndiag.rules.thresholds import FULLY_DEAD, Threshold

# Judged apart from the backward signal through depth: attention query/key projections get a
# tiny gradient at init in every block, the last included (near-uniform attention passes
# little of it back), and an embedding's gradient is a sum over the tokens that used each row.
JUDGED_APART = frozenset({ROLE_QUERY, ROLE_KEY, ROLE_EMBEDDING})
# Weight readings whose gradient-to-weight ratio says how fast a layer learns (the vanishing
# scale check), and the one whose ratio can show an explosion. ``None``: a hand-made record.
LEARNING_READINGS = frozenset({READING_PLAIN, READING_NORMALIZED, READING_GAIN, None})
EXPLODING_READINGS = frozenset({READING_PLAIN, None})


@dataclass
class BlockTrend:
    """The backward signal across repeated blocks, for the layers of one role."""

    role: str
    ratio: float
    first: LayerRecord
    first_block: int
    last_block: int


@dataclass
class GradientProfile:
    """Backward-signal gains and gradient-to-weight ratios of the weight layers."""

    gains: list[tuple[LayerRecord, float]]
    ratios: list[tuple[LayerRecord, float]]
    loss: float
    trend: BlockTrend | None = None
    reference: tuple[LayerRecord, float] | None = None
    set_aside: dict[str, int] = field(default_factory=dict)

    @property
    def exploding_ratios(self) -> list[tuple[LayerRecord, float]]:
        """The ratios that can show an explosion: those of plain weights."""
        return [(r, v) for r, v in self.ratios if r.weight_reading in EXPLODING_READINGS]

    @property
    def relative_gains(self) -> list[tuple[LayerRecord, float]]:
        """Gains over what the body receives: its largest gain, when below the output's."""
        scale = min(1.0, self.reference[1]) if self.reference and self.reference[1] > 0 else 1.0
        return [(r, g / scale) for r, g in self.gains]

    @property
    def weakest(self) -> tuple[LayerRecord, float] | None:
        """What "vanishing through depth" is judged on.

        In a model of repeated blocks (a transformer's ``layer.N``), the gain of the first
        block over the last one for the layers of one role (the worst role): a trend through
        depth, not the smallest layer anywhere. Elsewhere, the smallest gain.
        """
        if self.trend is not None:
            outside = [(r, g) for r, g in self.relative_gains if r.block is None]
            low = min(outside, key=lambda item: item[1], default=None)
            if low is None or self.trend.ratio <= low[1]:
                return self.trend.first, self.trend.ratio
            return low
        return self.min_gain

    @property
    def min_gain(self) -> tuple[LayerRecord, float] | None:
        """The layer where the backward signal is weakest, relative to the body's largest."""
        return min(self.relative_gains, key=lambda item: item[1], default=None)

    @property
    def max_gain(self) -> tuple[LayerRecord, float] | None:
        """The layer where the backward signal is strongest."""
        return max(self.gains, key=lambda item: item[1], default=None)

    @property
    def max_ratio(self) -> tuple[LayerRecord, float] | None:
        """The plain layer with the largest gradient-to-weight ratio (what can explode)."""
        return max(self.exploding_ratios, key=lambda item: item[1], default=None)

    @property
    def max_learning_ratio(self) -> tuple[LayerRecord, float] | None:
        """The largest gradient-to-weight ratio of any layer whose ratio says it learns."""
        return max(self.ratios, key=lambda item: item[1], default=None)

    @property
    def max_ratio_per_loss(self) -> float | None:
        """Largest gradient-to-weight ratio divided by ``|loss|`` (None for a zero loss)."""
        top = self.max_learning_ratio
        if top is None or abs(self.loss) == 0:
            return None
        return top[1] / abs(self.loss)


def gradient_profile(probe: ProbeRecord) -> GradientProfile:
    """Gains and ratios of trainable weight layers.

    When a ReLU layer is fully dead, gradients that are exactly zero are blocked by it rather
    than vanishing; they are left to the ``dead_relu`` rule. So are those blocked by
    zero-initialized weights, on purpose.
    """
    blocked = any(r.dead_fraction is not None and r.dead_fraction >= FULLY_DEAD
                  for r in probe.layers)
    # A zero-initialized gain (a residual branch's last BatchNorm, LoRA's B) passes no
    # gradient to the layers before it by design: their exact zeros are set aside too.
    blocked = blocked or any(r.weight_reading == READING_ZERO for r in probe.layers)
    layers = [r for r in probe.weight_layers() if r.role not in JUDGED_APART]
    set_aside = Counter(f"output_{r.output_reading}" for r in layers if r.output_reading)
    set_aside.update(f"weights_{r.weight_reading}" for r in layers
                     if r.weight_reading not in EXPLODING_READINGS)
    gains = [(r, r.depth_gain) for r in layers
             if r.depth_gain is not None and r.output_reading is None
             and not (blocked and r.depth_gain == 0)]
    ratios = [(r, _against_init(r)) for r in layers
              if r.grad_to_weight is not None and r.weight_reading in LEARNING_READINGS
              and not (blocked and r.grad_to_weight == 0)]
    body = [(r, g) for r, g in gains if r.role != ROLE_HEAD]
    reference = max(body, key=lambda item: item[1], default=None)
    return GradientProfile(gains, ratios, probe.loss, block_trend(gains), reference,
                           dict(set_aside))


def _against_init(record: LayerRecord) -> float:
    """``||g||`` over the larger of ``||w||`` and the norm He/Xavier would give the layer.

    A ratio to weights initialized below their He/Xavier scale (a head drawn at N(0, 0.02)) is
    inflated by that smallness alone; above it, the weights' own norm is the yardstick.
    """
    assert record.grad_to_weight is not None
    if record.init_scale is not None and record.init_scale < 1:
        return record.grad_to_weight * record.init_scale
    return record.grad_to_weight


def block_trend(gains: list[tuple[LayerRecord, float]]) -> BlockTrend | None:
    """The worst first-block / last-block ratio of median gains, over roles (``None``: no blocks).

    Layers are grouped by role (layers without one by their place in the block: a
    normalization inside a gated branch is not compared with one on the residual path) and
    by block; a group needs at least two blocks to show a trend.
    """
    worst = None
    for span in block_spans(gains):
        ratio = span.first_median / span.last_median if span.last_median > 0 else 1.0
        if worst is None or ratio < worst.ratio:
            weakest = min(span.first, key=lambda item: item[1])[0]
            worst = BlockTrend(span.key, ratio, weakest, span.first_block, span.last_block)
    return worst


def _at(key: str, item: tuple[LayerRecord, float] | None) -> dict[str, object]:
    """Evidence entries for a value and the layer where it was measured."""
    return {key: item[1] if item else None, f"{key}_layer": item[0].name if item else None}


def _readings(profile: GradientProfile) -> dict[str, object]:
    """Evidence of how the numbers were read: the reference gain and what was set aside."""
    reference = profile.reference
    return {"reference_gain": reference[1] if reference else None,
            "reference_gain_layer": reference[0].name if reference else None,
            "set_aside": profile.set_aside}


def _judged_by(depth: str | None, scale: str | None) -> list[str]:
    return [name for name, verdict in (("depth", depth), ("scale", scale)) if verdict]


def vanishing_headline(probe: ProbeRecord) -> dict[str, float | None]:
    """Smallest depth gain and the largest gradient-to-weight ratio per unit of loss."""
    profile = gradient_profile(probe)
    weakest = profile.weakest
    return {"min_depth_gain": weakest[1] if weakest else None,
            "max_grad_to_weight_per_loss": profile.max_ratio_per_loss}


def exploding_headline(probe: ProbeRecord) -> dict[str, float | None]:
    """Largest depth gain and the largest gradient-to-weight ratio."""
    profile = gradient_profile(probe)
    strongest, top = profile.max_gain, profile.max_ratio
    return {"max_depth_gain": strongest[1] if strongest else None,
            "max_grad_to_weight": top[1] if top else None}


def vanishing_gradients(probe: ProbeRecord, thresholds: dict[str, Threshold]) -> Finding | None:
    """Early layers receive a vanishing share of the gradient, or every layer a tiny one."""
    profile = gradient_profile(probe)
    depth_rule = thresholds["vanishing_depth_gain"]
    scale_rule = thresholds["vanishing_grad_to_weight_per_loss"]
    weakest = profile.weakest
    per_loss = profile.max_ratio_per_loss
    depth = depth_rule.severity(weakest[1]) if weakest else None
    scale = scale_rule.severity(per_loss)
    severity = worst_severity(depth, scale)
    if severity is None:
        return None
    trend = profile.trend if weakest is not None and profile.trend is not None and \
        weakest[0] is profile.trend.first else None
    if depth is not None and trend is not None:
        layers = [r.name for r, _ in profile.gains if r.block == trend.first_block
                  and place_in_block(r) == trend.role]
    elif depth is not None:
        layers = [r.name for r, gain in profile.relative_gains if depth_rule.severity(gain)]
    else:
        layers = [r.name for r, _ in profile.ratios]
    top = profile.max_learning_ratio
    evidence = {**_at("min_depth_gain", weakest), **_at("max_grad_to_weight", top),
                "max_grad_to_weight_per_loss": per_loss, "loss": probe.loss,
                "judged_by": _judged_by(depth, scale), **_readings(profile)}
    if trend is not None:
        evidence["block_trend"] = {"role": trend.role, "first_block": trend.first_block,
                                   "last_block": trend.last_block, "ratio": trend.ratio}
    if depth is not None and trend is not None:
        summary = (f"gradient vanishes through the blocks: the {trend.role} layers of block "
                   f"{trend.first_block} get {trend.ratio:.1e} of those of block "
                   f"{trend.last_block}")
    elif depth is not None and weakest is not None:
        against = ("the output gradient" if profile.reference is None
                   or profile.reference[1] >= 1 else "the gradient the body receives")
        summary = (f"gradient vanishes through depth: {weakest[1]:.1e} of {against} "
                   f"reaches {weakest[0].label}")
    else:
        summary = (f"every layer's gradient is tiny: at most {top[1] if top else 0:.1e} of its "
                   f"weights at a loss of {probe.loss:.3g}")
    return Finding(FindingId.VANISHING_GRADIENTS, severity, layers, summary, evidence=evidence)


def exploding_gradients(probe: ProbeRecord, thresholds: dict[str, Threshold]) -> Finding | None:
    """The backward signal grows through depth, or gradients dwarf the weights."""
    profile = gradient_profile(probe)
    depth_rule = thresholds["exploding_depth_gain"]
    scale_rule = thresholds["exploding_grad_to_weight"]
    strongest, top = profile.max_gain, profile.max_ratio
    depth = depth_rule.severity(strongest[1]) if strongest else None
    scale = scale_rule.severity(top[1]) if top else None
    severity = worst_severity(depth, scale)
    if severity is None:
        return None
    names = {r.name for r, gain in profile.gains if depth_rule.severity(gain)}
    names |= {r.name for r, ratio in profile.exploding_ratios if scale_rule.severity(ratio)}
    layers = [r.name for r in probe.layers if r.name in names]
    evidence = {**_at("max_depth_gain", strongest), **_at("max_grad_to_weight", top),
                "loss": probe.loss, "judged_by": _judged_by(depth, scale), **_readings(profile)}
    if depth is not None and strongest is not None:
        summary = (f"gradient explodes through depth: {strongest[1]:.1e}x the output gradient "
                   f"at {strongest[0].label}")
    else:
        summary = (f"gradients dwarf the weights: ||g||/||w|| = {top[1] if top else 0:.1e} "
                   f"at {top[0].label if top else '?'}")
    return Finding(FindingId.EXPLODING_GRADIENTS, severity, layers, summary, evidence=evidence)
