"""Parameters spread over ranks: a rank's own elements, and how to sum a statistic over ranks.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) a parameter is a ``DTensor`` whose
elements are split over the ranks of its device mesh (``Shard`` placements) and copied over
the others (``Replicate``); under DDP it is a plain tensor that every rank holds whole. A
squared norm is then computed on a rank's own elements (``local``) and summed over all ranks,
each rank's share weighted by ``sum_weight``: 1 for elements no other rank holds, 1/k for
elements k ranks hold alike. One sum over the world then gives the whole tensor's value for
any mix of placements, in one collective for every statistic of a step.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


@functools.cache
def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - older torch
        return None
    return DTensor


def is_dtensor(tensor: Any) -> bool:
    """True for a ``DTensor`` (a parameter sharded or replicated over a device mesh)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The elements this rank holds (a ``DTensor``'s local shard; a plain tensor itself)."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def sum_weight(tensor: torch.Tensor, world_size: int) -> float:
    """The weight of this rank's share of a summed statistic of ``tensor`` (see module doc).

    A ``DTensor`` is held alike by the ranks of its mesh's ``Replicate`` dimensions; a plain
    tensor under ``torch.distributed`` by every rank (DDP keeps replicas equal).
    """
    if not is_dtensor(tensor):
        return 1.0 / world_size
    copies = 1
    for size, placement in zip(tensor.device_mesh.shape, tensor.placements, strict=True):
        if placement.is_replicate():
            copies *= size
    return 1.0 / copies
