"""Per-site records of a probe: the plain numbers capture produces and rules read (no torch).

A ``ProbeRecord`` is what one inspection measured; it round-trips through JSON so that rules
can be run offline and tested with hand-made records.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from nndiag.records.rows import Row

if TYPE_CHECKING:
    from nndiag.records.checkpoint import CheckpointRecord

# Roles a layer plays in its architecture (``LayerRecord.role``; found by capture). Rules judge
# layers of one role together: attention query/key projections legitimately get tiny gradients
# at init (near-uniform attention passes little gradient to them), an embedding's gradient is
# a sum over the tokens that used each row, normalization re-scales the signal.
ROLE_QUERY, ROLE_KEY, ROLE_VALUE, ROLE_ATTENTION_OUT = ("attention_query", "attention_key",
                                                        "attention_value", "attention_output")
ROLE_ATTENTION = "attention"  # fused projections (nn.MultiheadAttention's in_proj, c_attn)
ROLE_EMBEDDING, ROLE_NORM, ROLE_HEAD = "embedding", "normalization", "head"
# Modules whose weight rows are looked up: a batch updates only the rows of the tokens it holds.
LOOKUP_KINDS = frozenset({"Embedding", "EmbeddingBag"})
ATTENTION_ROLES = frozenset({ROLE_QUERY, ROLE_KEY, ROLE_VALUE, ROLE_ATTENTION_OUT,
                             ROLE_ATTENTION})

# How a layer's weights can be read (``LayerRecord.weight_reading``, found by capture). A ratio to
# the weights' norm (gradient-to-weight, update-to-weight) or a scale judged against He/Xavier
# means something only for plain weights:
# - ``normalized``: the output reaches a normalization before the next weight layer (through at
#   most elementwise activations): the loss does not depend on the weights' norm, so a large
#   ||g||/||w|| at init is not an explosion (the optimizer's effective step, lr*||g||/||w||^2,
#   is what the update ratio measures in training);
# - ``zero``: the weights are zero, or a Linear/conv matrix far below its He/Xavier scale, on
#   purpose (LoRA's B, a zero-initialized residual branch or bias table): any ratio to their
#   norm is meaningless;
# - ``gain``: the weights are vectors (normalization gains, layer-scales, gains stored as an
#   offset from 1, class and mask tokens): they scale a signal rather than map it;
# - ``reparametrized``: the weights are computed from other parameters (weight or spectral
#   normalization); their real scale is the computed weight's, the parameters' own is not.
READING_PLAIN, READING_NORMALIZED, READING_ZERO = "plain", "normalized", "zero"
READING_GAIN, READING_REPARAMETRIZED = "gain", "reparametrized"
# How a layer's output gradient can be read (``LayerRecord.output_reading``): ``normalized``
# (a normalization follows: the gradient there is divided by the output's own scale) or
# ``gated`` (the output feeds only zero-initialized weights: no gradient reaches it by design).
OUTPUT_NORMALIZED, OUTPUT_GATED = "normalized", "gated"

# A repeated block: a container of numbered children (``layers.3``, ``h.3``, ``block.3``).
_BLOCK = re.compile(r"(?:^|\.)(?:layers?|h|blocks?|stages?)\.(\d+)(?:\.|$)")


@dataclass
class LayerRecord(Row):
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
        role: What the layer does in its architecture (``nndiag.capture.layers``: attention
            query/key/value/output, fused attention, embedding, normalization, head), from the
            data flow and module types first and names second; ``None`` for plain layers.
        weight_reading: How the weights' ratios can be read (``READING_*`` above): ``plain``,
            ``normalized``, ``zero``, ``gain`` or ``reparametrized``; ``None`` without weights.
        output_reading: How the output gradient can be read: ``normalized``, ``gated`` or
            ``None`` (as measured).

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
    role: str | None = None
    weight_reading: str | None = None
    output_reading: str | None = None

    @property
    def block(self) -> int | None:
        """Index of the repeated block the layer sits in (``encoder.layer.3.…`` -> 3)."""
        match = _BLOCK.search(self.module)
        return int(match.group(1)) if match else None

    @property
    def block_position(self) -> str | None:
        """Where the layer sits in its repeated block (``attention.self.query``; indices: ``N``).

        ``None`` outside repeated blocks.
        """
        match = _BLOCK.search(self.module)
        if match is None:
            return None
        return re.sub(r"\d+", "N", self.name[match.end():]) or "(block)"

    @property
    def pooled(self) -> bool:
        """True for a conv output pooled to a single position, (N, C, 1, 1).

        Such a layer is a gating bottleneck (squeeze-and-excitation) or a head, beside the
        feature maps' signal path.
        """
        return bool(self.shape) and len(self.shape) > 2 and all(d == 1 for d in self.shape[2:])

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
        skipped_in_training: Modules that never ran in training mode but run in eval mode
            (LayerDrop, stochastic depth): not unused.
        model_class: The model's class name.
        pretrained: The weights were loaded (a checkpoint, ``from_pretrained``): no advice
            re-initializes them.
        weights: The model's weights read as a checkpoint's are (``measure_checkpoint``), for
            the mechanisms a probe does not measure; ``None`` when not read. Not in
            ``to_dict``.

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
    skipped_in_training: list[str] = field(default_factory=list)
    model_class: str = ""
    pretrained: bool = False
    weights: CheckpointRecord | None = None

    def layer(self, name: str) -> LayerRecord:
        """The record of the site called ``name``."""
        for record in self.layers:
            if record.name == name:
                return record
        raise KeyError(name)

    @property
    def finite(self) -> bool:
        """False when the loss, a layer's output or a gradient held NaN or Inf."""
        return math.isfinite(self.loss) and all(r.output_finite and r.grad_finite
                                                for r in self.layers)

    def weight_layers(self) -> list[LayerRecord]:
        """Sites of modules with trainable weights, in forward order."""
        return [r for r in self.layers if r.has_weights and r.trainable]

    def activation_layers(self) -> list[LayerRecord]:
        """Activation sites (module or functional), in forward order."""
        return [r for r in self.layers if r.activation is not None]

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-ready apart from non-finite floats), without ``weights``."""
        return asdict(replace(self, weights=None))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeRecord:
        """Rebuild a record from ``to_dict`` output."""
        names = {f.name for f in fields(LayerRecord)}
        layers = [LayerRecord(**{k: v for k, v in d.items() if k in names}) for d in data["layers"]]
        own = {f.name for f in fields(cls)} - {"layers"}
        return cls(layers=layers, **{k: v for k, v in data.items() if k in own})
