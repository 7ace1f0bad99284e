"""Data-free rules over a checkpoint's weights (no forward pass, no data).

``poor_initialization`` has four mechanisms; each is judged and the most severe becomes the
one finding (the others are listed in its evidence under ``also``):

- ``init_scale`` (transformers): every projection's weight RMS over the std its family
  initializes it with (``roles.reference_std``: N(0, 0.02) for BERT, GPT-2, Llama, ViT, with
  GPT-2's residual projections at 0.02/sqrt(2 n_layer); T5's and ``nn.Transformer``'s fan-in
  schemes). Untrained weights (every normalization gain 1, every bias 0) are their init and
  must sit near 1x; trained weights drift (pretrained BERT, GPT-2 and MiniLM projections sit
  1-10x above their init), so they are only judged far off (30x). Embeddings follow
  conventions of their own (PyTorch's ``nn.Embedding`` starts at N(0, 1)) and never decide the
  finding alone, and a head tied to the embedding is judged as the embedding.
- ``chain``: a Linear/conv layer followed by a ReLU multiplies the signal's scale by about
  ``init_scale_he`` (its weight RMS over the He std); along a chain of layers with no
  normalization in between the factors multiply, and the largest growth and collapse of the
  product are judged with the thresholds the live rule uses for measured activations. In a
  transformer the chains are the residual branches (value -> output projection, MLP in ->
  out), whose input a normalization layer has just re-scaled, and only growth is judged: a
  branch that starts small is a block that starts near the identity (what GPT-2's scaled
  init aims for), not a vanishing signal.
- ``no_normalization``: a stack of transformer blocks with no normalization weights in any of
  them, where nothing re-scales the residual stream the blocks add to.
- ``norm_gains``: BatchNorm gains drawn like weights (N(0, 0.02)) instead of 1, so that every
  normalization shrinks the signal it should re-scale.
"""

from __future__ import annotations

import math
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nndiag.findings import Finding, FindingId, severity_rank, worst_severity
from nndiag.records import ProbeRecord
from nndiag.records.checkpoint import (
    FAMILY_LABELS,
    HF_INIT_STD,
    INPUT_ROLES,
    NORMAL_INIT_FAMILIES,
    PROJECTION_ROLES,
    QKV_ROLES,
    ROLE_ATTENTION,
    ROLE_EMBEDDING,
    ROLE_HEAD,
    ROLE_HIDDEN,
    ROLE_KEY,
    ROLE_NORM,
    ROLE_QUERY,
    CheckpointRecord,
    LoadResult,
    ModuleWeights,
    canonical_key,
)
from nndiag.rules.thresholds import CHECKPOINT_THRESHOLDS, Threshold

# A stack of at least this many transformer blocks without normalization is a finding even
# when the weights predict little growth: the scale of the residual stream compounds over
# blocks once training moves the weights (2-3 block toy models train without it).
MIN_BLOCKS_WITHOUT_NORMALIZATION = 4
# Tensors smaller than this have too few values for their RMS to mean much (a 2-row table).
MIN_JUDGED_ELEMENTS = 16
# Roles whose weight scale is judged against the family's init.
_JUDGED_ROLES = PROJECTION_ROLES | {ROLE_HEAD, ROLE_HIDDEN}
# Mechanisms in order of precedence when two are equally severe.
_MECHANISMS = ("init_scale", "norm_gains", "no_normalization", "chain")


def _threshold(thresholds: dict[str, Threshold], name: str) -> Threshold:
    return thresholds.get(name) or CHECKPOINT_THRESHOLDS[name]


@dataclass
class ChainDrift:
    """The worst predicted growth or collapse of signal scale along one chain of layers.

    Attributes:
        log_factor: Natural log of the predicted factor. A deep chain's product easily leaves
            the range of a float (1e400, 1e-400): it is kept and judged in log space.
        start: The first layer of the span.
        end: The last layer of the span.
        layers: The span's layers, in order.
        direction: ``grows`` or ``collapses``.
    """

    log_factor: float
    start: ModuleWeights
    end: ModuleWeights
    layers: list[ModuleWeights]
    direction: str

    @property
    def factor(self) -> float:
        """The predicted factor (``inf`` or ``0.0`` when it leaves the float range)."""
        return math.exp(self.log_factor) if self.log_factor < _LOG_MAX else math.inf

    @property
    def log10_factor(self) -> float:
        """Base-10 log of the predicted factor."""
        return self.log_factor / math.log(10)


