"""Explanations and fix recommendations, phrased in terms of the user's own architecture.

``advise`` fills a finding's ``explanation`` and ``fixes`` from the probe it was judged on.
Fixes come most effective first, each with the torch code to apply it; ``automatic`` marks
the ones ``--try-fixes`` can apply to a copy of the model and re-measure (see ``autofix``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from nndiag.findings import Finding, Fix
from nndiag.records import CheckpointRecord, LayerRecord, ProbeRecord
from nndiag.runlog import RunLog

NORM_KINDS = frozenset({"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm",
                        "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "RMSNorm",
                        "SyncBatchNorm"})
RECURRENT_KINDS = frozenset({"RNN", "LSTM", "GRU"})
# Largest derivative of each saturating activation (the most backward signal it can pass).
MAX_DERIVATIVE = {"sigmoid": 0.25, "hardsigmoid": 1 / 6, "tanh": 1.0, "softsign": 1.0,
                  "hardtanh": 1.0}
SATURATION_ONSET = {"sigmoid": 4.4, "tanh": 2.2, "softsign": 3.5}

AUTOMATIC = frozenset({"he_init", "xavier_init", "orthogonal_init", "non_saturating_activation",
                       "normalize_inputs", "bias_init"})


def _fix(fix_id: str, summary: str, code: str) -> Fix:
    return Fix(fix_id, summary, code.strip("\n"), automatic=fix_id in AUTOMATIC)


def _layer_types(kinds: set[str]) -> str:
    """The model's Linear/conv classes as an ``isinstance`` argument."""
    layers = sorted(k for k in kinds if k in ("Linear", "Bilinear") or k.startswith("Conv"))
    names = ", ".join(f"nn.{k}" for k in layers or ["Linear"])
    return f"({names})" if len(layers) > 1 else names


def _kinds(probe: ProbeRecord) -> set[str]:
    return {r.kind for r in probe.layers}


def he_init_fix(kinds: set[str]) -> Fix:
    """Re-initialize ReLU-feeding layers with He init."""
    return _fix("he_init", "re-initialize the layers that feed ReLUs with He (Kaiming) init, "
                "which keeps the signal's scale constant through ReLU layers", f"""
for m in model.modules():
    if isinstance(m, {_layer_types(kinds)}):
        nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)""")


def xavier_init_fix(kinds: set[str], activation: str = "tanh") -> Fix:
    """Re-initialize with Xavier init scaled for the saturating activation."""
    return _fix("xavier_init", f"re-initialize the layers that feed {activation} with Xavier "
                "(Glorot) init, which keeps pre-activations in the activation's linear range",
                f"""
for m in model.modules():
    if isinstance(m, {_layer_types(kinds)}):
        nn.init.xavier_normal_(m.weight, gain=nn.init.calculate_gain("{activation}"))
        if m.bias is not None:
            nn.init.zeros_(m.bias)""")


def _norm_fix(kinds: set[str]) -> Fix:
    if any(k.startswith("Conv") for k in kinds):
        return _fix("batch_norm", "insert BatchNorm after each conv layer (before its "
                    "activation) so every layer sees a unit-scale signal", """
nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
              nn.BatchNorm2d(c_out), nn.ReLU())""")
    if kinds & (RECURRENT_KINDS | {"MultiheadAttention"}):
        return _fix("layer_norm", "normalize each block's input with LayerNorm (pre-norm)", """
x = x + block(nn.LayerNorm(dim)(x))   # keep the LayerNorm as a module of the block""")
    return _fix("batch_norm", "insert normalization after each Linear layer (before its "
                "activation): BatchNorm1d, or LayerNorm for small or variable batches", """
nn.Sequential(nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU())""")


def _skip_fix() -> Fix:
    return _fix("skip_connections", "add residual connections around blocks of layers, so the "
                "gradient has a path that does not shrink with depth", """
class Residual(nn.Module):
    def __init__(self, block): super().__init__(); self.block = block
    def forward(self, x): return x + self.block(x)""")


def _activation_fix(kind: str) -> Fix:
    return _fix("non_saturating_activation", f"replace the hidden {kind} activations with ReLU "
                "(or GELU) and re-initialize with He init: ReLU passes the full gradient for "
                "every active unit", f"""
for m in list(model.modules()):
    for child_name, child in m.named_children():
        if isinstance(child, nn.{_MODULE_NAME.get(kind, kind.title())}):
            setattr(m, child_name, nn.ReLU())
# then apply He init (he_init) to the Linear/conv layers""")


