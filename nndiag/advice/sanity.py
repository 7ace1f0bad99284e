"""Advice on the sanity checks of the CI gate.

The pre-training checks (loss at init, parameters the optimizer skips, overfitting one batch,
batch mixing) with the root causes found by watching the training step (gradients never
zeroed, probabilities fed to a logit loss, eval mode during training, a loss summed over the
batch, inputs and targets apart). Each root cause's fix is the code change, never a learning
rate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nndiag.advice.catalog import make_fix
from nndiag.advice.common import SANITY, Advisor, fmt
from nndiag.findings import Finding, FindingId, Fix

if TYPE_CHECKING:
    from nndiag.records import SanityRecord

# ----------------------------------------------------------------------------- pre-training


def loss_at_init_unexpected(finding: Finding, record: SanityRecord) -> tuple[str, list[Fix]]:
    """A loss at init far above chance (confidently wrong) or below it (a leak)."""
    ev = finding.evidence
    if ev["ratio"] > 1:
        return (f"Before training the loss is {ev['ratio']:.1f}x what a model that knows "
                f"nothing scores ({ev['expected']:.4g} = log of the class count): the model "
                "starts confidently wrong, usually because the last layer's outputs are too "
                "large. Training first has to undo that."), [
                    make_fix("xavier_init", "output_layer")]
    return (f"Before training the loss is only {ev['ratio']:.2f}x the log of the class count: "
            "the model already knows the answer, which usually means the labels leak into "
            "the inputs, or the loss is computed on the wrong tensors."), []


def parameters_not_updated(finding: Finding, record: SanityRecord) -> tuple[str, list[Fix]]:
    """Parameters with a gradient that the optimizer step left as they were."""
    reason = finding.evidence.get("reason")
    if reason == "negligible_gradient":
        return ("These parameters' gradients are a rounding error of the others' (shown as a "
                "share of the median parameter's gradient RMS), so a step cannot move them in "
                "float32. That follows from the architecture, not from the training code: a "
                "bias followed by BatchNorm, LayerNorm or GroupNorm is cancelled by the "
                "normalization's re-centring, so the loss does not depend on it. Harmless; "
                "bias=False on that layer saves the parameter."), []
    if reason == "no_step":
        return (f"backward() produced gradients, but in {record.step_calls} calls of the "
                "training step optimizer.step() was never called on the optimizer the step was "
                "given, so nothing moved (accumulating over more micro-batches than that "
                "would look the same: then this is expected)."), [
                    make_fix("optimizer_params", "step_call")]
    if reason == "zeroed_before_step":
        return ("backward() produced gradients for these parameters, but .grad was zero (or "
                "None) every time optimizer.step() ran: optimizer.zero_grad() is called between "
                "loss.backward() and optimizer.step(), wiping the gradient just before it is "
                "applied."), [make_fix("zero_grad", "order")]
    return ("These parameters receive a gradient, but one optimizer step left them exactly as "
            "they were: they are missing from the optimizer's parameter groups, or their "
            "group's learning rate is zero."), [make_fix("optimizer_params")]


def cannot_overfit_batch(finding: Finding, record: SanityRecord) -> tuple[str, list[Fix]]:
    """A model that cannot drive one small batch's loss to zero, and what else could cause it."""
    ev = finding.evidence
    if ev.get("still_learning"):
        return (f"The loss of {ev['batch_size']} samples fell from {ev['first']:.4g} to "
                f"{ev['best']:.4g} in {ev['steps']} steps and was still falling over the last "
                f"third of them ({ev['before_last_third']:.4g} before it): the batch is being "
                "learned, more slowly than the check allows for. Give it more steps "
                "(--overfit-steps) or a higher learning rate to see it reach zero."), [
                    make_fix("raise_learning_rate")]
    parts = [f"A healthy model drives the loss of {ev['batch_size']} samples close to zero "
             f"within {ev['steps']} steps; this one went from {ev['first']:.4g} to "
             f"{ev['best']:.4g}. Common causes: the forward pass ignores its input or cuts the "
             "graph (detach(), torch.no_grad(), .data); inputs and targets shuffled apart "
             "differently on every call; a loss that cannot reach zero (probabilities fed to a "
             "logit loss, a target outside the output's range); a learning rate far too low, "
             "or so high that the loss bounces; too little capacity, or strong regularization "
             "(dropout, weight decay) on a handful of samples."]
    ruled_out = []
    if record.loss_calls and not any(c.get("input") == "probabilities"
                                     for c in record.loss_calls):
        ruled_out.append("the loss receives logits, not probabilities")
    if record.optimizer_steps and not record.carried_steps:
        ruled_out.append("gradients are zeroed between steps")
    if record.step_calls and not record.not_updated:
        ruled_out.append("every parameter with a gradient moves at each step")
    if record.step_calls and not record.eval_modules:
        ruled_out.append("no dropout or BatchNorm runs in eval mode")
    if ruled_out:
        parts.append("Watching the training step ruled out: " + "; ".join(ruled_out) + ".")
    return " ".join(parts), [make_fix("raise_learning_rate")]


