"""Rules: pure functions of records that return findings. They never import torch."""

from __future__ import annotations

from collections.abc import Callable

from nndiag.findings import Finding, severity_rank
from nndiag.records import CheckpointRecord, ProbeRecord
from nndiag.rules import activations, architecture, checkpoint, gradients, sanity
from nndiag.rules.thresholds import THRESHOLDS, Threshold

Rule = Callable[[ProbeRecord, dict[str, Threshold]], Finding | None]

PROBE_RULES: tuple[Rule, ...] = (
    architecture.post_ln_deep_stack,
    gradients.vanishing_gradients,
    gradients.exploding_gradients,
    activations.poor_initialization,
    activations.dead_relu,
    activations.saturated_activations,
    sanity.unused_parameters,
)

# The headline numbers of each finding, measured the same way before and after a fix.
HEADLINES: dict[str, Callable[[ProbeRecord], dict[str, float | None]]] = {
    "vanishing_gradients": gradients.vanishing_headline,
    "exploding_gradients": gradients.exploding_headline,
    "poor_initialization": activations.drift_headline,
    "dead_relu": activations.dead_headline,
    "saturated_activations": activations.saturation_headline,
    "nan_inf": sanity.nan_inf_headline,
    "unused_parameters": sanity.unused_headline,
    "post_ln_deep_stack": lambda probe: {
        "post_ln_blocks": float(len(architecture.post_ln_blocks(probe)[0]))},
}


def run_checkpoint_rules(record: CheckpointRecord,
                         thresholds: dict[str, Threshold] | None = None) -> list[Finding]:
    """Judge a checkpoint's weights without data: most severe finding first."""
    thresholds = thresholds or THRESHOLDS
    findings = [f for rule in checkpoint.CHECKPOINT_RULES
                if (f := rule(record, thresholds)) is not None]
    return sorted(findings, key=lambda f: -severity_rank(f.severity))


def run_probe_rules(probe: ProbeRecord,
                    thresholds: dict[str, Threshold] | None = None) -> list[Finding]:
    """Judge one probe: every rule, most severe finding first.

    When the probe holds NaN or Inf, only ``nan_inf`` (and ``unused_parameters``) are
    reported: the other statistics are not meaningful.
    """
    thresholds = thresholds or THRESHOLDS
    broken = sanity.nan_inf(probe, thresholds)
    if broken is not None:
        findings = [broken]
        unused = sanity.unused_parameters(probe, thresholds)
        findings += [unused] if unused else []
    else:
        findings = [f for rule in PROBE_RULES if (f := rule(probe, thresholds)) is not None]
    return sorted(findings, key=lambda f: -severity_rank(f.severity))