_MODULE_NAME = {"sigmoid": "Sigmoid", "tanh": "Tanh", "hardtanh": "Hardtanh",
                "softsign": "Softsign", "hardsigmoid": "Hardsigmoid"}


def _clip_fix() -> Fix:
    return _fix("gradient_clipping", "clip the global gradient norm before each optimizer step",
                """
loss.backward()
torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
optimizer.step()""")


def _normalize_inputs_fix(probe: ProbeRecord) -> Fix:
    mean = probe.input_mean if probe.input_mean is not None else 0.0
    std = probe.input_std if probe.input_std else 1.0
    return _fix("normalize_inputs", f"standardize the inputs (measured mean {mean:.3g}, "
                f"std {std:.3g}) to mean 0 and std 1", f"""
x = (x - {mean:.4g}) / {std:.4g}   # better: per-feature statistics of the training set""")


def _bias_fix(layers: Iterable[str]) -> Fix:
    names = ", ".join(layers)
    return _fix("bias_init", f"reset the biases feeding the dead units ({names}) to zero (or "
                "a small positive value) so that units start active", """
for m in model.modules():
    if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
        nn.init.zeros_(m.bias)   # or nn.init.constant_(m.bias, 0.01)""")


def _lr_fix(lower: bool) -> Fix:
    if lower:
        return _fix("lower_learning_rate", "lower the learning rate (try 10x lower, or run "
                    "`nndiag lr-find`)", "optimizer = torch.optim.AdamW(model.parameters(), "
                    "lr=lr / 10)")
    return _fix("raise_learning_rate", "raise the learning rate", "optimizer = "
                "torch.optim.AdamW(model.parameters(), lr=lr * 10)")


def _recurrent_fixes(kinds: set[str]) -> list[Fix]:
    fixes = []
    if "RNN" in kinds:
        fixes.append(_fix("gated_recurrent_unit", "replace nn.RNN with nn.LSTM or nn.GRU, whose "
                          "gates carry the gradient across time steps",
                          "rnn = nn.LSTM(input_size, hidden_size, batch_first=True)"))
    if kinds & RECURRENT_KINDS:
        fixes.append(_fix("orthogonal_init", "initialize the recurrent (hidden-to-hidden) "
                          "weights orthogonally, which preserves the signal's norm across steps",
                          """
for name, p in rnn.named_parameters():
    if "weight_hh" in name:
        nn.init.orthogonal_(p)"""))
    return fixes


# ----------------------------------------------------------------------------- context


def _between(probe: ProbeRecord, start: LayerRecord, end_index: int | None = None
             ) -> list[LayerRecord]:
    stop = probe.layers[-1].index if end_index is None else end_index
    return [r for r in probe.layers if start.index <= r.index <= stop]


def _activations(records: Iterable[LayerRecord]) -> Counter[str]:
    return Counter(r.activation for r in records if r.activation is not None)


def _has_norm(probe: ProbeRecord) -> bool:
    return any(r.kind in NORM_KINDS for r in probe.layers)


def _dominant_saturating(counts: Counter[str]) -> tuple[str, int] | None:
    saturating = [(k, n) for k, n in counts.most_common() if k in MAX_DERIVATIVE]
    relu_like = sum(n for k, n in counts.items() if k not in MAX_DERIVATIVE)
    if saturating and saturating[0][1] >= relu_like:
        return saturating[0]
    return None


def _median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v is not None and math.isfinite(v))
    return values[len(values) // 2] if values else None


def _init_story(probe: ProbeRecord, records: list[LayerRecord]) -> tuple[str, float | None]:
    """A sentence on the weight scale against He/Xavier and the per-layer factor it implies."""
    he_layers = [r for r in records if r.init_reference == "he" and r.init_scale is not None]
    scale = _median([r.init_scale for r in he_layers if r.init_scale is not None])
    if not he_layers or scale is None or 0.8 <= scale <= 1.25:
        return "", scale
    product = scale ** len(he_layers)
    return (f" Its {len(he_layers)} ReLU-feeding layers have weights at {scale:.2g}x the He "
            f"scale sqrt(2/fan_in), so each multiplies the signal by about {scale:.2g} forward "
            f"and backward: {scale:.2g}^{len(he_layers)} = {product:.1e}."), scale


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2g}" if 1e-2 <= abs(value) < 1e3 else \
        f"{value:.1e}"


