"""``inspect_model``: measure a live model, diagnose it, explain and (optionally) verify fixes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nndiag.advice.checkpoint import architecture_summary, checkpoint_notes
from nndiag.autofix import verify_fixes
from nndiag.batches import iter_batches, synthetic_batches
from nndiag.capture.probe import ProbeConfig, run_probe
from nndiag.capture.state import materialized
from nndiag.checkpoints import (
    Checkpoint,
    LoadResult,
    load_checkpoint,
    load_into,
    measure_checkpoint,
    model_checkpoint,
)
from nndiag.diagnosis import diagnose, judge
from nndiag.errors import UsageError, validate_seed
from nndiag.findings import CheckpointReport, Finding, InspectReport, Report, severity_rank
from nndiag.losses import Loss, as_loss
from nndiag.records import CheckpointRecord, ProbeRecord
from nndiag.records.rows import Row
from nndiag.rules.thresholds import THRESHOLDS, Threshold
from nndiag.specs import require_usable_model

SCHEMA = InspectReport.schema
def looks_pretrained(model: nn.Module) -> bool:
    """True for weights loaded with Hugging Face's ``from_pretrained`` (it records the source).

    Weights loaded from a checkpoint by nndiag are pretrained too; for other loaders pass
    ``pretrained=True`` (``--pretrained``).
    """
    config = getattr(model, "config", None)
    return bool(getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", ""))


def inspect_model(
    model: nn.Module,
    data: Any = None,
    *,
    input_shape: Sequence[int] | None = None,
    input_dtype: str = "float32",
    input_max: int | None = None,
    loss: str | Loss | Callable[[Any, Any], torch.Tensor] | None = None,
    batches: int = 1,
    try_fixes: bool = False,
    seed: int = 0,
    thresholds: dict[str, Threshold] | None = None,
    pretrained: bool | None = None,
) -> Report:
    """Measure a model on a few batches, diagnose it and recommend fixes.

    The model is left exactly as found (weights, buffers, modes, ``requires_grad``,
    ``.grad``, hooks and RNG state). A model whose lazy modules have not run yet is measured
    as a copy materialized on the first batch; it stays lazy.

    Args:
        model: Any ``nn.Module``.
        data: Batches (a DataLoader, a list) or one batch ``(inputs, targets)``.
        input_shape: Instead of data: the shape of a random input batch.
        input_dtype: dtype of random inputs (``float32``, ``long`` for token ids...).
        input_max: Exclusive upper bound of random integer inputs.
        loss: ``None`` to choose from the targets, a name (``cross_entropy``, ``mse``...), a
            spec ``module:function``, or a function ``f(outputs, targets)``.
        batches: How many batches to probe with.
        try_fixes: Apply automatic fixes to copies of the model and report before/after.
        seed: Seed for random inputs and targets.
        thresholds: Override the rule thresholds (default ``THRESHOLDS``).
        pretrained: The weights were trained (a checkpoint, a pretrained encoder): advice never
            re-initializes them and ``--try-fixes`` never applies a re-initialization.
            ``None`` detects Hugging Face ``from_pretrained`` models.

    Returns:
        The report: findings (with explanations and fixes), per-layer statistics, a summary.

    Raises:
        UsageError: Bad arguments or unusable data (exit code 2 in the CLI).
        UserCodeError: The model or the user's loss raised (exit code 3 in the CLI).

    Example:
        >>> from nndiag import examples, inspect_model
        >>> report = inspect_model(examples.deep_sigmoid_mlp(), input_shape=(64, 32))
        >>> report.status, [f.id for f in report.findings][:1]
        ('error', ['vanishing_gradients'])

    """
    probe, probe_batches, config, measured = probe_model(
        model, data, input_shape=input_shape, input_dtype=input_dtype, input_max=input_max,
        loss=loss, batches=batches, seed=seed, pretrained=pretrained)
    report = diagnose(probe, thresholds=thresholds)
    if try_fixes:
        verify_fixes(measured, probe_batches, probe, report.findings, config,
                     thresholds or THRESHOLDS)
    return build_report(probe, report.findings)


def probe_model(
    model: nn.Module,
    data: Any = None,
    *,
    input_shape: Sequence[int] | None = None,
    input_dtype: str = "float32",
    input_max: int | None = None,
    loss: str | Loss | Callable[[Any, Any], torch.Tensor] | None = None,
    batches: int = 1,
    seed: int = 0,
    pretrained: bool | None = None,
) -> tuple[ProbeRecord, list[Any], ProbeConfig, nn.Module]:
    """Measure a model as ``inspect_model`` does, without judging it (arguments as there).

    Returns:
        The probe (its ``weights`` read too), the batches it ran on, its configuration and the
        model it measured: ``model`` itself, or its materialized copy if ``model`` is lazy.
    """
    require_usable_model(model)
    validate_seed(seed, "--seed")
    if batches < 1:
        raise UsageError(f"batches must be at least 1, got {batches}")
    if (data is None) == (input_shape is None):
        raise UsageError("give exactly one of data (--data) or input_shape (--input-shape)")
    if data is not None:
        probe_batches = iter_batches(data, batches)
    else:
        assert input_shape is not None
        probe_batches = synthetic_batches(model, input_shape, dtype=input_dtype,
                                          input_max=input_max, count=batches, seed=seed)
    config = ProbeConfig(loss=as_loss(loss), seed=seed)
    model = materialized(model, lambda: probe_batches[0].inputs)
    probe = run_probe(model, probe_batches, config)
    probe.pretrained = looks_pretrained(model) if pretrained is None else pretrained
    probe.weights = measure_checkpoint(model_checkpoint(model))
    return probe, probe_batches, config, model


def probe_notes(probe: ProbeRecord) -> list[str]:
    """What the user should know about a probe that is not a finding (unmeasured layers)."""
    notes = []
    if probe.not_run:
        notes.append("not measured (never ran during the probe): " + ", ".join(probe.not_run))
    if probe.skipped_in_training:
        notes.append("skipped in training mode during the probe, run in eval mode (LayerDrop, "
                     "stochastic depth), not measured: " + ", ".join(probe.skipped_in_training))
    if not probe.activation_layers():
        notes.append("no activation was seen: activations written as plain tensor arithmetic "
                     "(x.clamp(min=0), x * (x > 0)) are not measured")
    return notes


def build_report(probe: ProbeRecord, findings: list[Finding]) -> InspectReport:
    """Assemble the inspect report from a probe and its findings."""
    layers: list[Row] = list(probe.layers)
    summary = {
        "model": probe.model_class,
        "loss": probe.loss,
        "loss_name": probe.loss_name,
        "num_classes": probe.num_classes,
        "batches": probe.batches,
        "batch_size": probe.batch_size,
        "trainable_parameters": probe.trainable_parameters,
        "frozen_parameters": probe.frozen_parameters,
        "output_grad_norm": probe.output_grad_norm,
        "input_std": probe.input_std,
        "measured_layers": len(probe.layers),
    }
    return InspectReport(findings=findings, layers=layers, summary=summary,
                         notes=probe_notes(probe))


CHECKPOINT_SCHEMA = CheckpointReport.schema


def inspect_checkpoint(
    path: str | Path,
    model: nn.Module | None = None,
    data: Any = None,
    *,
    input_shape: Sequence[int] | None = None,
    input_dtype: str = "float32",
    input_max: int | None = None,
    loss: str | Loss | Callable[[Any, Any], torch.Tensor] | None = None,
    batches: int = 1,
    try_fixes: bool = False,
    seed: int = 0,
    unsafe_load: bool = False,
    strict: bool = True,
    thresholds: dict[str, Threshold] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Inspect the weights a training run produced.

    Without ``model``, the weights are analysed without data (shapes, dtypes, NaN/Inf, scale
    against He/Xavier, chains of layers whose scales multiply to an exploding or vanishing
    signal, dead BatchNorm channels) -- except for TorchScript archives and pickled modules,
    which carry their architecture: given ``data`` or ``input_shape`` (and ``unsafe_load``,
    since loading them runs their code) they are inspected live. With ``model``, the weights
    are loaded into it (this changes ``model``: pass a fresh instance) and the model is
    inspected live, as ``inspect_model`` does.

    Args:
        path: A checkpoint file or a Hugging Face-style directory.
        model: The architecture to load the weights into.
        data: Batches for the live inspection.
        input_shape: Or the shape of random inputs.
        input_dtype: dtype of random inputs.
        input_max: Exclusive upper bound of random integer inputs.
        loss: As for ``inspect_model``.
        batches: Number of probe batches.
        try_fixes: As for ``inspect_model``.
        seed: Seed for random inputs and targets.
        unsafe_load: Allow unpickling arbitrary objects (runs code from the file).
        strict: Require the checkpoint's keys to match the model's (a wrapper prefix such
            as ``net.`` or ``module.`` is mapped); when False, mismatches become a finding.
        thresholds: Override the rule thresholds.
        progress: Called with (bytes done, bytes total) while tensors are read.

    Returns:
        A ``nndiag.inspect-checkpoint/1`` report (data-free) or a ``nndiag.inspect/1`` report.

    Raises:
        UsageError: Unreadable, unsafe or mismatched checkpoints, bad arguments.
        UserCodeError: The model or loss raised during the live inspection.
    """
    checkpoint = load_checkpoint(path, unsafe_load=unsafe_load)
    live = data is not None or input_shape is not None
    if model is None and checkpoint.module is not None and live:
        report = inspect_model(checkpoint.module, data, input_shape=input_shape,
                               input_dtype=input_dtype, input_max=input_max, loss=loss,
                               batches=batches, try_fixes=try_fixes, seed=seed,
                               thresholds=thresholds)
        return _with_checkpoint_summary(report, checkpoint, None)
    if model is None:
        if live and checkpoint.format == "torchscript":
            raise UsageError("a live inspection of a TorchScript archive loads the module, "
                             "which runs the archive's code: pass --unsafe-load if you trust "
                             "the file (or drop --data/--input-shape for a data-free analysis)")
        if live:
            raise UsageError("a live inspection of a state dict needs the architecture: pass "
                             "--model SPEC (or drop --data/--input-shape for a data-free "
                             "analysis)")
        record = measure_checkpoint(checkpoint, progress)
        return build_checkpoint_report(record, diagnose(record, thresholds=thresholds).findings)
    if not live:
        raise UsageError("with --model, give --data or --input-shape to inspect the loaded "
                         "model (or drop --model for a data-free analysis of the weights)")
    loaded = load_into(model, checkpoint, strict=strict, progress=progress)
    report = inspect_model(model, data, input_shape=input_shape, input_dtype=input_dtype,
                           input_max=input_max, loss=loss, batches=batches,
                           try_fixes=try_fixes, seed=seed, thresholds=thresholds,
                           pretrained=True)
    return _with_checkpoint_summary(report, checkpoint, loaded)


