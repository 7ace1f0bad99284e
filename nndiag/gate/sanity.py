"""The pre-training sanity measurements, each through the training step on copies of the model.

``run_sanity`` fills the ``SanityRecord`` that the sanity rules (``nndiag.rules.sanity``)
judge:

- a few watched calls of the step (``observers``): carried-over gradients, the loss functions
  and their inputs, modules run in eval mode, parameters not updated, the loss at init against
  log C;
- the step on a batch and on each half of it, from the same start (the loss reduction);
- overfitting one small batch;
- the labels check: two short trainings from the same start on the same batches, one with the
  data's pairing of inputs and targets and one with each batch's targets shuffled, scored
  through the step on a held-out batch;
- batch mixing: how much a sample's output depends on the other samples' inputs (eval mode).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from nndiag.batches import (
    Batch,
    batch_size,
    iter_tensors_with_batch,
    move_to,
    shuffle_targets,
    slice_batch,
    unpack_batch,
)
from nndiag.capture.state import copy_model
from nndiag.errors import UsageError, UserCodeError, describe_exception
from nndiag.gate.observers import LossInputs, StepWatch, mode_dependent
from nndiag.gate.steps import Stepper, model_device
from nndiag.records import ProbeRecord, SanityRecord
from nndiag.rules.sanity import NEGLIGIBLE_GRADIENT, SUM_REDUCTION_RATIO, cannot_overfit
from nndiag.specs import call_model, primary_output

OVERFIT_SAMPLES = 16
# Calls of the step watched for gradients and modes: until two optimizer steps and a backward
# pass after the second, at most this many (gradient accumulation over up to 7 micro-batches
# shows two steps, over up to 15 one).
TRACE_CALLS = 16
# Steps of each of the two trainings compared by the labels check (measured on the tests' and
# the CI-gate guide's examples: enough for data with a learnable pairing to pull clearly
# ahead).
LABEL_STEPS = 30


def run_sanity(model: nn.Module, pool: list[Any], stepper: Stepper, overfit_steps: int,
               init: ProbeRecord | None, seed: int, notes: list[str]) -> SanityRecord:
    """Run every sanity check through the step, each on a fresh copy of ``model``.

    Args:
        model: The caller's model (never trained itself).
        pool: Batches as the data yields them (the first one is the checks' batch).
        stepper: How the step runs.
        overfit_steps: Steps spent trying to overfit one small batch.
        init: The probe at init (``None``: skipped), for the loss at init.
        seed: Seed of the labels check (its shuffles, trainings and scores).
        notes: Receives a note for each check that could not run.

    Returns:
        The record the sanity rules judge.
    """
    first = pool[0]
    record = SanityRecord(loss_at_init=math.nan, step_kind=stepper.kind)
    full_loss = _watch_calls(model, pool, stepper, record, notes)
    size = batch_size(first)
    _expected_loss(record, init)
    if size is not None and size >= 4:
        _reduction(model, first, size, full_loss, stepper, record, notes)
    if record.reduction_ratio is not None:  # measured: a sum divided by hand is a mean
        summed = record.reduction_ratio >= SUM_REDUCTION_RATIO
    else:
        summed = any(c.get("reduction") == "sum" for c in record.loss_calls)
    if summed and size and record.expected_loss is not None and stepper.kind != "standard":
        record.expected_loss *= size  # a summed loss starts at the sum of chance losses
    small = slice_batch(first, 0, OVERFIT_SAMPLES, size) if size else first
    fitted = copy_model(model)
    opt = stepper.build_optimizer(fitted)
    step = stepper.new_step()
    losses = []
    # With gradient accumulation over k calls, a step of the check is k calls of the step.
    per_update = min(max(record.backward_per_step or 1, 1), TRACE_CALLS)
    for _ in range(overfit_steps * per_update):
        losses.append(stepper.run(step, fitted, small, opt))
        if not math.isfinite(losses[-1]):
            break
    record.overfit_losses = losses[::per_update] if per_update > 1 else losses
    record.overfit_batch_size = min(size or 0, OVERFIT_SAMPLES)
    unlearned = cannot_overfit(record)
    if (unlearned is None or unlearned.severity == "info") and len(losses) >= 2:
        _labels(model, pool, stepper, seed, record, per_update)
    try:
        batch = unpack_batch(first)
        record.mixing_ratio, record.mixing_method = _mixing(copy_model(model), batch)
    except Exception as exc:  # the step may feed the model otherwise than (inputs, targets)
        if stepper.kind == "standard":
            raise
        notes.append(f"batch mixing not checked: calling the model on the batch's inputs "
                     f"failed ({describe_exception(exc)})")
    return record


def _watch_calls(model: nn.Module, pool: list[Any], stepper: Stepper, record: SanityRecord,
                 notes: list[str]) -> float:
    """Call the step on a copy under watch; fill the record; return the first call's loss."""
    watched = copy_model(model)
    opt = stepper.build_optimizer(watched)
    step = stepper.new_step()
    before = {n: p.detach().clone() for n, p in watched.named_parameters() if p.requires_grad}
    watch = StepWatch(watched, opt)
    first_loss = math.nan
    try:
        tracer = LossInputs(watch.module_outputs)
        watch.record_outputs = True
        with tracer:
            first_loss = stepper.run(step, watched, pool[0], opt)
        watch.record_outputs = False
        watch._outputs_alive = []
        record.loss_calls = tracer.calls
        tracer.produced = []
        calls = 1
        while calls < TRACE_CALLS and not watch.done():
            stepper.run(step, watched, pool[calls % len(pool)], opt)
            calls += 1
    finally:
        watch.close()
    record.loss_at_init = first_loss
    record.step_calls = calls
    record.optimizer_steps = watch.steps
    record.steps_checked = watch.steps_checked
    record.backward_per_step = watch.backward_per_step
    record.carried_steps = watch.carried_steps
    names = [n for n, _ in watch.params]
    record.carried_parameters = [names[i] for i in sorted(watch.carried)]
    if watch.carried and watch.fresh_sq > 0:
        record.carried_ratio = math.sqrt(watch.stale_sq / watch.fresh_sq)
    moved = {n for n, p in watched.named_parameters() if n in before
             and not torch.equal(p.detach(), before[n])}
    unchanged = [i for i, n in enumerate(names) if watch.had_grad[i] and n not in moved]
    # A gradient float32 rounding can leave behind (a bias whose output a normalization
    # re-centres gets ~1e-8 of a real one) is not a gradient the optimizer failed to apply.
    scales = sorted(math.sqrt(watch.grad_ms[i]) for i, had in enumerate(watch.had_grad) if had)
    typical = scales[len(scales) // 2] if scales else 0.0
    negligible = {i for i in unchanged
                  if math.sqrt(watch.grad_ms[i]) < NEGLIGIBLE_GRADIENT * typical}
    record.negligible_gradients = {names[i]: math.sqrt(watch.grad_ms[i]) / typical
                                   for i in sorted(negligible)}
    unchanged = [i for i in unchanged if i not in negligible]
    record.not_updated = [names[i] for i in unchanged]
    if unchanged:
        if not watch.steps:
            record.not_updated_reason = "no_step"
        elif not any(watch.grad_at_step[i] for i in unchanged):
            record.not_updated_reason = "zeroed_before_step"
        else:
            record.not_updated_reason = "not_in_optimizer"
    if not watch.steps and moved:
        notes.append(f"the step changed the parameters without calling step() on the "
                     f"optimizer it was given ({calls} calls): gradients were not checked")
    dependent = [(n, m) for n, m in watch.eval_ran.items() if mode_dependent(m)]
    record.eval_modules = [n or "(model)" for n, _ in dependent]
    record.eval_kinds = [type(m).__name__ for _, m in dependent]
    record.eval_root = "" in watch.eval_ran
    if watch.eval_ran:
        record.mode_changes_output = _mode_changes_output(model, pool[0], set(watch.eval_ran))
    return first_loss


def _mode_changes_output(model: nn.Module, raw: Any, eval_names: set[str]) -> bool | None:
    """Whether the model's output in the modes the step used differs from training mode."""
    try:
        inputs = move_to(unpack_batch(raw).inputs, model_device(model))
        outputs = []
        for as_ran in (True, False):
            probe = copy_model(model)
            for name, module in probe.named_modules():
                module.training = not (as_ran and name in eval_names)
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                outputs.append(primary_output(call_model(probe, inputs)))
    except Exception:
        return None
    ran, trained = outputs
    if ran is None or trained is None or ran.shape != trained.shape:
        return None
    return not torch.allclose(ran.float(), trained.float(), rtol=1e-4, atol=1e-6)


def _expected_loss(record: SanityRecord, init: ProbeRecord | None) -> None:
    """What an uninformed model scores: log C for cross-entropy (from the probe or the step)."""
    if record.step_kind == "standard" and init is not None:
        record.loss_at_init = float(init.loss)
        classes = init.num_classes
        if classes and init.loss_name in ("cross_entropy", "nll"):
            record.classes, record.expected_loss = classes, math.log(classes)
        return
    calls = record.loss_calls
    if len(calls) != 1 or calls[0]["name"] not in ("cross_entropy", "nll_loss"):
        return
    call = calls[0]
    classes = call.get("classes")
    if not classes or classes < 2 or call["input"] == "probabilities":
        return
    record.classes, record.expected_loss = classes, math.log(classes)


def _reduction(model: nn.Module, raw: Any, size: int, full: float, stepper: Stepper,
               record: SanityRecord, notes: list[str]) -> None:
    """The step's loss on each half of the batch, from the same start as on the whole batch."""
    half = size // 2
    losses = []
    for start, stop in ((0, half), (half, size)):
        part = slice_batch(raw, start, stop, size)
        copy_ = copy_model(model)
        try:
            losses.append(stepper.run(stepper.new_step(), copy_, part,
                                      stepper.build_optimizer(copy_)))
        except (UsageError, UserCodeError) as exc:
            notes.append(f"loss reduction not checked: the step failed on half a batch ({exc})")
            return
    if not all(math.isfinite(v) and v > 0 for v in (full, *losses)):
        return
    mean = (half * losses[0] + (size - half) * losses[1]) / size
    record.batch_size = size
    record.reduction_ratio = full / mean
    record.reduction_losses = [full, *losses]


def _labels(model: nn.Module, pool: list[Any], stepper: Stepper, seed: int,
            record: SanityRecord, per_update: int) -> None:
    """A held-out batch's loss after training on the data's pairing and on shuffled targets."""
    if len(pool) >= 2:
        held, train = pool[0], pool[1:]
    else:
        size = batch_size(pool[0])
        if size is None or size < 8:
            return
        held = slice_batch(pool[0], size // 2, size, size)
        train = [slice_batch(pool[0], 0, size // 2, size)]
    generator = torch.Generator().manual_seed(seed + 1)
    shuffled = [shuffle_targets(b, generator) for b in train]
    if any(b is None for b in shuffled):
        return
    scores = {"init": _score(model, held, stepper, seed)}
    for label, batches in (("paired", train), ("shuffled", shuffled)):
        trained = copy_model(model)
        opt = stepper.build_optimizer(trained)
        step = stepper.new_step()
        torch.manual_seed(seed)
        for i in range(LABEL_STEPS * per_update):
            stepper.run(step, trained, batches[i % len(batches)], opt)
        scores[label] = _score(trained, held, stepper, seed)
    record.heldout = scores
    record.label_steps = LABEL_STEPS


def _score(model: nn.Module, batch: Any, stepper: Stepper, seed: int) -> float:
    """The step's loss on a batch, computed before its update, on a copy that is thrown away."""
    probe = copy_model(model)
    torch.manual_seed(seed)
    return stepper.run(stepper.new_step(), probe, batch, stepper.build_optimizer(probe))


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
    device = model_device(model)
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