# ----------------------------------------------------------------------------- advisors


def _vanishing(finding: Finding, probe: ProbeRecord) -> tuple[str, list[Fix]]:
    ev = finding.evidence
    weight_layers = probe.weight_layers()
    parts: list[str] = []
    start = probe.layer(ev["min_depth_gain_layer"]) if ev.get("min_depth_gain_layer") else None
    path = _between(probe, start) if start else probe.layers
    counts = _activations(path)
    saturating = _dominant_saturating(counts)
    if "depth" in ev["judged_by"] and start is not None and ev["min_depth_gain"] == 0:
        parts.append(f"No gradient at all reaches {start.label}: the path from the output to it "
                     "is cut (a detached tensor, a zero multiplier, or units that never fire).")
    elif "depth" in ev["judged_by"] and start is not None:
        parts.append(f"The gradient reaching {start.label} is "
                     f"{_fmt(ev['min_depth_gain'])} of the gradient at the model output: it "
                     f"shrinks {_fmt(1 / ev['min_depth_gain'])}x across the "
                     f"{sum(1 for r in path if r.has_weights) - 1} weight layers between it and "
                     "the output.")
    if "scale" in ev["judged_by"]:
        first, last = (weight_layers[0], weight_layers[-1]) if weight_layers else (None, None)
        ratio = (first.grad_norm / last.grad_norm if first and last and first.grad_norm
                 and last.grad_norm else None)
        top = probe.layer(ev["max_grad_to_weight_layer"])
        parts.append(f"Every layer's gradient is tiny next to its weights: the largest "
                     f"||g||/||w|| is {_fmt(ev['max_grad_to_weight'])}, at "
                     f"{top.label}, while the loss is still "
                     f"{_fmt(probe.loss)}, so no layer learns at a normal learning rate, even "
                     f"though the first/last weight-gradient ratio ({_fmt(ratio)}) looks "
                     "unremarkable.")
    if saturating:
        kind, n = saturating
        parts.append(f"The path crosses {n} {kind} activations; a {kind} passes at most "
                     f"{MAX_DERIVATIVE[kind]:.2g} of the backward signal"
                     + (f", so {n} of them multiply it by at most "
                        f"{MAX_DERIVATIVE[kind] ** n:.1e}." if MAX_DERIVATIVE[kind] < 1 else
                        " and much less once saturated."))
    story, scale = _init_story(probe, [r for r in path if r.has_weights])
    if story:
        parts.append(story.strip())
    if not _has_norm(probe):
        parts.append("No normalization layer re-scales the signal between layers.")
    fixes: list[Fix] = []
    if saturating:
        fixes += [_activation_fix(saturating[0]), _norm_fix(_kinds(probe)), _skip_fix()]
    else:
        if scale is not None and scale < 0.8:
            fixes.append(he_init_fix(_kinds(probe)))
        fixes += [_norm_fix(_kinds(probe)), _skip_fix()]
    fixes += _recurrent_fixes(_kinds(probe))
    return " ".join(parts), fixes


def _exploding(finding: Finding, probe: ProbeRecord) -> tuple[str, list[Fix]]:
    ev = finding.evidence
    parts = []
    if "depth" in ev["judged_by"]:
        parts.append(f"The gradient at {probe.layer(ev['max_depth_gain_layer']).label} is "
                     f"{_fmt(ev['max_depth_gain'])}x the gradient at the model output: it grows "
                     "on its way back to the early layers.")
    if "scale" in ev["judged_by"]:
        parts.append(f"At {probe.layer(ev['max_grad_to_weight_layer']).label} the gradient is "
                     f"{_fmt(ev['max_grad_to_weight'])}x the size of the weights, so a single "
                     "SGD step would overwrite them.")
    story, scale = _init_story(probe, probe.weight_layers())
    if story:
        parts.append(story.strip())
    biggest = max((r for r in probe.layers if r.std is not None), key=lambda r: r.std or 0.0,
                  default=None)
    if biggest is not None and biggest.std and biggest.std > 100:
        parts.append(f"Forward activations reach std {_fmt(biggest.std)} at {biggest.label} and "
                     f"the loss is {_fmt(probe.loss)}.")
    fixes: list[Fix] = []
    if scale is not None and scale > 1.25:
        fixes.append(he_init_fix(_kinds(probe)))
    fixes += [_clip_fix(), _norm_fix(_kinds(probe))]
    fixes += _recurrent_fixes(_kinds(probe))
    return " ".join(parts), fixes


