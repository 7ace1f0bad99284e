"""Advice on activation findings of a live probe.

Scale drift through depth (``poor_initialization``), dead ReLUs, saturated activations.
"""

from __future__ import annotations

from nndiag.advice import checkpoint
from nndiag.advice.catalog import make_fix
from nndiag.advice.common import (
    PROBE,
    SATURATION_ONSET,
    Advisor,
    activation_counts,
    activation_fix,
    between,
    bias_fix,
    dominant_saturating,
    feeding_layer,
    fmt,
    has_norm,
    he_init_fix,
    init_story,
    inputs_off_scale,
    is_transformer,
    n_blocks,
    norm_fix,
    normalize_inputs_fix,
    probe_kinds,
    xavier_init_fix,
)
from nndiag.findings import Finding, FindingId, Fix
from nndiag.records import ProbeRecord


def poor_initialization(finding: Finding, probe: ProbeRecord) -> tuple[str, list[Fix]]:
    """How much the activation scale drifts per layer, and the init that keeps it.

    A mechanism read from the model's weights (``probe.weights``) is explained as for a
    checkpoint.
    """
    ev = finding.evidence
    if "mechanism" in ev and probe.weights is not None:
        return checkpoint.poor_initialization(finding, probe.weights)
    if "weight_scale" in ev.get("judged_by", []):
        return oversized_weights(finding, probe)
    start, end = probe.layer(ev["from_layer"]), probe.layer(ev["to_layer"])
    span = [r for r in probe.layers if r.fan_in is not None and start.index <= r.index <= end.index]
    steps = max(len(span) - 1, 1)
    per_layer = ev["factor"] ** (1 / steps)
    parts = [f"Output std goes from {fmt(start.std)} at {start.label} to {fmt(end.std)} at "
             f"{end.label}: {fmt(ev['factor'])}x over {steps} layers, about {per_layer:.2g}x "
             "per layer. A well-initialized network keeps it within a small factor at every "
             "depth."]
    story, _ = init_story(span, explains="growth" if ev["factor"] > 1 else "shrinkage")
    if story:
        parts.append(story)
    kinds = probe_kinds(probe)
    saturating = dominant_saturating(activation_counts(between(probe, start, end.index)))
    if is_transformer(probe):
        fixes = [make_fix("layer_norm"), make_fix("scaled_residual_init", n_blocks=n_blocks(probe))]
    else:
        fixes = [xavier_init_fix(kinds, saturating[0]) if saturating else he_init_fix(kinds),
                 norm_fix(kinds)]
    if inputs_off_scale(probe):
        parts.append(f"The inputs themselves have std {fmt(probe.input_std)}.")
        fixes.insert(0, normalize_inputs_fix(probe))
    return " ".join(parts), fixes


def oversized_weights(finding: Finding, probe: ProbeRecord) -> tuple[str, list[Fix]]:
    """Weights far too large for the fans: the logits, not the activations, give it away."""
    ev = finding.evidence
    if ev.get("where") == "head":
        head = probe.layer(finding.layers[0])
        return (f"The output layer {head.label} has weights {fmt(ev['median_init_scale'])}x "
                f"the Xavier scale of its fans, and before any training the loss is "
                f"{fmt(ev['loss'])} where a model that knows nothing scores "
                f"{fmt(ev['uninformed_loss'])}: its logits are huge, the model starts "
                "confidently wrong, and the first updates are spent undoing it (the rest of "
                "the network is at a normal scale).", [make_fix("xavier_init", "output_layer")])
    parts = [f"The weights are at the median {fmt(ev['median_init_scale'])}x the He/Xavier "
             f"scale of their fans, and before any training the loss is {fmt(ev['loss'])} "
             f"where a model that knows nothing scores {fmt(ev['uninformed_loss'])}: the "
             "logits are huge, so the model starts confidently wrong and the softmax passes "
             "almost no gradient."]
    kinds = probe_kinds(probe)
    if is_transformer(probe):
        parts.append("The LayerNorms keep the activations in range, which hides the scale "
                     "everywhere but in the attention scores and the logits. Transformers are "
                     "initialized at a fixed small scale (GPT-2, BERT and Llama use std 0.02, "
                     "with the residual projections scaled down by sqrt(2 x blocks)).")
        fixes = [make_fix("scaled_residual_init", n_blocks=n_blocks(probe)), make_fix("qk_norm"),
                 make_fix("lr_warmup")]
    else:
        fixes = [he_init_fix(kinds), norm_fix(kinds)]
    return " ".join(parts), fixes


