"""Advice on findings over a recorded run.

The loss curve, NaN/Inf, gradients, dead units and update ratios through training.

The run's layer kinds come from its ``meta.json`` only (``run_layer_kinds``): advice never
reads the sampled steps.
"""

from __future__ import annotations

from nndiag.advice.catalog import make_fix
from nndiag.advice.common import (
    RUN,
    UNNORMALIZED_INPUTS,
    Advisor,
    bias_fix,
    he_init_fix,
    norm_fix,
)
from nndiag.findings import Finding, FindingId, Fix
from nndiag.runlog import RunLog


def run_layer_kinds(log: RunLog) -> set[str]:
    """The module class names of the run's weight layers, as recorded in its meta."""
    return {layer.get("kind", "") for layer in log.meta.get("weight_layers", [])}


def _when(finding: Finding) -> str:
    first = finding.evidence.get("first_step")
    return f" It appears at step {first}." if first is not None else ""


def nan_inf(finding: Finding, log: RunLog) -> tuple[str, list[Fix]]:
    """The step NaN/Inf appeared, and the usual causes."""
    ev = finding.evidence
    if not ev.get("first_step"):  # the first step: no update has run yet
        return (f"NaN/Inf reached {ev['where']} at the first step, before any update: the "
                "learning rate plays no part. The data or the model as initialized produces "
                "it: look for NaN in the inputs or targets, an overflow in the loss, or a log, "
                "division or sqrt of an out-of-range value (`nndiag inspect` on the model "
                "and a batch names the first layer)."), [make_fix("gradient_clipping")]
    return (f"NaN/Inf reached {ev['where']} at step {ev.get('first_step')}; every step after "
            "it is lost. The steps before it usually show the loss or the gradient norm "
            "climbing: a learning rate too high for this model, or an overflow in the loss."), [
                make_fix("lower_learning_rate"), make_fix("gradient_clipping")]


def loss_diverging(finding: Finding, log: RunLog) -> tuple[str, list[Fix]]:
    """A loss that climbs: from its start, or back after a fall."""
    ev = finding.evidence
    if ev["best"] < ev["start"] - max(ev.get("noise") or 0.0, 1e-12):
        course = (f"The running median of the loss went from {ev['start']:.4g} down to "
                  f"{ev['best']:.4g} (step {ev['best_step']}) and ends at {ev['end']:.4g}.")
        why = ("A loss that climbs back is the signature of a learning rate that became too "
               "high for the sharper region training reached.")
    else:
        course = (f"The running median of the loss never fell below its start "
                  f"({ev['start']:.4g}) and ends at {ev['end']:.4g}.")
        why = ("A loss that climbs from the first steps is the signature of a learning rate "
               "too high for the model as initialized, or of updates that push the wrong way.")
    return (f"{course}{_when(finding)} {why}"), [
                make_fix("lower_learning_rate"), make_fix("lr_warmup"),
                make_fix("gradient_clipping")]


def loss_not_decreasing(finding: Finding, log: RunLog) -> tuple[str, list[Fix]]:
    """A loss that stays within its noise."""
    ev = finding.evidence
    return (f"The running median of the loss moved from {ev['start']:.4g} to {ev['end']:.4g}, "
            f"within its noise ({ev['noise']:.3g}). Either the updates are too small (see "
            "update_ratio_low), the gradient does not reach the layers (see "
            "vanishing_gradients), or the targets cannot be learned from the inputs."), [
                make_fix("raise_learning_rate"), he_init_fix(run_layer_kinds(log))]


def loss_oscillating(finding: Finding, log: RunLog) -> tuple[str, list[Fix]]:
    """A loss that swings without falling."""
    ev = finding.evidence
    return (f"In the second half of the run the loss swings by {ev['relative_amplitude']:.0%} "
            f"of its level ({ev['amplitude']:.3g} around {ev['level']:.3g}) without falling "
            "further: steps overshoot the minimum they aim at."), [
                make_fix("lower_learning_rate"), make_fix("lr_warmup")]


def vanishing_gradients(finding: Finding, log: RunLog) -> tuple[str, list[Fix]]:
    """The spread of gradient-to-weight ratios across layers late in the run."""
    ev = finding.evidence
    kinds = run_layer_kinds(log)
    return (f"At the median sampled step of the second half, the smallest gradient-to-weight "
            f"ratio of a Linear/conv layer is {ev['spread']:.1e} of the largest; the weakest "
            f"layer is {ev['weakest_layer']}.{_when(finding)} Those layers barely learn."), [
                norm_fix(kinds), make_fix("skip_connections"), he_init_fix(kinds)]


def exploding_gradients(finding: Finding, log: RunLog) -> tuple[str, list[Fix]]:
    """A layer whose gradient dwarfs its weights late in the run."""
    ev = finding.evidence
    return (f"The gradient of {ev['layer']} reaches {ev['max_grad_to_weight']:.1e}x its "
            f"weights at the median sampled step of the second half.{_when(finding)}"), [
                make_fix("gradient_clipping"), make_fix("lower_learning_rate"),
                he_init_fix(run_layer_kinds(log))]


def dead_relu(finding: Finding, log: RunLog) -> tuple[str, list[Fix]]:
    """Units that died during training."""
    ev = finding.evidence
    return (f"By the last sampled step, {len(ev['dead_fraction'])} ReLU layer(s) have units "
            f"that never fire on the sampled batch (from {(ev.get('initial') or 0):.0%} at the "
            f"start).{_when(finding)} Units that die during training usually die after a "
            "too-large update pushed their bias negative."), [
                make_fix("lower_learning_rate"), make_fix("lr_warmup"),
                bias_fix(finding.layers[:3])]


