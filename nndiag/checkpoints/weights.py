"""Finding the model's weights inside a loaded checkpoint object, and describing the rest.

A plain state dict is a mapping of names to tensors. PyTorch Lightning stores it under
``state_dict`` next to ``epoch``, ``global_step``, ``optimizer_states``... Training scripts
bundle it under a key such as ``model``, ``model_state_dict`` or ``net`` next to the optimizer
and the epoch. When several candidates exist the one with most tensors wins.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sized
from dataclasses import dataclass
from typing import Any

import torch

_WEIGHT_KEYS = ("state_dict", "model_state_dict", "model", "model_state", "net", "network",
                "module", "weights", "params", "ema", "model_ema")
_LIGHTNING_KEYS = ("pytorch-lightning_version", "global_step", "optimizer_states",
                   "lr_schedulers", "loops")


@dataclass
class LocatedWeights:
    """Where the weights are and what else is there."""

    weights: dict[str, torch.Tensor]
    key: str | None
    format: str
    extras: dict[str, str]


def is_state_dict(obj: Any) -> bool:
    """A non-empty mapping of string keys to tensors (non-tensor values are allowed if few)."""
    if not isinstance(obj, Mapping) or not obj:
        return False
    tensors = sum(isinstance(v, torch.Tensor) for v in obj.values())
    return tensors > 0 and tensors >= 0.5 * len(obj) and all(isinstance(k, str) for k in obj)


def find_weights(obj: Any) -> LocatedWeights | None:
    """Locate the model's state dict in a loaded checkpoint object."""
    if not isinstance(obj, Mapping):
        return None
    if is_state_dict(obj) and not any(k in obj for k in _LIGHTNING_KEYS):
        return LocatedWeights(_tensors_only(obj), None, "state_dict", {})
    lightning = any(k in obj for k in _LIGHTNING_KEYS)
    candidates = [(k, obj[k]) for k in _WEIGHT_KEYS if k in obj and is_state_dict(obj[k])]
    if not candidates:  # any other key holding a state dict, one level down
        candidates = [(k, v) for k, v in obj.items() if is_state_dict(v)]
    if not candidates:
        return None
    key, weights = max(candidates, key=lambda kv: len(kv[1]))
    extras = {k: describe(v) for k, v in obj.items() if k != key}
    return LocatedWeights(_tensors_only(weights), str(key),
                          "lightning" if lightning else "training_checkpoint", extras)


def _tensors_only(mapping: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in mapping.items() if isinstance(v, torch.Tensor)}


def describe(value: Any) -> str:
    """A short description of a non-weight checkpoint entry."""
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)}"
    if isinstance(value, bool | int | float | str) or value is None:
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    if isinstance(value, Mapping):
        if "state" in value and "param_groups" in value:
            groups = value["param_groups"]
            groups = groups if isinstance(groups, list | tuple) else []
            state = value["state"]
            parameters = len(state) if isinstance(state, Sized) else "?"
            lrs = _learning_rates(g["lr"] for g in groups if isinstance(g, Mapping) and "lr" in g)
            return (f"optimizer state for {parameters} parameters, "
                    f"{len(groups)} param group(s), lr {lrs}")
        return f"dict with {len(value)} entries"
    if isinstance(value, list | tuple):
        if value and all(isinstance(v, Mapping) and "state" in v for v in value):
            return f"{len(value)} optimizer state(s)"
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def _learning_rates(values: Iterable[Any]) -> str:
    """The distinct learning rates of an optimizer's param groups: ``[0.001, 0.01]``.

    Numbers sort by value; anything else a file may hold there (a string, a tensor, a list)
    is described after them.
    """
    numbers: set[float] = set()
    others: set[str] = set()
    for value in values:
        if isinstance(value, int | float) and not isinstance(value, bool):
            numbers.add(value)
        else:
            others.add(describe(value))
    ordered = sorted(numbers, key=lambda v: (math.isnan(v), v))
    return "[" + ", ".join([repr(v) for v in ordered] + sorted(others)) + "]"
