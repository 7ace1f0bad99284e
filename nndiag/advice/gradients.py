"""Advice on gradient findings of a live probe: vanishing and exploding gradients."""

from __future__ import annotations

from nndiag.advice.catalog import make_fix
from nndiag.advice.common import (
    MAX_DERIVATIVE,
    PROBE,
    Advisor,
    activation_counts,
    activation_fix,
    between,
    dominant_saturating,
    fmt,
    has_norm,
    he_init_fix,
    init_story,
    is_transformer,
    n_blocks,
    norm_fix,
    probe_kinds,
    recurrent_fixes,
)
from nndiag.findings import Finding, FindingId, Fix
from nndiag.records import ProbeRecord


def vanishing(finding: Finding, probe: ProbeRecord) -> tuple[str, list[Fix]]:
    """Where the gradient shrinks, what on the path shrinks it, and how to keep it."""
    ev = finding.evidence
    weight_layers = probe.weight_layers()
    parts: list[str] = []
    start = probe.layer(ev["min_depth_gain_layer"]) if ev.get("min_depth_gain_layer") else None
    path = between(probe, start) if start else probe.layers
    saturating = dominant_saturating(activation_counts(path))
    trend = ev.get("block_trend")
    if "depth" in ev["judged_by"] and trend is not None:
        parts.append(f"Across the model's repeated blocks, the {trend['role']} layers of block "
                     f"{trend['first_block']} receive {fmt(trend['ratio'])} of the gradient "
                     f"those of block {trend['last_block']} receive (median per block): the "
                     "backward signal shrinks block after block, so the early blocks learn "
                     "far slower than the late ones.")
    elif "depth" in ev["judged_by"] and start is not None and ev["min_depth_gain"] == 0:
        parts.append(f"No gradient at all reaches {start.label}: the path from the output to it "
                     "is cut (a detached tensor, a zero multiplier, or units that never fire).")
    elif "depth" in ev["judged_by"] and start is not None:
        reference = ev.get("reference_gain")
        against = ("of the gradient at the model output" if not reference or reference >= 1
                   else f"of the largest the body receives ({ev['reference_gain_layer']})")
        parts.append(f"The gradient reaching {start.label} is "
                     f"{fmt(ev['min_depth_gain'])} {against}: it "
                     f"shrinks {fmt(1 / ev['min_depth_gain'])}x across the "
                     f"{sum(1 for r in path if r.has_weights) - 1} weight layers between it and "
                     "the output.")
    if "scale" in ev["judged_by"]:
        first, last = (weight_layers[0], weight_layers[-1]) if weight_layers else (None, None)
        ratio = (first.grad_norm / last.grad_norm if first and last and first.grad_norm
                 and last.grad_norm else None)
        top = probe.layer(ev["max_grad_to_weight_layer"])
        parts.append(f"Every layer's gradient is tiny next to its weights: the largest "
                     f"||g||/||w|| is {fmt(ev['max_grad_to_weight'])}, at "
                     f"{top.label}, while the loss is still "
                     f"{fmt(probe.loss)}, so no layer learns at a normal learning rate, even "
                     f"though the first/last weight-gradient ratio ({fmt(ratio)}) looks "
                     "unremarkable.")
    if saturating:
        kind, n = saturating
        parts.append(f"The path crosses {n} {kind} activations; a {kind} passes at most "
                     f"{MAX_DERIVATIVE[kind]:.2g} of the backward signal"
                     + (f", so {n} of them multiply it by at most "
                        f"{MAX_DERIVATIVE[kind] ** n:.1e}." if MAX_DERIVATIVE[kind] < 1 else
                        " and much less once saturated."))
    story, scale = init_story([r for r in path if r.has_weights], explains="shrinkage")
    if story:
        parts.append(story)
    if not has_norm(probe):
        parts.append("No normalization layer re-scales the signal between layers.")
    kinds = probe_kinds(probe)
    if is_transformer(probe):
        parts.append("In a transformer, a deep stack keeps its gradient when each block's input "
                     "is normalized (pre-LN) and the residual path carries the gradient "
                     "unchanged; post-LN stacks and stacks without LayerNorm lose it, and warm-up "
                     "lets them train.")
        return " ".join(parts), [make_fix("layer_norm"), make_fix("lr_warmup"),
                                 make_fix("gradient_clipping")]
    fixes: list[Fix] = []
    if saturating:
        fixes.append(activation_fix(saturating[0]))
    elif scale is not None and scale < 0.8:
        fixes.append(he_init_fix(kinds))
    if not has_norm(probe):
        fixes.append(norm_fix(kinds))
    fixes += [make_fix("skip_connections"), *recurrent_fixes(kinds)]
    return " ".join(parts), fixes