def _poor_init(finding: Finding, probe: ProbeRecord) -> tuple[str, list[Fix]]:
    ev = finding.evidence
    start, end = probe.layer(ev["from_layer"]), probe.layer(ev["to_layer"])
    span = [r for r in probe.layers if r.fan_in is not None and start.index <= r.index <= end.index]
    steps = max(len(span) - 1, 1)
    per_layer = ev["factor"] ** (1 / steps)
    parts = [f"Output std goes from {_fmt(start.std)} at {start.label} to {_fmt(end.std)} at "
             f"{end.label}: {_fmt(ev['factor'])}x over {steps} layers, about {per_layer:.2g}x "
             "per layer. A well-initialized network keeps it within a small factor at every "
             "depth."]
    story, scale = _init_story(probe, span)
    if story:
        parts.append(story.strip())
    counts = _activations(_between(probe, start, end.index))
    saturating = _dominant_saturating(counts)
    fixes: list[Fix] = []
    if saturating:
        fixes.append(xavier_init_fix(_kinds(probe), saturating[0]))
    else:
        fixes.append(he_init_fix(_kinds(probe)))
    fixes.append(_norm_fix(_kinds(probe)))
    if probe.input_std is not None and not 0.1 <= probe.input_std <= 10:
        parts.append(f"The inputs themselves have std {_fmt(probe.input_std)}.")
        fixes.insert(0, _normalize_inputs_fix(probe))
    return " ".join(parts), fixes


def _feeding_layer(probe: ProbeRecord, record: LayerRecord) -> LayerRecord | None:
    earlier = [r for r in probe.layers if r.index < record.index and r.has_weights]
    return earlier[-1] if earlier else None


def _dead(finding: Finding, probe: ProbeRecord) -> tuple[str, list[Fix]]:
    ev = finding.evidence
    worst = probe.layer(max(ev["dead_fraction"], key=lambda k: ev["dead_fraction"][k]))
    parts = [f"In {worst.label}, {worst.dead_fraction:.0%} of the units output zero for all "
             f"{ev['samples']} probe samples, so they pass no gradient to the weights that feed "
             "them and cannot recover by training."]
    feeding = _feeding_layer(probe, worst)
    negative = feeding is not None and feeding.mean is not None and feeding.std is not None \
        and feeding.mean < -0.5 * feeding.std
    if feeding is not None and negative:
        parts.append(f"Its input, the output of {feeding.label}, has mean {_fmt(feeding.mean)} "
                     f"against std {_fmt(feeding.std)}: most pre-activations sit below zero "
                     "(a negative bias or shift).")
    blocked = [r.name for r in probe.weight_layers() if r.grad_out_norm == 0]
    if blocked:
        parts.append(f"Behind the fully dead layers the gradient is exactly zero: "
                     f"{', '.join(blocked[:5])}{' ...' if len(blocked) > 5 else ''} "
                     "receive none.")
    fixes = [_bias_fix(finding.layers)] if negative else []
    fixes += [he_init_fix(_kinds(probe)), _lr_fix(lower=True)]
    return " ".join(parts), fixes


def _saturated(finding: Finding, probe: ProbeRecord) -> tuple[str, list[Fix]]:
    ev = finding.evidence
    worst = probe.layer(max(ev["saturated_fraction"], key=lambda k: ev["saturated_fraction"][k]))
    kind = worst.activation or "tanh"
    parts = [f"{worst.saturated_fraction:.0%} of the outputs of {worst.label} sit where the {kind} "
             "derivative is below 5% of its peak: those units pass almost no gradient."]
    if worst.preact_std is not None and kind in SATURATION_ONSET:
        parts.append(f"Its inputs have std {_fmt(worst.preact_std)}; a {kind} saturates beyond "
                     f"|x| ~ {SATURATION_ONSET[kind]}.")
    feeding = _feeding_layer(probe, worst)
    if feeding is not None and feeding.init_scale is not None:
        parts.append(f"The layer feeding it, {feeding.label}, has weights at "
                     f"{_fmt(feeding.init_scale)}x the Xavier scale.")
    fixes = [xavier_init_fix(_kinds(probe), kind)]
    if probe.input_std is not None and not 0.1 <= probe.input_std <= 10:
        fixes.insert(0, _normalize_inputs_fix(probe))
    fixes += [_norm_fix(_kinds(probe)), _activation_fix(kind)]
    return " ".join(parts), fixes


