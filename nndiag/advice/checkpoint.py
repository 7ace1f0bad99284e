"""Advice on data-free checkpoint findings.

A predicted scale drift (``poor_initialization``: a transformer's weights off their family's
init scale, a residual stack without normalization, or a chain of layers), NaN/Inf in the
weights, dead BatchNorm channels. Fixes fit the architecture the weights show: transformer
fixes (GPT-2-style init, pre-LN LayerNorm, warmup, clipping) for a transformer, never BatchNorm
or conv snippets; and trained weights are never re-initialized (only a new head beside them).
"""

from __future__ import annotations

import math
from typing import Any

from nndiag.advice.catalog import CATALOG, make_fix
from nndiag.advice.common import CHECKPOINT, Advisor, fmt, he_init_fix, norm_fix
from nndiag.findings import Finding, FindingId, Fix
from nndiag.records import CheckpointRecord, LoadResult
from nndiag.records.checkpoint import FAMILY_LABELS, HF_INIT_STD, NORMAL_INIT_FAMILIES

# The module class a checkpoint's module kind stands for, to phrase the fixes.
_CHECKPOINT_CLASSES = {"linear": "Linear", "batch_norm": "BatchNorm2d", "norm": "LayerNorm",
                       "recurrent": "LSTM", "attention": "MultiheadAttention",
                       "embedding": "Embedding"}
# Keys that only a checkpoint written during training holds.
_TRAINING_STATE = ("epoch", "global_step", "optimizer", "optimizer_states",
                   "optimizer_state_dict")
# A config's init scale and the weights agree when within this factor of each other.
_AGREE = 3.0
_BRANCHES = {"attention_value": "value path", "attention": "value path",
             "mlp_in": "MLP", "mlp_gate": "MLP"}


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
    return record.untrained is False or any(key in record.extras for key in _TRAINING_STATE)


def _label(record: CheckpointRecord) -> str:
    return FAMILY_LABELS.get(record.family or "", "transformer")


def init_fix(record: CheckpointRecord) -> Fix:
    """GPT-2-style init (N(0, 0.02), residual projections scaled by depth) for a transformer."""
    return make_fix("scaled_residual_init", n_blocks=max(record.blocks, 1))


def poor_initialization(finding: Finding, record: CheckpointRecord) -> tuple[str, list[Fix]]:
    """Explain the mechanism the rule found, in the terms of the architecture's family."""
    mechanism = finding.evidence.get("mechanism", "chain")
    if mechanism == "init_scale":
        return _init_scale(finding.evidence, record)
    if mechanism == "no_normalization":
        return _no_normalization(finding.evidence, record)
    if mechanism == "norm_gains":
        return _norm_gains(finding.evidence)
    if record.family is not None:
        return _branch(finding.evidence, record)
    return _chain(finding.evidence, record)


def _norm_gains(ev: dict[str, Any]) -> tuple[str, list[Fix]]:
    """BatchNorm gains initialized like weights."""
    text = (f"The BatchNorm gains (gamma) have an RMS of {fmt(ev['median_gain_rms'])} (median "
            f"of {ev['layers_judged']} layers) instead of starting at 1: each normalization "
            "re-scales its input to unit variance and then multiplies it by about that much, so "
            "the signal, and the gradient with it, shrinks at every normalization and is lost "
            "within a few blocks. An init routine that draws every `weight` from N(0, 0.02) "
            "does this to normalization layers too.")
    return text, [make_fix("norm_gain_init")]


def _chain(ev: dict[str, Any], record: CheckpointRecord) -> tuple[str, list[Fix]]:
    """A plain network's chain of layers."""
    kinds = checkpoint_kinds(record)
    verb = "explode" if ev["direction"] == "grows" else "vanish"
    text = (f"Assuming ReLU-like activations between them, the {ev['layers_in_chain']} layers "
            f"from {ev['from_layer']} to {ev['to_layer']} multiply the signal's scale by "
            f"{fmt(ev['predicted_factor'])}: their weights are, at the median, "
            f"{fmt(ev['median_init_scale_he'])}x the He scale sqrt(2/fan_in), and no "
            "normalization layer sits between them. Forward activations and gradients through "
            f"them would {verb} by about that factor. With --model and --data (or --input-shape) "
            "nndiag measures it instead of predicting it.")
    if _was_trained(record):
        text += (" The weights have been trained (normalization statistics or training state "
                 "show it): re-initializing them would throw away what they learned.")
        if ev["direction"] == "grows":
            text += " If they started at a sound scale, they grew during training."
            return text, [make_fix("lower_learning_rate"), make_fix("gradient_clipping"),
                          norm_fix(kinds)]
        return text, [norm_fix(kinds), make_fix("skip_connections")]
    return text, [he_init_fix(kinds), norm_fix(kinds)]


