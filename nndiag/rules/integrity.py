"""A live probe's integrity: non-finite values, and parameters that receive no gradient."""

from __future__ import annotations

import math
import re

from nndiag.findings import Finding, FindingId
from nndiag.records import ProbeRecord
from nndiag.records.layers import ROLE_NORM
from nndiag.rules.thresholds import Threshold


def nan_inf_headline(probe: ProbeRecord) -> dict[str, float | None]:
    """How many layers produced non-finite outputs or gradients, and whether the loss did."""
    return {
        "nonfinite_outputs": float(sum(not r.output_finite for r in probe.layers)),
        "nonfinite_gradients": float(sum(not r.grad_finite for r in probe.layers)),
        "loss_finite": float(math.isfinite(probe.loss)),
    }


def nan_inf(probe: ProbeRecord, thresholds: dict[str, Threshold]) -> Finding | None:
    """NaN or Inf in the loss, a layer's output or a gradient."""
    if probe.finite:
        return None
    bad_out = [r for r in probe.layers if not r.output_finite]
    bad_grad = [r for r in probe.layers if not r.grad_finite]
    evidence: dict[str, object] = {"loss": probe.loss,
                                   "nonfinite_output_layers": [r.name for r in bad_out],
                                   "nonfinite_gradient_layers": [r.name for r in bad_grad]}
    if bad_out:
        first = bad_out[0]
        evidence["first_layer"] = first.name
        summary = f"NaN/Inf first appears in the output of {first.label}"
    elif bad_grad:
        last = bad_grad[-1]
        evidence["first_layer"] = last.name
        summary = f"NaN/Inf appears in the backward pass at {last.label}"
    else:
        summary = f"the loss is {probe.loss} although every layer's output is finite"
    layers = [r.name for r in bad_out] or [r.name for r in bad_grad]
    return Finding(FindingId.NAN_INF, "error", layers, summary, evidence=evidence)


def input_scale(mean: float | None, std: float | None) -> float | None:
    """How far inputs of this mean and std are from unit RMS (a factor >= 1).

    ``None`` without the statistics (integer inputs) or when they are not finite.
    """
    if std is None or mean is None:
        return None
    rms = math.hypot(mean, std)
    if not math.isfinite(rms):
        return None
    return max(rms, 1 / rms) if rms > 0 else math.inf


def input_scale_headline(probe: ProbeRecord) -> dict[str, float | None]:
    """The inputs' distance from unit scale."""
    return {"input_scale": input_scale(probe.input_mean, probe.input_std)}


def unnormalized_inputs(mean: float | None, std: float | None,
                        thresholds: dict[str, Threshold]) -> Finding | None:
    """``inputs_not_normalized`` for inputs of this mean and std (``None`` when they are fine)."""
    scale = input_scale(mean, std)
    severity = thresholds["input_scale"].severity(scale)
    if severity is None or scale is None or mean is None or std is None:
        return None
    return Finding(FindingId.INPUTS_NOT_NORMALIZED, severity, [],
                   f"the inputs are not normalized: mean {mean:.3g}, std {std:.3g} "
                   f"({scale:.3g}x from unit scale)",
                   evidence={"input_mean": mean, "input_std": std, "input_scale": scale})


def inputs_not_normalized(probe: ProbeRecord, thresholds: dict[str, Threshold]
                          ) -> Finding | None:
    """Floating-point inputs far from unit scale, with no normalization as the first layer."""
    first = probe.layers[0] if probe.layers else None
    if first is not None and first.role == ROLE_NORM:
        return None  # the model standardizes its own input
    return unnormalized_inputs(probe.input_mean, probe.input_std, thresholds)


# Parameters used only in another training mode, unused by design in a plain forward pass: the
# mask token of masked pre-training (BEiT, DINOv2, ViT-MAE: ``mask_token``; wav2vec 2.0 and
# HuBERT: ``masked_spec_embed``).
UNUSED_BY_DESIGN = re.compile(r"(^|\.)(mask_token|masked_spec_embed|mask_emb|mask_embedding)$")


def unused_headline(probe: ProbeRecord) -> dict[str, float | None]:
    """Number of trainable parameters that received no gradient."""
    return {"unused_parameters": float(len(probe.unused_parameters))}


def unused_parameters(probe: ProbeRecord, thresholds: dict[str, Threshold]) -> Finding | None:
    """Trainable parameters that receive no gradient from the loss."""
    by_design = [n for n in probe.unused_parameters if UNUSED_BY_DESIGN.search(n)]
    names = [n for n in probe.unused_parameters if n not in by_design]
    if not names:
        return None
    modules = sorted({n.rsplit(".", 1)[0] if "." in n else n for n in names})
    summary = (f"{len(names)} trainable parameter tensor(s) receive no gradient "
               f"({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})")
    evidence = {"parameters": names, "modules_not_run": probe.not_run,
                "unused_by_design": by_design}
    return Finding(FindingId.UNUSED_PARAMETERS, "warning", modules, summary, evidence=evidence)
