"""``check_training``: a CI gate for training code (``nndiag check --model --data``).

It works on deep copies, so the caller's model is left as found (its weights, buffers, modes
and the global RNG):

1. the model is inspected at init (NaN/Inf, gradient health, dead or saturated units, unused
   parameters), as ``nndiag inspect`` does;
2. pre-training sanity checks in the spirit of Karpathy's recipe, run through the training
   step: the user's own ``f(model, batch, optimizer) -> loss`` (``train_step``), a Lightning
   module's ``training_step`` with ``configure_optimizers``, or else nndiag's own step (zero
   the gradients, forward, loss, backward, optimizer step). The step is watched from outside,
   never edited:

   - a few calls with hooks on every trainable parameter (the gradient arriving in a backward
     pass, and what ``.grad`` held then), on the optimizer (the gradient each ``step()``
     applied) and on every module (its mode when it ran); the first call also sees, through a
     ``TorchFunctionMode``, every loss function the step calls and where its input came from
     (softmax, sigmoid or log_softmax; a module's output or the step's own code). Hence
     ``zero_grad_missing``, ``softmax_before_loss``, ``train_mode_off``,
     ``parameters_not_updated`` (with the reason) and the loss at init against log C;
   - the step on a batch and on each half of it, from the same start: a summed loss scores a
     batch twice its halves' mean (``loss_reduction_sum``);
   - overfitting one small batch (``cannot_overfit_batch``);
   - ``labels_misaligned``: two short trainings from the same start on the same batches, one
     with the data's pairing of inputs and targets and one with each batch's targets shuffled,
     scored through the step on a held-out batch;
   - batch mixing (a sample's output must not depend on another sample's input; checked in
     eval mode, where BatchNorm uses running statistics and legitimately couples nothing);
3. a short training run through the same step, recorded with ``Monitor`` and judged by the run
   rules.

The three phases' records are judged together by ``nndiag.diagnosis.diagnose``: symptoms that
a root cause explains (``nndiag.advice.causes``) are tagged with it, whichever phase found it.

This module orchestrates the gate and merges the findings of its phases; the parts live in
``nndiag.gate``: ``steps`` (running the step), ``observers`` (watching it from outside),
``sanity`` (the measurements of step 2) and ``batches`` (collecting, slicing and shuffling
batches). Their public names used before the split are re-exported here.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nndiag.batches import iter_tensors_with_batch, raw_batches, take_samples, unpack_batch
from nndiag.capture.state import copy_model, materialized
from nndiag.diagnosis import diagnose
from nndiag.errors import UsageError, UserCodeError
from nndiag.findings import FindingId, Report
from nndiag.gate.sanity import LABEL_STEPS, OVERFIT_SAMPLES, TRACE_CALLS, run_sanity
from nndiag.gate.steps import (
    LIGHTNING,
    Stepper,
    TrainStep,
    lightning_stepper,
    load_train_step,
    model_device,
    optimizer_builder,
    standard_stepper,
    user_stepper,
)
from nndiag.inspection import probe_model, probe_notes
from nndiag.losses import Loss, as_loss
from nndiag.lrfind import cycle_batches
from nndiag.monitor import Monitor
from nndiag.records import ProbeRecord, SanityRecord
from nndiag.rules.registry import finding_ids
from nndiag.run_check import RUN_FINDINGS, build_run_report
from nndiag.runlog import read_run

__all__ = [
    "DEFAULT_LR", "INIT_FINDINGS", "LABEL_STEPS", "LIGHTNING", "OVERFIT_SAMPLES",
    "SANITY_FINDINGS", "TRACE_CALLS", "TrainStep", "check_training", "iter_tensors_with_batch",
    "load_train_step", "take_samples",
]

SANITY_FINDINGS = finding_ids(SanityRecord)
INIT_FINDINGS = (FindingId.UNUSED_PARAMETERS, FindingId.POOR_INITIALIZATION,
                 FindingId.SATURATED_ACTIVATIONS, FindingId.INPUTS_NOT_NORMALIZED)
DEFAULT_LR = {"sgd": 1e-2, "rmsprop": 1e-3, "adam": 1e-3, "adamw": 1e-3}


@contextmanager
def _seeded(seed: int, model: nn.Module) -> Iterator[None]:
    """Seed the global RNG (dropout, shuffles) and restore the caller's state afterwards."""
    device = model_device(model)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def check_training(model: nn.Module, data: Any, *, loss: Any = None, optimizer: Any = "adamw",
                   lr: float | None = None, steps: int = 50, overfit_steps: int = 100,
                   log_dir: str | Path | None = None, seed: int = 0,
                   train_step: TrainStep | str | None = None) -> Report:
    """Gate training code: inspection at init, sanity checks through the step, a short run.

    Args:
        model: The model (left unchanged: every check works on a copy; a model whose lazy
            modules have not run yet is materialized on a copy, on the first batch's inputs).
            For ``train_step="lightning"``, a LightningModule.
        data: Training batches (cycled) or one batch, as the step receives them.
        loss: ``None`` (from the targets), a name, a spec or ``f(outputs, targets)``: the loss
            of nndiag's own step, and of the inspection at init.
        optimizer: ``sgd``, ``adam``, ``adamw``, ``rmsprop``, ``f(params, lr)`` or
            ``f(model)`` (or a spec of either); ignored for ``lightning``.
        lr: Learning rate for a named optimizer or ``f(params, lr)`` (default 1e-3, 1e-2 for
            SGD).
        steps: Steps of the short training run.
        overfit_steps: Steps spent trying to overfit one small batch.
        log_dir: Keep the run log here (default: a temporary directory).
        seed: Seed of the global RNG during the checks (restored afterwards) and of drawn
            targets.
        train_step: The user's step ``f(model, batch, optimizer) -> loss``, which zeroes the
            gradients, runs forward and backward and steps the optimizer itself; or
            ``"lightning"`` for the model's ``training_step`` and ``configure_optimizers``;
            ``None`` runs nndiag's own step with ``loss``.

    Returns:
        A ``nndiag.check/1`` report.

    Raises:
        UsageError: Bad arguments or unusable data.
        UserCodeError: The model, loss, optimizer or step code raised.

    Example:
        >>> report = check_training(build_model(), batches,  # doctest: +SKIP
        ...                         train_step=my_train_step, optimizer="sgd", lr=0.1)
        >>> [f.id for f in report.findings]  # doctest: +SKIP
        ['zero_grad_missing']
    """
    if steps < 2:
        raise UsageError(f"--steps must be at least 2, got {steps}")
    name = optimizer.lower() if isinstance(optimizer, str) and ":" not in optimizer else None
    rate = lr if lr is not None else DEFAULT_LR.get(name or "", 1e-3)
    loss_spec = as_loss(loss)
    if train_step == LIGHTNING:
        stepper = lightning_stepper(model)
    else:
        build, optimizer_name = optimizer_builder(optimizer, rate)
        if train_step is None:
            stepper = standard_stepper(loss_spec, build, seed, optimizer_name)
        elif callable(train_step):
            stepper = user_stepper(train_step, build, optimizer_name)
        else:
            raise UsageError(f"train_step: expected f(model, batch, optimizer) or "
                             f"'lightning', got {type(train_step).__name__}")
    pool = raw_batches(data, LABEL_STEPS + 1)
    if not isinstance(data, torch.Tensor | Mapping | tuple) and iter(data) is data:
        data = itertools.chain(pool, data)  # a one-shot iterator: the run starts from its start
    notes: list[str] = []

    with _seeded(seed, model):
        model = _materialized(model, pool[0], stepper)
        init = _probe_at_init(model, pool[0], loss_spec, seed, stepper, notes)
        record = run_sanity(model, pool, stepper, overfit_steps, init, seed, notes)
        with tempfile.TemporaryDirectory() as temp:
            run_dir = Path(log_dir) if log_dir is not None else Path(temp) / "run"
            _train(copy_model(model), data, stepper, steps, run_dir)
            log = read_run(run_dir)
    # Each phase judges its own evidence (a probe at init, the sanity checks, the recorded
    # run): a finding id may come from two phases, and both are kept, tagged with their phase.
    contexts, phases = [record, log], ["sanity", "training"]
    if init is not None:
        contexts, phases = [init, *contexts], ["init", *phases]
    report = build_run_report(log, diagnose(*contexts, phases=phases).findings)
    if log_dir is None:
        report.summary["run"] = None
    report.summary.update({
        # The rate the optimizer ran at (an optimizer spec may set its own), else the asked.
        "mode": "training",
        "lr": next((lr for lr in log.lrs if lr is not None),
                   None if stepper.kind == LIGHTNING else rate),
        "train_step": None if stepper.kind == "standard" else stepper.name, "seed": seed,
        "loss_at_init": record.loss_at_init, "expected_loss_at_init": record.expected_loss,
        "rules": [*SANITY_FINDINGS, *INIT_FINDINGS, *RUN_FINDINGS]})
    report.notes = (probe_notes(init) if init is not None else []) + notes + report.notes
    return report