def _branch(ev: dict[str, Any], record: CheckpointRecord) -> tuple[str, list[Fix]]:
    """A transformer's residual branch whose layers multiply to a large gain."""
    roles = ev.get("roles") or []
    branch = _BRANCHES.get(roles[0] if roles else "", "layers")
    gains = ", ".join(f"{name} {fmt(value)}" for name, value in ev.get("signal_gain", {}).items())
    text = (f"The {branch} from {ev['from_layer']} to {ev['to_layer']} multiplies the scale of "
            f"its normalized input by {fmt(ev['predicted_factor'])} (signal gains, RMS x "
            f"sqrt(fan_in): {gains}). The block adds that output to the residual stream, so the "
            "stream grows block after block, drowns the embeddings' contribution, and the "
            "normalization before each block hides the growth from the forward pass but not "
            "from the gradients.")
    if _was_trained(record):
        return (text + " The weights are trained: lower the learning rate and clip rather "
                "than re-initialize them."), [make_fix("lower_learning_rate"),
                                               make_fix("gradient_clipping"),
                                               make_fix("lr_warmup")]
    return text, [init_fix(record), make_fix("gradient_clipping")]


def _config_sentence(ev: dict[str, Any], record: CheckpointRecord) -> str:
    """What config.json's init scale says about these weights (empty without one)."""
    family = record.family or ""
    if family in NORMAL_INIT_FAMILIES:
        key, default = "initializer_range", HF_INIT_STD
    elif family == "t5":
        key, default = "initializer_factor", 1.0
    else:
        return ""
    value = record.config.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        return ""
    follows = 1 / _AGREE <= ev["median_ratio"] * default / value <= _AGREE
    off = value / default
    if not 1 / _AGREE <= off <= _AGREE and follows:
        return (f" config.json sets {key}={value}, {fmt(off)}x the {default:g} "
                f"{_label(record)} uses, and the weights follow it: the config is the mistake.")
    if follows:
        return f" config.json sets {key}={value}, and the weights follow it."
    return (f" config.json says {key}={value}, so these weights did not come from this "
            "config's init (custom init code, or weights loaded from elsewhere).")


def _logit_sentences(ev: dict[str, Any]) -> str:
    parts = []
    logits, at_init = ev.get("attention_logit_std"), ev.get("attention_logit_std_at_init")
    if logits is not None and ev["direction"] == "grows" and logits > 1:
        parts.append(
            f" At this scale the attention logits q.k/sqrt(d_head) have a predicted std of "
            f"{fmt(logits)}" + (f" instead of {fmt(at_init)}" if at_init else "") +
            ": the softmax starts nearly one-hot on a single token per query (attention "
            "entropy collapse) and passes almost no gradient to the query and key projections.")
    output = ev.get("output_logit_std")
    if output is not None and ev["direction"] == "grows" and output > 2:
        parts.append(
            f" The output logits, made by {ev['output_layer']} from the final normalization's "
            f"unit-scale output, start with a std of about {fmt(output)}: the model starts "
            "confidently wrong, with a loss at init far above ln("
            + ("vocabulary size" if ev.get("output_is_embedding") else "number of classes")
            + ").")
    return "".join(parts)


