"""What the advisors share.

Their type and context kinds, number formatting, the catalogue fixes that suit a model's
layers, and readings of a probe (activations on a path, the weight scale's story).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from nndiag.advice.catalog import activation_module, init_gain, layer_types, make_fix
from nndiag.findings import Finding, Fix
from nndiag.records import LayerRecord, ProbeRecord
from nndiag.records.layers import ATTENTION_ROLES, READING_PLAIN, ROLE_NORM

# The kinds of context a finding is judged on (the first half of a registry key).
PROBE = "probe"  # a live probe: ProbeRecord
CHECKPOINT = "checkpoint"  # a data-free checkpoint analysis: CheckpointRecord
RUN = "run"  # a recorded run: RunLog
SANITY = "sanity"  # the pre-training checks: SanityRecord
LR_CURVE = "lr_curve"  # lr-find: LRCurveRecord, TrialsRecord

Advisor = Callable[[Finding, Any], tuple[str, list[Fix]]]
"""``f(finding, context) -> (explanation, fixes)``, fixes most effective first."""

NORM_KINDS = frozenset({"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm",
                        "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "RMSNorm",
                        "SyncBatchNorm"})
RECURRENT_KINDS = frozenset({"RNN", "LSTM", "GRU"})
# Largest derivative of each saturating activation (the most backward signal it can pass).
MAX_DERIVATIVE = {"sigmoid": 0.25, "hardsigmoid": 1 / 6, "tanh": 1.0, "softsign": 1.0,
                  "hardtanh": 1.0}
SATURATION_ONSET = {"sigmoid": 4.4, "tanh": 2.2, "softsign": 3.5}


def fmt(value: float | None) -> str:
    """A number for a sentence: two significant digits, scientific when very small or large."""
    if value is None:
        return "n/a"
    return f"{value:.2g}" if 1e-2 <= abs(value) < 1e3 else f"{value:.1e}"


# ----------------------------------------------------------------------------- fixes for a model


def he_init_fix(kinds: set[str]) -> Fix:
    """He init of the model's Linear/conv layers (``kinds``: its module class names)."""
    return make_fix("he_init", layer_types=layer_types(kinds))


def xavier_init_fix(kinds: set[str], activation: str = "tanh") -> Fix:
    """Xavier init of the model's Linear/conv layers, scaled for a saturating activation."""
    return make_fix("xavier_init", layer_types=layer_types(kinds), activation=activation,
                    gain=init_gain(activation))


def norm_fix(kinds: set[str]) -> Fix:
    """The normalization that suits the model's layers.

    BatchNorm after convs, else pre-norm LayerNorm for recurrent or attention models, else
    BatchNorm (or LayerNorm) after Linear layers.
    """
    if is_transformer_kinds(kinds) or kinds & RECURRENT_KINDS:
        return make_fix("layer_norm")
    if any(k in ("Conv1d", "Conv2d", "Conv3d") for k in kinds):
        return make_fix("batch_norm", "conv")
    return make_fix("batch_norm")


def is_transformer_kinds(kinds: set[str]) -> bool:
    """True for a model with attention or LayerNorm/RMSNorm layers (never advise BatchNorm)."""
    return any(k.endswith(("Attention", "LayerNorm", "RMSNorm")) or k in ("Conv1D",)
               for k in kinds)


def is_transformer(probe: ProbeRecord) -> bool:
    """True when the probe saw attention layers or a transformer's normalization."""
    return any(r.role in ATTENTION_ROLES for r in probe.layers) or \
        is_transformer_kinds(probe_kinds(probe))


def n_blocks(probe: ProbeRecord) -> int:
    """How many repeated blocks the model has (1 when none was seen)."""
    return len({r.block for r in probe.layers if r.block is not None}) or 1


def activation_fix(activation: str) -> Fix:
    """Swap a saturating activation kind (``tanh``, ``sigmoid``...) for ReLU."""
    return make_fix("non_saturating_activation", activation=activation,
                    module=activation_module(activation))


def normalize_inputs_fix(probe: ProbeRecord) -> Fix:
    """Standardize the inputs, quoting their measured mean and std."""
    mean = probe.input_mean if probe.input_mean is not None else 0.0
    std = probe.input_std if probe.input_std else 1.0
    return make_fix("normalize_inputs", mean=mean, std=std)


def bias_fix(layers: Iterable[str]) -> Fix:
    """Reset the biases feeding the dead units of ``layers``."""
    return make_fix("bias_init", layers=", ".join(layers))