_LOG_MAX = math.log(sys.float_info.max)


def gain(module: ModuleWeights) -> float | None:
    """A layer's predicted signal gain: ``signal_gain``, else its He scale."""
    return module.signal_gain if module.signal_gain is not None else module.init_scale_he


def _usable_scale(module: ModuleWeights) -> bool:
    """A finite, positive gain: zero or non-finite ones have no log (NaN/Inf: own finding)."""
    scale = gain(module)
    return scale is not None and math.isfinite(scale) and scale > 0


def _ordered(modules: list[ModuleWeights]) -> list[ModuleWeights]:
    return sorted(modules, key=lambda m: canonical_key(m.name, m.kind))


def chain_drifts(record: CheckpointRecord) -> list[ChainDrift]:
    """For each chain, the largest growth and the largest collapse of the predicted scale.

    One pass over the chain's layers in log space: the largest rise (fall) of the running log
    product above its lowest (highest) earlier value.
    """
    chains: dict[int, list[ModuleWeights]] = {}
    for module in _ordered(record.modules):
        if module.chain is not None and _usable_scale(module):
            chains.setdefault(module.chain, []).append(module)
    drifts = []
    for layers in chains.values():
        log_prefix = 0.0
        low = high = (0.0, 0)  # (log of the product so far, index of the layer after it)
        grow = shrink = None
        for index, module in enumerate(layers):
            log_prefix += math.log(gain(module))  # type: ignore[arg-type]
            if grow is None or log_prefix - low[0] > grow[0]:
                grow = (log_prefix - low[0], low[1], index)
            if shrink is None or log_prefix - high[0] < shrink[0]:
                shrink = (log_prefix - high[0], high[1], index)
            if log_prefix < low[0]:
                low = (log_prefix, index + 1)
            if log_prefix > high[0]:
                high = (log_prefix, index + 1)
        for found, direction in ((grow, "grows"), (shrink, "collapses")):
            if found is not None:
                value, first, last = found
                span = layers[first: last + 1]
                drifts.append(ChainDrift(value, span[0], span[-1], span, direction))
    return drifts


# Layer-scale parameters: per-channel gains that start a residual branch near zero
# (``layer_scale_parameter``, ``layer_scale_1``, timm's ``gamma_1`` and ``ls1.gamma``, BEiT's
# ``lambda_1``).
_LAYER_SCALE = re.compile(r"(layer_?scale|(^|\.)gamma_\d|(^|\.)lambda_\d|(^|\.)ls\d\.)", re.I)


def has_layer_scale(record: CheckpointRecord) -> bool:
    """True when the weights hold layer-scale parameters (residual branches start small)."""
    return any(_LAYER_SCALE.search(t.name) for m in record.modules for t in m.tensors)


def format_factor(log10_factor: float) -> str:
    """``3.6e+03`` in the float range, ``1e+412`` / ``1e-412`` beyond it."""
    if abs(log10_factor) < 300:
        return f"{10 ** log10_factor:.1e}"
    return f"1e{round(log10_factor):+d}"


def _positions(record: CheckpointRecord) -> dict[str, int]:
    """Each module's position in canonical order (the same in every format)."""
    return {module.name: index for index, module in enumerate(_ordered(record.modules))}


def _fmt(value: float) -> str:
    return f"{value:.2g}" if 1e-2 <= abs(value) < 1e3 else f"{value:.1e}"


