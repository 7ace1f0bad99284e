"""Pre-training sanity rules: pure functions of a ``SanityRecord``.

They follow Karpathy's "recipe for training neural networks".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from nndiag.findings import Finding

# Loss at init outside [expected / HIGH, expected * HIGH] is a warning, beyond VERY_HIGH an error.
INIT_LOSS_HIGH = 1.5
INIT_LOSS_VERY_HIGH = 3.0
# One small batch is "overfit" when its loss falls below this share of its starting value.
OVERFIT_FRACTION = 0.2
# An input gradient (or output change) from another sample above this share of the sample's
# own is batch mixing (float32 noise sits far below).
MIXING_RATIO = 1e-4


@dataclass
class SanityRecord:
    """The numbers the pre-training checks measured.

    Attributes:
        loss_at_init: Loss of the first batch before any update.
        expected_loss: What that loss should be for an uninformed model (log C for C-class
            cross-entropy, log 2 for binary), ``None`` when unknown.
        classes: Number of classes, for cross-entropy.
        not_updated: Trainable parameters with a gradient that one optimizer step left equal.
        overfit_losses: Loss of one small batch over the overfitting steps.
        overfit_batch_size: Samples in that batch.
        mixing_ratio: Largest influence of another sample's input on a sample's output,
            relative to its own input's (``None`` when it could not be measured).
        mixing_method: ``gradient`` (float inputs) or ``perturbation`` (integer inputs).
    """

    loss_at_init: float
    expected_loss: float | None = None
    classes: int | None = None
    not_updated: list[str] = field(default_factory=list)
    overfit_losses: list[float] = field(default_factory=list)
    overfit_batch_size: int = 0
    mixing_ratio: float | None = None
    mixing_method: str | None = None


def loss_at_init(record: SanityRecord) -> Finding | None:
    """The loss before training far from what an uninformed model should score."""
    expected = record.expected_loss
    if expected is None or expected <= 0 or not math.isfinite(record.loss_at_init):
        return None
    ratio = record.loss_at_init / expected
    if 1 / INIT_LOSS_HIGH <= ratio <= INIT_LOSS_HIGH:
        return None
    severity = "error" if ratio > INIT_LOSS_VERY_HIGH or ratio < 1 / INIT_LOSS_VERY_HIGH \
        else "warning"
    direction = "too high" if ratio > 1 else "too low"
    return Finding("loss_at_init_unexpected", severity, [],
                   f"loss at init {record.loss_at_init:.4g} is {direction}: an uninformed "
                   f"model scores {expected:.4g} (log {record.classes})",
                   evidence={"loss_at_init": record.loss_at_init, "expected": expected,
                             "ratio": ratio})


def parameters_not_updated(record: SanityRecord) -> Finding | None:
    """Trainable parameters with a gradient that an optimizer step did not change."""
    if not record.not_updated:
        return None
    names = record.not_updated
    return Finding("parameters_not_updated", "error", names,
                   f"{len(names)} trainable parameter(s) did not change after a step "
                   f"({', '.join(names[:4])}{' ...' if len(names) > 4 else ''})",
                   evidence={"parameters": names})


def cannot_overfit(record: SanityRecord) -> Finding | None:
    """One small batch that the model cannot drive to a low loss."""
    losses = [v for v in record.overfit_losses if math.isfinite(v)]
    if len(losses) < 2:
        return None
    first, best = losses[0], min(losses)
    floor = 0.0 if first >= 0 else first * 2
    if best - floor <= OVERFIT_FRACTION * (first - floor):
        return None
    return Finding("cannot_overfit_batch", "error", [],
                   f"{len(losses)} steps on one batch of {record.overfit_batch_size} took the "
                   f"loss only from {first:.4g} to {best:.4g}",
                   evidence={"first": first, "best": best, "steps": len(losses),
                             "batch_size": record.overfit_batch_size})


def batch_mixing(record: SanityRecord) -> Finding | None:
    """A sample's output depends on other samples' inputs."""
    if record.mixing_ratio is None or record.mixing_ratio <= MIXING_RATIO:
        return None
    influence = ("only on them" if math.isinf(record.mixing_ratio)
                 else f"{record.mixing_ratio:.2g} of its own input's influence")
    return Finding("batch_mixing", "error", [],
                   f"sample 0's output depends on other samples' inputs ({influence}, by "
                   f"{record.mixing_method})",
                   evidence={"ratio": record.mixing_ratio, "method": record.mixing_method})


SANITY_RULES = (loss_at_init, parameters_not_updated, cannot_overfit, batch_mixing)
