"""One registry of every rule: the findings it may report and the context record it reads.

A rule is a pure function ``check(context, thresholds)`` of one context record (a live probe's
``ProbeRecord``, a checkpoint's ``CheckpointRecord``, a recorded run's ``RunLog``, the gate's
``SanityRecord``, lr-find's ``LRCurveRecord`` and ``TrialsRecord``) that returns its findings.
``run_rules(context)`` runs every rule of that context; ``finding_ids(context_type)`` lists what
they can report (the JUnit cases of a check, the rules a report names). Adding a finding is
adding its rule here, its advice and its test. ``nndiag.diagnosis.diagnose`` runs the rules,
their advice and the root-cause links in one call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from nndiag.findings import Finding, FindingId, severity_rank
from nndiag.records import CheckpointRecord, LoadResult, ProbeRecord, SanityRecord
from nndiag.records.lrcurve import LRCurveRecord, TrialsRecord
from nndiag.rules import (
    activations,
    architecture,
    checkpoint,
    gradients,
    integrity,
    lrcurve,
    run,
    sanity,
)
from nndiag.rules.thresholds import CHECKPOINT_THRESHOLDS, RUN_THRESHOLDS, THRESHOLDS, Threshold
from nndiag.runlog import RunLog

Check = Callable[[Any, dict[str, Threshold]], "Finding | Sequence[Finding] | None"]


@dataclass(frozen=True)
class Rule:
    """One rule of the registry.

    Attributes:
        ids: The findings it may report.
        context: The record type it reads.
        check: ``check(context, thresholds)`` -> a finding, several, or ``None``.
        on_nonfinite: It still runs when a probe holds NaN or Inf (the other statistics of such
            a probe are not meaningful).
        headline: For a probe's rule, the numbers it judges, measured the same way before
            and after a fix (``--try-fixes``).
    """

    ids: tuple[FindingId, ...]
    context: type
    check: Check
    on_nonfinite: bool = False
    headline: Callable[[Any], dict[str, float | None]] | None = None


def _sanity(rule: Callable[[SanityRecord], Finding | None]) -> Check:
    return lambda record, thresholds: rule(record)


F = FindingId
RULES: tuple[Rule, ...] = (
    # A live probe: forward and backward on a few batches.
    Rule((F.NAN_INF,), ProbeRecord, integrity.nan_inf, on_nonfinite=True,
         headline=integrity.nan_inf_headline),
    Rule((F.INPUTS_NOT_NORMALIZED,), ProbeRecord, integrity.inputs_not_normalized,
         headline=integrity.input_scale_headline),
    Rule((F.POST_LN_DEEP_STACK,), ProbeRecord, architecture.post_ln_deep_stack,
         headline=architecture.post_ln_headline),
    Rule((F.VANISHING_GRADIENTS,), ProbeRecord, gradients.vanishing_gradients,
         headline=gradients.vanishing_headline),
    Rule((F.EXPLODING_GRADIENTS,), ProbeRecord, gradients.exploding_gradients,
         headline=gradients.exploding_headline),
    Rule((F.POOR_INITIALIZATION,), ProbeRecord, activations.poor_initialization,
         headline=activations.drift_headline),
    # The probed model's own weights, read as a checkpoint's are: the mechanisms a probe does
    # not measure (a family's init scale, BatchNorm gains, blocks with no normalization).
    Rule((F.POOR_INITIALIZATION,), ProbeRecord, checkpoint.probed_weights, on_nonfinite=True,
         headline=activations.drift_headline),
    Rule((F.DEAD_RELU,), ProbeRecord, activations.dead_relu,
         headline=activations.dead_headline),
    Rule((F.SATURATED_ACTIVATIONS,), ProbeRecord, activations.saturated_activations,
         headline=activations.saturation_headline),
    Rule((F.UNUSED_PARAMETERS,), ProbeRecord, integrity.unused_parameters, on_nonfinite=True,
         headline=integrity.unused_headline),
    # A checkpoint's weights, without data (a live inspection reads its weights so too).
    Rule((F.NAN_INF,), CheckpointRecord, checkpoint.nonfinite_weights),
    Rule((F.POOR_INITIALIZATION,), CheckpointRecord, checkpoint.poor_initialization),
    Rule((F.DEAD_CHANNELS,), CheckpointRecord, checkpoint.dead_channels),
    # A checkpoint loaded non-strictly into the user's architecture.
    Rule((F.CHECKPOINT_MISMATCH,), LoadResult, checkpoint.checkpoint_mismatch),
    # A recorded run.
    Rule((F.NAN_INF,), RunLog, run.nan_inf),
    Rule((F.INPUTS_NOT_NORMALIZED,), RunLog, run.inputs_not_normalized),
    Rule((F.ACCUMULATION_UNSCALED,), RunLog, run.accumulation_unscaled),
    Rule((F.DEAD_RELU,), RunLog, run.dead_units),
    Rule((F.LOSS_DIVERGING, F.LOSS_NOT_DECREASING, F.LOSS_OSCILLATING), RunLog,
         run.loss_findings),
    Rule((F.VANISHING_GRADIENTS, F.EXPLODING_GRADIENTS), RunLog, run.gradient_trends),
    Rule((F.UPDATE_RATIO_HIGH, F.UPDATE_RATIO_LOW), RunLog, run.update_ratios),
    Rule((F.ZERO_GRAD_MISSING,), RunLog, run.zero_grad_missing),
    Rule((F.AMP_SKIPPED_STEPS,), RunLog, run.amp_skipped_steps),
    # The CI gate's checks of the user's training step.
    Rule((F.ZERO_GRAD_MISSING,), SanityRecord, _sanity(sanity.zero_grad_missing)),
    Rule((F.SOFTMAX_BEFORE_LOSS,), SanityRecord, _sanity(sanity.softmax_before_loss)),
    Rule((F.TRAIN_MODE_OFF,), SanityRecord, _sanity(sanity.train_mode_off)),
    Rule((F.LOSS_REDUCTION_SUM,), SanityRecord, _sanity(sanity.loss_reduction_sum)),
    Rule((F.LOSS_AT_INIT_UNEXPECTED,), SanityRecord, _sanity(sanity.loss_at_init)),
    Rule((F.PARAMETERS_NOT_UPDATED,), SanityRecord, _sanity(sanity.parameters_not_updated)),
    Rule((F.CANNOT_OVERFIT_BATCH,), SanityRecord, _sanity(sanity.cannot_overfit)),
    Rule((F.LABELS_MISALIGNED,), SanityRecord, _sanity(sanity.labels_misaligned)),
    Rule((F.BATCH_MIXING,), SanityRecord, _sanity(sanity.batch_mixing)),
    # lr-find: the range test's curve, then the trial trainings.
    Rule((F.LR_CURVE_TOO_SHORT,), LRCurveRecord, lrcurve.curve_too_short),
    Rule((F.LR_CURVE_FLAT,), LRCurveRecord, lrcurve.curve_flat),
    Rule((F.LR_CURVE_NOISY,), LRCurveRecord, lrcurve.curve_noisy),
    Rule((F.LR_RANGE_TOO_NARROW,), LRCurveRecord, lrcurve.range_too_narrow),
    Rule((F.LR_TRIALS_DIVERGED,), TrialsRecord, lrcurve.trials_diverged),
)


def finding_ids(context: type) -> tuple[FindingId, ...]:
    """Every finding the rules of a context type may report, in registry order, once each."""
    return tuple(dict.fromkeys(i for rule in RULES if rule.context is context
                               for i in rule.ids))


def _as_list(found: Finding | Sequence[Finding] | None) -> list[Finding]:
    if found is None:
        return []
    return [found] if isinstance(found, Finding) else list(found)


def run_rules(context: Any, thresholds: dict[str, Threshold] | None = None) -> list[Finding]:
    """Run every rule of the context's type: its findings, most severe first.

    When a probe holds NaN or Inf, only the rules that mean something then run. Two rules of
    one context that report the same finding id describe one problem: the worse finding is kept
    (the earlier rule's on a tie), the other listed in its evidence under ``also``.

    Args:
        context: A ``ProbeRecord``, ``CheckpointRecord``, ``LoadResult``, ``RunLog`` or
            ``SanityRecord``.
        thresholds: Override thresholds by name (the defaults: every table of
            ``rules/thresholds.py``).
    """
    merged = {**THRESHOLDS, **RUN_THRESHOLDS, **CHECKPOINT_THRESHOLDS, **(thresholds or {})}
    rules = [rule for rule in RULES if isinstance(context, rule.context)]
    findings: list[Finding] = []
    if isinstance(context, ProbeRecord) and not context.finite:
        rules = [rule for rule in rules if rule.on_nonfinite]
    for rule in rules:
        for finding in _as_list(rule.check(context, merged)):
            findings = _merge_same_id(findings, finding)
    return sorted(findings, key=lambda f: -severity_rank(f.severity))


def _merge_same_id(findings: list[Finding], extra: Finding) -> list[Finding]:
    """Add a finding of a later rule: one finding per id, the worse kept."""
    same = next((f for f in findings if f.id == extra.id), None)
    if same is None:
        return [*findings, extra]
    kept, other = ((same, extra) if severity_rank(same.severity) >= severity_rank(extra.severity)
                   else (extra, same))
    kept.evidence.setdefault("also", []).append(
        {"mechanism": other.evidence.get("mechanism") or "probe", "severity": other.severity,
         "summary": other.summary})
    return [kept if f is same else f for f in findings]
