"""``check_run``: judge a recorded run; JUnit XML for CI systems."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from nndiag.advice import advise_run
from nndiag.errors import UsageError
from nndiag.files import write_atomic
from nndiag.findings import Finding, Report, severity_rank
from nndiag.findings import FindingId as F
from nndiag.rules.registry import diagnose, finding_ids
from nndiag.rules.thresholds import Threshold
from nndiag.runlog import RunLog, read_run

SCHEMA = "nndiag.check/1"
# Every finding a run check can report: each becomes one JUnit test case.
RUN_FINDINGS = finding_ids(RunLog)
# What a bug in the training code makes the loss and the gradients look like: when the root
# cause is found, these symptoms are tagged with it (``evidence["explained_by"]``), and their
# learning-rate advice gives way to it.
# (A step that cannot train makes the labels check fail too: training on the data's pairing
# then beats shuffled targets no more than a broken step allows.)
EXPLAINS: dict[str, tuple[str, ...]] = {
    F.ZERO_GRAD_MISSING: (F.LOSS_DIVERGING, F.LOSS_OSCILLATING, F.LOSS_NOT_DECREASING,
                          F.EXPLODING_GRADIENTS, F.UPDATE_RATIO_HIGH, F.DEAD_RELU,
                          F.CANNOT_OVERFIT_BATCH, F.LABELS_MISALIGNED),
    F.SOFTMAX_BEFORE_LOSS: (F.CANNOT_OVERFIT_BATCH, F.LOSS_NOT_DECREASING, F.UPDATE_RATIO_LOW,
                            F.LABELS_MISALIGNED),
    F.TRAIN_MODE_OFF: (F.CANNOT_OVERFIT_BATCH, F.LOSS_NOT_DECREASING, F.LABELS_MISALIGNED),
    F.LOSS_REDUCTION_SUM: (F.LOSS_DIVERGING, F.LOSS_OSCILLATING, F.EXPLODING_GRADIENTS,
                           F.UPDATE_RATIO_HIGH, F.DEAD_RELU),
    F.LABELS_MISALIGNED: (F.LOSS_NOT_DECREASING,),
    F.PARAMETERS_NOT_UPDATED: (F.LOSS_NOT_DECREASING, F.UPDATE_RATIO_LOW,
                               F.CANNOT_OVERFIT_BATCH, F.LABELS_MISALIGNED),
    F.BATCH_MIXING: (F.CANNOT_OVERFIT_BATCH, F.LOSS_NOT_DECREASING, F.LABELS_MISALIGNED),
}
_LR_FIXES = ("raise_learning_rate", "lower_learning_rate", "lr_warmup")


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
    findings = [advise_run(f, log) for f in diagnose(log, thresholds)]
    report = build_run_report(log, explain_symptoms(findings))
    if log.skipped_steps:
        report.summary["skipped_steps"] = len(log.skipped_steps)
    return report


def explain_symptoms(findings: list[Finding]) -> list[Finding]:
    """Tag the findings that a root cause found alongside them explains.

    A symptom of a root cause (``EXPLAINS``) gets ``evidence["explained_by"]``, an explanation
    that starts by naming the cause, and loses its learning-rate fixes: changing the learning
    rate does not fix a bug in the training code. When the cause is an error, the symptom is
    lowered to ``info``: the gate still fails, on the cause.

    Args:
        findings: Findings of one check (any phase), advised already.

    Returns:
        The same findings, most severe first.
    """
    causes = [f for f in findings if f.id in EXPLAINS]
    for finding in findings:
        explained = sorted((c for c in causes if finding.id in EXPLAINS[c.id]),
                           key=lambda c: -severity_rank(c.severity))
        if not explained:
            continue
        cause = explained[0]
        finding.evidence["explained_by"] = list(dict.fromkeys(c.id for c in explained))
        finding.explanation = (f"Probably a consequence of {cause.id} (see it): fix that first."
                               + (f" {finding.explanation}" if finding.explanation else ""))
        finding.fixes = [x for x in finding.fixes if x.id not in _LR_FIXES]
        if cause.severity == "error":
            finding.severity = "info"
    return sorted(findings, key=lambda f: -severity_rank(f.severity))


def build_run_report(log: RunLog, findings: list) -> Report:
    """The check report of a run log and its findings."""
    notes = []
    if log.skipped_lines:
        notes.append(f"{log.skipped_lines} unreadable line(s) skipped (a run cut short while "
                     "writing)")
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
    return Report(SCHEMA, sorted(findings, key=lambda f: -severity_rank(f.severity)), [],
                  summary, notes)


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
