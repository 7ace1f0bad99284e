"""Advice on sanity findings.

NaN/Inf and unused parameters in a live probe, and the pre-training checks (loss at init,
parameters the optimizer skips, overfitting one batch, batch mixing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nndiag.advice.catalog import make_fix
from nndiag.advice.common import PROBE, SANITY, Advisor, fmt, inputs_off_scale, normalize_inputs_fix
from nndiag.findings import Finding, Fix
from nndiag.records import ProbeRecord

if TYPE_CHECKING:
    from nndiag.rules.pretraining import SanityRecord

# ----------------------------------------------------------------------------- live probe


def nan_inf(finding: Finding, probe: ProbeRecord) -> tuple[str, list[Fix]]:
    """Where non-finite values first appear and whether an overflow leads there."""
    ev = finding.evidence
    parts = ["The inputs were checked and are finite."]
    if ev.get("first_layer"):
        first = probe.layer(ev["first_layer"])
        earlier = [r for r in probe.layers if r.index < first.index and r.absmax is not None]
        peak = max(earlier, key=lambda r: r.absmax or 0.0, default=None)
        parts.append(f"Non-finite values first appear in {first.label}; every "
                     "layer after it inherits them.")
        if peak is not None and peak.absmax and peak.absmax > 1e6:
            parts.append(f"Values before it already reach {fmt(peak.absmax)} "
                         f"({peak.label}): an overflow of an exploding signal.")
        else:
            parts.append("Values before it are moderate: look for a log, division, sqrt or "
                         "exp of an out-of-range value in that layer.")
    fixes = [make_fix("gradient_clipping"), make_fix("lower_learning_rate")]
    if inputs_off_scale(probe):
        fixes.append(normalize_inputs_fix(probe))
    return " ".join(parts), fixes


def unused_parameters(finding: Finding, probe: ProbeRecord) -> tuple[str, list[Fix]]:
    """Why trainable parameters the loss ignores are a problem, and the ways out."""
    not_run = finding.evidence.get("modules_not_run") or []
    where = (f" ({', '.join(not_run)} never ran in forward)." if not_run else
             " (their modules ran, but their output does not reach the loss).")
    return ("These parameters are trainable but the loss does not depend on them" + where
            + " Weight decay still shrinks them, they waste optimizer memory, and "
            "DistributedDataParallel fails on them unless find_unused_parameters=True. "
            "Remove them, freeze them with requires_grad_(False), or connect them to the "
            "output."), []


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
    return ("These parameters receive a gradient, but one optimizer step left them exactly as "
            "they were: they are missing from the optimizer's parameter groups, or their "
            "group's learning rate is zero."), []


def cannot_overfit_batch(finding: Finding, record: SanityRecord) -> tuple[str, list[Fix]]:
    """A model that cannot drive one small batch's loss to zero."""
    ev = finding.evidence
    return (f"A healthy model drives the loss of {ev['batch_size']} samples close to zero "
            f"within {ev['steps']} steps; this one went from {ev['first']:.4g} to "
            f"{ev['best']:.4g}. Common causes: the forward pass ignores its input, inputs and "
            "labels are misaligned, the learning rate is far too low, or the model lacks "
            "capacity."), [make_fix("raise_learning_rate")]


def batch_mixing(finding: Finding, record: SanityRecord) -> tuple[str, list[Fix]]:
    """One sample's output depending on the other samples' inputs in eval mode."""
    return (f"In eval mode, sample 0's output changes with the other samples' inputs "
            f"(measured by {finding.evidence['method']}): a reshape, view or transpose mixes "
            "the batch dimension with another one (for example x.view(-1, batch) where "
            "x.view(batch, -1) was meant)."), []


ADVISORS: dict[tuple[str, str], Advisor] = {
    (PROBE, "nan_inf"): nan_inf,
    (PROBE, "unused_parameters"): unused_parameters,
    (SANITY, "loss_at_init_unexpected"): loss_at_init_unexpected,
    (SANITY, "parameters_not_updated"): parameters_not_updated,
    (SANITY, "cannot_overfit_batch"): cannot_overfit_batch,
    (SANITY, "batch_mixing"): batch_mixing,
}
