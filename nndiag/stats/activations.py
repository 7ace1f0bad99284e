"""Activation statistics: mean, variance, dead units, saturation, pre-activation scale.

Definitions (each one has an oracle test in ``tests/test_stats_oracle.py``, and the probe and
the recorder are checked to agree on them in ``tests/test_agreement.py``):

- mean / variance: over every element of a layer's output (population variance), pooled over
  every call the statistic covers (probe batches, or the micro-batches of a training step).
- dead unit: a unit is a feature map's channel (dimension 1 of an output of four or more
  dimensions, ``(N, C, H, W)``: a conv filter), else one position of the output apart from the
  batch dimension (a feature of a Linear layer); it is dead when it is exactly zero at every
  position for every sample. The dead fraction is the share of such units. (A channel rather
  than a channel at one pixel: pixels on an image's constant border, or that a sparse feature
  happens not to reach in a small batch, are silent without the filter being dead; a digits
  CNN at batch 16 showed 26-45% of its pixel-units silent at initialization.) The shape
  decides: a 3-D output ``(N, C, L)`` of a Conv1d still counts each position as a unit (a
  sequence layer's ``(N, T, F)`` looks the same), and any 4-D ReLU output groups by dimension
  1, a feature map's or not.
- saturated element: one whose local derivative is below ``SATURATION_DERIVATIVE_RATIO`` of the
  activation's largest derivative (sigmoid: ``4*y*(1-y)``, tanh: ``1-y**2``, softsign:
  ``(1-|y|)**2``), or that sits on a clipping bound (hardtanh, hardsigmoid, the top of relu6).
- pre-activation mean / variance: of the input of a saturating activation (not available for
  in-place activations, whose input is overwritten).

Every output is reduced, as soon as it appears (while it is still in the cache), to a few
device scalars (``output_moments``): sum, sum of squares, and where they apply the
largest absolute value, the saturated count and the pre-activation's two sums; ReLU-family
outputs also to their per-unit maximum over the batch (a unit fired if it is above zero; the
lean path of ``capture.sites`` takes the per-unit sum instead, never negative either, whose
total is the call's sum: one kernel fewer).
Those are *moments*: sums over calls add up, so they pool over probe batches, micro-batches
and distributed ranks by plain addition (the largest values by a maximum: ``pool_calls``),
and mean and variance come out of them once, on the host (``finish_moments``). The exact mode
(the probe) shifts the values by their first element before the float32 sums, so
``E[y^2] - E[y]^2`` does not cancel when the mean is large against the spread, and reads the
largest value; the lean mode (recorded training steps) skips both, three kernels cheaper per
layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

SATURATION_DERIVATIVE_RATIO = 0.05

# What one call of a layer is reduced to; all are summed when pooling, but ``absmax`` (a
# maximum) and the shifts that exact-mode sums were taken against (undone when pooling).
CALL_FIELDS = ("sum", "sumsq", "absmax", "saturated", "pre_sum", "pre_sumsq", "shift",
               "pre_shift")
# Pooled moments, in order (``n`` and ``pre_n`` are element counts).
MOMENT_FIELDS = ("n", "sum", "sumsq", "absmax", "saturated", "pre_n", "pre_sum", "pre_sumsq")

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


def _sums(values: torch.Tensor, exact: bool) -> list[torch.Tensor]:
    """Sum and sum of squares of all elements (float32, 0-d), and, if exact, the first value.

    Exact sums are of the values minus the first one (the shift is undone when the moments
    are pooled, in float64). The shift is a copy: the output may be overwritten in place
    after this call (``nn.ReLU(inplace=True)``).
    """
    flat = values.detach().reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.float()
    if not exact:
        return [flat.sum(), torch.dot(flat, flat)]
    shift = flat[0].clone()
    centered = flat - shift
    return [centered.sum(), torch.dot(centered, centered), shift]


def output_moments(output: torch.Tensor, *, saturation: str | None = None,
                   bounds: tuple[float, float] = (-1.0, 1.0),
                   pre_activation: torch.Tensor | None = None,
                   exact: bool = True) -> list[tuple[int, torch.Tensor]]:
    """Reduce one output (one call of a layer) to the device scalars of ``CALL_FIELDS``.

    Args:
        output: The layer's output (at least one element).
        saturation: The activation kind when it can saturate.
        bounds: Clipping bounds for hardtanh-family activations.
        pre_activation: The activation's input, when it is still intact.
        exact: Shifted sums and the largest absolute value (the probe); ``False`` is the lean
            mode of recorded training steps.

    Returns:
        ``(field index, 0-d float32 tensor)`` for each field that applies (the others stay
        unmeasured in ``pool_calls``). Nothing is moved to the host, and nothing is stacked per
        call: the caller stacks every call's scalars once.
    """
    y = output.detach()
    if not exact and saturation is None and pre_activation is None:  # the common lean case
        flat = y.reshape(-1)
        if flat.dtype != torch.float32:
            flat = flat.float()
        return [(0, flat.sum()), (1, torch.dot(flat, flat))]
    found = list(zip((0, 1, 6), _sums(y, exact), strict=False))
    if exact:
        found.append((2, y.abs().amax().float()))
    if saturation is not None:
        found.append((3, saturated_mask(saturation, y.float(), bounds).sum().float()))
    if pre_activation is not None and pre_activation.numel():
        found += zip((4, 5, 7), _sums(pre_activation, exact), strict=False)
    return found


# Where an output's units lie, when its producer says (``capture.layers.unit_layout_of``): the
# channels of a feature map (dim 1: ``(N, C, *positions)``) or the features of a token or
# position (the last dim: ``(N, *positions, D)``).
CHANNELS_FIRST = "channels_first"
CHANNELS_LAST = "channels_last"


def _by_unit(output: torch.Tensor, layout: str | None = None
             ) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The output (detached) and the dimensions that, reduced, leave one value per unit.

    A unit is a channel where the output is a feature map: ``layout`` ``CHANNELS_FIRST`` (a
    ``Conv1d``'s ``(N, C, L)`` as a ``Conv2d``'s ``(N, C, H, W)``), or without a layout any
    output of four dimensions or more. It is a feature (the last dimension, over the batch
    and every position) where ``layout`` is ``CHANNELS_LAST`` (a ``Linear``'s ``(N, T, D)``):
    a transformer's feed-forward unit fires for some tokens, not at every position. Else
    every position but the batch dimension is a unit.
    """
    y = output.detach()
    if y.dim() >= 3 and layout == CHANNELS_LAST:
        return y.reshape(-1, y.shape[-1]), (0,)
    if y.dim() >= 4 or (y.dim() == 3 and layout == CHANNELS_FIRST):
        return y, (0, *range(2, y.dim()))
    return y.reshape(y.shape[0], -1), (0,)


