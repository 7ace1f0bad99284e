"""Weight statistics: fans, and the scale against the He and Xavier expectations.

Defined once for the live probe, the recorder and the data-free checkpoint analysis (which
reads shapes, not tensors: nothing here needs torch).

- fans: as ``torch.nn.init`` computes them: ``fan_in = shape[1] * receptive field``,
  ``fan_out = shape[0] * receptive field`` (the receptive field is the product of the
  dimensions after the first two).
- He std ``sqrt(2 / fan_in)``: keeps the signal's scale through a ReLU-like activation.
- Xavier std ``sqrt(2 / (fan_in + fan_out))``: keeps it through a linear or symmetric
  saturating activation.
- reference: a layer whose next activation (before the next weight layer) is ReLU-like is
  judged against He, any other against Xavier.
- init scale: the weight RMS over the reference std.
- update ratio: ``||w_after - w_before|| / ||w_before||`` over one optimizer step, of one
  tensor or several taken together (a layer's weights).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Activations after which a layer's weights are judged against He rather than Xavier.
HE_ACTIVATIONS = frozenset({"relu", "relu6", "leaky_relu", "prelu", "elu", "celu", "gelu",
                            "silu", "mish", "hardswish"})


def fans_from_shape(shape: Sequence[int]) -> tuple[int, int]:
    """Fan-in and fan-out of a Linear/conv weight of this shape (as ``torch.nn.init``).

    Raises:
        ValueError: A shape with fewer than two dimensions.
    """
    if len(shape) < 2:
        raise ValueError(f"fans need a weight with at least 2 dimensions, got shape {shape}")
    receptive = math.prod(int(v) for v in shape[2:]) if len(shape) > 2 else 1
    return int(shape[1]) * receptive, int(shape[0]) * receptive


def fans(weight: object) -> tuple[int, int]:
    """Fan-in and fan-out of a Linear/conv weight tensor (anything with a ``shape``)."""
    return fans_from_shape(list(weight.shape))  # type: ignore[attr-defined]


def he_std(fan_in: int) -> float:
    """Standard deviation of He (Kaiming) initialization for ReLU: ``sqrt(2 / fan_in)``."""
    return math.sqrt(2.0 / fan_in)


def xavier_std(fan_in: int, fan_out: int) -> float:
    """Standard deviation of Xavier (Glorot) initialization: ``sqrt(2 / (fan_in + fan_out))``."""
    return math.sqrt(2.0 / (fan_in + fan_out))


def init_reference(next_activation: str | None) -> str:
    """``he`` when the activation a layer feeds is ReLU-like, else ``xavier``."""
    return "he" if next_activation in HE_ACTIVATIONS else "xavier"


def expected_std(reference: str, fan_in: int, fan_out: int) -> float:
    """The expected weight scale under ``reference`` (``"he"`` or ``"xavier"``)."""
    return he_std(fan_in) if reference == "he" else xavier_std(fan_in, fan_out)


def init_scale(weight_rms: float, reference: str, fan_in: int, fan_out: int) -> float:
    """Weight RMS over the reference's expected std (1.0 is exactly the reference scale)."""
    return weight_rms / expected_std(reference, fan_in, fan_out)


def update_ratio(delta_norms: Sequence[float], weight_norms: Sequence[float]) -> float | None:
    """``||w_after - w_before|| / ||w_before||`` of tensors taken together (``None`` at zero).

    Args:
        delta_norms: ``||w_after - w_before||`` of each tensor.
        weight_norms: ``||w_before||`` of each tensor.
    """
    base = math.sqrt(sum(v * v for v in weight_norms))
    return math.sqrt(sum(v * v for v in delta_norms)) / base if base > 0 else None