def batch_mixing(finding: Finding, record: SanityRecord) -> tuple[str, list[Fix]]:
    """One sample's output depending on the other samples' inputs in eval mode."""
    return (f"In eval mode, sample 0's output changes with the other samples' inputs "
            f"(measured by {finding.evidence['method']}): a reshape, view or transpose mixes "
            "the batch dimension with another one (for example x.view(-1, batch) where "
            "x.view(batch, -1) was meant)."), [make_fix("batch_first_reshape")]


# ----------------------------------------------------------------------------- the training step


def zero_grad_missing(finding: Finding, record: SanityRecord) -> tuple[str, list[Fix]]:
    """Gradients carried from one optimizer step into the next."""
    ev = finding.evidence
    stale = ev.get("stale_to_fresh")
    size = (f" (the stale gradient was {fmt(stale)}x the fresh one at the next step)"
            if stale is not None else "")
    accumulation = ev.get("backward_per_step")
    parts = [f"loss.backward() adds each new gradient to .grad; only zero_grad() (or setting "
             f".grad to None) clears it. Here the gradient that optimizer.step() had just "
             f"applied was still in .grad when the next backward() ran, after "
             f"{ev['carried_steps']} of {ev['steps_checked']} steps{size}. Every step then "
             "applies the sum of all earlier gradients once more: a step that grows as "
             "training goes on, which looks like a learning rate becoming too high "
             "(loss_diverging, exploding gradients) but is not one, and no learning rate "
             "fixes it."]
    if accumulation and accumulation > 1:
        parts.append(f"The step runs {accumulation} backward passes per optimizer step "
                     "(gradient accumulation): that is fine, but the gradients must be zeroed "
                     "after each optimizer step.")
    else:
        parts.append("Gradient accumulation is not this: it sums micro-batches that no step "
                     "has applied yet, and zeroes right after each optimizer step.")
    return " ".join(parts), [make_fix("zero_grad")]


def softmax_before_loss(finding: Finding, record: SanityRecord) -> tuple[str, list[Fix]]:
    """Probabilities where a logit loss expects logits (or log-probabilities)."""
    ev = finding.evidence
    loss, where, source = ev["loss"], ev.get("where"), ev.get("produced_by") or "a softmax"
    if where == "forward":
        origin = f"the model's forward applies {source}"
    elif where not in (None, "step"):
        origin = f"the model's module {where!r} returns them"
    elif where == "step":
        origin = f"the training step applies {source} to the model's output"
    else:
        origin = "their rows lie in [0, 1] and sum to 1"
    parts = [f"{loss} expects {ev['expects']} and applies (log_)softmax or sigmoid itself; "
             f"it was given probabilities ({origin}). Their values lie in [0, 1], so the "
             "scores the loss sees differ by at most 1 and the softmax's derivative squashes "
             "the gradient."]
    if ev.get("floor") is not None:
        reached = (f" one batch could only be fitted down to {ev['overfit_best']:.4g}."
                   if ev.get("overfit_best") is not None else "")
        parts.append(f"Even a perfect model scores at least log(1 + (C-1)/e) = "
                     f"{ev['floor']:.4g} for C = {ev['classes']} classes, a floor well above "
                     f"0:{reached}")
    parts.append("Log-probabilities (log_softmax) would be harmless here: log_softmax of "
                 "log-probabilities changes nothing, and nll_loss expects exactly them.")
    if where not in (None, "step"):
        fix = make_fix("logits_to_loss", "model")
    elif loss == "nll_loss":
        fix = make_fix("logits_to_loss", "nll")
    elif loss == "binary_cross_entropy_with_logits":
        fix = make_fix("logits_to_loss", "binary")
    else:
        fix = make_fix("logits_to_loss")
    return " ".join(parts), [fix]