def predicted_drift(record: CheckpointRecord, thresholds: dict[str, Threshold]
                    ) -> Finding | None:
    """Chains of layers whose weight scales multiply to an exploding or vanishing signal.

    In a transformer, in a residual network whose branches end in a layer-scale (ConvNeXt,
    PoolFormer, CaiT) and in any network with normalization layers inside its repeated blocks,
    only growth is judged: a branch that starts small is a block that starts near the
    identity, on purpose, and a collapsing signal is re-scaled at the block's next
    normalization (whose place among the block's layers the names alone do not tell).
    """
    transformer = record.family is not None
    growth_only = transformer or has_layer_scale(record) or any(
        m.role == ROLE_NORM and m.block is not None for m in record.modules)
    judged = []
    for drift in chain_drifts(record):
        if growth_only and drift.direction != "grows":
            continue
        rule = thresholds["activation_growth" if drift.direction == "grows"
                          else "activation_collapse"]
        severity = rule.severity(drift.factor)  # inf and 0.0 compare as they should
        if severity is not None:
            judged.append((severity, drift))
    if not judged:
        return None
    severity = worst_severity(*(s for s, _ in judged))
    assert severity is not None
    worst = max((d for s, d in judged if s == severity), key=lambda d: abs(d.log_factor))
    scales = sorted(m.init_scale_he for m in worst.layers if m.init_scale_he is not None)
    evidence: dict[str, Any] = {
        "mechanism": "chain",
        "predicted_factor": worst.factor,
        "log10_predicted_factor": worst.log10_factor,
        "direction": worst.direction,
        "from_layer": worst.start.name,
        "to_layer": worst.end.name,
        "layers_in_chain": len(worst.layers),
        "init_scale_he": {m.name: m.init_scale_he for m in worst.layers},
        "median_init_scale_he": scales[len(scales) // 2] if scales else None,
        "assumes": "ReLU-like activations between the layers",
    }
    if transformer:
        evidence["signal_gain"] = {m.name: gain(m) for m in worst.layers}
        evidence["roles"] = [m.role for m in worst.layers]
        evidence["assumes"] = ("a unit-scale (normalized) input; value and output projections "
                               "linear, a ReLU-like activation after an MLP input projection")
    position = _positions(record)
    layers = sorted({m.name for _, d in judged for m in d.layers}, key=position.__getitem__)
    summary = (f"weights predict a signal that {worst.direction} "
               f"{format_factor(worst.log10_factor)}x from {worst.start.name} to "
               f"{worst.end.name} ({len(worst.layers)} layers, no normalization between them)")
    return Finding(FindingId.POOR_INITIALIZATION, severity, layers, summary, evidence=evidence)


def _module_state(record: CheckpointRecord, module: ModuleWeights) -> str:
    """``untrained``, ``new head`` (a zero-bias head beside trained weights) or ``trained``."""
    if record.untrained:
        return "untrained"
    bias = module.tensor("bias")
    if module.role == ROLE_HEAD and bias is not None and bias.rms == 0:
        return "new head"
    return "trained"


def _judge_scale(module: ModuleWeights, state: str, thresholds: dict[str, Threshold]
                 ) -> tuple[str, str] | None:
    """(severity, direction) of a module's init ratio, or ``None`` within bounds."""
    ratio = module.init_ratio
    if ratio is None or not math.isfinite(ratio) or ratio <= 0:
        return None  # exactly zero: a deliberate zero init; NaN/Inf: nan_inf
    fresh = state != "trained"
    high = _threshold(thresholds, "init_scale_untrained" if fresh else "init_scale_trained")
    severity = high.severity(ratio)
    if severity is not None:
        return severity, "grows"
    if fresh and module.role in INPUT_ROLES:
        severity = _threshold(thresholds, "init_scale_untrained_low").severity(ratio)
        if severity is not None:
            return severity, "collapses"
    return None


def _judgeable(module: ModuleWeights, roles: frozenset[str] | set[str]) -> bool:
    weight = module.weight
    return (module.role in roles and module.kind in ("linear", "attention", "embedding")
            and not module.tied_to and module.init_ratio is not None and weight is not None
            and weight.numel >= MIN_JUDGED_ELEMENTS)


def attention_logit_std(record: CheckpointRecord) -> float | None:
    """Largest predicted std of the attention logits q.k/sqrt(d_head) over the blocks.

    For a unit-scale input of width d and weights of RMS s_q, s_k (independent at init) the
    logits have std s_q * s_k * d. ``None`` for T5 (no 1/sqrt(d_head) scaling) and when no
    block shows both projections.
    """
    if record.family == "t5":
        return None
    per_block: dict[str, dict[str, float]] = {}
    width: dict[str, int] = {}
    for module in record.modules:
        if module.block is None or module.weight_rms is None or not module.fan_in:
            continue
        scales = per_block.setdefault(module.block, {})
        if module.role in (ROLE_QUERY, ROLE_KEY):
            scales.setdefault(module.role, module.weight_rms)
            width[module.block] = module.fan_in
        elif module.role == ROLE_ATTENTION and module.fused_rms:
            scales.setdefault(ROLE_QUERY, module.fused_rms["query"])
            scales.setdefault(ROLE_KEY, module.fused_rms["key"])
            width[module.block] = module.fan_in
    values = [s[ROLE_QUERY] * s[ROLE_KEY] * width[b] for b, s in per_block.items()
              if ROLE_QUERY in s and ROLE_KEY in s]
    return max(values) if values else None


def output_layer(record: CheckpointRecord) -> ModuleWeights | None:
    """The layer that makes the model's output logits.

    Its largest untied head, else (an LM whose head is tied to it) its largest embedding table.
    """
    def size(module: ModuleWeights) -> int:
        weight = module.weight
        return weight.numel if weight is not None else 0

    heads = [m for m in record.modules if m.role == ROLE_HEAD and not m.tied_to
             and m.weight_rms is not None]
    if heads:
        return max(heads, key=lambda m: (size(m), m.name))
    tables = [m for m in record.modules if m.role == ROLE_EMBEDDING and m.kind == "embedding"
              and not m.tied_to and m.weight_rms is not None]
    return max(tables, key=lambda m: (size(m), m.name)) if tables else None


def output_logit_std(record: CheckpointRecord) -> float | None:
    """Predicted std of the output logits: the output layer's RMS * sqrt(width)."""
    layer = output_layer(record)
    if layer is None or layer.weight_rms is None:
        return None
    width = layer.fan_in if layer.role == ROLE_HEAD else record.width
    return layer.weight_rms * math.sqrt(width) if width else None


def init_scale_drift(record: CheckpointRecord, thresholds: dict[str, Threshold]
                     ) -> Finding | None:
    """Transformer weights far off the scale their family initializes them at."""
    if record.family is None:
        return None
    judged = [(m, _module_state(record, m)) for m in record.modules
              if _judgeable(m, _JUDGED_ROLES)]
    off = [(verdict, m, state) for m, state in judged
           if (verdict := _judge_scale(m, state, thresholds)) is not None]
    if not off:
        return None
    severity = worst_severity(*(v[0] for v, _, _ in off))
    assert severity is not None
    (_, direction), worst, state = max(
        off, key=lambda o: (severity_rank(o[0][0]), abs(math.log(o[1].init_ratio or 1.0))))
    chosen = [m for (_, d), m, _ in off if d == direction]
    ratios = sorted(m.init_ratio for m in chosen if m.init_ratio is not None)
    # Embeddings off the same way belong to the same problem (a tied LM head's scale).
    embeddings = [m for m in record.modules if _judgeable(m, {ROLE_EMBEDDING})
                  and (v := _judge_scale(m, "untrained" if record.untrained else "trained",
                                         thresholds)) is not None and v[1] == direction]
    position = _positions(record)
    layers = sorted({m.name for m in chosen + embeddings}, key=position.__getitem__)
    family = record.family
    roles = Counter(m.role for m in chosen)
    ratio_of = {m.name: m.init_ratio for m in chosen + embeddings}
    evidence: dict[str, Any] = {
        "mechanism": "init_scale",
        "family": family,
        "state": state,
        "direction": direction,
        "reference_std": worst.reference_std,
        "worst_layer": worst.name,
        "worst_ratio": worst.init_ratio,
        "median_ratio": ratios[len(ratios) // 2],
        "layers_judged": len(judged),
        "layers_off": len(chosen),
        "ratios": {name: ratio_of[name] for name in layers},
        "roles": dict(sorted(roles.items(), key=lambda kv: str(kv[0]))),
        "only_heads": set(roles) == {ROLE_HEAD},
        "blocks": record.blocks,
        "width": record.width,
        "attention_logit_std": attention_logit_std(record),
        "attention_logit_std_at_init": (HF_INIT_STD ** 2 * record.width
                                        if family in NORMAL_INIT_FAMILIES and record.width
                                        else None),
        "output_layer": (layer.name if (layer := output_layer(record)) else None),
        "output_is_embedding": layer is not None and layer.role == ROLE_EMBEDDING,
        "output_logit_std": output_logit_std(record),
    }
    label = FAMILY_LABELS.get(family, family)
    if evidence["only_heads"]:
        summary = (f"head {worst.name} at {_fmt(worst.init_ratio or 0.0)}x the scale {label} "
                   f"initializes heads at ({state} weights)")
    else:
        summary = (f"{len(chosen)} of {len(judged)} {label} projections at "
                   f"{_fmt(ratios[len(ratios) // 2])}x the scale their family initializes them "
                   f"at (worst {worst.name}: {_fmt(worst.init_ratio or 0.0)}x; {state} weights)")
    return Finding(FindingId.POOR_INITIALIZATION, severity, layers, summary, evidence=evidence)


def missing_normalization(record: CheckpointRecord, thresholds: dict[str, Threshold]
                          ) -> Finding | None:
    """A stack of transformer blocks with no normalization weights in any of them."""
    if record.family is None or record.blocks < MIN_BLOCKS_WITHOUT_NORMALIZATION:
        return None
    blocks = sorted({m.block for m in record.modules if m.role in QKV_ROLES and m.block},
                    key=canonical_key)
    in_blocks = set(blocks)
    if any(m.role == ROLE_NORM and m.block in in_blocks for m in record.modules):
        return None
    # Each residual branch adds its output to the stream: with a branch gain g the stream's
    # variance is multiplied by (1 + g^2) (output and input uncorrelated at init).
    branches: dict[int, list[ModuleWeights]] = {}
    for module in record.modules:
        if module.chain is not None and module.block in in_blocks and _usable_scale(module):
            branches.setdefault(module.chain, []).append(module)
    log_growth, gains = 0.0, []
    for members in branches.values():
        log_gain = sum(math.log(gain(m)) for m in members)  # type: ignore[arg-type]
        gains.append(log_gain)
        log_growth += 0.5 * math.log1p(math.exp(min(2 * log_gain, 700.0)))
    factor = math.exp(log_growth) if log_growth < _LOG_MAX else math.inf
    by_growth = thresholds["activation_growth"].severity(factor)
    severity = worst_severity("warning", by_growth)
    assert severity is not None
    gains.sort()
    evidence = {
        "mechanism": "no_normalization",
        "family": record.family,
        "blocks": len(blocks),
        "predicted_factor": factor,
        "log10_predicted_factor": log_growth / math.log(10),
        "median_branch_gain": math.exp(gains[len(gains) // 2]) if gains else None,
        "branches": len(gains),
    }
    shown = _fmt(factor) if factor < 1e300 else format_factor(log_growth / math.log(10))
    summary = (f"{len(blocks)} transformer blocks with no normalization weights in any of "
               f"them: nothing re-scales the residual stream they add to (predicted growth "
               f"{shown}x at the current weights)")
    return Finding(FindingId.POOR_INITIALIZATION, severity, blocks, summary, evidence=evidence)


def batch_norm_gains(record: CheckpointRecord, thresholds: dict[str, Threshold]
                     ) -> Finding | None:
    """BatchNorm gains far below 1 throughout: every normalization shrinks the signal."""
    gains = [(m, m.weight_rms) for m in record.modules
             if m.kind == "batch_norm" and m.weight_rms and not m.zero_initialized]
    if not gains:
        return None
    median = sorted(rms for _, rms in gains)[len(gains) // 2]
    severity = _threshold(thresholds, "batch_norm_gain").severity(median)
    if severity is None:
        return None
    low = [m.name for m, rms in gains if rms <= 2 * median]
    evidence = {"mechanism": "norm_gains", "median_gain_rms": median,
                "layers_judged": len(gains), "gain_rms": {m.name: rms for m, rms in gains}}
    summary = (f"BatchNorm gains at {_fmt(median)} RMS (median of {len(gains)} layers) where "
               "they start at 1: every normalization multiplies the signal by about that")
    return Finding(FindingId.POOR_INITIALIZATION, severity, low, summary, evidence=evidence)


_WEIGHT_MECHANISMS = (init_scale_drift, batch_norm_gains, missing_normalization)


def poor_initialization(record: CheckpointRecord, thresholds: dict[str, Threshold]
                        ) -> Finding | None:
    """The most severe ``poor_initialization`` mechanism (module docstring)."""
    return _most_severe((*_WEIGHT_MECHANISMS, predicted_drift), record, thresholds)


def _most_severe(mechanisms: tuple[Callable[[CheckpointRecord, dict[str, Threshold]],
                                            Finding | None], ...],
                 record: CheckpointRecord, thresholds: dict[str, Threshold]) -> Finding | None:
    """One finding: the most severe mechanism's, the others listed under ``also``."""
    found = [f for rule in mechanisms if (f := rule(record, thresholds)) is not None]
    if not found:
        return None
    best = max(found, key=lambda f: (severity_rank(f.severity),
                                     -_MECHANISMS.index(f.evidence["mechanism"])))
    others = [f for f in found if f is not best]
    if others:
        best.evidence["also"] = [{"mechanism": f.evidence["mechanism"], "severity": f.severity,
                                  "summary": f.summary} for f in others]
    return best


def probed_weights(probe: ProbeRecord, thresholds: dict[str, Threshold]) -> Finding | None:
    """What a live inspection reads from the weights themselves, as the data-free analysis does.

    The mechanisms a probe does not measure: a transformer's weights against the scale its
    family initializes them at, BatchNorm gains far below 1, and blocks with no normalization
    at all (a live probe measures the drift that chains only predict). Live and data-free
    analysis of the same weights then agree on them. Nothing without ``probe.weights``.
    """
    if probe.weights is None:
        return None
    return _most_severe(_WEIGHT_MECHANISMS, probe.weights, thresholds)


def checkpoint_mismatch(loaded: LoadResult, thresholds: dict[str, Threshold]) -> Finding | None:
    """Model keys a checkpoint loaded non-strictly lacked, or checkpoint keys the model lacked."""
    if not loaded.missing and not loaded.unexpected:
        return None
    return Finding(FindingId.CHECKPOINT_MISMATCH, "warning", loaded.missing[:50],
                   f"{len(loaded.missing)} model key(s) missing from the checkpoint, "
                   f"{len(loaded.unexpected)} unexpected key(s) in it",
                   evidence={"missing": loaded.missing, "unexpected": loaded.unexpected})


def nonfinite_weights(record: CheckpointRecord, thresholds: dict[str, Threshold]
                      ) -> Finding | None:
    """NaN or Inf stored in the weights."""
    bad = [(m, t) for m in record.modules for t in m.tensors if t.nonfinite]
    if not bad:
        return None
    names = sorted({m.name for m, _ in bad}, key=_positions(record).__getitem__)
    bad.sort(key=lambda pair: canonical_key(pair[0].name, pair[0].kind))
    evidence = {"tensors": {t.name: t.nonfinite for _, t in bad},
                "first_layer": bad[0][0].name}
    summary = (f"{len(bad)} tensor(s) hold NaN/Inf, first {bad[0][1].name} "
               f"({bad[0][1].nonfinite} of {bad[0][1].numel} values)")
    return Finding(FindingId.NAN_INF, "error", names, summary, evidence=evidence)


def dead_channels(record: CheckpointRecord, thresholds: dict[str, Threshold]
                  ) -> Finding | None:
    """BatchNorm layers many of whose channels have near-zero gamma or running variance."""
    rule = thresholds["dead_channel_fraction"]
    judged = []
    for module in record.modules:
        if module.channels and module.dead_channels is not None:
            severity = rule.severity(module.dead_channels / module.channels)
            if severity is not None:
                judged.append((severity, module))
    if not judged:
        return None
    severity = worst_severity(*(s for s, _ in judged))
    assert severity is not None
    worst = max((m for _, m in judged), key=lambda m: (m.dead_channels or 0) / (m.channels or 1))
    evidence = {"dead_channels": {m.name: m.dead_channels for _, m in judged},
                "channels": {m.name: m.channels for _, m in judged}}
    summary = (f"{len(judged)} BatchNorm layer(s) with dead channels; worst {worst.name}: "
               f"{worst.dead_channels} of {worst.channels}")
    return Finding(FindingId.DEAD_CHANNELS, severity, [m.name for _, m in judged], summary,
                   evidence=evidence)

