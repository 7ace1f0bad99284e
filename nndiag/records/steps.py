"""A recorded training step (``Monitor``), in the same per-site shape as a probe (no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from nndiag.records.layers import LayerRecord


@dataclass
class StepRecord:
    """What ``Monitor`` measured on one sampled training step.

    The layers are ``LayerRecord``s, as in a probe: one per call site in forward order, with
    the parameter statistics on a module's first call (``update_ratio`` included), so the
    rules read one shape for a probe and for a recorded step.

    Attributes:
        step: The step index (0-based; one step per optimizer step).
        loss: The loss of the step.
        grad_norm: Global L2 norm of every trainable parameter's gradient.
        layers: Per-site records.
    """

    step: int
    loss: float | None = None
    grad_norm: float | None = None
    layers: list[LayerRecord] = field(default_factory=list)

    def to_columns(self) -> dict[str, Any]:
        """Columnar plain data: one list per recorded field (``STEP_COLUMNS``) any layer has.

        Fields that follow from others or do not change during a run (module, shape, fans,
        parameter counts) are left out; ``from_columns`` derives ``grad_to_weight``.
        """
        columns: dict[str, list[Any]] = {}
        rows = [vars(layer) for layer in self.layers]
        for name in STEP_COLUMNS:
            values = [row[name] for row in rows]
            if name == "name" or any(v is not None and v is not False for v in values):
                columns[name] = values
        return {"step": self.step, "loss": self.loss, "grad_norm": self.grad_norm,
                "layers": columns}

    @classmethod
    def from_columns(cls, data: dict[str, Any]) -> StepRecord:
        """Rebuild a step from ``to_columns`` output.

        Raises:
            ValueError: Data that is not such a record (wrong types, ragged columns).
        """
        step = data.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"step must be an integer, got {step!r}")
        columns = data.get("layers") or {}
        if not isinstance(columns, dict):
            raise ValueError("layers must be an object of columns")
        known = {f.name: f for f in fields(LayerRecord)}
        names = columns.get("name") or []
        if not isinstance(names, list) or any(not isinstance(c, list) or len(c) != len(names)
                                              for c in columns.values()):
            raise ValueError("layer columns must be lists of one length")
        layers = []
        for i in range(len(names)):
            values = {k: v[i] for k, v in columns.items() if k in known}
            values.setdefault("module", values.get("name"))
            values.setdefault("kind", "")
            values.setdefault("index", i)
            layers.append(LayerRecord(**values))
        for layer in layers:
            _check_numbers(layer)
            if layer.grad_to_weight is None and layer.grad_norm is not None and \
                    layer.weight_norm:
                layer.grad_to_weight = layer.grad_norm / layer.weight_norm
        return cls(step, _number(data.get("loss")), _number(data.get("grad_norm")), layers)


# What a recorded step writes of each layer.
STEP_COLUMNS = ("name", "kind", "role", "activation", "functional", "mean", "std", "absmax",
                "dead_fraction", "saturated_fraction", "preact_std", "weight_norm", "grad_norm",
                "update_ratio", "init_scale", "weight_reading")
_NUMBER_FIELDS = ("mean", "std", "absmax", "dead_fraction", "saturated_fraction", "preact_mean",
                  "preact_std", "grad_out_norm", "weight_norm", "weight_rms", "grad_norm",
                  "grad_to_weight", "init_scale", "depth_gain", "update_ratio")


def _number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def _check_numbers(layer: LayerRecord) -> None:
    if not isinstance(layer.name, str):
        raise ValueError(f"layer name must be a string, got {layer.name!r}")
    if layer.weight_reading is not None and not isinstance(layer.weight_reading, str):
        raise ValueError(f"weight_reading must be a string, got {layer.weight_reading!r}")
    for name in _NUMBER_FIELDS:
        setattr(layer, name, _number(getattr(layer, name)))
