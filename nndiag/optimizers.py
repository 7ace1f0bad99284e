"""Optimizers by name or spec: ``sgd``, ``adam``, ``adamw``, ``rmsprop`` or ``f(params, lr)``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from nndiag.errors import UsageError, UserCodeError, describe_exception
from nndiag.specs import load_object

OptimizerFactory = Callable[[Iterable[Any], float], torch.optim.Optimizer]
OPTIMIZER_NAMES = ("sgd", "adam", "adamw", "rmsprop")


def optimizer_factory(name_or_spec: str, *, momentum: float | None = None,
                      weight_decay: float = 0.0) -> OptimizerFactory:
    """A factory ``f(params, lr)`` for a named optimizer or a user spec.

    Args:
        name_or_spec: ``sgd`` (momentum 0.9 unless given), ``adam``, ``adamw``, ``rmsprop``, or a
            spec of a callable ``f(params, lr) -> Optimizer``.
        momentum: Momentum for SGD and RMSprop.
        weight_decay: Weight decay for the named optimizers.

    Raises:
        UsageError: Unknown name, or a spec that is not callable.
    """
    name = name_or_spec.lower()
    if name == "sgd":
        mom = 0.9 if momentum is None else momentum
        return lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=mom,
                                                  weight_decay=weight_decay)
    if name == "adam":
        return lambda params, lr: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":
        return lambda params, lr: torch.optim.RMSprop(params, lr=lr, momentum=momentum or 0.0,
                                                      weight_decay=weight_decay)
    if ":" not in name_or_spec:
        raise UsageError(f"--optimizer {name_or_spec!r}: use one of {', '.join(OPTIMIZER_NAMES)} "
                         "or a spec of f(params, lr) -> Optimizer")
    factory = load_object(name_or_spec, "--optimizer")
    if not callable(factory):
        raise UsageError(f"--optimizer {name_or_spec!r}: expected a callable f(params, lr), got "
                         f"{type(factory).__name__}")

    def build(params: Iterable[Any], lr: float) -> torch.optim.Optimizer:
        try:
            optimizer = factory(params, lr)
        except Exception as exc:
            raise UserCodeError(f"--optimizer {name_or_spec!r} raised "
                                f"{describe_exception(exc)}") from exc
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UsageError(f"--optimizer {name_or_spec!r}: expected a torch.optim.Optimizer, "
                             f"got {type(optimizer).__name__}")
        return optimizer

    return build