def _nan_inf(finding: Finding, probe: ProbeRecord) -> tuple[str, list[Fix]]:
    ev = finding.evidence
    parts = ["The inputs were checked and are finite."]
    if ev.get("first_layer"):
        first = probe.layer(ev["first_layer"])
        earlier = [r for r in probe.layers if r.index < first.index and r.absmax is not None]
        peak = max(earlier, key=lambda r: r.absmax or 0.0, default=None)
        parts.append(f"Non-finite values first appear in {first.label}; every "
                     "layer after it inherits them.")
        if peak is not None and peak.absmax and peak.absmax > 1e6:
            parts.append(f"Values before it already reach {_fmt(peak.absmax)} "
                         f"({peak.label}): an overflow of an exploding signal.")
        else:
            parts.append("Values before it are moderate: look for a log, division, sqrt or "
                         "exp of an out-of-range value in that layer.")
    fixes = [_clip_fix(), _lr_fix(lower=True)]
    if probe.input_std is not None and not 0.1 <= probe.input_std <= 10:
        fixes.append(_normalize_inputs_fix(probe))
    return " ".join(parts), fixes


def _unused(finding: Finding, probe: ProbeRecord) -> tuple[str, list[Fix]]:
    not_run = finding.evidence.get("modules_not_run") or []
    parts = ["These parameters are trainable but the loss does not depend on them"]
    parts[0] += (f" ({', '.join(not_run)} never ran in forward)." if not_run else
                 " (their modules ran, but their output does not reach the loss).")
    parts.append("Weight decay still shrinks them, they waste optimizer memory, and "
                 "DistributedDataParallel fails on them unless find_unused_parameters=True. "
                 "Remove them, freeze them with requires_grad_(False), or connect them to the "
                 "output.")
    return " ".join(parts), []


_ADVISORS: dict[str, Callable[[Finding, ProbeRecord], tuple[str, list[Fix]]]] = {
    "vanishing_gradients": _vanishing,
    "exploding_gradients": _exploding,
    "poor_initialization": _poor_init,
    "dead_relu": _dead,
    "saturated_activations": _saturated,
    "nan_inf": _nan_inf,
    "unused_parameters": _unused,
}


def _apply(advisors: dict[str, Callable[[Finding, Any], tuple[str, list[Fix]]]],
           finding: Finding, record: Any) -> Finding:
    advisor = advisors.get(finding.id)
    if advisor is not None:
        finding.explanation, finding.fixes = advisor(finding, record)
    return finding


def advise(finding: Finding, probe: ProbeRecord) -> Finding:
    """Fill a finding's explanation and fixes from the probe it was judged on."""
    return _apply(_ADVISORS, finding, probe)


# ----------------------------------------------------------------------------- checkpoints


def _checkpoint_kinds(record: CheckpointRecord) -> set[str]:
    kinds = set()
    for module in record.modules:
        if module.kind == "conv":
            weight = next((t for t in module.tensors if t.name.endswith("weight")), None)
            kinds.add(f"Conv{len(weight.shape) - 2}d" if weight else "Conv2d")
        elif module.kind in _CHECKPOINT_CLASSES:
            kinds.add(_CHECKPOINT_CLASSES[module.kind])
    return kinds


_CHECKPOINT_CLASSES = {"linear": "Linear", "batch_norm": "BatchNorm2d", "norm": "LayerNorm",
                       "recurrent": "LSTM", "attention": "MultiheadAttention",
                       "embedding": "Embedding"}
_TRAINING_STATE = ("epoch", "global_step", "optimizer", "optimizer_states",
                   "optimizer_state_dict")


def _was_trained(record: CheckpointRecord) -> bool:
    return any(key in record.extras for key in _TRAINING_STATE)


def _checkpoint_drift(finding: Finding, record: CheckpointRecord) -> tuple[str, list[Fix]]:
    ev = finding.evidence
    kinds = _checkpoint_kinds(record)
    scale = ev["median_init_scale_he"]
    verb = "explode" if ev["direction"] == "grows" else "vanish"
    text = (f"Assuming ReLU-like activations between them, the {ev['layers_in_chain']} layers "
            f"from {ev['from_layer']} to {ev['to_layer']} multiply the signal's scale by "
            f"{_fmt(ev['predicted_factor'])}: their weights are, at the median, {_fmt(scale)}x "
            "the He scale sqrt(2/fan_in), and no normalization layer sits between them. "
            f"Forward activations and gradients through them would {verb} by about that "
            "factor. With --model and --data (or --input-shape) nndiag measures it instead of "
            "predicting it.")
    fixes = [he_init_fix(kinds), _norm_fix(kinds)]
    if _was_trained(record) and ev["direction"] == "grows":
        text += (" The file also holds training state: if the weights started at a sound "
                 "scale, they grew during training.")
        fixes = [_lr_fix(lower=True), _clip_fix(), _norm_fix(kinds)]
    return text, fixes