def _init_scale(ev: dict[str, Any], record: CheckpointRecord) -> tuple[str, list[Fix]]:
    """Weights far off the scale their family initializes them at."""
    label = _label(record)
    state, ratio = ev["state"], fmt(ev["median_ratio"])
    worst = f"worst {ev['worst_layer']}: {fmt(ev['worst_ratio'])}x"
    if ev.get("only_heads"):
        return _head(ev, record)
    scheme = _scheme(record)
    if state == "trained":
        text = (f"These weights have been trained (their normalization gains moved from 1), "
                f"and trained weights drift from their init: pretrained BERT, GPT-2 and MiniLM "
                f"projections sit 1-10x above N(0, 0.02). Here {ev['layers_off']} of "
                f"{ev['layers_judged']} {label} layers sit at {ratio}x the scale {scheme} "
                f"({worst}), which is beyond drift: the weights grew unchecked during training "
                "(a learning rate too high, no clipping or weight decay) or started that far "
                f"off.{_config_sentence(ev, record)}{_logit_sentences(ev)} Re-initializing would "
                "throw away what the model learned: resume from an earlier checkpoint with a "
                "lower learning rate, clipping and warmup.")
        return text, [make_fix("lower_learning_rate"), make_fix("gradient_clipping"),
                      make_fix("lr_warmup")]
    where = "above" if ev["direction"] == "grows" else "below"
    text = (f"These weights are untrained (every normalization gain is exactly 1 and every "
            f"bias 0), so they are the initialization itself. {label} initializes {scheme}; "
            f"here {ev['layers_off']} of {ev['layers_judged']} layers sit {ratio}x that scale "
            f"({worst}, {where} it).{_config_sentence(ev, record)}")
    if ev["direction"] == "grows":
        text += (_logit_sentences(ev) + " Normalization re-scales each block's input, but "
                 "not the residual stream the blocks add to, nor the logits: it does not undo a "
                 "wrong init scale.")
    else:
        text += (" Queries and keys this small make every attention map uniform, values and "
                 "MLP inputs this small make each block pass almost nothing, and under Adam, "
                 "whose steps have a fixed size, the first updates are larger than the weights "
                 "themselves.")
    return text, [init_fix(record), make_fix("lr_warmup")]


def _scheme(record: CheckpointRecord) -> str:
    """How the family initializes its weights, in words."""
    if record.family == "gpt2":
        blocks = max(record.blocks, 1)
        return (f"its Linear (Conv1D) and embedding weights from N(0, 0.02), and the projections "
                f"that write into the residual stream (c_proj) from N(0, 0.02/sqrt(2 x {blocks} "
                f"layers)) = N(0, {HF_INIT_STD / math.sqrt(2 * blocks):.2g})")
    if record.family in NORMAL_INIT_FAMILIES:
        return "its Linear and embedding weights from N(0, 0.02)"
    if record.family == "t5":
        return ("its projections from N(0, 1/sqrt(fan_in)) (queries also scaled by "
                "1/sqrt(d_kv)) and its embeddings from N(0, 1)")
    return ("its fused q/k/v with Xavier init and its Linear layers with PyTorch's default "
            "U(+-1/sqrt(fan_in))")


def _head(ev: dict[str, Any], record: CheckpointRecord) -> tuple[str, list[Fix]]:
    """A head initialized far above its family's scale."""
    head, std = ev["worst_layer"], ev.get("reference_std") or HF_INIT_STD
    output = ev.get("output_logit_std")
    text = (f"The head {head} has weights {fmt(ev['worst_ratio'])}x the scale "
            f"{_label(record)} initializes heads at (N(0, {std:.2g})).")
    if output is not None:
        text += (f" Reading the final normalization's unit-scale output, its logits start with "
                 f"a std of about {fmt(output)} instead of "
                 f"{fmt(output / (ev['worst_ratio'] or 1.0))}")
    text += (": the softmax starts confident, the loss at init sits far above ln(number of "
             "classes), the first updates go into shrinking the head, and its large weights "
             "send large gradients into the layers below.")
    if ev["state"] == "new head":
        text += (" The rest of the model is trained and this head is new (its bias is still "
                 "exactly zero): re-initializing the head alone keeps every pretrained weight.")
    elif ev["state"] == "trained":
        text += (" The head has been trained with the rest: lower the learning rate rather "
                 "than re-initialize it.")
        return text, [make_fix("lower_learning_rate"), make_fix("gradient_clipping")]
    return text, [head_fix(head, std), make_fix("lr_warmup")]


# The catalogue's ``xavier_init`` "output_layer" wording names ``model.head``; a checkpoint
# knows its head's real name (``classifier``, ``lm_head``, ``score``...), so this wording of the
# same fix id is filled here.
_HEAD_SUMMARY = ("re-initialize the head {head} alone at its family's scale N(0, {std}), so its "
                 "logits start near zero (the other weights stay as they are)")
_HEAD_CODE = """head = model.get_submodule("{head}")
nn.init.normal_(head.weight, mean=0.0, std={std})
if head.bias is not None:
    nn.init.zeros_(head.bias)"""


def head_fix(head: str, std: float) -> Fix:
    """Re-initialize one head, by its module name, at its family's scale (``xavier_init``)."""
    values = {"head": head, "std": f"{std:.2g}"}
    return Fix("xavier_init", _HEAD_SUMMARY.format(**values), _HEAD_CODE.format(**values),
               automatic=CATALOG["xavier_init"].automatic)


