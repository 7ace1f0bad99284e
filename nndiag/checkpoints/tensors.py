"""Tensor entries that are read one at a time, so memory tracks the largest tensor, not the file.

Some stored tensors are not read as they are: a quantized tensor is read dequantized (its
statistics are those of the values it stands for), and a tensor that cannot be analysed
(sparse, with no data, or a view expanded far beyond its stored elements) is not read at all:
its entry is replaced by a ``NotAnalysed`` reason that the checkpoint reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# An overlapping view (a stride-0 ``expand``) of more elements than it stores is analysed only
# up to this many bytes of logical elements: beyond it, its statistics would cost time and
# memory out of all proportion to the bytes in the file.
MAX_EXPANDED_BYTES = 64 * 1024 * 1024
# Stored integer type of each quantized dtype, and how many values one stored byte packs.
QUANTIZED_STORAGE = {torch.qint8: (torch.int8, 1), torch.quint8: (torch.uint8, 1),
                     torch.qint32: (torch.int32, 1), torch.quint4x2: (torch.uint8, 2),
                     torch.quint2x4: (torch.uint8, 4)}


@dataclass
class TensorEntry:
    """One tensor of a checkpoint, known by its metadata and read on demand.

    Attributes:
        name: The state-dict key.
        shape: The tensor's shape.
        dtype: The tensor's dtype (what ``read`` returns).
        read: Returns the tensor (reading it from disk if it is not in memory).
        stored_dtype: The dtype in the file when it differs from ``dtype`` (a quantized
            tensor, read dequantized).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]
    stored_dtype: torch.dtype | None = None

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size in bytes."""
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class NotAnalysed(Exception):
    """A stored tensor nndiag does not read; the message says what it is."""


def in_memory(name: str, tensor: torch.Tensor) -> TensorEntry:
    """An entry for a tensor that is already loaded."""
    return TensorEntry(name, tuple(tensor.shape), tensor.dtype, lambda: tensor)


def loaded_entry(name: str, tensor: torch.Tensor) -> TensorEntry:
    """An entry for a tensor a whole-file loader produced, read as a stored one would be.

    Raises:
        NotAnalysed: A sparse tensor, one on the ``meta`` device (no data), or a view
            expanded beyond ``MAX_EXPANDED_BYTES``.
    """
    if tensor.layout != torch.strided:
        raise NotAnalysed(f"{str(tensor.layout).removeprefix('torch.')} tensor")
    if tensor.is_meta:
        raise NotAnalysed("saved without data")
    if tensor.is_quantized:
        return TensorEntry(name, tuple(tensor.shape), torch.float32,
                           tensor.dequantize, tensor.dtype)
    check_expansion(tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
    return in_memory(name, tensor)


def check_expansion(shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype) -> None:
    """Refuse a view whose logical elements far outnumber the elements it stores.

    Raises:
        NotAnalysed: More logical elements than stored ones (stride 0 or overlapping
            strides), and more than ``MAX_EXPANDED_BYTES`` of them.
    """
    count, reached = math.prod(shape), span(shape, stride)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if count > reached and count * itemsize > MAX_EXPANDED_BYTES:
        raise NotAnalysed(f"a view of {count:,} elements over {reached:,} stored ones "
                          "(expanded); its statistics would cost far more than its bytes")


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
                 stride: tuple[int, ...], swap: bool = False) -> torch.Tensor:
    """Read only the bytes a (possibly strided) view covers, starting at ``file_offset``.

    ``swap``: the bytes are in the other byte order than this machine's.
    """
    count = span(shape, stride)
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return strided_view(read_exact(path, file_offset, count * itemsize), dtype, shape, stride,
                        swap)


def strided_view(buffer: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...],
                 stride: tuple[int, ...], swap: bool = False) -> torch.Tensor:
    """A uint8 buffer holding a view's span, as that view (byte-swapped first if ``swap``)."""
    if swap:
        buffer = byteswapped(buffer, dtype)
    return buffer.view(dtype).as_strided(shape, stride)


def byteswapped(buffer: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A uint8 buffer of ``dtype`` values with each value's bytes reversed.

    A complex value's real and imaginary parts are reversed each.
    """
    unit = torch.empty((), dtype=dtype).element_size() // (2 if dtype.is_complex else 1)
    if unit == 1:
        return buffer
    return buffer.view(-1, unit).flip(1).reshape(-1)


def dequantize(raw: torch.Tensor, scale: float | torch.Tensor, zero_point: float | torch.Tensor,
               axis: int | None) -> torch.Tensor:
    """The float32 values a quantized tensor stands for: ``(q - zero_point) * scale``.

    Args:
        raw: The stored integers, in the tensor's shape (packed sub-byte values unpacked).
        scale: One scale, or one per index of ``axis``.
        zero_point: Likewise.
        axis: The channel axis of a per-channel quantization; ``None`` for per-tensor.
    """
    values = raw.to(torch.float32)
    if axis is None:
        return values.sub_(float(zero_point)).mul_(float(scale))
    view = [1] * raw.dim()
    view[axis] = -1
    scales = torch.as_tensor(scale, dtype=torch.float32).reshape(view)
    zero_points = torch.as_tensor(zero_point, dtype=torch.float32).reshape(view)
    return values.sub_(zero_points).mul_(scales)


def unpack_sub_byte(packed: torch.Tensor, per_byte: int, count: int) -> torch.Tensor:
    """Values packed ``per_byte`` to a byte (low bits first), the first ``count`` of them."""
    bits = 8 // per_byte
    shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
    values = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(-1)[:count]