def _materialized(model: nn.Module, raw: Any, stepper: Stepper) -> nn.Module:
    """``model``, or if its lazy modules have not run yet a copy materialized on the first batch.

    Every phase then copies the same materialized weights. The copy is materialized by calling
    the model on the batch's inputs, as nndiag's own step does; a step of the user's that feeds
    the model otherwise cannot be used for that.
    """
    try:
        return materialized(model, lambda: unpack_batch(raw).inputs)
    except (UsageError, UserCodeError) as exc:
        if stepper.kind == "standard":
            raise
        raise UsageError(f"the model has lazy modules that have not run yet: nndiag "
                         f"materializes them on a copy by calling the model on the first "
                         f"batch's inputs, and that failed ({exc}); run the model once on a "
                         "batch before the check") from exc


def _probe_at_init(model: nn.Module, raw: Any, loss: Loss, seed: int, stepper: Stepper,
                   notes: list[str]) -> ProbeRecord | None:
    """The probe at init; skipped (with a note) when the user's step feeds the model otherwise."""
    try:
        first = unpack_batch(raw)
        probe, _, _, _ = probe_model(copy_model(model), (first.inputs, first.targets),
                                  loss=loss, seed=seed)
        return probe
    except (UsageError, UserCodeError) as exc:
        if stepper.kind == "standard":
            raise
        notes.append(f"inspection at init skipped (it calls the model on the batch's inputs "
                     f"with --loss): {exc}")
        return None


def _train(model: nn.Module, data: Any, stepper: Stepper, steps: int, run_dir: Path) -> None:
    """The short run through the step, recorded with ``Monitor``."""
    optimizer = stepper.build_optimizer(model)
    step = stepper.new_step()
    batches = cycle_batches(data)
    with Monitor(model, optimizer, every=max(1, steps // 10), log_dir=run_dir) as monitor:
        for _ in range(steps):
            try:
                raw = next(batches)
            except StopIteration:
                raise UsageError("--data: the data yielded no batch") from None
            monitor.step(stepper.run(step, model, raw, optimizer))