def _checkpoint_nan(finding: Finding, record: CheckpointRecord) -> tuple[str, list[Fix]]:
    text = ("NaN/Inf are stored in the weights themselves: the run diverged before this "
            "checkpoint was written, and every forward pass through these layers yields NaN. "
            "Resume from an earlier checkpoint and find the step where the loss first "
            "diverged.")
    return text, [_lr_fix(lower=True), _clip_fix()]


def _checkpoint_dead(finding: Finding, record: CheckpointRecord) -> tuple[str, list[Fix]]:
    ev = finding.evidence
    name = max(ev["dead_channels"], key=lambda k: ev["dead_channels"][k] / ev["channels"][k])
    text = (f"In {name}, {ev['dead_channels'][name]} of {ev['channels'][name]} channels have a "
            "gamma or running variance near zero, so they output a constant and pass no "
            "gradient to the layer before. Common causes: a learning rate too high for the "
            "network, weight decay applied to BatchNorm parameters, or a dead ReLU feeding the "
            "layer.")
    return text, [_lr_fix(lower=True)]


_CHECKPOINT_ADVISORS: dict[str, Callable[[Finding, CheckpointRecord], tuple[str, list[Fix]]]] = {
    "poor_initialization": _checkpoint_drift,
    "nan_inf": _checkpoint_nan,
    "dead_channels": _checkpoint_dead,
}


def advise_checkpoint(finding: Finding, record: CheckpointRecord) -> Finding:
    """Fill a data-free finding's explanation and fixes from the checkpoint record."""
    return _apply(_CHECKPOINT_ADVISORS, finding, record)


# ----------------------------------------------------------------------------- recorded runs


def _run_kinds(log: RunLog) -> set[str]:
    return {layer.get("kind", "") for layer in log.meta.get("weight_layers", [])}


