"""Batches: the user's data taken apart, measured, cut, replayed and made up.

Everything nndiag does with a batch lives here. A batch is ``(inputs, targets)``; inputs may be
a tensor, a tuple (passed as ``model(*inputs)``) or a dict (passed as ``model(**inputs)``):

- ``iter_batches`` and ``unpack_batch`` take data apart into ``Batch`` objects;
  ``check_batch`` refuses a batch nested absurdly deep or without a sample,
  ``check_finite_batch`` one holding NaN or Inf;
- ``raw_batches``, ``take_samples``, ``slice_batch``, ``shuffle_targets`` work on batches as
  the user's training step receives them (their own structure, tensors, tuples, namedtuples,
  dicts), cut or reordered along the batch dimension;
- ``BatchSource`` replays the user's data as restartable streams (lr-find's stages);
- ``synthetic_batches`` makes random inputs of a given shape (``--input-shape``);
- ``iter_tensors``, ``move_to`` and ``describe_value`` walk nested structures (at most
  ``MAX_NESTING`` levels deep: ``check_batch`` refuses deeper batches where they come in).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nndiag.errors import UsageError, UserCodeError, describe_exception, user_code, validate_seed

_INT_DTYPES = {"long": torch.long, "int64": torch.long, "int": torch.int, "int32": torch.int}
# How torch's allocators word a failed allocation (CPU, CUDA, a size past int64).
_ALLOCATION_FAILURES = ("not enough memory", "can't allocate memory", "out of memory",
                        "size calculation overflowed")
# Deepest nesting of tuples, lists and dicts accepted in a batch: real batches nest a few levels
# (Hugging Face's past_key_values: three); the walks over a batch stay well within Python's
# recursion limit.
MAX_NESTING = 64
# Levels of a nested value that error messages spell out.
_DESCRIBE_DEPTH = 6
_FLOAT_DTYPES = {"float": torch.float32, "float32": torch.float32, "float64": torch.float64,
                 "double": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Batch:
    """One batch, unpacked.

    Attributes:
        inputs: A tensor, a tuple of positional inputs or a dict of keyword inputs.
        targets: The targets, or ``None`` when the data carries none.

    """

    inputs: Any
    targets: Any = None


def iter_batches(data: Any, limit: int) -> list[Batch]:
    """Take up to ``limit`` batches from data and unpack each.

    A tensor, a dict or a tuple is one batch; any other iterable (a list, a DataLoader, a
    generator) yields batches.

    Raises:
        UsageError: The data yields no batch, or a batch is not tensor-shaped.
        UserCodeError: Iterating the user's data raised.

    """
    if isinstance(data, torch.Tensor | Mapping | tuple):
        return [unpack_batch(data)]
    if not isinstance(data, Iterable):
        raise UsageError(
            f"--data: expected batches (a DataLoader, a list of batches) or one batch "
            f"(inputs, targets), got {type(data).__name__}"
        )
    return _first_batches(data, limit, unpack_batch)


def _first_batches(data: Iterable[Any], limit: int, accept: Callable[[Any], Any]) -> list[Any]:
    """Up to ``limit`` items of the user's data, each passed through ``accept``, in one pass.

    Raises:
        UsageError: The data yielded nothing (or ``accept`` refused an item).
        UserCodeError: Iterating the data raised.
    """
    batches: list[Any] = []
    iterator = _user_iteration(lambda: iter(data))
    while len(batches) < limit:
        item = _user_iteration(lambda: next(iterator, _END))
        if item is _END:
            break
        batches.append(accept(item))
    if not batches:
        raise UsageError("--data: the data yielded no batch")
    return batches


def _user_iteration(step: Any) -> Any:
    """Run one step of iterating the user's data; what it raises is the user's code raising."""
    try:
        with user_code():
            return step()
    except Exception as exc:
        raise UserCodeError(f"--data: iterating the data raised {describe_exception(exc)}") from exc


def unpack_batch(batch: Any, option: str = "--data") -> Batch:
    """Split a batch into inputs and targets.

    ``(inputs, targets)`` and ``[inputs, targets]`` give both; a bare tensor or dict is
    inputs only; a 1-tuple is inputs only. ``option`` names the data in errors.

    Raises:
        UsageError: The batch holds no tensor, no sample, or is nested deeper than
            ``MAX_NESTING`` levels.

    """
    check_nesting(batch, option)
    if isinstance(batch, torch.Tensor | Mapping):
        result = Batch(batch)
    elif isinstance(batch, tuple | list) and len(batch) == 2:
        result = Batch(batch[0], batch[1])
    elif isinstance(batch, tuple | list) and len(batch) == 1:
        result = Batch(batch[0])
    else:
        raise UsageError(
            f"{option}: a batch must be (inputs, targets), a tensor or a dict of tensors; "
            f"got {describe_value(batch)}"
        )
    if not _has_tensor(result.inputs):
        raise UsageError(
            f"{option}: the batch inputs hold no tensor: {describe_value(result.inputs)}"
        )
    check_not_empty(result.inputs, option)
    return result


def check_nesting(batch: Any, option: str = "--data") -> None:
    """Refuse a batch whose tuples, lists and dicts nest deeper than ``MAX_NESTING`` levels.

    Iterative, so an absurdly deep (or self-containing) batch is refused with a message
    instead of exhausting the interpreter's recursion limit in nndiag's walks over it.

    Raises:
        UsageError: Naming the option and the limit.

    """
    stack = [(batch, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, Mapping):
            children = list(value.values())
        elif isinstance(value, tuple | list):
            children = list(value)
        else:
            continue
        if depth > MAX_NESTING:
            raise UsageError(f"{option}: the batch nests tuples, lists or dicts more than "
                             f"{MAX_NESTING} levels deep; pass tensors in a flat structure")
        stack.extend((child, depth + 1) for child in children)


def is_empty(value: Any) -> bool:
    """True when ``value`` holds tensors with a batch dimension and every one has no element."""
    sizes = [t.numel() for t in iter_tensors(value) if t.dim()]
    return bool(sizes) and not any(sizes)


def check_not_empty(value: Any, option: str = "--data") -> None:
    """Refuse a batch without a single sample (a batch dimension of 0 in every tensor).

    Its loss would be the mean of nothing, NaN: the data is at fault, not the model.

    Raises:
        UsageError: Naming the option and the batch's shapes.

    """
    if is_empty(value):
        raise UsageError(f"{option}: the batch is empty, it holds no sample "
                         f"({describe_value(value)}); check the dataset and the batch size")


def check_batch(batch: Any, option: str = "--data") -> None:
    """Refuse a batch as the user's data yields it that nndiag cannot use (any structure).

    Raises:
        UsageError: Nested deeper than ``MAX_NESTING`` levels, or without a sample.

    """
    check_nesting(batch, option)
    check_not_empty(batch, option)


def check_finite_batch(batch: Batch, option: str = "--data", *, allow_inf: bool = False,
                       targets: bool = False) -> None:
    """Refuse a batch whose floating-point inputs hold NaN or Inf.

    With ``targets`` the targets are checked too; with ``allow_inf`` only NaN is refused (an
    additive ``-inf`` attention mask is a legitimate input).

    Raises:
        UsageError: Naming the option and the part of the batch: the data is at fault.

    """
    bad = "NaN" if allow_inf else "NaN or Inf"
    for part, value in (("input", batch.inputs), ("target", batch.targets if targets else None)):
        for tensor in iter_tensors(value):
            if tensor.is_floating_point() and (bool(torch.isnan(tensor).any()) if allow_inf
                                               else not bool(torch.isfinite(tensor).all())):
                raise UsageError(f"{option}: the {part} batch holds {bad} values "
                                 f"({describe_value(value)}); clean the data first")


def move_to(obj: Any, device: torch.device) -> Any:
    """Move every tensor inside nested tuples, lists and dicts to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {key: move_to(value, device) for key, value in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(move_to(value, device) for value in obj)
    return obj


def iter_tensors(obj: Any) -> Iterable[torch.Tensor]:
    """Yield every tensor inside nested tuples, lists, dicts and dataclass-like outputs, in order.

    Raises:
        UsageError: The value nests deeper than ``MAX_NESTING`` levels (or contains itself).

    """
    stack = [(obj, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, Mapping | tuple | list):
            if depth >= MAX_NESTING:
                raise UsageError(f"a value nests tuples, lists or dicts more than "
                                 f"{MAX_NESTING} levels deep")
            items = value.values() if isinstance(value, Mapping) else value
            stack.extend((item, depth + 1) for item in reversed(list(items)))
        elif hasattr(value, "data") and isinstance(value.data, torch.Tensor):  # PackedSequence
            yield value.data


def _has_tensor(obj: Any) -> bool:
    return next(iter(iter_tensors(obj)), None) is not None


def describe_value(obj: Any, _depth: int = 0) -> str:
    """Describe a value by its tensor shapes and dtypes, for error messages.

    Only the outer ``_DESCRIBE_DEPTH`` levels of a nested value are spelled out.
    """
    if isinstance(obj, torch.Tensor):
        return f"tensor {tuple(obj.shape)} {str(obj.dtype).removeprefix('torch.')}"
    if isinstance(obj, Mapping | tuple | list) and _depth >= _DESCRIBE_DEPTH:
        return "{...}" if isinstance(obj, Mapping) else "(...)"
    if isinstance(obj, Mapping):
        return "{" + ", ".join(f"{k}: {describe_value(v, _depth + 1)}"
                               for k, v in obj.items()) + "}"
    if isinstance(obj, tuple | list):
        return "(" + ", ".join(describe_value(v, _depth + 1) for v in obj) + ")"
    return type(obj).__name__


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
        check_batch(data)
        return [data]
    if not isinstance(data, Iterable) and not hasattr(data, "__getitem__"):
        raise UsageError(f"--data: expected batches (a DataLoader, a list of batches) or one "
                         f"batch, got {type(data).__name__}")
    return _first_batches(data, limit, _checked)


def _checked(batch: Any) -> Any:
    """The batch itself, once ``check_batch`` has accepted it."""
    check_batch(batch)
    return batch


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


class BatchSource:
    """The user's data as restartable streams of batches.

    Every ``stream()`` starts from the beginning and cycles forever: a DataLoader or list is
    re-iterated; a one-shot iterator is replayed from what it has given so far, then read on;
    a single batch repeats.
    """

    def __init__(self, data: Any) -> None:
        self.data = data
        self.single = isinstance(data, torch.Tensor | Mapping | tuple)
        self.iterator = None if self.single or iter(data) is not data else data
        self.seen: list[Any] = []

    def stream(self) -> Iterator[Any]:
        """Batches from the start, forever (stops only when the data holds none)."""
        if self.single:
            while True:
                yield self.data
        if self.iterator is None:
            while True:
                empty = True
                for batch in self.data:
                    empty = False
                    yield batch
                if empty:
                    return
        index = 0
        while True:
            if index < len(self.seen):
                yield self.seen[index]
            else:
                batch = next(self.iterator, _END)
                if batch is _END:
                    if not self.seen:
                        return
                    index = 0
                    continue
                self.seen.append(batch)
                yield batch
            index += 1


_END = object()


def synthetic_batches(model: nn.Module, input_shape: Sequence[int], *, dtype: str = "float32",
                      input_max: int | None = None, count: int = 1, seed: int = 0
                      ) -> list[Batch]:
    """Random input batches of a given shape (standard normal, or integers for embeddings).

    Args:
        model: The model, used to find the vocabulary size of integer inputs.
        input_shape: Shape of one input batch, batch dimension first.
        dtype: ``float32`` (default), ``float64``, ``float16``, ``bfloat16``, ``long`` or ``int``.
        input_max: Exclusive upper bound of integer inputs (default: the first embedding's
            ``num_embeddings``).
        count: Number of batches.
        seed: Seed of a private generator (the global RNG is left alone).

    Raises:
        UsageError: A bad shape or dtype, integer inputs with no known upper bound, or inputs
            larger than the machine's memory.

    """
    shape = tuple(int(v) for v in input_shape)
    if not shape or any(v <= 0 for v in shape):
        raise UsageError(f"--input-shape {','.join(map(str, shape))}: every size must be positive")
    if count < 1:
        raise UsageError(f"batches must be at least 1, got {count}")
    generator = torch.Generator().manual_seed(validate_seed(seed, "--seed"))
    if dtype in _INT_DTYPES:
        if input_max is None:
            embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
            if embedding is None:
                raise UsageError("integer inputs need --input-max (the model has no nn.Embedding "
                                 "to take the vocabulary size from)")
            input_max = embedding.num_embeddings
        if input_max <= 0:
            raise UsageError(f"--input-max {input_max}: must be positive")
        int_dtype = _INT_DTYPES[dtype]
        _check_fits_in_memory(shape, int_dtype.itemsize, count)
        with _allocating(shape):
            return [Batch(torch.randint(0, input_max, shape, generator=generator,
                                        dtype=int_dtype)) for _ in range(count)]
    if dtype not in _FLOAT_DTYPES:
        raise UsageError(f"--input-dtype {dtype!r}: use one of "
                         f"{', '.join([*_FLOAT_DTYPES, *_INT_DTYPES])}")
    # randn draws in float32 first: that is the peak, whatever the dtype asked for.
    _check_fits_in_memory(shape, max(4, _FLOAT_DTYPES[dtype].itemsize), count)
    with _allocating(shape):
        return [Batch(torch.randn(shape, generator=generator).to(_FLOAT_DTYPES[dtype]))
                for _ in range(count)]


def _memory_bytes() -> int | None:
    """The machine's physical memory, or ``None`` where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _check_fits_in_memory(shape: tuple[int, ...], itemsize: int, count: int) -> None:
    """Refuse random inputs larger than the machine's memory before allocating any.

    Refusing beats trying: on Linux a large enough allocation may succeed and the process is
    then killed by the kernel while the tensor is filled, with no message at all.
    """
    needed = math.prod(shape) * itemsize * count
    memory = _memory_bytes()
    if memory is not None and needed > memory:
        raise UsageError(
            f"--input-shape {','.join(map(str, shape))}: {count} random batch(es) of this "
            f"shape need {needed / 2**30:,.1f} GiB, more than this machine's "
            f"{memory / 2**30:,.1f} GiB of memory; use a smaller batch"
        )


@contextmanager
def _allocating(shape: tuple[int, ...]) -> Iterator[None]:
    """Turn an allocation failure while making random inputs into a ``UsageError``."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        text = str(exc).strip()
        if isinstance(exc, RuntimeError) and not any(
                word in text.lower() for word in _ALLOCATION_FAILURES):
            raise
        first = text.splitlines()[0][:200] if text else type(exc).__name__
        raise UsageError(
            f"--input-shape {','.join(map(str, shape))}: not enough memory for random inputs "
            f"of this shape ({first}); use a smaller batch"
        ) from exc