def exploding(finding: Finding, probe: ProbeRecord) -> tuple[str, list[Fix]]:
    """Where the gradient grows, whether the weight scale explains it, and how to bound it."""
    ev = finding.evidence
    parts = []
    if "depth" in ev["judged_by"]:
        parts.append(f"The gradient at {probe.layer(ev['max_depth_gain_layer']).label} is "
                     f"{fmt(ev['max_depth_gain'])}x the gradient at the model output: it grows "
                     "on its way back to the early layers.")
    if "scale" in ev["judged_by"]:
        parts.append(f"At {probe.layer(ev['max_grad_to_weight_layer']).label} the gradient is "
                     f"{fmt(ev['max_grad_to_weight'])}x the size of the weights, so a single "
                     "SGD step would overwrite them.")
    story, scale = init_story(probe.weight_layers(), explains="growth")
    if story:
        parts.append(story)
    biggest = max((r for r in probe.layers if r.std is not None), key=lambda r: r.std or 0.0,
                  default=None)
    if biggest is not None and biggest.std and biggest.std > 100:
        parts.append(f"Forward activations reach std {fmt(biggest.std)} at {biggest.label} and "
                     f"the loss is {fmt(probe.loss)}.")
    kinds = probe_kinds(probe)
    if is_transformer(probe):
        fixes = [make_fix("gradient_clipping"), make_fix("lr_warmup")]
        if scale is not None and scale > 1.25:
            fixes.insert(0, make_fix("scaled_residual_init", n_blocks=n_blocks(probe)))
        if not has_norm(probe):
            parts.append("No LayerNorm re-scales the residual stream: every block adds to it "
                         "unchecked, and the backward signal grows block after block.")
            fixes.insert(0, make_fix("layer_norm"))
        return " ".join(parts), fixes + [make_fix("lower_learning_rate")]
    fixes: list[Fix] = []
    if scale is not None and scale > 1.25:
        fixes.append(he_init_fix(kinds))
    fixes.append(make_fix("gradient_clipping"))
    if not has_norm(probe):
        fixes.append(norm_fix(kinds))
    return " ".join(parts), fixes + recurrent_fixes(kinds)


def post_ln_deep_stack(finding: Finding, probe: ProbeRecord) -> tuple[str, list[Fix]]:
    """Why a deep post-LN stack is hard to train, and the two standard remedies."""
    ev = finding.evidence
    return (f"{ev['post_ln_blocks']} of the model's {ev['blocks']} transformer blocks put "
            "their LayerNorm after the residual add (post-LN), so the gradient reaching the "
            "early blocks passes through every later LayerNorm. At init the measured gradients "
            "look normal; in training, deep post-LN stacks are known to diverge or stall "
            "unless the learning rate is warmed up, and to train reliably with the LayerNorm "
            "at each block's input (pre-LN, as GPT-2 and Llama do).",
            [make_fix("lr_warmup"), make_fix("layer_norm"), make_fix("gradient_clipping")])


ADVISORS: dict[tuple[str, str], Advisor] = {
    (PROBE, FindingId.VANISHING_GRADIENTS): vanishing,
    (PROBE, FindingId.EXPLODING_GRADIENTS): exploding,
    (PROBE, FindingId.POST_LN_DEEP_STACK): post_ln_deep_stack,
}
