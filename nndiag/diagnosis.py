"""``diagnose``: the one call that judges what was measured.

Every command ends here: ``nndiag inspect`` (a live probe, or a checkpoint's weights), the gate
(its probe at init, the checks of the training step, the short recorded run), ``nndiag check``
and ``nndiag report`` on a run, ``Monitor`` when it closes, lr-find (the range test's curve and
its trials). ``diagnose`` runs every registered rule of each context record
(``nndiag.rules.registry``), fills each finding's explanation and fixes from the context it was
judged on (``nndiag.advice``) and links root causes to their symptoms
(``nndiag.advice.causes``). The command then adds its own rows, summary and notes to the report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from nndiag.advice import advise
from nndiag.advice.catalog import fit_learning_rate_fix
from nndiag.advice.causes import link_causes
from nndiag.findings import (
    CheckpointReport,
    CheckReport,
    Finding,
    InspectReport,
    LRFindResult,
    Report,
)
from nndiag.records import CheckpointRecord, LoadResult, ProbeRecord, SanityRecord
from nndiag.records.lrcurve import LRCurveRecord, TrialsRecord
from nndiag.rules.registry import run_rules
from nndiag.rules.thresholds import Threshold
from nndiag.runlog import RunLog

# The report a context's findings go into (by the first context given).
_REPORTS: dict[type, type[Report]] = {
    ProbeRecord: InspectReport, LoadResult: InspectReport, CheckpointRecord: CheckpointReport,
    RunLog: CheckReport, SanityRecord: CheckReport,
}


def judge(context: Any, thresholds: dict[str, Threshold] | None = None) -> list[Finding]:
    """The findings of one context record's rules, each with its advice (no cause links)."""
    return [advise(finding, context) for finding in run_rules(context, thresholds)]


def diagnose(*contexts: Any, thresholds: dict[str, Threshold] | None = None,
             phases: Sequence[str] | None = None) -> Report:
    """Judge context records: their rules, the advice, the root-cause links between them.

    Args:
        *contexts: What was measured: ``ProbeRecord``, ``CheckpointRecord``, ``LoadResult``,
            ``RunLog``, ``SanityRecord``, ``LRCurveRecord`` or ``TrialsRecord``.
        thresholds: Override thresholds by name (``nndiag.rules.thresholds``).
        phases: One name per context: each finding's ``evidence["phase"]`` says which it came
            from (the gate's ``init``, ``sanity`` and ``training``).

    Returns:
        A report of the first context's command (``InspectReport``, ``CheckpointReport``,
        ``CheckReport``; a plain ``nndiag.lr-find/1`` report for lr-find's records) holding
        the findings, most severe first; its rows, summary and notes are the caller's to add.

    Raises:
        ValueError: No context, or ``phases`` of another length.
        TypeError: The first context is not a record that rules judge.
    """
    if not contexts:
        raise ValueError("diagnose needs at least one context record")
    if phases is not None and len(phases) != len(contexts):
        raise ValueError(f"{len(phases)} phase names for {len(contexts)} contexts")
    findings: list[Finding] = []
    for index, context in enumerate(contexts):
        found = judge(context, thresholds)
        if phases is not None:
            for finding in found:
                finding.evidence["phase"] = phases[index]
        findings += found
    _fit_learning_rate_fixes(findings, contexts)
    report_type = next((cls for kind, cls in _REPORTS.items()
                        if isinstance(contexts[0], kind)), None)
    linked = link_causes(findings)
    if report_type is None:
        if not isinstance(contexts[0], LRCurveRecord | TrialsRecord):
            raise TypeError(f"nothing diagnoses a {type(contexts[0]).__name__}")
        return Report(LRFindResult.schema, linked)
    return report_type(findings=linked)


def _fit_learning_rate_fixes(findings: list[Finding], contexts: Sequence[Any]) -> None:
    """Write learning-rate fixes for the optimizer and rate a recorded run used, if any."""
    log = next((c for c in contexts if isinstance(c, RunLog)), None)
    if log is None:
        return
    rates = [lr for lr in log.lrs if lr is not None and math.isfinite(lr)]
    optimizer = log.meta.get("optimizer")
    lr = max(rates) if rates else None
    for finding in findings:
        finding.fixes = [fit_learning_rate_fix(fix, optimizer if isinstance(optimizer, str)
                                               else None, lr) for fix in finding.fixes]
