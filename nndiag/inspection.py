"""``inspect_model``: measure a live model, diagnose it, explain and (optionally) verify fixes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from nndiag.advice import advise
from nndiag.autofix import verify_fixes
from nndiag.capture.probe import ProbeConfig, run_probe
from nndiag.errors import UsageError
from nndiag.findings import Report
from nndiag.losses import Loss, resolve_loss
from nndiag.records import ProbeRecord
from nndiag.rules import run_probe_rules
from nndiag.rules.thresholds import THRESHOLDS, Threshold
from nndiag.specs import Batch, iter_batches

SCHEMA = "nndiag.inspect/1"
_INT_DTYPES = {"long": torch.long, "int64": torch.long, "int": torch.int, "int32": torch.int}
_FLOAT_DTYPES = {"float": torch.float32, "float32": torch.float32, "float64": torch.float64,
                 "double": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def synthetic_batches(model: nn.Module, input_shape: Sequence[int], *, dtype: str = "float32",
                      input_max: int | None = None, count: int = 1, seed: int = 0
                      ) -> list[Batch]:
    """Random input batches of a given shape (standard normal, or integers for embeddings).

    Args:
        model: The model, used to find the vocabulary size of integer inputs.
        input_shape: Shape of one input batch, batch dimension first.
        dtype: ``float32`` (default), ``float64``, ``float16``, ``bfloat16``, ``long`` or ``int``.
        input_max: Exclusive upper bound of integer inputs (default: the first embedding's
            ``num_embeddings``).
        count: Number of batches.
        seed: Seed of a private generator (the global RNG is left alone).

    Raises:
        UsageError: A bad shape or dtype, or integer inputs with no known upper bound.

    """
    shape = tuple(int(v) for v in input_shape)
    if not shape or any(v <= 0 for v in shape):
        raise UsageError(f"--input-shape {','.join(map(str, shape))}: every size must be positive")
    generator = torch.Generator().manual_seed(seed)
    if dtype in _INT_DTYPES:
        if input_max is None:
            embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
            if embedding is None:
                raise UsageError("integer inputs need --input-max (the model has no nn.Embedding "
                                 "to take the vocabulary size from)")
            input_max = embedding.num_embeddings
        if input_max <= 0:
            raise UsageError(f"--input-max {input_max}: must be positive")
        return [Batch(torch.randint(0, input_max, shape, generator=generator,
                                    dtype=_INT_DTYPES[dtype])) for _ in range(count)]
    if dtype not in _FLOAT_DTYPES:
        raise UsageError(f"--input-dtype {dtype!r}: use one of "
                         f"{', '.join([*_FLOAT_DTYPES, *_INT_DTYPES])}")
    return [Batch(torch.randn(shape, generator=generator).to(_FLOAT_DTYPES[dtype]))
            for _ in range(count)]


def _as_loss(loss: str | Loss | Callable[[Any, Any], torch.Tensor] | None) -> Loss:
    if loss is None or isinstance(loss, str):
        return resolve_loss(loss)
    if isinstance(loss, Loss):
        return loss
    if callable(loss):
        return Loss(getattr(loss, "__name__", type(loss).__name__), loss, user_code=True)
    raise UsageError(f"loss: expected a name, a spec or a function, got {type(loss).__name__}")


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
) -> Report:
    """Measure a model on a few batches, diagnose it and recommend fixes.

    The model is left exactly as found (weights, buffers, modes, ``requires_grad``,
    ``.grad``, hooks and RNG state).

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
    if not isinstance(model, nn.Module):
        raise UsageError(f"expected an nn.Module, got {type(model).__name__}")
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
    thresholds = thresholds or THRESHOLDS
    config = ProbeConfig(loss=_as_loss(loss), seed=seed)
    probe = run_probe(model, probe_batches, config)
    findings = [advise(f, probe) for f in run_probe_rules(probe, thresholds)]
    if try_fixes:
        verify_fixes(model, probe_batches, probe, findings, config, thresholds)
    return build_report(probe, findings)


def build_report(probe: ProbeRecord, findings: list[Any]) -> Report:
    """Assemble the inspect report from a probe and its findings."""
    reference = probe.output_grad_norm
    layers = []
    for record in probe.layers:
        row = asdict(record)
        row["depth_gain"] = (record.grad_out_norm / reference
                             if reference and record.grad_out_norm is not None else None)
        layers.append(row)
    notes = []
    if probe.not_run:
        notes.append("not measured (never ran during the probe): " + ", ".join(probe.not_run))
    if not probe.activation_layers():
        notes.append("no activation was seen: activations written as plain tensor arithmetic "
                     "(x.clamp(min=0), x * (x > 0)) are not measured")
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
    return Report(SCHEMA, findings, layers, summary, notes)
