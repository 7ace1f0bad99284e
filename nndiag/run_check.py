"""``check_run``: judge a recorded run; JUnit XML for CI systems."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from nndiag.diagnosis import diagnose
from nndiag.errors import UsageError
from nndiag.files import write_atomic
from nndiag.findings import CheckReport, Finding, Report, severity_rank
from nndiag.rules.registry import finding_ids
from nndiag.rules.thresholds import Threshold
from nndiag.runlog import RunLog, read_run

SCHEMA = CheckReport.schema
# Every finding a run check can report: each becomes one JUnit test case.
RUN_FINDINGS = finding_ids(RunLog)


def check_run(run: str | Path | RunLog, thresholds: dict[str, Threshold] | None = None
              ) -> Report:
    """Read a run log and judge it with the rules over time.

    Args:
        run: A directory written by ``nndiag.Monitor``, or a run already read.
        thresholds: Override thresholds (see ``nndiag.rules.thresholds``).

    Returns:
        A ``nndiag.check/1`` report: findings with the first step each appeared, and the
        steps a ``GradScaler`` skipped (``amp.jsonl``) as their own finding.

    Raises:
        UsageError: Not a run directory, or a run with no recorded step.
    """
    log = run if isinstance(run, RunLog) else read_run(run)
    if not log.losses and not log.samples:
        raise UsageError(f"{str(log.path)!r} holds no recorded step: nothing to judge (did "
                         "training call monitor.step(loss)?)")
    return judge_run(log, thresholds=thresholds)


def judge_run(log: RunLog, skipped: Sequence[dict[str, float] | int] | None = None,
              thresholds: dict[str, Threshold] | None = None) -> Report:
    """The check report of a run log: the run rules with advice.

    Args:
        log: The run.
        skipped: The steps a ``GradScaler`` skipped, when the caller knows them better than
            the run directory (``Monitor.skipped_steps``, bare step indices): they replace
            ``log.skipped_steps``.
        thresholds: Override thresholds.
    """
    if skipped is not None:
        log.skipped_steps = [row if isinstance(row, dict) else
                             {"step": row, "scale": float("nan")} for row in skipped]
    report = build_run_report(log, diagnose(log, thresholds=thresholds).findings)
    if log.skipped_steps:
        report.summary["skipped_steps"] = len(log.skipped_steps)
    return report


def build_run_report(log: RunLog, findings: list[Finding]) -> CheckReport:
    """The check report of a run log and its findings."""
    notes = []
    if log.skipped_lines:
        notes.append(f"{log.skipped_lines} unreadable line(s) skipped (a run cut short while "
                     "writing, or a malformed line)")
    if not log.samples:
        notes.append("no sampled step yet: only the loss was judged")
    summary = {
        "run": str(log.path),
        "model": log.meta.get("model"),
        "optimizer": log.meta.get("optimizer"),
        "every": log.meta.get("every"),
        "world_size": log.meta.get("world_size", 1),
        "steps": len(log.losses),
        "last_step": log.last_step,
        "samples": len(log.samples),
        "final_loss": log.losses[-1] if log.losses else None,
        "rules": list(RUN_FINDINGS),
    }
    return CheckReport(findings=sorted(findings, key=lambda f: -severity_rank(f.severity)),
                       summary=summary, notes=notes)


def write_junit(report: Report, path: str | Path, fail_on: str = "error") -> Path:
    """Write the report as JUnit XML, atomically.

    One test case per rule, failed when its finding is at or above ``fail_on``.
    """
    found: dict[str, list[Finding]] = {}
    for finding in report.findings:  # most severe first
        found.setdefault(finding.id, []).append(finding)
    rules = list(report.summary.get("rules") or RUN_FINDINGS)
    rules = list(dict.fromkeys([*rules, *(f.id for f in report.findings)]))
    threshold = severity_rank(fail_on)
    suite = ET.Element("testsuite", name="nndiag.check", tests=str(len(rules)))
    failures = 0
    for finding_id in rules:
        case = ET.SubElement(suite, "testcase", classname="nndiag.check", name=finding_id)
        same_id = found.get(finding_id)
        if not same_id:
            continue
        finding = same_id[0]
        if severity_rank(finding.severity) >= threshold:
            failures += 1
            failure = ET.SubElement(case, "failure", type=finding.severity,
                                    message=finding.summary)
            fixes = "\n".join(f"fix {x.id}: {x.summary}" for x in finding.fixes)
            others = "\n".join(f"also [{f.severity}] {f.summary}" for f in same_id[1:])
            failure.text = "\n".join(p for p in (finding.explanation, fixes, others) if p)
        else:
            ET.SubElement(case, "system-out").text = "\n".join(
                f"[{f.severity}] {f.summary}" for f in same_id)
    suite.set("failures", str(failures))
    suite.set("errors", "0")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(target, lambda temp: ET.ElementTree(suite).write(
        temp, encoding="utf-8", xml_declaration=True), prefix=".junit-")
