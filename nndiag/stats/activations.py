"""Activation statistics: mean, variance, dead units, saturation, pre-activation scale.

Definitions (each one has an oracle test in ``tests/test_stats_oracle.py``):

- mean / variance: over every element of the output of the batch (population variance),
  from the sum and sum of squares of the values shifted by their first element (one pass each
  and an order of magnitude faster than ``torch.var_mean`` on CPU; the shift avoids the
  cancellation of ``E[y^2] - E[y]^2`` when the mean is large against the spread).
- dead unit: a unit is one position of the output apart from the batch dimension (a feature of
  a Linear layer, one channel at one pixel of a conv layer); it is dead when it is exactly zero
  for every sample of the probe. The dead fraction is the share of such units.
- saturated element: one whose local derivative is below ``SATURATION_DERIVATIVE_RATIO`` of the
  activation's largest derivative (sigmoid: ``4*y*(1-y)``, tanh: ``1-y**2``, softsign:
  ``(1-|y|)**2``), or that sits on a clipping bound (hardtanh, hardsigmoid, the top of relu6).
- pre-activation mean / variance: of the input of a saturating activation (not available for
  in-place activations, whose input is overwritten).
"""

from __future__ import annotations

import math

import torch

SATURATION_DERIVATIVE_RATIO = 0.05

# Order of the entries of the vector that ``activation_vector`` returns: raw sums, turned into
# statistics on the host by ``finish_vector`` (fewer device ops per layer).
VECTOR_FIELDS = ("shift", "sum", "sumsq", "absmax", "saturated_fraction",
                 "pre_shift", "pre_sum", "pre_sumsq")

_NAN = float("nan")


def _shifted_sums(values: torch.Tensor) -> list[torch.Tensor]:
    """First element, and sum and sum of squares of all elements minus it (0-d tensors)."""
    flat = values.detach().float().reshape(-1)
    shift = flat[0]
    centered = flat - shift
    return [shift, centered.sum(), torch.dot(centered, centered)]


def square_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of squares of all elements (a squared L2 norm) as a 0-d float32 tensor."""
    flat = values.detach().float().reshape(-1)
    return torch.dot(flat, flat)


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


def activation_vector(
    output: torch.Tensor,
    saturation_kind: str | None,
    pre_activation: torch.Tensor | None,
    bounds: tuple[float, float] = (-1.0, 1.0),
) -> torch.Tensor:
    """Reduce one output tensor to the raw sums in ``VECTOR_FIELDS`` (NaN where not applicable).

    Args:
        output: The layer's output for one batch (at least one element).
        saturation_kind: The activation kind when it can saturate, else ``None``.
        pre_activation: The activation's input, when it is still intact.
        bounds: Clipping bounds for hardtanh-family activations.

    Returns:
        A float32 vector on the output's device; nothing is moved to the host.
    """
    y = output.detach().float()
    parts = _shifted_sums(y)
    parts.append(y.abs().amax())
    nan = y.new_full((), _NAN)
    if saturation_kind is not None:
        parts.append(saturated_mask(saturation_kind, y, bounds).float().mean())
    else:
        parts.append(nan)
    if pre_activation is not None and pre_activation.numel():
        parts += _shifted_sums(pre_activation)
    else:
        parts += [nan, nan, nan]
    return torch.stack(parts)


_CONSTANTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A zero and a NaN scalar on ``device``, made once (two fewer kernel launches a layer)."""
    found = _CONSTANTS.get(device)
    if found is None:
        found = _CONSTANTS[device] = (torch.zeros((), device=device),
                                      torch.full((), _NAN, device=device))
    return found


