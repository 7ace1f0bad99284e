"""Batches as the training step receives them: collected, counted, sliced and shuffled.

Nothing here unpacks a batch into inputs and targets (``nndiag.specs.unpack_batch`` does):
the gate hands the step batches in the data's own structure (tensors, tuples, namedtuples,
dicts), cut or reordered along the batch dimension.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from nndiag.errors import UsageError, UserCodeError, describe_exception
from nndiag.specs import iter_tensors

# Keys under which a dict batch holds its targets (the ones the labels check shuffles).
_LABEL_KEYS = ("labels", "label", "targets", "target", "y")


def take_samples(obj: Any, count: int) -> Any:
    """The first ``count`` samples of every tensor in nested inputs (batch dimension first)."""
    if isinstance(obj, torch.Tensor):
        return obj[:count] if obj.dim() else obj
    if isinstance(obj, Mapping):
        return {k: take_samples(v, count) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(take_samples(v, count) for v in obj)
    return obj


def iter_tensors_with_batch(obj: Any) -> Any:
    """Tensors with a batch dimension inside nested inputs."""
    return (t for t in iter_tensors(obj) if t.dim() >= 1)


def raw_batches(data: Any, limit: int) -> list[Any]:
    """Up to ``limit`` batches as the data yields them, in one pass (no unpacking)."""
    if isinstance(data, torch.Tensor | Mapping | tuple):
        return [data]
    batches: list[Any] = []
    try:
        for item in data:
            batches.append(item)
            if len(batches) >= limit:
                break
    except TypeError as exc:
        raise UsageError(f"--data: expected batches (a DataLoader, a list of batches) or one "
                         f"batch, got {type(data).__name__}") from exc
    except Exception as exc:
        raise UserCodeError(f"--data: iterating the data raised {describe_exception(exc)}"
                            ) from exc
    if not batches:
        raise UsageError("--data: the data yielded no batch")
    return batches


def batch_size(raw: Any) -> int | None:
    """The first dimension of the batch's first tensor that has one (``None``: no such tensor)."""
    first = next(iter_tensors_with_batch(raw), None)
    return int(first.shape[0]) if first is not None else None


def _rebuild(obj: Any, items: list[Any]) -> Any:
    if hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*items)
    return type(obj)(items)


def slice_batch(raw: Any, start: int, stop: int, size: int) -> Any:
    """Samples ``start:stop`` of every tensor whose first dimension is the batch size."""
    if isinstance(raw, torch.Tensor):
        return raw[start:stop] if raw.dim() and raw.shape[0] == size else raw
    if isinstance(raw, Mapping):
        return {k: slice_batch(v, start, stop, size) for k, v in raw.items()}
    if isinstance(raw, tuple | list):
        return _rebuild(raw, [slice_batch(v, start, stop, size) for v in raw])
    return raw


def _permute(obj: Any, order: torch.Tensor) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj[order.to(obj.device)] if obj.dim() and obj.shape[0] == len(order) else obj
    if isinstance(obj, Mapping):
        return {k: _permute(v, order) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return _rebuild(obj, [_permute(v, order) for v in obj])
    return obj


def shuffle_targets(raw: Any, generator: torch.Generator) -> Any | None:
    """The batch with its targets shuffled across samples (``None``: no targets found)."""
    size = batch_size(raw)
    if size is None or size < 2:
        return None
    order = torch.randperm(size, generator=generator)
    if isinstance(raw, tuple | list) and len(raw) == 2 and next(iter_tensors(raw[1]), None) \
            is not None:
        return _rebuild(raw, [raw[0], _permute(raw[1], order)])
    if isinstance(raw, Mapping):
        key = next((k for k in _LABEL_KEYS if isinstance(raw.get(k), torch.Tensor)), None)
        if key is not None:
            return {**raw, key: _permute(raw[key], order)}
    return None