_MODE_EFFECTS = (("Dropout", "dropout is off, so it no longer regularizes"),
                 ("BatchNorm", "BatchNorm normalizes with its running statistics, which eval "
                               "mode also stops updating, instead of the batch's"),
                 ("InstanceNorm", "InstanceNorm uses its running statistics"))


def train_mode_off(finding: Finding, record: SanityRecord) -> tuple[str, list[Fix]]:
    """Mode-dependent modules in eval mode while the model trains."""
    kinds = set(record.eval_kinds)
    effects = [text for key, text in _MODE_EFFECTS if any(key in k for k in kinds)]
    effect = ("; ".join(effects) if effects
              else "the modules behave as at inference")
    measured = (" Its output in training mode differs from the output the step computed."
                if record.mode_changes_output else "")
    if finding.evidence.get("whole_model"):
        return (f"During the training step the model was in eval mode (model.eval() was "
                f"called and nothing called model.train() again, or the model arrived in eval "
                f"mode, as pretrained models loaded for inference do): {effect}.{measured} "
                "A model without dropout or BatchNorm would not care; this one trains as "
                "something other than the model it is."), [make_fix("train_mode")]
    return (f"Only these modules ran in eval mode while the rest of the model trained: "
            f"{effect}.{measured} Freezing BatchNorm this way is common when fine-tuning with "
            "small batches; if it is not deliberate, call model.train() after whatever put "
            "them in eval mode."), [make_fix("train_mode")]


def loss_reduction_sum(finding: Finding, record: SanityRecord) -> tuple[str, list[Fix]]:
    """A loss summed over the batch: the step size follows the batch size."""
    ev = finding.evidence
    declared = (f" (reduction={ev['reduction'][0]!r} was passed to the loss)"
                if ev.get("reduction") == ["sum"] else "")
    return (f"The loss of {ev['batch_size']} samples is {ev['ratio']:.2f}x the mean of its "
            f"two halves' losses: it adds up the samples{declared} instead of averaging them. "
            f"The gradient, and with SGD the step, is then about {ev['batch_size']}x what a "
            "mean gives and changes with every batch size (the smaller last batch of an "
            "epoch, another batch size in CI than in production), so the learning rate that "
            "works depends on the batch size. A sum divided by the number of samples by hand "
            "is a mean and is fine."), [make_fix("mean_reduction")]


def labels_misaligned(finding: Finding, record: SanityRecord) -> tuple[str, list[Fix]]:
    """Inputs and targets whose pairing carries no information."""
    ev = finding.evidence
    return (f"The model memorizes one batch (the overfitting check passes), yet after "
            f"{ev['steps']} steps on the data as given a held-out batch scores "
            f"{ev['heldout_paired']:.4g}, no better than the {ev['heldout_shuffled']:.4g} it "
            f"scores after the same steps with every batch's targets shuffled (at init: "
            f"{ev['heldout_init']:.4g}). The data's pairing of inputs and targets teaches "
            "nothing: they are shuffled, sorted or indexed apart (in the dataset, the loader or "
            "the training step), or the targets do not depend on the inputs. A task that needs "
            f"far more than {ev['steps']} steps to learn anything would look the same: if so, "
            "ignore this warning."), [make_fix("align_inputs_labels")]


ADVISORS: dict[tuple[str, str], Advisor] = {
    (SANITY, FindingId.LOSS_AT_INIT_UNEXPECTED): loss_at_init_unexpected,
    (SANITY, FindingId.PARAMETERS_NOT_UPDATED): parameters_not_updated,
    (SANITY, FindingId.CANNOT_OVERFIT_BATCH): cannot_overfit_batch,
    (SANITY, FindingId.BATCH_MIXING): batch_mixing,
    (SANITY, FindingId.ZERO_GRAD_MISSING): zero_grad_missing,
    (SANITY, FindingId.SOFTMAX_BEFORE_LOSS): softmax_before_loss,
    (SANITY, FindingId.TRAIN_MODE_OFF): train_mode_off,
    (SANITY, FindingId.LOSS_REDUCTION_SUM): loss_reduction_sum,
    (SANITY, FindingId.LABELS_MISALIGNED): labels_misaligned,
}
