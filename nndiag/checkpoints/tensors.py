"""Tensor entries that are read one at a time, so memory tracks the largest tensor, not the file."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class TensorEntry:
    """One tensor of a checkpoint, known by its metadata and read on demand.

    Attributes:
        name: The state-dict key.
        shape: The tensor's shape.
        dtype: The tensor's dtype.
        read: Returns the tensor (reading it from disk if it is not in memory).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size in bytes."""
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def in_memory(name: str, tensor: torch.Tensor) -> TensorEntry:
    """An entry for a tensor that is already loaded."""
    return TensorEntry(name, tuple(tensor.shape), tensor.dtype, lambda: tensor)


def read_exact(path: str, offset: int, nbytes: int) -> torch.Tensor:
    """Read ``nbytes`` at ``offset`` of a file into a fresh uint8 tensor.

    The buffer comes from torch's allocator, which returns large blocks to the system as soon
    as the tensor is freed, so reading tensor after tensor does not pile up memory.

    Raises:
        EOFError: The file ends before.
    """
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    with open(path, "rb") as handle:
        handle.seek(offset)
        view = memoryview(buffer.numpy())
        done = 0
        while done < nbytes:
            got = handle.readinto(view[done:])
            if not got:
                raise EOFError(f"{path}: expected {nbytes} bytes at offset {offset}, got {done}")
            done += got
    return buffer


def span(shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """Number of elements a strided view reaches from its first element (0 for empty views)."""
    if any(size == 0 for size in shape):
        return 0
    return 1 + sum((size - 1) * step for size, step in zip(shape, stride, strict=True))


def read_strided(path: str, file_offset: int, dtype: torch.dtype, shape: tuple[int, ...],
                 stride: tuple[int, ...]) -> torch.Tensor:
    """Read only the bytes a (possibly strided) view covers, starting at ``file_offset``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = span(shape, stride)
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    flat = read_exact(path, file_offset, count * itemsize).view(dtype)
    return flat.as_strided(shape, stride)