def dead_relu(finding: Finding, probe: ProbeRecord) -> tuple[str, list[Fix]]:
    """Which units never fire, whether a negative shift feeds them, and what it blocks."""
    ev = finding.evidence
    worst = probe.layer(max(ev["dead_fraction"], key=lambda k: ev["dead_fraction"][k]))
    parts = [f"In {worst.label}, {worst.dead_fraction:.0%} of the units output zero for all "
             f"{ev['samples']} probe samples, so they pass no gradient to the weights that feed "
             "them and cannot recover by training."]
    feeding = feeding_layer(probe, worst)
    negative = feeding is not None and feeding.mean is not None and feeding.std is not None \
        and feeding.mean < -0.5 * feeding.std
    if feeding is not None and negative:
        parts.append(f"Its input, the output of {feeding.label}, has mean {fmt(feeding.mean)} "
                     f"against std {fmt(feeding.std)}: most pre-activations sit below zero "
                     "(a negative bias or shift).")
    blocked = [r.name for r in probe.weight_layers() if r.grad_out_norm == 0]
    if blocked:
        parts.append(f"Behind the fully dead layers the gradient is exactly zero: "
                     f"{', '.join(blocked[:5])}{' ...' if len(blocked) > 5 else ''} "
                     "receive none.")
    fixes = [bias_fix(finding.layers)] if negative else []
    fixes += [he_init_fix(probe_kinds(probe)), make_fix("lower_learning_rate")]
    return " ".join(parts), fixes


def saturated_activations(finding: Finding, probe: ProbeRecord) -> tuple[str, list[Fix]]:
    """How saturated the worst activation is, how large its inputs are, and the scale fix."""
    ev = finding.evidence
    worst = probe.layer(max(ev["saturated_fraction"], key=lambda k: ev["saturated_fraction"][k]))
    kind = worst.activation or "tanh"
    parts = [f"{worst.saturated_fraction:.0%} of the outputs of {worst.label} sit where the {kind} "
             "derivative is below 5% of its peak: those units pass almost no gradient."]
    if worst.preact_std is not None and kind in SATURATION_ONSET:
        parts.append(f"Its inputs have std {fmt(worst.preact_std)}; a {kind} saturates beyond "
                     f"|x| ~ {SATURATION_ONSET[kind]}.")
    feeding = feeding_layer(probe, worst)
    if feeding is not None and feeding.init_scale is not None:
        parts.append(f"The layer feeding it, {feeding.label}, has weights at "
                     f"{fmt(feeding.init_scale)}x the Xavier scale.")
    kinds = probe_kinds(probe)
    if is_transformer(probe):
        # A transformer's activations saturate when its weights leave the family's scale:
        # its own init is the fix, not another activation or a normalization it already has.
        fixes = [make_fix("scaled_residual_init", n_blocks=n_blocks(probe))]
    else:
        fixes = [xavier_init_fix(kinds, kind)]
        if not has_norm(probe):
            fixes.append(norm_fix(kinds))
        fixes.append(activation_fix(kind))
    if inputs_off_scale(probe):
        fixes.insert(0, normalize_inputs_fix(probe))
    return " ".join(parts), fixes


ADVISORS: dict[tuple[str, str], Advisor] = {
    (PROBE, FindingId.POOR_INITIALIZATION): poor_initialization,
    (PROBE, FindingId.DEAD_RELU): dead_relu,
    (PROBE, FindingId.SATURATED_ACTIVATIONS): saturated_activations,
}
