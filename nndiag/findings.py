"""Findings, fixes and the report that every command renders (text, JSON or figures)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any, ClassVar

from nndiag.records.lrcurve import Trial
from nndiag.records.rows import Row

SEVERITIES = ("info", "warning", "error")


class FindingId(str, Enum):
    """Every finding nndiag reports, by its stable id (other tools parse these).

    A ``FindingId`` is a ``str``: it compares equal to its id, and JSON writes the id. Code
    names a finding through this enum only; new ids may be added, existing ones keep their
    meaning.
    """

    VANISHING_GRADIENTS = "vanishing_gradients"
    EXPLODING_GRADIENTS = "exploding_gradients"
    DEAD_RELU = "dead_relu"
    SATURATED_ACTIVATIONS = "saturated_activations"
    POOR_INITIALIZATION = "poor_initialization"
    NAN_INF = "nan_inf"
    UNUSED_PARAMETERS = "unused_parameters"
    UPDATE_RATIO_HIGH = "update_ratio_high"
    UPDATE_RATIO_LOW = "update_ratio_low"
    LOSS_NOT_DECREASING = "loss_not_decreasing"
    LOSS_DIVERGING = "loss_diverging"
    LOSS_OSCILLATING = "loss_oscillating"
    LOSS_AT_INIT_UNEXPECTED = "loss_at_init_unexpected"
    CANNOT_OVERFIT_BATCH = "cannot_overfit_batch"
    BATCH_MIXING = "batch_mixing"
    DEAD_CHANNELS = "dead_channels"
    CHECKPOINT_MISMATCH = "checkpoint_mismatch"
    PARAMETERS_NOT_UPDATED = "parameters_not_updated"
    LR_CURVE_FLAT = "lr_curve_flat"
    LR_CURVE_NOISY = "lr_curve_noisy"
    LR_RANGE_TOO_NARROW = "lr_range_too_narrow"
    LR_CURVE_TOO_SHORT = "lr_curve_too_short"
    LR_TRIALS_DIVERGED = "lr_trials_diverged"
    ZERO_GRAD_MISSING = "zero_grad_missing"
    SOFTMAX_BEFORE_LOSS = "softmax_before_loss"
    TRAIN_MODE_OFF = "train_mode_off"
    LOSS_REDUCTION_SUM = "loss_reduction_sum"
    LABELS_MISALIGNED = "labels_misaligned"
    POST_LN_DEEP_STACK = "post_ln_deep_stack"
    AMP_SKIPPED_STEPS = "amp_skipped_steps"
    INPUTS_NOT_NORMALIZED = "inputs_not_normalized"
    ACCUMULATION_UNSCALED = "accumulation_unscaled"

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)

    __format__ = str.__format__


def severity_rank(severity: str) -> int:
    """Order of a severity: info < warning < error."""
    return SEVERITIES.index(severity)


def validate_severity(value: str | None, what: str, *, optional: bool = False) -> str | None:
    """``value`` if it is a severity (or ``None`` when ``optional``), else a ``UsageError``."""
    if value not in SEVERITIES and not (optional and value is None):
        from nndiag.errors import UsageError

        choices = ", ".join(SEVERITIES) + (" or None" if optional else "")
        raise UsageError(f"{what} must be one of {choices}, got {value!r}")
    return value


def worst_severity(*severities: str | None) -> str | None:
    """The most severe of several verdicts (``None`` when there is none)."""
    present = [s for s in severities if s is not None]
    return max(present, key=severity_rank) if present else None


@dataclass
class Fix:
    """A recommended change.

    Attributes:
        id: A fix id of the catalogue (``nndiag.advice.catalog``: ``he_init``...).
        summary: One line saying what to change.
        code: The concrete torch call(s), ready to paste.
        automatic: True when ``--try-fixes`` can apply it to a copy and re-measure.
        verified: Before/after measurements once the fix was tried, else ``None``.

    """

    id: str
    summary: str
    code: str = ""
    automatic: bool = False
    verified: dict[str, Any] | None = None


@dataclass
class Finding:
    """One diagnosed problem.

    Attributes:
        id: A finding id (``FindingId``: ``vanishing_gradients``...).
        severity: ``info``, ``warning`` or ``error``.
        layers: Names of the layers involved, in forward order.
        summary: One line.
        explanation: Why, in terms of the model's own layers, with numbers.
        evidence: The numbers the rule judged.
        fixes: Recommended fixes, most effective first.

    """

    id: str
    severity: str
    layers: list[str]
    summary: str
    explanation: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    fixes: list[Fix] = field(default_factory=list)


@dataclass
class Report:
    """The result of a command: findings plus the data they were judged on.

    A command with top-level data of its own (lr-find's curve) subclasses it, adds its fields
    and lists its JSON keys in ``json_fields``; ``status``, ``fails``, ``finding`` and
    ``to_dict`` are shared.

    Attributes:
        schema: ``nndiag.<command>/<version>``.
        findings: Findings, most severe first.
        layers: Per-layer rows: typed records (``nndiag.records.rows.Row``) that also read
            like their JSON objects.
        summary: Facts about the model and the probe.
        notes: Things the user should know that are not findings (unmeasured layers...).
        json_fields: The top-level keys of the JSON contract after ``schema`` and ``status``,
            in order (a class attribute; a subclass sets its own).

    """

    json_fields: ClassVar[tuple[str, ...]] = ("findings", "layers", "summary", "notes")

    schema: str
    findings: list[Finding] = field(default_factory=list)
    layers: list[Row] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        """``ok`` with no warning or error, else the highest severity found."""
        worst = max((severity_rank(f.severity) for f in self.findings), default=0)
        return "ok" if worst == 0 else SEVERITIES[worst]

    def fails(self, fail_on: str) -> bool:
        """True when a finding is at or above ``fail_on`` (``warning`` or ``error``).

        Raises:
            UsageError: ``fail_on`` is not a severity.
        """
        validate_severity(fail_on, "fail_on")
        threshold = severity_rank(fail_on)
        return any(severity_rank(f.severity) >= threshold for f in self.findings)

    def finding(self, finding_id: str) -> Finding | None:
        """The finding with this id, if any."""
        return next((f for f in self.findings if f.id == finding_id), None)

    def to_dict(self) -> dict[str, Any]:
        """The JSON contract as plain data: schema, status, then ``json_fields``."""
        data = asdict(replace(self, layers=[]))
        data["layers"] = [row.to_dict() for row in self.layers]
        return {"schema": self.schema, "status": self.status,
                **{name: data[name] for name in self.json_fields}}

    def _repr_html_(self) -> str:
        """The report as HTML for Jupyter, figures included (``nndiag.render.html``)."""
        from nndiag.render.html import report_html

        return report_html(self)


@dataclass
class InspectReport(Report):
    """``nndiag inspect`` on a live model: ``layers`` are ``LayerRecord`` rows."""

    schema: str = "nndiag.inspect/1"


@dataclass
class CheckpointReport(Report):
    """``nndiag inspect`` on a checkpoint without data: ``layers`` are ``ModuleWeights`` rows."""

    schema: str = "nndiag.inspect-checkpoint/1"


@dataclass
class CheckReport(Report):
    """``nndiag check``: a recorded run, or the gate on training code (no ``layers``)."""

    schema: str = "nndiag.check/1"


@dataclass(kw_only=True)
class LRFindResult(Report):
    """The range test and its suggestion: a ``Report`` with the curve at the top level.

    ``status``, ``fails``, ``finding`` and ``to_dict`` come from ``Report``; the JSON
    contract (``nndiag.lr-find/1``) has no ``layers`` or ``notes`` (they stay empty).

    Attributes:
        suggested_lr: The learning rate to start training with (``None`` if unreadable).
        lr_low: Lower end of the useful range.
        lr_high: Upper end (the smoothed minimum).
        lrs: Learning rate of each step (for the first param group).
        losses: Loss recorded at each step (mean over ``accumulate`` micro-batches).
        smoothed: The smoothed curve the suggestion was read from.
        stopped_because: ``completed``, ``diverged`` or ``non_finite_loss``.
        reason: Why the suggestion, in words.
        findings: Warnings about the curve.
        summary: Settings of the sweep (optimizer, steps, range, group ratios).
        curve_lr: The suggestion read from the curve alone (what ``trials=0`` returns).
        trials: One ``Trial`` per candidate: ``lr``, ``steps`` run, ``loss`` on the fixed batches
            (``None``: diverged), ``diverged``; empty when the trial stage was skipped.
    """

    json_fields: ClassVar[tuple[str, ...]] = (
        "suggested_lr", "lr_low", "lr_high", "lrs", "losses", "smoothed", "stopped_because",
        "reason", "findings", "summary", "curve_lr", "trials")

    schema: str = "nndiag.lr-find/1"
    suggested_lr: float | None
    lr_low: float | None
    lr_high: float | None
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    stopped_because: str
    reason: str
    curve_lr: float | None = None
    trials: list[Trial] = field(default_factory=list)
