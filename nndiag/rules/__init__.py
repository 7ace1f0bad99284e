"""Rules: pure functions of records that return findings. They never import torch.

Every rule is registered once in ``registry.RULES`` with the findings it may report and the
context record it reads; ``diagnose(context)`` runs them.
"""

from __future__ import annotations

from collections.abc import Callable

from nndiag.findings import Finding
from nndiag.records import CheckpointRecord, ProbeRecord
from nndiag.rules.registry import RULES, Rule, diagnose, finding_ids
from nndiag.rules.thresholds import Threshold

__all__ = ["HEADLINES", "RULES", "Rule", "diagnose", "finding_ids", "run_checkpoint_rules",
           "run_probe_rules"]

# The headline numbers of each finding a probe's rules report, measured the same way before and
# after a fix (``--try-fixes``): each rule's own.
HEADLINES: dict[str, Callable[[ProbeRecord], dict[str, float | None]]] = {
    finding_id: rule.headline for rule in RULES
    if rule.context is ProbeRecord and rule.headline is not None for finding_id in rule.ids}


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