def _update_ratios(finding: Finding) -> str:
    ratios = finding.evidence["median_update_ratio"]
    listed = ", ".join(f"{k}: {v:.1e}" for k, v in list(ratios.items())[:4])
    return (f"The median of ||w_after - w_before|| / ||w_before|| per step is "
            f"{listed}{' ...' if len(ratios) > 4 else ''}; the rule of thumb is about 1e-3.")


def update_ratio_high(finding: Finding, log: RunLog) -> tuple[str, list[Fix]]:
    """Steps that move the weights by a large share of their norm."""
    return _update_ratios(finding), [make_fix("lower_learning_rate"), make_fix("lr_warmup")]


def update_ratio_low(finding: Finding, log: RunLog) -> tuple[str, list[Fix]]:
    """Steps that barely move the weights."""
    return (_update_ratios(finding) + " A layer fed by dead units or a vanishing gradient "
            "stops updating too: if those are reported, fix them first."), [
                make_fix("raise_learning_rate")]


def zero_grad_missing(finding: Finding, log: RunLog) -> tuple[str, list[Fix]]:
    """Gradient norms that grow like a running sum: ``.grad`` never zeroed."""
    ev = finding.evidence
    return (f"From step {ev['steps'][0]} to step {ev['steps'][-1]} the recorded gradient norm "
            f"grew {ev['growth']:.1f}x, steadily (rising at {ev['rising_share']:.0%} of the "
            f"sampled steps, like (step + 1)^{ev['slope']:.2f}), in {ev['layers_growing']} of "
            f"{ev['layers']} weight layers at once.{_when(finding)} That is the shape of a "
            "gradient that is the sum of every step's gradient so far (between (step + 1)^0.5 "
            "and (step + 1)^1): loss.backward() adds to .grad and nothing zeroes it, so each "
            "step applies all the earlier gradients again. A learning rate too high makes the "
            "norm blow up faster than that, and gradient accumulation done right (zeroing "
            "after each optimizer step) saw-tooths around a level instead. Lowering the "
            "learning rate would only slow the growth."), [make_fix("zero_grad")]


def amp_skipped_steps(finding: Finding, log: RunLog) -> tuple[str, list[Fix]]:
    """Loss scaling at work, or gradients that overflow fp16 at any scale."""
    ev = finding.evidence
    steps = ev["skipped_steps"]
    listed = ", ".join(str(step) for step in steps[:6]) + (" ..." if len(steps) > 6 else "")
    text = (f"The loss scaler found inf/NaN in the scaled gradients and skipped the update on "
            f"{ev['skipped']} of {ev['steps']} steps ({ev['share']:.1%}): at steps {listed}; "
            f"the scale was {ev['last_scale']:g} after the last one. Those steps are recorded "
            "without gradient norms and are not NaN/Inf in the model: lowering the scale until "
            "the gradients fit fp16 is how loss scaling works, and a few skipped steps at the "
            "start (the scale settling from 65536) or now and then are normal.")
    if finding.severity == "warning":
        text += (" Skipping this often means the gradients overflow fp16 even at a small "
                 "scale: most updates are lost. Train in bfloat16 (no scaler needed), or lower "
                 "the learning rate.")
    return text, []


def inputs_not_normalized(finding: Finding, log: RunLog) -> tuple[str, list[Fix]]:
    """Inputs far from unit scale, as measured at the run's first sampled step."""
    ev = finding.evidence
    return (f"At the first sampled step the model's input had mean {ev['input_mean']:.3g} and "
            f"std {ev['input_std']:.3g}. {UNNORMALIZED_INPUTS}"), [
                make_fix("normalize_inputs", mean=ev["input_mean"], std=ev["input_std"])]


def accumulation_unscaled(finding: Finding, log: RunLog) -> tuple[str, list[Fix]]:
    """Why a Trainer's accumulated loss can be k times the mean, and the switch that fixes it."""
    k = finding.evidence["micro_batches"]
    return (f"The Hugging Face Trainer passed num_items_in_batch to the model, and so left the "
            f"division by the {k} accumulation steps to it, but the model's loss is each "
            f"micro-batch's plain mean: every step's loss and gradients are the sum of {k} "
            f"means. The recorded losses are the ones the gradients came from ({k}x the mean "
            "loss); gradient clipping and the learning rate act on a gradient "
            f"{k}x larger than intended."), [make_fix("trainer_mean_loss")]


ADVISORS: dict[tuple[str, str], Advisor] = {
    (RUN, FindingId.ACCUMULATION_UNSCALED): accumulation_unscaled,
    (RUN, FindingId.INPUTS_NOT_NORMALIZED): inputs_not_normalized,
    (RUN, FindingId.AMP_SKIPPED_STEPS): amp_skipped_steps,
    (RUN, FindingId.NAN_INF): nan_inf,
    (RUN, FindingId.LOSS_DIVERGING): loss_diverging,
    (RUN, FindingId.LOSS_NOT_DECREASING): loss_not_decreasing,
    (RUN, FindingId.LOSS_OSCILLATING): loss_oscillating,
    (RUN, FindingId.VANISHING_GRADIENTS): vanishing_gradients,
    (RUN, FindingId.EXPLODING_GRADIENTS): exploding_gradients,
    (RUN, FindingId.DEAD_RELU): dead_relu,
    (RUN, FindingId.UPDATE_RATIO_HIGH): update_ratio_high,
    (RUN, FindingId.UPDATE_RATIO_LOW): update_ratio_low,
    (RUN, FindingId.ZERO_GRAD_MISSING): zero_grad_missing,
}
