"""Records: the plain numbers that capture produces and rules read (no torch in here).

A ``ProbeRecord`` is what one inspection measured; it round-trips through JSON so that rules
can be run offline and tested with hand-made records.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class LayerRecord:
    """Measurements of one layer call site, in forward execution order.

    A module called several times in one forward pass gets one record per call (``act``,
    ``act#2``...). Activations applied functionally inside a module's ``forward`` get a record
    named ``<module>/<activation>``. Parameter statistics sit on a module's first call.

    Attributes:
        name: Site name: the module's qualified name, with ``#k`` for its k-th call.
        module: Qualified name of the module that ran (or contains a functional activation).
        kind: The module class (``Linear``) or ``relu()`` for a functional activation.
        index: Position in forward execution order.
        activation: Activation kind (``relu``, ``tanh``...) for activation sites, else ``None``.
        functional: True when the activation was applied as a function, not a module.
        shape: Output shape of the first probe batch.
        mean: Mean of the output.
        std: Standard deviation of the output.
        absmax: Largest absolute output value (``inf``/``nan`` when the output was not finite).
        dead_fraction: Share of units that were zero for every probe sample (ReLU family).
        saturated_fraction: Share of output elements in saturation (saturating activations).
        preact_mean: Mean of a saturating activation's input, when it could be read.
        preact_std: Standard deviation of that input.
        grad_out_norm: L2 norm of the loss gradient with respect to the output
            (root mean square over probe batches).
        params: Number of the module's own parameters (first call site only).
        trainable: Whether any of those parameters requires a gradient.
        weight_norm: L2 norm of the module's weights (its parameters other than biases).
        weight_rms: Root mean square of those weights.
        grad_norm: L2 norm of the loss gradient with respect to those weights.
        grad_to_weight: ``grad_norm / weight_norm``.
        fan_in: Fan-in of a Linear/conv weight.
        fan_out: Fan-out of a Linear/conv weight.
        init_reference: ``he`` when the layer feeds a ReLU-like activation, else ``xavier``.
        init_scale: ``weight_rms`` divided by the reference's expected standard deviation.
        depth_gain: ``grad_out_norm`` over the gradient norm at the model output.
        update_ratio: ``||w_after - w_before|| / ||w_before||`` of the weights over one
            optimizer step (recorded steps only).

    """

    name: str
    module: str
    kind: str
    index: int
    activation: str | None = None
    functional: bool = False
    shape: list[int] | None = None
    mean: float | None = None
    std: float | None = None
    absmax: float | None = None
    dead_fraction: float | None = None
    saturated_fraction: float | None = None
    preact_mean: float | None = None
    preact_std: float | None = None
    grad_out_norm: float | None = None
    params: int = 0
    trainable: bool = False
    weight_norm: float | None = None
    weight_rms: float | None = None
    grad_norm: float | None = None
    grad_to_weight: float | None = None
    fan_in: int | None = None
    fan_out: int | None = None
    init_reference: str | None = None
    init_scale: float | None = None
    depth_gain: float | None = None
    update_ratio: float | None = None

    @property
    def label(self) -> str:
        """The name with the layer kind, for messages: ``features.3 (Conv2d)``."""
        return f"{self.name} ({self.kind})"

    @property
    def has_weights(self) -> bool:
        """True for the first call site of a module with weights."""
        return self.weight_norm is not None

    @property
    def output_finite(self) -> bool:
        """False when the output held NaN or Inf (seen in its largest value or its moments)."""
        return all(v is None or math.isfinite(v) for v in (self.absmax, self.mean, self.std))

    @property
    def grad_finite(self) -> bool:
        """False when a gradient (output or weights) held NaN or Inf."""
        return all(v is None or math.isfinite(v) for v in (self.grad_out_norm, self.grad_norm))


@dataclass
class ProbeRecord:
    """Everything one probe (forward and backward on a few batches) measured.

    Attributes:
        layers: Per-site records in forward execution order.
        loss: Mean loss over the probe batches.
        loss_name: The loss used (``cross_entropy``, ``mse``, or the user's function name).
        num_classes: Classes of a cross-entropy loss (for the expected loss at init), else None.
        output_grad_norm: L2 norm of the gradient of the loss with respect to the model output.
        output_std: Standard deviation of the model output.
        input_std: Standard deviation of floating-point inputs, ``None`` for integer inputs.
        input_mean: Mean of floating-point inputs.
        batches: Number of probe batches.
        batch_size: Size of the first dimension of the first input tensor.
        trainable_parameters: Number of trainable parameter elements.
        frozen_parameters: Number of frozen parameter elements.
        unused_parameters: Trainable parameters that received no gradient in any batch.
        not_run: Modules with parameters that never ran during the probe.
        model_class: The model's class name.

    """

    layers: list[LayerRecord]
    loss: float
    loss_name: str
    num_classes: int | None = None
    output_grad_norm: float | None = None
    output_std: float | None = None
    input_std: float | None = None
    input_mean: float | None = None
    batches: int = 1
    batch_size: int | None = None
    trainable_parameters: int = 0
    frozen_parameters: int = 0
    unused_parameters: list[str] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)
    model_class: str = ""

    def layer(self, name: str) -> LayerRecord:
        """The record of the site called ``name``."""
        for record in self.layers:
            if record.name == name:
                return record
        raise KeyError(name)

    def weight_layers(self) -> list[LayerRecord]:
        """Sites of modules with trainable weights, in forward order."""
        return [r for r in self.layers if r.has_weights and r.trainable]

    def activation_layers(self) -> list[LayerRecord]:
        """Activation sites (module or functional), in forward order."""
        return [r for r in self.layers if r.activation is not None]

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-ready apart from non-finite floats)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeRecord:
        """Rebuild a record from ``to_dict`` output."""
        names = {f.name for f in fields(LayerRecord)}
        layers = [LayerRecord(**{k: v for k, v in d.items() if k in names}) for d in data["layers"]]
        own = {f.name for f in fields(cls)} - {"layers"}
        return cls(layers=layers, **{k: v for k, v in data.items() if k in own})


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
        for name in STEP_COLUMNS:
            values = [getattr(layer, name) for layer in self.layers]
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
STEP_COLUMNS = ("name", "kind", "activation", "functional", "mean", "std", "absmax",
                "dead_fraction", "saturated_fraction", "preact_std", "weight_norm", "grad_norm",
                "update_ratio", "init_scale")
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
    for name in _NUMBER_FIELDS:
        setattr(layer, name, _number(getattr(layer, name)))


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
    from nndiag.stats.weights import init_reference, init_scale

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
        moved = [(g.update_ratio * g.weight_norm) ** 2 for g in parts
                 if g.update_ratio is not None]
        if moved and layer.weight_norm > 0:
            layer.update_ratio = math.sqrt(sum(moved)) / layer.weight_norm
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


@dataclass
class TensorStats:
    """Data-free statistics of one checkpoint tensor.

    Attributes:
        name: The state-dict key.
        shape: Its shape.
        dtype: Its dtype, without the ``torch.`` prefix.
        numel: Number of elements.
        rms: Root mean square (``None`` for non-float tensors).
        mean: Mean (``None`` for non-float tensors).
        nonfinite: Number of NaN/Inf elements.
    """

    name: str
    shape: list[int]
    dtype: str
    numel: int
    rms: float | None = None
    mean: float | None = None
    nonfinite: int = 0


@dataclass
class ModuleWeights:
    """A checkpoint's tensors grouped by module, with what they imply (no data needed).

    Attributes:
        name: Module prefix of the tensors (``features.3``), ``(root)`` for top-level ones.
        kind: ``linear``, ``conv``, ``batch_norm``, ``norm``, ``embedding``, ``recurrent``,
            ``attention`` or ``other``, guessed from tensor names and shapes.
        params: Number of elements of the module's tensors (buffers included).
        tensors: Per-tensor statistics.
        fan_in: Fan-in of a linear/conv weight.
        fan_out: Fan-out of a linear/conv weight.
        weight_rms: RMS of the module's weight.
        init_scale_he: ``weight_rms`` over the He std ``sqrt(2/fan_in)``: the signal gain of
            the layer followed by a ReLU.
        init_scale_xavier: ``weight_rms`` over the Xavier std.
        chain: Index of the run of linear/conv layers with no normalization in between.
        channels: Channels of a BatchNorm layer.
        dead_channels: BatchNorm channels with near-zero gamma or running variance.
        zero_initialized: True for a BatchNorm whose gamma is exactly zero everywhere and whose
            running statistics were never updated (the zero-init residual trick).
    """

    name: str
    kind: str
    params: int
    tensors: list[TensorStats]
    fan_in: int | None = None
    fan_out: int | None = None
    weight_rms: float | None = None
    init_scale_he: float | None = None
    init_scale_xavier: float | None = None
    chain: int | None = None
    channels: int | None = None
    dead_channels: int | None = None
    zero_initialized: bool = False

    @property
    def nonfinite(self) -> int:
        """NaN/Inf elements over all the module's tensors."""
        return sum(t.nonfinite for t in self.tensors)


@dataclass
class CheckpointRecord:
    """Everything the data-free analysis read from a checkpoint.

    Attributes:
        path: The file or directory.
        format: The format detected (see ``nndiag.checkpoints``).
        modules: Tensors grouped by module, in stored order.
        weights_key: Where the weights were found inside the file.
        extras: What else the file holds, described in words.
        files: Files read.
    """

    path: str
    format: str
    modules: list[ModuleWeights]
    weights_key: str | None = None
    extras: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    @property
    def parameters(self) -> int:
        """Number of elements over all tensors."""
        return sum(m.params for m in self.modules)
