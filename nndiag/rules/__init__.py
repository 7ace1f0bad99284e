"""Rules: pure functions of records that return findings. They never import torch.

Every rule is registered once in ``registry.RULES`` with the findings it may report and the
context record it reads; ``run_rules(context)`` runs them (``nndiag.diagnosis.diagnose`` adds
their advice and the root-cause links).
"""

from __future__ import annotations

from collections.abc import Callable

from nndiag.findings import Finding
from nndiag.records import CheckpointRecord, ProbeRecord
from nndiag.rules.registry import RULES, Rule, finding_ids, run_rules
from nndiag.rules.thresholds import Threshold

__all__ = ["HEADLINES", "RULES", "Rule", "finding_ids", "run_checkpoint_rules", "run_probe_rules",
           "run_rules"]

# The headline numbers of each finding a probe's rules report, measured the same way before and
# after a fix (``--try-fixes``): each rule's own.
HEADLINES: dict[str, Callable[[ProbeRecord], dict[str, float | None]]] = {
    finding_id: rule.headline for rule in RULES
    if rule.context is ProbeRecord and rule.headline is not None for finding_id in rule.ids}


def run_checkpoint_rules(record: CheckpointRecord,
                         thresholds: dict[str, Threshold] | None = None) -> list[Finding]:
    """Judge a checkpoint's weights without data: ``run_rules`` on its record."""
    return run_rules(record, thresholds)


def run_probe_rules(probe: ProbeRecord,
                    thresholds: dict[str, Threshold] | None = None) -> list[Finding]:
    """Judge one probe: ``run_rules`` on its record.

    When the probe holds NaN or Inf, only ``nan_inf`` (and ``unused_parameters``) are
    reported: the other statistics are not meaningful.
    """
    return run_rules(probe, thresholds)
