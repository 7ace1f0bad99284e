"""Parameter statistics per module, and how they attach to the call sites (no torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from nndiag.records.layers import LayerRecord
from nndiag.stats.weights import init_reference, init_scale, update_ratio


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


def ancestors(name: str, root: str) -> list[str]:
    """Qualified names of a module's ancestors, nearest first (``root`` last)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)] + [root]


def attach_parameters(layers: list[LayerRecord], groups: list[ParamGroup], root: str
                      ) -> list[str]:
    """Put each module's parameter statistics on its first call site, in place.

    A module that never ran but whose parameters all got gradients (``out_proj`` inside
    ``nn.MultiheadAttention``, whose weights are used functionally) is folded into its nearest
    measured ancestor; with no such ancestor (submodules of a TorchScript module, whose calls
    Python hooks do not see) it gets a record of its own. Then every Linear/conv layer gets
    its init scale against He or Xavier, chosen by the next activation it feeds.

    Args:
        layers: Site records in forward order (records may be appended).
        groups: Each parameter owner's statistics.
        root: The name the root module's sites carry.

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
    for layer in layers:
        if layer.fan_in is not None and layer.fan_out is not None and layer.weight_rms:
            layer.init_reference = init_reference(_next_activation(layers, layer))
            layer.init_scale = init_scale(layer.weight_rms, layer.init_reference, layer.fan_in,
                                          layer.fan_out)
    return not_run


def _next_activation(layers: list[LayerRecord], layer: LayerRecord) -> str | None:
    """The first activation after ``layer`` in forward order, before the next weight layer."""
    for later in layers[layer.index + 1:]:
        if later.activation is not None:
            return later.activation
        if later.fan_in is not None:
            break
    return None
