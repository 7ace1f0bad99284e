"""Advice on data-free checkpoint findings.

A predicted scale drift (``poor_initialization``), NaN/Inf in the weights, dead BatchNorm
channels.
"""

from __future__ import annotations

from nndiag.advice.catalog import make_fix
from nndiag.advice.common import CHECKPOINT, Advisor, fmt, he_init_fix, norm_fix
from nndiag.findings import Finding, Fix
from nndiag.records import CheckpointRecord

# The module class a checkpoint's module kind stands for, to phrase the fixes.
_CHECKPOINT_CLASSES = {"linear": "Linear", "batch_norm": "BatchNorm2d", "norm": "LayerNorm",
                       "recurrent": "LSTM", "attention": "MultiheadAttention",
                       "embedding": "Embedding"}
# Keys that only a checkpoint written during training holds.
_TRAINING_STATE = ("epoch", "global_step", "optimizer", "optimizer_states",
                   "optimizer_state_dict")


def checkpoint_kinds(record: CheckpointRecord) -> set[str]:
    """The module class names the checkpoint's weights imply (``Conv2d``, ``Linear``...)."""
    kinds = set()
    for module in record.modules:
        if module.kind == "conv":
            weight = next((t for t in module.tensors if t.name.endswith("weight")), None)
            kinds.add(f"Conv{len(weight.shape) - 2}d" if weight else "Conv2d")
        elif module.kind in _CHECKPOINT_CLASSES:
            kinds.add(_CHECKPOINT_CLASSES[module.kind])
    return kinds


def _was_trained(record: CheckpointRecord) -> bool:
    return any(key in record.extras for key in _TRAINING_STATE)


def poor_initialization(finding: Finding, record: CheckpointRecord) -> tuple[str, list[Fix]]:
    """The drift a chain of layers would cause, predicted from their weight scale."""
    ev = finding.evidence
    kinds = checkpoint_kinds(record)
    verb = "explode" if ev["direction"] == "grows" else "vanish"
    text = (f"Assuming ReLU-like activations between them, the {ev['layers_in_chain']} layers "
            f"from {ev['from_layer']} to {ev['to_layer']} multiply the signal's scale by "
            f"{fmt(ev['predicted_factor'])}: their weights are, at the median, "
            f"{fmt(ev['median_init_scale_he'])}x the He scale sqrt(2/fan_in), and no "
            "normalization layer sits between them. Forward activations and gradients through "
            f"them would {verb} by about that factor. With --model and --data (or --input-shape) "
            "nndiag measures it instead of predicting it.")
    if _was_trained(record) and ev["direction"] == "grows":
        text += (" The file also holds training state: if the weights started at a sound "
                 "scale, they grew during training.")
        return text, [make_fix("lower_learning_rate"), make_fix("gradient_clipping"),
                      norm_fix(kinds)]
    return text, [he_init_fix(kinds), norm_fix(kinds)]


def nan_inf(finding: Finding, record: CheckpointRecord) -> tuple[str, list[Fix]]:
    """Non-finite weights: the run diverged before the checkpoint was written."""
    return ("NaN/Inf are stored in the weights themselves: the run diverged before this "
            "checkpoint was written, and every forward pass through these layers yields NaN. "
            "Resume from an earlier checkpoint and find the step where the loss first "
            "diverged."), [make_fix("lower_learning_rate"), make_fix("gradient_clipping")]


def dead_channels(finding: Finding, record: CheckpointRecord) -> tuple[str, list[Fix]]:
    """BatchNorm channels whose gamma or running variance collapsed."""
    ev = finding.evidence
    name = max(ev["dead_channels"], key=lambda k: ev["dead_channels"][k] / ev["channels"][k])
    return (f"In {name}, {ev['dead_channels'][name]} of {ev['channels'][name]} channels have a "
            "gamma or running variance near zero, so they output a constant and pass no "
            "gradient to the layer before. Common causes: a learning rate too high for the "
            "network, weight decay applied to BatchNorm parameters, or a dead ReLU feeding the "
            "layer."), [make_fix("lower_learning_rate")]


ADVISORS: dict[tuple[str, str], Advisor] = {
    (CHECKPOINT, "poor_initialization"): poor_initialization,
    (CHECKPOINT, "nan_inf"): nan_inf,
    (CHECKPOINT, "dead_channels"): dead_channels,
}
