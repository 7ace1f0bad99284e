"""Optimizers by name or spec, and the optimizer and ``GradScaler`` inside a framework's wrapper.

Names: ``sgd``, ``adam``, ``adamw``, ``rmsprop``; a spec names ``f(params, lr)`` or ``f(model)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from nndiag.errors import (
    UsageError,
    UserCodeError,
    describe_exception,
    user_code,
    validate_non_negative,
    validate_positive,
)
from nndiag.specs import load_object

OptimizerFactory = Callable[[Iterable[Any], float], torch.optim.Optimizer]
OPTIMIZER_NAMES = ("sgd", "adam", "adamw", "rmsprop")


def validate_lr(lr: float, option: str = "--lr") -> float:
    """Return ``lr`` if it is a usable learning rate (positive and finite).

    Raises:
        UsageError: Zero, negative, NaN or infinite.

    """
    return validate_positive(lr, option)


def optimizer_factory(name_or_spec: str, *, momentum: float | None = None,
                      weight_decay: float = 0.0) -> OptimizerFactory:
    """A factory ``f(params, lr)`` for a named optimizer or a user spec.

    Args:
        name_or_spec: ``sgd`` (momentum 0.9 unless given), ``adam``, ``adamw``, ``rmsprop``, or a
            spec of a callable ``f(params, lr) -> Optimizer``.
        momentum: Momentum for SGD and RMSprop (finite, ``>= 0``).
        weight_decay: Weight decay for the named optimizers (finite, ``>= 0``).

    Raises:
        UsageError: Unknown name, a spec that is not callable, a negative or non-finite
            momentum or weight decay. The factory itself raises ``UsageError`` for a learning
            rate that is not positive and finite, or arguments torch refuses (an empty
            parameter list), and ``UserCodeError`` when the user's factory raises.
    """
    if momentum is not None:
        validate_non_negative(momentum, "--momentum")
    validate_non_negative(weight_decay, "--weight-decay")
    name = name_or_spec.lower()
    builders: dict[str, Callable[[Iterable[Any], float], torch.optim.Optimizer]] = {
        "sgd": lambda params, lr: torch.optim.SGD(
            params, lr=lr, momentum=0.9 if momentum is None else momentum,
            weight_decay=weight_decay),
        "adam": lambda params, lr: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay),
        "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay),
        "rmsprop": lambda params, lr: torch.optim.RMSprop(
            params, lr=lr, momentum=momentum or 0.0, weight_decay=weight_decay),
    }
    if name in builders:
        builder = builders[name]

        def build_named(params: Iterable[Any], lr: float) -> torch.optim.Optimizer:
            validate_lr(lr, "learning rate")
            try:
                return builder(params, lr)
            except ValueError as exc:  # torch's own argument checks (an empty parameter list)
                raise UsageError(f"--optimizer {name}: {describe_exception(exc)}") from exc

        return build_named
    if ":" not in name_or_spec:
        raise UsageError(f"--optimizer {name_or_spec!r}: use one of {', '.join(OPTIMIZER_NAMES)} "
                         "or a spec of f(params, lr) -> Optimizer")
    factory = load_object(name_or_spec, "--optimizer")
    if not callable(factory):
        raise UsageError(f"--optimizer {name_or_spec!r}: expected a callable f(params, lr), got "
                         f"{type(factory).__name__}")

    def build(params: Iterable[Any], lr: float) -> torch.optim.Optimizer:
        validate_lr(lr, "learning rate")
        try:
            with user_code():
                optimizer = factory(params, lr)
        except Exception as exc:
            raise UserCodeError(f"--optimizer {name_or_spec!r} raised "
                                f"{describe_exception(exc)}") from exc
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UsageError(f"--optimizer {name_or_spec!r}: expected a torch.optim.Optimizer, "
                             f"got {type(optimizer).__name__}")
        return optimizer

    return build


def _wrapper_chain(optimizer: Any) -> Iterator[Any]:
    """An optimizer, then what it wraps (``.optimizer``), innermost last; at most 8 levels down."""
    for _ in range(9):
        if optimizer is None:
            return
        yield optimizer
        inner = getattr(optimizer, "optimizer", None)
        if inner is optimizer:
            return
        optimizer = inner


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside a framework's wrapper (anything with an ``.optimizer``)."""
    found = optimizer
    for inner in itertools.islice(_wrapper_chain(optimizer), 1, None):
        if not hasattr(inner, "param_groups"):
            break
        found = inner
    return found


def is_grad_scaler(scaler: Any) -> bool:
    """True for an object with a ``GradScaler``'s methods (``scale``, ``unscale_``...)."""
    return callable(getattr(scaler, "scale", None)) and callable(getattr(scaler, "unscale_",
                                                                         None)) and \
        callable(getattr(scaler, "get_scale", None))


def find_scaler(optimizer: Any) -> Any:
    """The ``GradScaler`` an optimizer wrapper carries (Accelerate's ``.scaler``), if any."""
    scalers = (getattr(wrapper, "scaler", None) for wrapper in _wrapper_chain(optimizer))
    return next((scaler for scaler in scalers if is_grad_scaler(scaler)), None)
