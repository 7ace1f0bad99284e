"""``check_training``: a CI gate for training code (``nndiag check --model --data``).

It works on deep copies, so the caller's model is left as found:

1. the model is inspected at init (NaN/Inf, gradient health, dead or saturated units, unused
   parameters), as ``nndiag inspect`` does;
2. pre-training sanity checks in the spirit of Karpathy's recipe: the loss at init against
   log C, parameters that one optimizer step leaves unchanged, overfitting one small batch,
   and batch mixing (a sample's output must not depend on another sample's input; checked in
   eval mode, where BatchNorm uses running statistics and legitimately couples nothing);
3. a short training run recorded with ``Monitor`` and judged by the run rules.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nndiag.advice import advise_run, advise_sanity
from nndiag.checking import RUN_FINDINGS, build_run_report
from nndiag.errors import UsageError, UserCodeError, describe_exception
from nndiag.findings import Report, severity_rank
from nndiag.inspection import inspect_model
from nndiag.losses import Loss, as_loss, compute_loss
from nndiag.lrfind import cycle_batches
from nndiag.monitor import Monitor
from nndiag.optimizers import optimizer_factory
from nndiag.rules.pretraining import SANITY_RULES, SanityRecord
from nndiag.rules.run import run_rules
from nndiag.runlog import read_run
from nndiag.specs import (
    Batch,
    call_model,
    iter_batches,
    iter_tensors,
    move_to,
    primary_output,
    unpack_batch,
)

SANITY_FINDINGS = ("loss_at_init_unexpected", "parameters_not_updated", "cannot_overfit_batch",
                   "batch_mixing")
INIT_FINDINGS = ("unused_parameters", "poor_initialization", "saturated_activations")
DEFAULT_LR = {"sgd": 1e-2, "rmsprop": 1e-3, "adam": 1e-3, "adamw": 1e-3}
OVERFIT_SAMPLES = 16


def take_samples(obj: Any, count: int) -> Any:
    """The first ``count`` samples of every tensor in nested inputs (batch dimension first)."""
    if isinstance(obj, torch.Tensor):
        return obj[:count] if obj.dim() else obj
    if isinstance(obj, Mapping):
        return {k: take_samples(v, count) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(take_samples(v, count) for v in obj)
    return obj


def check_training(model: nn.Module, data: Any, *, loss: Any = None, optimizer: Any = "adamw",
                   lr: float | None = None, steps: int = 50, overfit_steps: int = 100,
                   log_dir: str | Path | None = None, seed: int = 0) -> Report:
    """Gate training code: inspection at init, sanity checks, a short recorded run.

    Args:
        model: The model (left unchanged: every check works on a copy).
        data: Training batches (cycled) or one batch.
        loss: ``None`` (from the targets), a name, a spec or ``f(outputs, targets)``.
        optimizer: ``sgd``, ``adam``, ``adamw``, ``rmsprop``, or ``f(params, lr)``.
        lr: Learning rate (default 1e-3, 1e-2 for SGD).
        steps: Steps of the short training run.
        overfit_steps: Steps spent trying to overfit one small batch.
        log_dir: Keep the run log here (default: a temporary directory).
        seed: Seed for random targets.

    Returns:
        A ``nndiag.check/1`` report.

    Raises:
        UsageError: Bad arguments or unusable data.
        UserCodeError: The model, loss or optimizer code raised.
    """
    if steps < 2:
        raise UsageError(f"--steps must be at least 2, got {steps}")
    name = optimizer.lower() if isinstance(optimizer, str) else None
    factory = optimizer_factory(optimizer) if isinstance(optimizer, str) else optimizer
    rate = lr if lr is not None else DEFAULT_LR.get(name or "", 1e-3)
    loss_spec = as_loss(loss)
    first = iter_batches(data, 1)[0]

    init = inspect_model(copy.deepcopy(model), (first.inputs, first.targets), loss=loss_spec,
                         seed=seed)
    record = _sanity(model, first, loss_spec, factory, rate, overfit_steps, init, seed)
    findings = [advise_sanity(f, record) for rule in SANITY_RULES
                if (f := rule(record)) is not None]

    with tempfile.TemporaryDirectory() as temp:
        run_dir = Path(log_dir) if log_dir is not None else Path(temp) / "run"
        _train(copy.deepcopy(model), data, loss_spec, factory, rate, steps, run_dir, seed)
        log = read_run(run_dir)
        run_findings = [advise_run(f, log) for f in run_rules(log)]
        report = build_run_report(log, [])
        if log_dir is None:
            report.summary["run"] = None
    # Each phase judges its own evidence (a probe at init, the sanity checks, the recorded
    # run): a finding id may come from two phases, and both are kept, tagged with their phase.
    phases = (("init", init.findings), ("sanity", findings), ("training", run_findings))
    for phase, found in phases:
        for finding in found:
            finding.evidence["phase"] = phase
    report.findings = sorted([f for _, found in phases for f in found],
                             key=lambda f: -severity_rank(f.severity))
    report.summary.update({"mode": "training", "lr": rate, "loss_at_init": record.loss_at_init,
                           "expected_loss_at_init": record.expected_loss,
                           "rules": [*SANITY_FINDINGS, *INIT_FINDINGS, *RUN_FINDINGS]})
    report.notes = init.notes + report.notes
    return report


def _loss(loss: Loss, model: nn.Module, batch: Batch, generator: torch.Generator
          ) -> tuple[torch.Tensor, str, int | None]:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        outputs = call_model(model, move_to(batch.inputs, device))
    except Exception as exc:
        raise UserCodeError(f"the model raised: {describe_exception(exc)}") from exc
    return compute_loss(loss, outputs, move_to(batch.targets, device), generator)


def _sanity(model: nn.Module, batch: Batch, loss: Loss, factory: Any, rate: float,
            overfit_steps: int, init: Report, seed: int) -> SanityRecord:
    classes = init.summary.get("num_classes")
    loss_name = init.summary.get("loss_name")
    expected = math.log(classes) if classes and loss_name in ("cross_entropy", "nll") else None
    record = SanityRecord(loss_at_init=float(init.summary["loss"]), expected_loss=expected,
                          classes=classes)
    generator = torch.Generator().manual_seed(seed)

    stepped = copy.deepcopy(model)
    stepped.train()
    opt = factory([p for p in stepped.parameters() if p.requires_grad], rate)
    before = {n: p.detach().clone() for n, p in stepped.named_parameters() if p.requires_grad}
    value, _, _ = _loss(loss, stepped, batch, generator)
    opt.zero_grad()
    value.backward()
    with_grad = {n for n, p in stepped.named_parameters()
                 if p.grad is not None and bool(p.grad.abs().max() > 0)}
    opt.step()
    record.not_updated = [n for n, p in stepped.named_parameters()
                          if n in with_grad and torch.equal(p.detach(), before[n])]

    small = Batch(take_samples(batch.inputs, OVERFIT_SAMPLES),
                  take_samples(batch.targets, OVERFIT_SAMPLES))
    fitted = copy.deepcopy(model)
    fitted.train()
    opt = factory([p for p in fitted.parameters() if p.requires_grad], rate)
    losses = []
    for _ in range(overfit_steps):
        value, _, _ = _loss(loss, fitted, small, torch.Generator().manual_seed(seed))
        losses.append(float(value.detach()))
        if not math.isfinite(losses[-1]):
            break
        opt.zero_grad()
        value.backward()
        opt.step()
    record.overfit_losses = losses
    first = next(iter_tensors_with_batch(small.inputs), None)
    record.overfit_batch_size = int(first.shape[0]) if first is not None else 0
    record.mixing_ratio, record.mixing_method = _mixing(copy.deepcopy(model), batch)
    return record


def iter_tensors_with_batch(obj: Any) -> Any:
    """Tensors with a batch dimension inside nested inputs."""
    return (t for t in iter_tensors(obj) if t.dim() >= 1)


def _replace_first(obj: Any, old: torch.Tensor, new: torch.Tensor) -> Any:
    if obj is old:
        return new
    if isinstance(obj, Mapping):
        return {k: _replace_first(v, old, new) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(_replace_first(v, old, new) for v in obj)
    return obj


def _mixing(model: nn.Module, batch: Batch) -> tuple[float | None, str | None]:
    """How much sample 0's output depends on the other samples' inputs (eval mode)."""
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    inputs = move_to(batch.inputs, device)
    target = next((t for t in iter_tensors_with_batch(inputs) if t.shape[0] > 1), None)
    if target is None:
        return None, None
    if target.is_floating_point():
        probe = target.detach().clone().requires_grad_(True)
        output = primary_output(call_model(model, _replace_first(inputs, target, probe)))
        if output is None or not output.requires_grad:
            return None, None
        (grad,) = torch.autograd.grad(output[0].float().sum(), probe, allow_unused=True)
        if grad is None:
            return None, None
        per_sample = grad.reshape(grad.shape[0], -1).norm(dim=1)
        own, others = float(per_sample[0]), float(per_sample[1:].max())
        return (others / own if own > 0 else (math.inf if others > 0 else 0.0)), "gradient"
    with torch.no_grad():
        base = primary_output(call_model(model, inputs))
        changed = target.clone()
        changed[1:] = target[1:].roll(1, dims=0) if target.shape[0] > 2 else target[1:].flip(-1)
        moved = primary_output(call_model(model, _replace_first(inputs, target, changed)))
    if base is None or moved is None:
        return None, None
    delta = float((moved[0] - base[0]).float().norm())
    return delta / max(float(base[0].float().norm()), 1e-12), "perturbation"


def _train(model: nn.Module, data: Any, loss: Loss, factory: Any, rate: float, steps: int,
           run_dir: Path, seed: int) -> None:
    model.train()
    optimizer = factory([p for p in model.parameters() if p.requires_grad], rate)
    generator = torch.Generator().manual_seed(seed)
    batches = cycle_batches(data)
    with Monitor(model, optimizer, every=max(1, steps // 10), log_dir=run_dir) as monitor:
        for _ in range(steps):
            try:
                raw = next(batches)
            except StopIteration:
                raise UsageError("--data: the data yielded no batch") from None
            value, _, _ = _loss(loss, model, unpack_batch(raw), generator)
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            monitor.step(value)
