"""Activation statistics: mean, variance, dead units, saturation, pre-activation scale.

Definitions (each one has an oracle test in ``tests/test_stats_oracle.py``, and the probe and
the recorder are checked to agree on them in ``tests/test_agreement.py``):

- mean / variance: over every element of a layer's output (population variance), pooled over
  every call the statistic covers (probe batches, or the micro-batches of a training step).
- dead unit: a unit is one position of the output apart from the batch dimension (a feature of
  a Linear layer, one channel at one pixel of a conv layer); it is dead when it is exactly zero
  for every sample. The dead fraction is the share of such units.
- saturated element: one whose local derivative is below ``SATURATION_DERIVATIVE_RATIO`` of the
  activation's largest derivative (sigmoid: ``4*y*(1-y)``, tanh: ``1-y**2``, softsign:
  ``(1-|y|)**2``), or that sits on a clipping bound (hardtanh, hardsigmoid, the top of relu6).
- pre-activation mean / variance: of the input of a saturating activation (not available for
  in-place activations, whose input is overwritten).

Every output is reduced to summable *moments* (``MOMENT_FIELDS``, float64): element count, sum,
sum of squares, largest absolute value, saturated count, and the same three sums of the
pre-activation. Sums of calls add up, so the moments pool over batches and over distributed
ranks by plain addition (the largest value by a maximum), and mean and variance come out of
them once, on the host (``finish_moments``). Outputs of the same shape are reduced together,
stacked (``reduce_outputs``): one set of kernels for a whole group of layers instead of one
per layer, which is what keeps recording every step cheap. Each output's values are shifted by
its first element before the float32 sums, so ``E[y^2] - E[y]^2`` does not cancel when the
mean is large against the spread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

SATURATION_DERIVATIVE_RATIO = 0.05

# Columns of the moments tensor; all are summed when pooling, but ``absmax`` (a maximum).
MOMENT_FIELDS = ("n", "sum", "sumsq", "absmax", "saturated", "pre_n", "pre_sum", "pre_sumsq")
ABSMAX = MOMENT_FIELDS.index("absmax")


def saturated_mask(kind: str, output: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    """Boolean mask of saturated elements of an activation's output (see module docstring)."""
    y = output
    if kind == "sigmoid":
        return 4.0 * y * (1.0 - y) < SATURATION_DERIVATIVE_RATIO
    if kind == "tanh":
        return 1.0 - y * y < SATURATION_DERIVATIVE_RATIO
    if kind == "softsign":
        return (1.0 - y.abs()).square() < SATURATION_DERIVATIVE_RATIO
    if kind == "relu6":
        return y >= bounds[1]
    low, high = bounds
    return (y <= low) | (y >= high)


