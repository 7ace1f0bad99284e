"""Weight statistics: scale against the He and Xavier expectations for a layer's fans."""

from __future__ import annotations

import math

import torch


def fans(weight: torch.Tensor) -> tuple[int, int]:
    """Fan-in and fan-out of a Linear/conv weight, as ``torch.nn.init`` computes them."""
    fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(weight)
    return int(fan_in), int(fan_out)


def he_std(fan_in: int) -> float:
    """Standard deviation of He (Kaiming) initialization for ReLU: ``sqrt(2 / fan_in)``."""
    return math.sqrt(2.0 / fan_in)


def xavier_std(fan_in: int, fan_out: int) -> float:
    """Standard deviation of Xavier (Glorot) initialization: ``sqrt(2 / (fan_in + fan_out))``."""
    return math.sqrt(2.0 / (fan_in + fan_out))


def expected_std(reference: str, fan_in: int, fan_out: int) -> float:
    """The expected weight scale under ``reference`` (``"he"`` or ``"xavier"``)."""
    return he_std(fan_in) if reference == "he" else xavier_std(fan_in, fan_out)
