"""Parameter statistics per module, and how they attach to the call sites (no torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from nndiag.records.layers import (
    OUTPUT_GATED,
    OUTPUT_NORMALIZED,
    READING_GAIN,
    READING_NORMALIZED,
    READING_PLAIN,
    READING_REPARAMETRIZED,
    READING_ZERO,
    LayerRecord,
)
from nndiag.stats.weights import init_reference, init_scale, update_ratio

# A Linear/conv matrix below this share of its He/Xavier scale was set near zero on purpose.
NEAR_ZERO_INIT_SCALE = 1e-3


@dataclass
class ParamGroup:
    """One module's own parameters, measured (plain numbers, for ``attach_parameters``).

    Attributes:
        name: The module's qualified name.
        kind: Its class name.
        params: Elements of its parameters.
        trainable: Whether any of them requires a gradient.
        weight_norm: L2 norm of its weights (parameters other than biases).
        weight_numel: Elements of those weights.
        grad_norm: L2 norm of the weights' gradient (``None`` when none was read).
        used: True when every trainable parameter got a gradient.
        any_used: True when any parameter got a gradient.
        fan_in: Fan-in when the weight has a He/Xavier expectation (Linear/conv).
        fan_out: Fan-out likewise.
        update_ratio: ``||w_after - w_before|| / ||w_before||`` over an optimizer step.
        vector_only: Every weight is a vector (at most one dimension longer than 1): gains,
            layer-scales, tokens.
        reparametrized: The weights are computed from other parameters (weight or spectral
            normalization); ``weight_norm`` is the computed weight's.
    """

    name: str
    kind: str
    params: int
    trainable: bool
    weight_norm: float
    weight_numel: int
    grad_norm: float | None = None
    used: bool = True
    any_used: bool = True
    fan_in: int | None = None
    fan_out: int | None = None
    update_ratio: float | None = None
    vector_only: bool = False
    reparametrized: bool = False


@dataclass
class DataFlow:
    """What the forward pass showed of where each module's output goes (from capture).

    Attributes:
        consumers: Module name -> the modules that took its output as their input.
        normalized: Modules whose output reaches a normalization before any other layer with
            weights (directly, or through elementwise activations and pass-through modules).
    """

    consumers: dict[str, set[str]]
    normalized: set[str]


def weight_reading(group: ParamGroup, normalized: bool) -> str:
    """How one module's weight ratios can be read (``READING_*`` in ``records.layers``)."""
    if group.reparametrized:
        return READING_REPARAMETRIZED
    if group.weight_norm == 0:
        return READING_ZERO
    if group.vector_only:
        return READING_GAIN
    return READING_NORMALIZED if normalized else READING_PLAIN


def ancestors(name: str, root: str) -> list[str]:
    """Qualified names of a module's ancestors, nearest first (``root`` last)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)] + [root]


def attach_parameters(layers: list[LayerRecord], groups: list[ParamGroup], root: str,
                      flow: DataFlow | None = None) -> list[str]:
    """Put each module's parameter statistics on its first call site, in place.

    A module that never ran but whose parameters all got gradients (``out_proj`` inside
    ``nn.MultiheadAttention``, whose weights are used functionally) is folded into its nearest
    measured ancestor; with no such ancestor (submodules of a TorchScript module, whose calls
    Python hooks do not see) it gets a record of its own. Then every Linear/conv layer gets
    its init scale against He or Xavier, chosen by the next activation it feeds, and every
    layer with weights its ``weight_reading``; with the data flow, outputs that are normalized
    or feed only zero weights get their ``output_reading``.

    Args:
        layers: Site records in forward order (records may be appended).
        groups: Each parameter owner's statistics.
        root: The name the root module's sites carry.
        flow: Where outputs went in the forward pass (``None``: not observed).

    Returns:
        The modules with parameters that stayed unmeasured (never ran, no gradient).
    """
    first_site: dict[str, LayerRecord] = {}
    for layer in layers:
        if not layer.functional:
            first_site.setdefault(layer.module, layer)
    members: dict[str, list[ParamGroup]] = {}
    not_run = []
    for group in groups:
        target = group.name if group.name in first_site else None
        if target is None and group.used:
            target = next((a for a in ancestors(group.name, root) if a in first_site), None)
        if target is None and group.any_used:
            record = LayerRecord(group.name, group.name, group.kind, len(layers))
            layers.append(record)
            first_site[group.name] = record
            target = group.name
        if target is None:
            not_run.append(group.name)
            continue
        members.setdefault(target, []).append(group)

    for target, parts in members.items():
        layer = first_site[target]
        layer.params = sum(g.params for g in parts)
        layer.trainable = any(g.trainable for g in parts)
        layer.weight_norm = math.sqrt(sum(g.weight_norm ** 2 for g in parts))
        numel = sum(g.weight_numel for g in parts)
        layer.weight_rms = layer.weight_norm / math.sqrt(numel) if numel else 0.0
        grads = [g.grad_norm for g in parts if g.grad_norm is not None]
        if grads:
            layer.grad_norm = math.sqrt(sum(v * v for v in grads))
            layer.grad_to_weight = (layer.grad_norm / layer.weight_norm
                                    if layer.weight_norm > 0 else math.inf)
        moved = [(g.update_ratio * g.weight_norm, g.weight_norm) for g in parts
                 if g.update_ratio is not None]
        if moved:
            layer.update_ratio = update_ratio([d for d, _ in moved], [w for _, w in moved])
        own = parts[0]
        if own.name == target and own.fan_in is not None and own.fan_out is not None:
            layer.fan_in, layer.fan_out = own.fan_in, own.fan_out
        normalized = flow is not None and target in flow.normalized
        layer.weight_reading = weight_reading(own if own.name == target else parts[0],
                                              normalized)
    for layer in layers:
        if layer.fan_in is not None and layer.fan_out is not None and layer.weight_rms:
            layer.init_reference = init_reference(_next_activation(layers, layer))
            layer.init_scale = init_scale(layer.weight_rms, layer.init_reference, layer.fan_in,
                                          layer.fan_out)
            if layer.init_scale < NEAR_ZERO_INIT_SCALE and \
                    layer.weight_reading in (READING_PLAIN, READING_NORMALIZED):
                layer.weight_reading = READING_ZERO
    if flow is not None:
        _read_outputs(layers, flow)
    return not_run


def _read_outputs(layers: list[LayerRecord], flow: DataFlow) -> None:
    """Mark outputs that are normalized, or that feed only zero weights (no gradient by design)."""
    zero = {r.module for r in layers if r.weight_reading == READING_ZERO}
    for layer in layers:
        if layer.functional:
            continue
        consumers = flow.consumers.get(layer.module, set())
        if layer.module in flow.normalized:
            layer.output_reading = OUTPUT_NORMALIZED
        elif consumers and consumers <= zero:
            layer.output_reading = OUTPUT_GATED


def _next_activation(layers: list[LayerRecord], layer: LayerRecord) -> str | None:
    """The first activation after ``layer`` in forward order, before the next weight layer."""
    for later in layers[layer.index + 1:]:
        if later.activation is not None:
            return later.activation
        if later.fan_in is not None:
            break
    return None