def _stacked(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors as rows of one float32 matrix (a view, not a copy, for a single tensor)."""
    if len(tensors) == 1:
        return tensors[0].detach().reshape(1, -1).float()
    return torch.stack([t.detach().reshape(-1).float() for t in tensors])


def _raw_sums(rows: torch.Tensor) -> torch.Tensor:
    """Per row: count, sum and sum of squares (float64), from sums shifted by the first value."""
    shift = rows[:, :1]
    centered = rows - shift
    total = centered.sum(1)
    squares = torch.linalg.vecdot(centered, centered)
    n = rows.shape[1]
    shift64, total64, squares64 = shift[:, 0].double(), total.double(), squares.double()
    return torch.stack([torch.full_like(shift64, n), total64 + n * shift64,
                        squares64 + 2 * shift64 * total64 + n * shift64 * shift64], dim=1)


def reduce_outputs(outputs: Sequence[torch.Tensor], *, saturation: str | None = None,
                   bounds: tuple[float, float] = (-1.0, 1.0),
                   pre_activations: Sequence[torch.Tensor] | None = None,
                   unit_mask: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reduce outputs of one shape to their moments (and, for ReLUs, their fired-unit masks).

    Args:
        outputs: Layer outputs of identical shape, dtype and device (at least one element
            each): one group, reduced with one set of kernels.
        saturation: The activation kind when the outputs come from a saturating activation.
        bounds: Clipping bounds for hardtanh-family activations.
        pre_activations: The activations' inputs (same shapes), when they are still intact.
        unit_mask: Also return which units fired (ReLU family; see ``alive_units``).

    Returns:
        A ``(len(outputs), len(MOMENT_FIELDS))`` float64 tensor on the outputs' device (NaN in
        the columns that do not apply), and a ``(len(outputs), units)`` boolean tensor or
        ``None``. Nothing is moved to the host.
    """
    rows = _stacked(outputs)
    sums = _raw_sums(rows)
    low, high = torch.aminmax(rows, dim=1)
    absmax = torch.maximum(high, -low).double().unsqueeze(1)
    nan = torch.full_like(absmax, math.nan)
    if saturation is not None:
        saturated = saturated_mask(saturation, rows, bounds).sum(1).double().unsqueeze(1)
    else:
        saturated = nan
    if pre_activations is not None:
        pre = _raw_sums(_stacked(pre_activations))
    else:
        pre = nan.expand(-1, 3)
    moments = torch.cat([sums, absmax, saturated, pre], dim=1)
    alive = None
    if unit_mask:
        batch = outputs[0].shape[0] if outputs[0].dim() else 1
        alive = _alive_rows(rows.reshape(rows.shape[0], batch, -1))
    return moments, alive


def _alive_rows(values: torch.Tensor) -> torch.Tensor:
    """``(groups, batch, units)`` -> ``(groups, units)``: nonzero in some sample.

    For the ReLU family, whose outputs are never negative, "nonzero in some sample" is "the
    maximum over the batch is above zero": a max over the batch is ~13x faster on CPU than an
    ``any`` over a boolean tensor.
    """
    return values.amax(dim=1) != 0


def alive_units(output: torch.Tensor) -> torch.Tensor:
    """Boolean mask over units (all positions but the batch dimension): nonzero in some sample."""
    y = output.detach()
    if y.dim() == 0:
        return (y != 0).reshape(1)
    flat = y.reshape(1, y.shape[0], -1)
    if bool(y.dtype.is_floating_point):
        return _alive_rows(flat)[0]
    return (flat[0] != 0).any(dim=0)


def square_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of squares of all elements (a squared L2 norm) as a 0-d float32 tensor."""
    flat = values.detach().float().reshape(-1)
    return torch.dot(flat, flat)


def dead_fraction(alive: torch.Tensor) -> torch.Tensor:
    """Share of units that never fired, from a fired-unit mask (0-d tensor, on device)."""
    return 1.0 - alive.float().mean()


def _moments(n: float, total: float, squares: float) -> tuple[float | None, float | None]:
    if not n or n != n:
        return None, None
    mean = total / n
    variance = squares / n - mean * mean
    if not math.isfinite(variance):
        return mean, variance
    return mean, math.sqrt(max(variance, 0.0))


def finish_moments(values: Sequence[float]) -> dict[str, float | None]:
    """Turn pooled moments (``MOMENT_FIELDS``, host numbers) into the reported statistics.

    Returns:
        ``mean``, ``std``, ``absmax``, ``saturated_fraction``, ``preact_mean``,
        ``preact_std`` (``None`` where not measured).
    """
    fields = dict(zip(MOMENT_FIELDS, values, strict=True))
    mean, std = _moments(fields["n"], fields["sum"], fields["sumsq"])
    pre_mean, pre_std = _moments(fields["pre_n"], fields["pre_sum"], fields["pre_sumsq"])
    saturated = fields["saturated"]
    return {
        "mean": mean,
        "std": std,
        "absmax": fields["absmax"],
        "saturated_fraction": saturated / fields["n"] if saturated == saturated and
        fields["n"] else None,
        "preact_mean": pre_mean,
        "preact_std": pre_std,
    }


def depth_gain(grad_out_norm: float | None, output_grad_norm: float | None) -> float | None:
    """Gradient norm at a layer's output over the gradient norm at the model's output."""
    if grad_out_norm is None or not output_grad_norm:
        return None
    return grad_out_norm / output_grad_norm