def _with_checkpoint_summary(report: Report, checkpoint: Checkpoint,
                             loaded: LoadResult | None) -> Report:
    report.summary["checkpoint"] = {
        "path": str(checkpoint.path), "format": checkpoint.format,
        "weights_key": checkpoint.weights_key, "extras": checkpoint.extras,
    }
    if checkpoint.format == "torchscript":
        report.notes.append("TorchScript: calls inside the scripted module are invisible to "
                            "Python hooks, so per-layer activations and the gradient through "
                            "depth are not measured; parameters, their gradients and the "
                            "model output are")
    if loaded is None:
        return report
    if loaded.prefix_removed or loaded.prefix_added:
        report.notes.append(
            f"checkpoint keys mapped onto the model: prefix {loaded.prefix_removed!r} removed, "
            f"{loaded.prefix_added!r} added")
    mismatch = judge(loaded)
    if mismatch:
        report.findings = sorted(report.findings + mismatch,
                                 key=lambda f: -severity_rank(f.severity))
    return report


def build_checkpoint_report(record: CheckpointRecord, findings: list[Finding]
                            ) -> CheckpointReport:
    """Assemble the data-free report from a checkpoint record and its findings."""
    layers: list[Row] = list(record.modules)
    dtypes: dict[str, int] = {}
    for module in record.modules:
        for tensor in module.tensors:
            dtypes[tensor.dtype] = dtypes.get(tensor.dtype, 0) + tensor.numel
    notes = []
    zero_init = [m.name for m in record.modules if m.zero_initialized]
    if zero_init:
        notes.append("BatchNorm layers with gamma exactly zero and untouched running statistics "
                     "(zero-initialized residual branches, not dead): " + ", ".join(zero_init))
    notes += checkpoint_notes(record)
    summary = {
        "path": record.path,
        "format": record.format,
        "weights_key": record.weights_key,
        "parameters": record.parameters,
        "tensors": sum(len(m.tensors) for m in record.modules),
        "dtypes": dtypes,
        "extras": record.extras,
        "files": record.files,
    }
    architecture = architecture_summary(record)
    if architecture is not None:
        summary["architecture"] = architecture
    return CheckpointReport(findings=findings, layers=layers, summary=summary, notes=notes)
