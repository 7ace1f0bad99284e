"""Pre-training sanity rules: pure functions of a ``SanityRecord``.

They follow Karpathy's "recipe for training neural networks", and judge the training step as
it ran (the user's own step, or nndiag's): ``nndiag.training_check`` watches it from outside
(gradients before and after each call, module modes, the tensors fed to the loss) and records
plain numbers here; every root cause is told apart from its look-alike:

- ``zero_grad_missing``: the gradient an optimizer step applied is still in ``.grad`` when the
  next backward pass adds to it. Gradient accumulation adds to ``.grad`` too, but only to
  gradients no step has applied yet (it zeroes after each optimizer step).
- ``softmax_before_loss``: a logit loss receives probabilities (rows in [0, 1] summing to 1, or
  the output of softmax/sigmoid). Log-probabilities (log_softmax) are what ``nll_loss``
  expects and are harmless in ``cross_entropy``: they are not flagged.
- ``train_mode_off``: a module whose behaviour depends on the mode (dropout, BatchNorm, or any
  module whose output changes with it) ran in eval mode during the step. A model without such
  modules computes the same thing in both modes: not flagged. Only part of the model in eval
  mode (frozen BatchNorm while fine-tuning) is reported as info.
- ``loss_reduction_sum``: the loss of a batch is the sum of its halves' losses, not their mean.
  A loss averaged by hand (``sum() / len(y)``) is a mean: not flagged.
- ``labels_misaligned``: the model can memorize one batch, yet training on the data's own
  pairing of inputs and targets predicts a held-out batch no better than training on the same
  batches with their targets shuffled: the pairing carries no information.
"""

from __future__ import annotations

import math
from typing import Any

from nndiag.findings import Finding, FindingId
from nndiag.records.sanity import SanityRecord

# Loss at init outside [expected / HIGH, expected * HIGH] is a warning, beyond VERY_HIGH an error.
INIT_LOSS_HIGH = 1.5
INIT_LOSS_VERY_HIGH = 3.0
# An unchanged parameter whose gradient's RMS is below this share of the median parameter's
# was not failed by the optimizer: its gradient vanishes by construction (a bias followed by a
# normalization, which removes any constant shift: ~1e-6 of the others' in float32), and the
# step's change rounds away. A parameter the optimizer misses gets a gradient like any other's.
NEGLIGIBLE_GRADIENT = 1e-4
# One small batch is "overfit" when its loss falls below this share of its starting value.
OVERFIT_FRACTION = 0.2
# A batch whose loss fell by this share of its starting gap over the last third of the steps
# is still being learned: the check ran out of steps (a healthy 2-block GPT-2 on 8 sequences of
# random tokens at AdamW 1e-3 is at a quarter of its starting loss after 100 steps, and
# falling), which is no error; a model that cannot learn has flattened out by then.
STILL_LEARNING = 0.1
# An input gradient (or output change) from another sample above this share of the sample's
# own is batch mixing (float32 noise sits far below).
MIXING_RATIO = 1e-4
# A batch's loss over the batch-weighted mean of its two halves' losses: 1 for a mean, 2 for a
# sum (a penalty that does not depend on the batch pulls a sum towards 1; 1.5 splits the two).
SUM_REDUCTION_RATIO = 1.5
# Held-out loss: training on the data's pairing must beat training on shuffled targets by this
# share of the held-out loss at init. Measured over 4 seeds (30 steps, one held-out batch):
# healthy MLPs with and without BatchNorm 6% to 9%, a BatchNorm ResNet on 4 batches of 16
# images 3.3% to 6%, the CI-gate guide's example 35% to 39%; targets shifted by one sample, or
# inputs sorted apart from their targets, -4.4% to +1.1%. (More held-out batches, or the
# training losses instead, separated the two groups less.)
LABEL_GAIN = 0.02
# The loss functions that expect logits (or log-probabilities), and what each expects.
LOGIT_LOSSES = {"cross_entropy": "logits", "nll_loss": "log-probabilities",
                "binary_cross_entropy_with_logits": "logits", "kl_div": "log-probabilities"}


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
    return Finding(FindingId.LOSS_AT_INIT_UNEXPECTED, severity, [],
                   f"loss at init {record.loss_at_init:.4g} is {direction}: an uninformed "
                   f"model scores {expected:.4g} (log {record.classes})",
                   evidence={"loss_at_init": record.loss_at_init, "expected": expected,
                             "ratio": ratio})


