"""``--try-fixes``: apply automatic fixes to a deep copy of the model and measure again.

Each automatic fix is applied once to its own copy (never to the user's model), the copy is
probed on the same batches, and every finding that recommended the fix gets the before/after
headline numbers in its ``verified`` field.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from nndiag.advice import RE_INITIALIZING
from nndiag.batches import Batch, iter_tensors
from nndiag.capture.layers import SATURATING, has_init_expectation, module_activation
from nndiag.capture.probe import ROOT_NAME, ProbeConfig, run_probe
from nndiag.capture.state import copy_model
from nndiag.findings import Finding
from nndiag.records import ProbeRecord
from nndiag.rules import HEADLINES, run_probe_rules
from nndiag.rules.thresholds import Threshold

_SWAPPABLE = SATURATING - {"relu6"}


class NotApplicable(Exception):
    """The fix cannot be applied automatically to this model; the message says why."""


def _submodule(model: nn.Module, name: str) -> nn.Module:
    return model if name == ROOT_NAME else model.get_submodule(name)


def _reinit(model: nn.Module, init: Any) -> int:
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if has_init_expectation(module):
                init(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
                count += 1
    if not count:
        raise NotApplicable("the model has no Linear or conv layer to re-initialize")
    return count


def _he(model: nn.Module, probe: ProbeRecord, batches: list[Batch]) -> list[Batch]:
    _reinit(model, lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"))
    return batches


def _xavier(model: nn.Module, probe: ProbeRecord, batches: list[Batch]) -> list[Batch]:
    kinds = [r.activation for r in probe.layers if r.activation in ("tanh", "sigmoid")]
    gain = nn.init.calculate_gain(max(set(kinds), key=kinds.count)) if kinds else 1.0
    _reinit(model, lambda w: nn.init.xavier_normal_(w, gain=gain))
    return batches


def _orthogonal(model: nn.Module, probe: ProbeRecord, batches: list[Batch]) -> list[Batch]:
    found = False
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.RNNBase):
                for name, param in module.named_parameters():
                    if "weight_hh" in name:
                        for start in range(0, param.shape[0], param.shape[1]):
                            nn.init.orthogonal_(param[start:start + param.shape[1]])
                        found = True
    if not found:
        raise NotApplicable("the model has no recurrent layer")
    return batches


def _non_saturating(model: nn.Module, probe: ProbeRecord, batches: list[Batch]) -> list[Batch]:
    last = probe.layers[-1].module if probe.layers else None
    names = {id(module): name or ROOT_NAME for name, module in model.named_modules()}
    swapped = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if module_activation(child) in _SWAPPABLE:
                if names.get(id(child)) == last:
                    continue  # an output activation (e.g. a final sigmoid) keeps its meaning
                setattr(parent, child_name, nn.ReLU())
                swapped += 1
    if not swapped:
        raise NotApplicable("the saturating activations are applied functionally inside "
                            "forward(), so they cannot be swapped automatically")
    _he(model, probe, batches)
    return batches


def _normalize(model: nn.Module, probe: ProbeRecord, batches: list[Batch]) -> list[Batch]:
    if probe.input_std is None:
        raise NotApplicable("the inputs are not floating-point")
    floats = [t for b in batches for t in iter_tensors(b.inputs) if t.is_floating_point()]
    joined = torch.cat([t.detach().float().reshape(-1) for t in floats])
    std, mean = torch.std_mean(joined)
    if float(std) == 0:
        raise NotApplicable("the inputs are constant")

    def scale(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return (obj - mean.to(obj)) / std.to(obj) if obj.is_floating_point() else obj
        if isinstance(obj, dict):
            return {k: scale(v) for k, v in obj.items()}
        if isinstance(obj, tuple | list):
            return type(obj)(scale(v) for v in obj)
        return obj

    return [Batch(scale(b.inputs), b.targets) for b in batches]


def _bias(model: nn.Module, probe: ProbeRecord, batches: list[Batch]) -> list[Batch]:
    dead = [r for r in probe.layers if r.dead_fraction]
    feeding = set()
    for record in dead:
        earlier = [r for r in probe.layers if r.index < record.index and r.has_weights]
        if earlier:
            feeding.add(earlier[-1].module)
    changed = 0
    with torch.no_grad():
        for name in feeding:
            bias = getattr(_submodule(model, name), "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.zero_()
                changed += 1
    if not changed:
        raise NotApplicable("the layers feeding the dead units have no bias")
    return batches


APPLY = {
    "he_init": _he,
    "xavier_init": _xavier,
    "orthogonal_init": _orthogonal,
    "non_saturating_activation": _non_saturating,
    "normalize_inputs": _normalize,
    "bias_init": _bias,
}


# A fix may not raise the probe loss by more than this share of it (batch-to-batch noise of a
# probe on the same batches is far below; a re-initialized pretrained model is far above).
LOSS_TOLERANCE = 0.05


def _loss_got_worse(before: ProbeRecord, after: ProbeRecord) -> bool:
    """True when the patched copy's probe loss rose beyond ``LOSS_TOLERANCE``."""
    if before.loss != before.loss or after.loss != after.loss:
        return after.loss != after.loss and before.loss == before.loss
    return after.loss > before.loss + LOSS_TOLERANCE * max(abs(before.loss), 1e-12)


def verify_fixes(model: nn.Module, batches: Sequence[Batch], probe: ProbeRecord,
                 findings: list[Finding], config: ProbeConfig,
                 thresholds: dict[str, Threshold]) -> None:
    """Try every automatic fix the findings recommend and fill in ``Fix.verified``.

    Raises:
        UserCodeError: The model raised while the patched copy was measured.

    """
    results: dict[str, tuple[ProbeRecord, list[Finding]] | str] = {}
    for finding in findings:
        for fix in finding.fixes:
            if not fix.automatic or fix.id not in APPLY:
                continue
            if fix.id not in results and probe.pretrained and fix.id in RE_INITIALIZING:
                results[fix.id] = ("the weights are pretrained: re-initializing them would "
                                   "throw away what they learned")
            if fix.id not in results:
                patched = copy_model(model)
                # A re-initialization draws from the seeded generator, not the caller's RNG:
                # the same model gets the same verdict whatever ran before.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(config.seed)
                    try:
                        new_batches = APPLY[fix.id](patched, probe, list(batches))
                    except NotApplicable as reason:
                        results[fix.id] = str(reason)
                    else:
                        after = run_probe(patched, new_batches, config)
                        results[fix.id] = (after, run_probe_rules(after, thresholds))
            outcome = results[fix.id]
            if isinstance(outcome, str):
                fix.verified = {"applied": False, "reason": outcome}
                continue
            after_probe, after_findings = outcome
            headline = HEADLINES[finding.id]
            remaining = next((f for f in after_findings if f.id == finding.id), None)
            before_ids = {f.id for f in findings}
            new = sorted({f.id for f in after_findings if f.severity != "info"} - before_ids)
            # The loss of a freshly initialized model is that of a random draw: it is judged
            # only when the weights carry what they learned.
            worse_loss = probe.pretrained and _loss_got_worse(probe, after_probe)
            fix.verified = {
                "applied": True,
                "before": headline(probe),
                "after": headline(after_probe),
                # Verified only when the finding is gone, nothing new is warned about, and (for
                # pretrained weights) the probe loss is no worse beyond noise.
                "resolved": remaining is None and not new and not worse_loss,
                "severity_after": remaining.severity if remaining else None,
                "new_findings": new,
                "loss_before": probe.loss,
                "loss_after": after_probe.loss,
            }
