"""Activation statistics: mean, variance, dead units, saturation, pre-activation scale.

Definitions (each one has an oracle test in ``tests/test_stats_oracle.py``):

- mean / variance: over every element of the output of the batch (population variance).
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

import torch

SATURATION_DERIVATIVE_RATIO = 0.05

# Order of the entries of the vector that ``activation_vector`` returns.
VECTOR_FIELDS = ("mean", "var", "absmax", "saturated_fraction", "preact_mean", "preact_var")

_NAN = float("nan")


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
    """Reduce one output tensor to the statistics in ``VECTOR_FIELDS`` (NaN where not applicable).

    Args:
        output: The layer's output for one batch.
        saturation_kind: The activation kind when it can saturate, else ``None``.
        pre_activation: The activation's input, when it is still intact.
        bounds: Clipping bounds for hardtanh-family activations.

    Returns:
        A float32 vector on the output's device; nothing is moved to the host.

    """
    y = output.detach().float()
    var, mean = torch.var_mean(y, correction=0)
    absmax = y.abs().amax() if y.numel() else y.new_zeros(())
    nan = y.new_full((), _NAN)
    if saturation_kind is not None:
        saturated = saturated_mask(saturation_kind, y, bounds).float().mean()
    else:
        saturated = nan
    if pre_activation is not None:
        pre_var, pre_mean = torch.var_mean(pre_activation.detach().float(), correction=0)
    else:
        pre_var = pre_mean = nan
    return torch.stack([mean, var, absmax, saturated, pre_mean, pre_var])


def alive_units(output: torch.Tensor) -> torch.Tensor:
    """Boolean mask over units (all positions but the batch dimension): nonzero in some sample."""
    y = output.detach()
    if y.dim() == 0:
        return (y != 0).reshape(1)
    return (y != 0).reshape(y.shape[0], -1).any(dim=0)