def parameters_not_updated(record: SanityRecord) -> Finding | None:
    """Trainable parameters with a gradient that an optimizer step did not change.

    Parameters whose gradient is negligible by construction (``NEGLIGIBLE_GRADIENT``) are an
    ``info`` when nothing else is unchanged, and listed in the evidence otherwise.
    """
    negligible = record.negligible_gradients
    if not record.not_updated and negligible:
        names = list(negligible)
        worst = max(negligible.values())
        return Finding(FindingId.PARAMETERS_NOT_UPDATED, "info", names,
                       f"{len(names)} parameter(s) with a vanishing gradient stayed as they were "
                       f"({', '.join(names[:4])}{' ...' if len(names) > 4 else ''}: gradient "
                       f"RMS at most {worst:.1e} of the median parameter's)",
                       evidence={"parameters": names, "reason": "negligible_gradient",
                                 "relative_gradients": dict(negligible),
                                 "optimizer_steps": record.optimizer_steps,
                                 "step_calls": record.step_calls})
    if not record.not_updated:
        return None
    names = record.not_updated
    why = {"no_step": ": optimizer.step() was never called",
           "zeroed_before_step": ": their gradient was zero when optimizer.step() ran"}
    return Finding(FindingId.PARAMETERS_NOT_UPDATED, "error", names,
                   f"{len(names)} trainable parameter(s) did not change after a step "
                   f"({', '.join(names[:4])}{' ...' if len(names) > 4 else ''})"
                   f"{why.get(record.not_updated_reason or '', '')}",
                   evidence={"parameters": names, "reason": record.not_updated_reason,
                             "optimizer_steps": record.optimizer_steps,
                             "step_calls": record.step_calls,
                             "negligible_gradients": dict(negligible)})


