"""Rules: pure functions of records that return findings. They never import torch.

Every rule is registered once in ``registry.RULES`` with the findings it may report and the
context record it reads; ``diagnose(context)`` runs them.
"""

from __future__ import annotations

from collections.abc import Callable

from nndiag.findings import Finding, FindingId
from nndiag.records import CheckpointRecord, ProbeRecord
from nndiag.rules import activations, architecture, gradients, integrity
from nndiag.rules.registry import RULES, Rule, diagnose, finding_ids
from nndiag.rules.thresholds import Threshold

__all__ = ["HEADLINES", "RULES", "Rule", "diagnose", "finding_ids", "run_checkpoint_rules",
           "run_probe_rules"]

# The headline numbers of each finding, measured the same way before and after a fix.
HEADLINES: dict[str, Callable[[ProbeRecord], dict[str, float | None]]] = {
    FindingId.VANISHING_GRADIENTS: gradients.vanishing_headline,
    FindingId.EXPLODING_GRADIENTS: gradients.exploding_headline,
    FindingId.POOR_INITIALIZATION: activations.drift_headline,
    FindingId.DEAD_RELU: activations.dead_headline,
    FindingId.SATURATED_ACTIVATIONS: activations.saturation_headline,
    FindingId.NAN_INF: integrity.nan_inf_headline,
    FindingId.UNUSED_PARAMETERS: integrity.unused_headline,
    FindingId.POST_LN_DEEP_STACK: lambda probe: {
        "post_ln_blocks": float(len(architecture.post_ln_blocks(probe)[0]))},
}


def run_checkpoint_rules(record: CheckpointRecord,
                         thresholds: dict[str, Threshold] | None = None) -> list[Finding]:
    """Judge a checkpoint's weights without data: ``diagnose`` on its record."""
    return diagnose(record, thresholds)


def run_probe_rules(probe: ProbeRecord,
                    thresholds: dict[str, Threshold] | None = None) -> list[Finding]:
    """Judge one probe: ``diagnose`` on its record.

    When the probe holds NaN or Inf, only ``nan_inf`` (and ``unused_parameters``) are
    reported: the other statistics are not meaningful.
    """
    return diagnose(probe, thresholds)