def recurrent_fixes(kinds: set[str]) -> list[Fix]:
    """Gated units instead of a plain RNN, and orthogonal recurrent weights, where they apply."""
    fixes = []
    if "RNN" in kinds:
        fixes.append(make_fix("gated_recurrent_unit"))
    if kinds & RECURRENT_KINDS:
        fixes.append(make_fix("orthogonal_init"))
    return fixes


# ----------------------------------------------------------------------------- reading a probe


def probe_kinds(probe: ProbeRecord) -> set[str]:
    """The module class names of the probed sites."""
    return {r.kind for r in probe.layers}


# Why inputs far from unit scale matter, and what to do (inspect, the gate, a recorded run).
UNNORMALIZED_INPUTS = (
    "Default initializations (PyTorch's, He, Xavier) are scaled for inputs of about unit size: "
    "the first layer's pre-activations are multiplied by the inputs' scale, and the gradient "
    "of its weights with them, so every later layer starts off scale and the first layer's "
    "updates are out of proportion with the others'. Standardize the inputs with the "
    "training set's statistics (per feature or per channel); re-initializing the weights or "
    "changing the learning rate only compensates for the symptom.")


def inputs_off_scale(probe: ProbeRecord) -> bool:
    """True when the measured input std is outside [0.1, 10]."""
    return probe.input_std is not None and not 0.1 <= probe.input_std <= 10


def between(probe: ProbeRecord, start: LayerRecord, end_index: int | None = None
            ) -> list[LayerRecord]:
    """The sites from ``start`` to the site at ``end_index`` (default: the last), inclusive."""
    stop = probe.layers[-1].index if end_index is None else end_index
    return [r for r in probe.layers if start.index <= r.index <= stop]


def activation_counts(records: Iterable[LayerRecord]) -> Counter[str]:
    """How many sites of each activation kind ``records`` hold."""
    return Counter(r.activation for r in records if r.activation is not None)


def has_norm(probe: ProbeRecord) -> bool:
    """True when the model has a normalization layer."""
    return any(r.kind in NORM_KINDS or r.role == ROLE_NORM for r in probe.layers)


def dominant_saturating(counts: Counter[str]) -> tuple[str, int] | None:
    """The most frequent saturating activation and its count, if saturating ones dominate.

    ``None`` when the other activations outnumber the most frequent saturating kind.
    """
    saturating = [(k, n) for k, n in counts.most_common() if k in MAX_DERIVATIVE]
    relu_like = sum(n for k, n in counts.items() if k not in MAX_DERIVATIVE)
    if saturating and saturating[0][1] >= relu_like:
        return saturating[0]
    return None


def feeding_layer(probe: ProbeRecord, record: LayerRecord) -> LayerRecord | None:
    """The last site with weights before ``record``."""
    earlier = [r for r in probe.layers if r.index < record.index and r.has_weights]
    return earlier[-1] if earlier else None


def _median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v is not None and math.isfinite(v))
    return values[len(values) // 2] if values else None


def init_story(records: list[LayerRecord], explains: str | None = None
               ) -> tuple[str, float | None]:
    """A sentence on the weight scale against He and the per-layer factor it implies.

    Only plain weights on the signal's path count: a normalization re-scales the output of the
    others, whatever their scale, and a squeeze-and-excitation gate sits beside the path.

    Args:
        records: The weight layers on the path being explained.
        explains: ``"growth"`` or ``"shrinkage"``: the sentence is only told when the weight
            scale does that (a shrinking factor never explains an exploding gradient).

    Returns:
        The sentence (empty when the median scale is within [0.8, 1.25] of He, unknown, or
        pulls the other way than ``explains``) and the median scale of the He-referenced
        layers (``None`` without any).
    """
    he_layers = [r for r in records if r.init_reference == "he" and r.init_scale is not None
                 and r.weight_reading in (READING_PLAIN, None) and not r.pooled]
    scale = _median([r.init_scale for r in he_layers if r.init_scale is not None])
    if not he_layers or scale is None or 0.8 <= scale <= 1.25:
        return "", scale
    if (explains == "growth" and scale < 1) or (explains == "shrinkage" and scale > 1):
        return "", scale
    product = scale ** len(he_layers)
    return (f"Its {len(he_layers)} ReLU-feeding layers have weights at {scale:.2g}x the He "
            f"scale sqrt(2/fan_in), so each multiplies the signal by about {scale:.2g} forward "
            f"and backward: {scale:.2g}^{len(he_layers)} = {product:.1e}."), scale