def unit_peaks(output: torch.Tensor, layout: str | None = None) -> torch.Tensor:
    """Per unit (``_by_unit``), the largest value over the batch and a feature map's positions.

    For the ReLU family, whose outputs are never negative, a unit fired in the batch exactly
    when its peak is above zero, and the peaks of several calls combine by a maximum (a max
    over the batch is ~13x faster on CPU than an ``any`` over a boolean tensor).
    """
    if output.dim() == 0:
        return output.detach().reshape(1)
    values, dims = _by_unit(output, layout)
    return values.amax(dim=dims)


def unit_sums(output: torch.Tensor, layout: str | None = None) -> torch.Tensor:
    """Per unit (``_by_unit``), the float32 sum over the batch and a feature map's positions.

    For the ReLU family, never negative, a unit fired exactly when its sum is above zero (as
    when its peak is), and the units' sums add up to the output's sum: one reduction gives both.
    """
    values, dims = _by_unit(output, layout)
    return values.sum(dim=dims, dtype=torch.float32)


def pool_calls(values: Sequence[float], positions: Sequence[int],
               numels: Sequence[tuple[float, float]], sites: Sequence[int], count: int
               ) -> list[list[float]]:
    """Pool the calls' scalars (on the host) into per-site moments (``MOMENT_FIELDS``).

    Args:
        values: Every call's scalars, in the order they were taken.
        positions: Where each scalar goes: ``call * len(CALL_FIELDS) + field``.
        numels: Per call, the element counts of the output and of its pre-activation.
        sites: Per call, its site index.
        count: Number of sites.

    Returns:
        Per site, the moments (NaN in the fields none of its calls measured; a NaN or Inf
        output shows as non-finite sums). Sums of an exact-mode call are un-shifted first
        (``sum(y) = sum(y - c) + n c``), in float64.
    """
    width = len(CALL_FIELDS)
    calls: list[list[float | None]] = [[None] * width for _ in sites]
    for value, position in zip(values, positions, strict=True):
        calls[position // width][position % width] = value
    pooled: list[list[float | None]] = [[None] * len(MOMENT_FIELDS) for _ in range(count)]
    for call, (n, pre_n), site in zip(calls, numels, sites, strict=True):
        total, squares, absmax, saturated, pre_total, pre_squares, shift, pre_shift = call
        if total is None or squares is None:
            continue
        if shift is not None:
            total, squares = total + n * shift, squares + 2 * shift * total + n * shift ** 2
        if pre_total is not None and pre_squares is not None and pre_shift is not None:
            pre_total, pre_squares = (pre_total + pre_n * pre_shift,
                                      pre_squares + 2 * pre_shift * pre_total
                                      + pre_n * pre_shift ** 2)
        pre_count = pre_n if pre_total is not None else None
        row = pooled[site]
        for i, value in enumerate((n, total, squares, None, saturated, pre_count, pre_total,
                                   pre_squares)):
            if value is not None:
                held = row[i]
                row[i] = value if held is None else held + value
        if absmax is not None:
            held = row[3]
            row[3] = absmax if held is None or absmax != absmax else max(held, absmax)
    return [[math.nan if v is None else v for v in row] for row in pooled]


def pool_sums(values: Sequence[float], numels: Sequence[tuple[float, float]],
              sites: Sequence[int], count: int) -> list[list[float]]:
    """``pool_calls`` for calls reduced to their sum and sum of squares alone (lean mode).

    ``values`` holds each call's two sums in turn; the rows are ``pool_calls``' (NaN in the
    fields not measured).
    """
    pooled: list[list[float] | None] = [None] * count
    for call, site in enumerate(sites):
        n, total, squares = numels[call][0], values[2 * call], values[2 * call + 1]
        row = pooled[site]
        if row is None:
            pooled[site] = [n, total, squares, *_UNMEASURED]
        else:
            row[0] += n
            row[1] += total
            row[2] += squares
    return [row if row is not None else [math.nan] * len(MOMENT_FIELDS) for row in pooled]


_UNMEASURED = (math.nan,) * (len(MOMENT_FIELDS) - 3)


def square_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of squares of all elements (a squared L2 norm) as a 0-d float32 tensor."""
    flat = values.detach().float().reshape(-1)
    return torch.dot(flat, flat)


def dead_fractions(peaks: torch.Tensor) -> torch.Tensor:
    """Per row of unit peaks (``unit_peaks``, combined over calls), the share never above 0."""
    return (peaks <= 0).double().mean(dim=-1)


def mean_std(n: float, total: float, squares: float) -> tuple[float | None, float | None]:
    """Mean and standard deviation from a count, a sum and a sum of squares.

    ``(None, None)`` without elements; a non-finite variance is returned as the "std".
    """
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
    mean, std = mean_std(fields["n"], fields["sum"], fields["sumsq"])
    pre_mean, pre_std = mean_std(fields["pre_n"], fields["pre_sum"], fields["pre_sumsq"])
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