def _no_normalization(ev: dict[str, Any], record: CheckpointRecord) -> tuple[str, list[Fix]]:
    """A stack of transformer blocks with no normalization weights."""
    text = (f"These {ev['blocks']} blocks hold attention and MLP weights but no normalization "
            "weights at all. In a transformer, a LayerNorm (or RMSNorm) in every block, before "
            "each sublayer (pre-LN: GPT-2, Llama, ViT) or after each residual addition "
            "(post-LN: BERT), is what keeps the scale in check whatever the blocks add; "
            "without it each block adds its branch output to a stream that nothing re-scales, "
            "so activations and gradients compound with depth as soon as training "
            "moves the weights (predicted through the stack at the current weights: "
            f"{fmt(ev['predicted_factor'])}x, median branch gain "
            f"{fmt(ev['median_branch_gain'])}). If the model normalizes without parameters "
            "(LayerNorm(elementwise_affine=False)), a state dict cannot show it: then ignore "
            "this finding.")
    fixes = [make_fix("layer_norm")]
    if not _was_trained(record):
        fixes.append(init_fix(record))
    return text, [*fixes, make_fix("gradient_clipping"), make_fix("lr_warmup")]


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


def checkpoint_notes(record: CheckpointRecord) -> list[str]:
    """What the data-free report should say about how the weights were read.

    The architecture the roles show and how that changes the judgement, the config's init
    scale, tied weights; for a plain network, which weights keep conventions of their own.
    """
    if record.family is None:
        if any(m.kind in ("recurrent", "attention", "embedding") for m in record.modules):
            return ["recurrent, attention and embedding weights are reported but not judged "
                    "against He/Xavier: they keep conventions of their own"]
        return []
    transposed = [m.name for m in record.modules if m.transposed]
    state = {True: "untrained (every normalization gain 1, every bias 0): judged against the "
                   "family's init scale, 10x off is a finding",
             False: "trained: judged against the family's init scale only beyond 30x, since "
                    "training drift is normal",
             None: "of unknown training state: judged as trained"}[record.untrained]
    notes = [f"transformer read from names and shapes: {_label(record)} family, "
             f"{record.blocks} blocks, width {record.width}"
             + (f", {len(transposed)} Conv1D weights stored (in, out) read with fans swapped"
                if transposed else "") +
             "; queries, keys and values are parallel projections, chains are the residual "
             "branches and end at every normalization; the weights are " + state]
    value = record.config.get("initializer_range")
    if isinstance(value, int | float) and not isinstance(value, bool) and \
            record.family in NORMAL_INIT_FAMILIES:
        ratios = sorted(m.weight_rms / value for m in record.modules
                        if m.role in ("attention_query", "attention_key", "attention_value",
                                      "attention", "mlp_in") and m.weight_rms and value > 0)
        median = ratios[len(ratios) // 2] if ratios else None
        note = (f"config.json: initializer_range={value} ({fmt(value / HF_INIT_STD)}x the "
                f"0.02 of {_label(record)})")
        if median is not None:
            note += f"; input projections at {fmt(median)}x it"
            if record.untrained and not 1 / _AGREE <= median <= _AGREE:
                note += ": the weights were not initialized from this config"
        notes.append(note)
    tied = [f"{m.name} = {m.tied_to}" for m in record.modules if m.tied_to]
    if tied:
        notes.append("tied weights judged once: " + ", ".join(tied[:5])
                     + (f" and {len(tied) - 5} more" if len(tied) > 5 else ""))
    return notes


def architecture_summary(record: CheckpointRecord) -> dict[str, Any] | None:
    """The architecture the roles show, for the report's summary (``None``: no transformer)."""
    if record.family is None:
        return None
    return {"family": record.family, "blocks": record.blocks, "width": record.width,
            "untrained": record.untrained,
            "initializer_range": record.config.get("initializer_range")}


def checkpoint_mismatch(finding: Finding, loaded: LoadResult) -> tuple[str, list[Fix]]:
    """A checkpoint loaded non-strictly: what kept the model's own init, and what was ignored."""
    return ("Loaded non-strictly: the missing tensors keep the model's own initialization, the "
            "unexpected ones were ignored. A fine-tuning head is an expected difference; a "
            "backbone layer is not."), []


ADVISORS: dict[tuple[str, str], Advisor] = {
    (CHECKPOINT, FindingId.POOR_INITIALIZATION): poor_initialization,
    (CHECKPOINT, FindingId.NAN_INF): nan_inf,
    (CHECKPOINT, FindingId.DEAD_CHANNELS): dead_channels,
    (CHECKPOINT, FindingId.CHECKPOINT_MISMATCH): checkpoint_mismatch,
}