def cannot_overfit(record: SanityRecord) -> Finding | None:
    """One small batch that the model cannot drive to a low loss."""
    losses = [v for v in record.overfit_losses if math.isfinite(v)]
    if len(losses) < 2:
        return None
    first, best = losses[0], min(losses)
    floor = 0.0 if first >= 0 else first * 2
    if best - floor <= OVERFIT_FRACTION * (first - floor):
        return None
    before_last_third = min(losses[: max(1, len(losses) * 2 // 3)])
    still_learning = before_last_third - best >= STILL_LEARNING * (first - floor)
    summary = (f"{len(losses)} steps on one batch of {record.overfit_batch_size} took the "
               f"loss only from {first:.4g} to {best:.4g}")
    if still_learning:
        summary += ", still falling: the check ran out of steps"
    return Finding(FindingId.CANNOT_OVERFIT_BATCH, "info" if still_learning else "error", [],
                   summary,
                   evidence={"first": first, "best": best, "steps": len(losses),
                             "batch_size": record.overfit_batch_size,
                             "before_last_third": before_last_third,
                             "still_learning": still_learning})


def batch_mixing(record: SanityRecord) -> Finding | None:
    """A sample's output depends on other samples' inputs."""
    if record.mixing_ratio is None or record.mixing_ratio <= MIXING_RATIO:
        return None
    influence = ("only on them" if math.isinf(record.mixing_ratio)
                 else f"{record.mixing_ratio:.2g} of its own input's influence")
    return Finding(FindingId.BATCH_MIXING, "error", [],
                   f"sample 0's output depends on other samples' inputs ({influence}, by "
                   f"{record.mixing_method})",
                   evidence={"ratio": record.mixing_ratio, "method": record.mixing_method})


def zero_grad_missing(record: SanityRecord) -> Finding | None:
    """A gradient an optimizer step applied, still in ``.grad`` at the next backward pass."""
    if not record.carried_steps:
        return None
    names = record.carried_parameters
    ratio = record.carried_ratio
    return Finding(FindingId.ZERO_GRAD_MISSING, "error", names,
                   f"the gradient applied by optimizer.step() was still in .grad when the next "
                   f"backward() added to it (after {record.carried_steps} of "
                   f"{record.steps_checked} steps, {len(names)} parameter tensor(s))",
                   evidence={"carried_steps": record.carried_steps,
                             "steps_checked": record.steps_checked,
                             "optimizer_steps": record.optimizer_steps,
                             "step_calls": record.step_calls,
                             "backward_per_step": record.backward_per_step,
                             "stale_to_fresh": ratio, "parameters": names})


def softmax_before_loss(record: SanityRecord) -> Finding | None:
    """A logit loss fed probabilities."""
    call = next((c for c in record.loss_calls if c.get("input") == "probabilities"
                 and c.get("name") in LOGIT_LOSSES), None)
    if call is None:
        return None
    name, classes = call["name"], call.get("classes")
    evidence: dict[str, Any] = {"loss": name, "expects": LOGIT_LOSSES[name],
                                "produced_by": call.get("produced_by"),
                                "where": call.get("where"), "classes": classes}
    if name == "cross_entropy" and classes and classes >= 2:
        # Probabilities as logits: the best case (1 for the target, 0 elsewhere) scores
        # -log(e / (e + C - 1)), a floor the model can never go below.
        evidence["floor"] = math.log(1 + (classes - 1) / math.e)
    finite = [v for v in record.overfit_losses if math.isfinite(v)]
    if finite:
        evidence["overfit_best"] = min(finite)
    source = f" from {call['produced_by']}" if call.get("produced_by") else ""
    shape = ("values in [0, 1]" if call.get("produced_by") == "sigmoid"
             else "rows in [0, 1] summing to 1")
    return Finding(FindingId.SOFTMAX_BEFORE_LOSS, "error", [call["where"]] if call.get("where")
                   not in (None, "step", "forward") else [],
                   f"{name} receives probabilities{source} ({shape}) where it expects "
                   f"{LOGIT_LOSSES[name]}", evidence=evidence)


def train_mode_off(record: SanityRecord) -> Finding | None:
    """Dropout, BatchNorm (or another mode-dependent module) in eval mode during the step."""
    if not record.eval_modules and not (record.eval_root and record.mode_changes_output):
        return None
    if record.mode_changes_output is False:
        return None
    names = record.eval_modules
    labels = [f"{n}: {k}" for n, k in zip(names, record.eval_kinds, strict=False)] or names
    listed = f" ({', '.join(labels[:4])}{' ...' if len(labels) > 4 else ''})" if names else ""
    if record.eval_root:
        return Finding(FindingId.TRAIN_MODE_OFF, "error", names,
                       f"the training step ran the model in eval mode: {len(names)} "
                       f"mode-dependent module(s){listed} trained as at inference",
                       evidence={"modules": names, "whole_model": True,
                                 "output_changes_in_train_mode": record.mode_changes_output})
    return Finding(FindingId.TRAIN_MODE_OFF, "info", names,
                   f"{len(names)} mode-dependent module(s){listed} ran in eval mode while the "
                   "rest of the model trained", evidence={
                       "modules": names, "whole_model": False,
                       "output_changes_in_train_mode": record.mode_changes_output})


def loss_reduction_sum(record: SanityRecord) -> Finding | None:
    """A loss that adds up the samples of a batch instead of averaging them."""
    ratio = record.reduction_ratio
    if ratio is None or not math.isfinite(ratio) or ratio < SUM_REDUCTION_RATIO:
        return None
    full, *halves = record.reduction_losses
    declared = sorted({c["reduction"] for c in record.loss_calls if c.get("reduction")})
    return Finding(FindingId.LOSS_REDUCTION_SUM, "warning", [],
                   f"the loss grows with the batch size: {record.batch_size} samples score "
                   f"{full:.4g}, {ratio:.2f}x the mean of their halves' losses "
                   f"({', '.join(f'{h:.4g}' for h in halves)}): a sum, not a mean",
                   evidence={"ratio": ratio, "batch_size": record.batch_size,
                             "losses": record.reduction_losses, "reduction": declared})


def labels_misaligned(record: SanityRecord) -> Finding | None:
    """A model that memorizes one batch but learns nothing general from the data's pairing."""
    held = record.heldout
    if not held or cannot_overfit(record) is not None or len(record.overfit_losses) < 2:
        return None
    init, paired, shuffled = held["init"], held["paired"], held["shuffled"]
    if not all(math.isfinite(v) for v in (init, paired, shuffled)) or init <= 0:
        return None
    gain = shuffled - paired
    if gain >= LABEL_GAIN * init:
        return None
    return Finding(FindingId.LABELS_MISALIGNED, "warning", [],
                   f"after {record.label_steps} steps, a held-out batch scores {paired:.4g} "
                   f"when trained on the data's input-target pairs and {shuffled:.4g} with the "
                   f"targets shuffled (at init: {init:.4g}): the pairing teaches nothing, "
                   "although one batch can be memorized",
                   evidence={"heldout_init": init, "heldout_paired": paired,
                             "heldout_shuffled": shuffled, "gain": gain,
                             "steps": record.label_steps})