def activation_sums(output: torch.Tensor, saturation_kind: str | None,
                    pre_activation: torch.Tensor | None,
                    bounds: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """A leaner ``activation_vector`` for every-step monitoring: unshifted sums, no maximum.

    Same layout as ``VECTOR_FIELDS`` with ``shift`` 0 and ``absmax`` NaN (not measured). It
    saves two passes and an allocation per layer; the price is that the variance comes from
    ``E[y^2] - E[y]^2`` in float32, which loses precision once ``|mean| / std`` exceeds ~100.
    Non-finite outputs still show, as non-finite sums.
    """
    y = output.detach().float().reshape(-1)
    zero, nan = _constants(y.device)
    saturated = (saturated_mask(saturation_kind, y, bounds).float().mean()
                 if saturation_kind is not None else nan)
    if pre_activation is not None and pre_activation.numel():
        pre = pre_activation.detach().float().reshape(-1)
        pre_sums = [zero, pre.sum(), torch.dot(pre, pre)]
    else:
        pre_sums = [nan, nan, nan]
    return torch.stack([zero, y.sum(), torch.dot(y, y), nan, saturated, *pre_sums])


def finish_vector(values: dict[str, float], numel: int) -> dict[str, float]:
    """Turn one batch's raw sums into mean, var, absmax, saturation and pre-activation moments."""
    def moments(shift: float, total: float, squares: float) -> tuple[float, float]:
        first = total / numel
        return shift + first, max(squares / numel - first * first, 0.0)

    mean, var = moments(values["shift"], values["sum"], values["sumsq"])
    pre_mean, pre_var = moments(values["pre_shift"], values["pre_sum"], values["pre_sumsq"])
    return {"mean": mean, "var": var, "absmax": values["absmax"],
            "saturated_fraction": values["saturated_fraction"],
            "preact_mean": pre_mean, "preact_var": pre_var}


def _weighted(values: list[float], weights: list[int]) -> float | None:
    if all(math.isnan(v) for v in values):
        return None
    return sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights)


def _pooled_moments(means: list[float], variances: list[float],
                    numels: list[int]) -> tuple[float | None, float | None]:
    """Pooled mean and standard deviation of several batches (``None`` when not measured)."""
    mean = _weighted(means, numels)
    if mean is None:
        return None, None
    second = _weighted([v + m * m for m, v in zip(means, variances, strict=True)], numels)
    variance = variances[0] if len(numels) == 1 or second is None else second - mean * mean
    if variance != variance or math.isinf(variance):
        return mean, variance
    return mean, math.sqrt(max(variance, 0.0))


def pool_batches(values: list[float], numels: list[int]) -> dict[str, float | None]:
    """Pool the raw vectors (``VECTOR_FIELDS``) of several batches into one set of statistics.

    Args:
        values: The concatenated vectors, ``len(VECTOR_FIELDS)`` numbers per batch.
        numels: Elements of the output in each batch.

    Returns:
        ``mean``, ``std``, ``absmax``, ``saturated_fraction``, ``preact_mean``, ``preact_std``.
    """
    width = len(VECTOR_FIELDS)
    rows = [finish_vector(dict(zip(VECTOR_FIELDS, values[i * width:(i + 1) * width],
                                   strict=True)), numel)
            for i, numel in enumerate(numels)]
    mean, std = _pooled_moments([r["mean"] for r in rows], [r["var"] for r in rows], numels)
    pre_mean, pre_std = _pooled_moments([r["preact_mean"] for r in rows],
                                        [r["preact_var"] for r in rows], numels)
    absmax = [r["absmax"] for r in rows]
    return {
        "mean": mean,
        "std": std,
        "absmax": math.nan if any(math.isnan(a) for a in absmax) else max(absmax),
        "saturated_fraction": _weighted([r["saturated_fraction"] for r in rows], numels),
        "preact_mean": pre_mean,
        "preact_std": pre_std,
    }


def alive_units(output: torch.Tensor) -> torch.Tensor:
    """Boolean mask over units (all positions but the batch dimension): nonzero in some sample.

    For the ReLU family, whose outputs are never negative, "nonzero in some sample" is "the
    maximum over the batch is above zero": a max over dim 0 is ~13x faster on CPU than an
    ``any`` over a boolean tensor.
    """
    y = output.detach()
    if y.dim() == 0:
        return (y != 0).reshape(1)
    flat = y.reshape(y.shape[0], -1)
    if bool(y.dtype.is_floating_point):
        return flat.amax(dim=0) != 0
    return (flat != 0).any(dim=0)