def advise_run(finding: Finding, log: RunLog) -> Finding:
    """Fill the explanation and fixes of a finding over a recorded run."""
    ev = finding.evidence
    kinds = _run_kinds(log)
    first = ev.get("first_step")
    when = f" It appears at step {first}." if first is not None else ""
    if finding.id == "nan_inf":
        finding.explanation = (f"NaN/Inf reached {ev['where']} at step {first}; every step "
                               "after it is lost. The steps before it usually show the loss or "
                               "the gradient norm climbing: a learning rate too high for this "
                               "model, or an overflow in the loss.")
        finding.fixes = [_lr_fix(lower=True), _clip_fix()]
    elif finding.id == "loss_diverging":
        finding.explanation = (f"The running median of the loss went from {ev['start']:.4g} "
                               f"down to {ev['best']:.4g} (step {ev['best_step']}) and ends at "
                               f"{ev['end']:.4g}.{when} A loss that climbs back is the signature "
                               "of a learning rate that became too high for the sharper region "
                               "training reached.")
        finding.fixes = [_lr_fix(lower=True), _warmup_fix(), _clip_fix()]
    elif finding.id == "loss_not_decreasing":
        finding.explanation = (f"The running median of the loss moved from {ev['start']:.4g} to "
                               f"{ev['end']:.4g}, within its noise ({ev['noise']:.3g}). Either "
                               "the updates are too small (see update_ratio_low), the gradient "
                               "does not reach the layers (see vanishing_gradients), or the "
                               "targets cannot be learned from the inputs.")
        finding.fixes = [_lr_fix(lower=False), he_init_fix(kinds)]
    elif finding.id == "loss_oscillating":
        finding.explanation = (f"In the second half of the run the loss swings by "
                               f"{ev['relative_amplitude']:.0%} of its level "
                               f"({ev['amplitude']:.3g} around {ev['level']:.3g}) without "
                               "falling further: steps overshoot the minimum they aim at.")
        finding.fixes = [_lr_fix(lower=True), _warmup_fix()]
    elif finding.id == "vanishing_gradients":
        finding.explanation = (f"At the median sampled step of the second half, the smallest "
                               f"gradient-to-weight ratio of a Linear/conv layer is "
                               f"{ev['spread']:.1e} of the largest; the weakest layer is "
                               f"{ev['weakest_layer']}.{when} Those layers barely learn.")
        finding.fixes = [_norm_fix(kinds), _skip_fix(), he_init_fix(kinds)]
    elif finding.id == "exploding_gradients":
        finding.explanation = (f"The gradient of {ev['layer']} reaches "
                               f"{ev['max_grad_to_weight']:.1e}x its weights at the median "
                               f"sampled step of the second half.{when}")
        finding.fixes = [_clip_fix(), _lr_fix(lower=True), he_init_fix(kinds)]
    elif finding.id == "dead_relu":
        finding.explanation = (f"By the last sampled step, {len(ev['dead_fraction'])} ReLU "
                               f"layer(s) have units that never fire on the sampled batch "
                               f"(from {(ev.get('initial') or 0):.0%} at the start).{when} "
                               "Units that die during training usually die after a too-large "
                               "update pushed their bias negative.")
        finding.fixes = [_lr_fix(lower=True), _warmup_fix(), _bias_fix(finding.layers[:3])]
    elif finding.id in ("update_ratio_high", "update_ratio_low"):
        ratios = ev["median_update_ratio"]
        listed = ", ".join(f"{k}: {v:.1e}" for k, v in list(ratios.items())[:4])
        finding.explanation = (f"The median of ||w_after - w_before|| / ||w_before|| per step "
                               f"is {listed}{' ...' if len(ratios) > 4 else ''}; the rule of "
                               "thumb is about 1e-3.")
        if finding.id.endswith("low"):
            finding.explanation += (" A layer fed by dead units or a vanishing gradient stops "
                                    "updating too: if those are reported, fix them first.")
        finding.fixes = ([_lr_fix(lower=True), _warmup_fix()] if finding.id.endswith("high")
                         else [_lr_fix(lower=False)])
    return finding


def _warmup_fix() -> Fix:
    return _fix("lr_warmup", "warm the learning rate up over the first steps", """
scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=500)
# call scheduler.step() after each optimizer.step()""")


# ----------------------------------------------------------------------------- sanity checks


def advise_sanity(finding: Finding, record: Any) -> Finding:
    """Fill the explanation and fixes of a pre-training sanity finding."""
    ev = finding.evidence
    if finding.id == "loss_at_init_unexpected":
        if ev["ratio"] > 1:
            finding.explanation = (
                f"Before training the loss is {ev['ratio']:.1f}x what a model that knows "
                f"nothing scores ({ev['expected']:.4g} = log of the class count): the model "
                "starts confidently wrong, usually because the last layer's outputs are too "
                "large. Training first has to undo that.")
            finding.fixes = [_fix("xavier_init", "initialize the output layer small so the "
                                  "logits start near zero", "nn.init.normal_(model.head.weight, "
                                  "std=1e-3); nn.init.zeros_(model.head.bias)")]
        else:
            finding.explanation = (
                f"Before training the loss is only {ev['ratio']:.2f}x the log of the class count: "
                "the model already knows the answer, which usually means the labels leak into "
                "the inputs, or the loss is computed on the wrong tensors.")
    elif finding.id == "parameters_not_updated":
        finding.explanation = ("These parameters receive a gradient, but one optimizer step "
                               "left them exactly as they were: they are missing from the "
                               "optimizer's parameter groups, or their group's learning rate "
                               "is zero.")
    elif finding.id == "cannot_overfit_batch":
        finding.explanation = (
            f"A healthy model drives the loss of {ev['batch_size']} samples close to zero "
            f"within {ev['steps']} steps; this one went from {ev['first']:.4g} to "
            f"{ev['best']:.4g}. Common causes: the forward pass ignores its input, inputs and "
            "labels are misaligned, the learning rate is far too low, or the model lacks "
            "capacity.")
        finding.fixes = [_lr_fix(lower=False)]
    elif finding.id == "batch_mixing":
        finding.explanation = (
            f"In eval mode, sample 0's output changes with the other samples' inputs "
            f"(measured by {ev['method']}): a reshape, view or "
            "transpose mixes the batch dimension with another one (for example "
            "x.view(-1, batch) where x.view(batch, -1) was meant).")
    return finding
