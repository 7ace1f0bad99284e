"""Repeated blocks (a transformer's ``layer.N``): one quantity, first block against last.

Rules that judge a trend through depth in a model of repeated blocks compare, for the layers
at one place in the block (``place_in_block``), the median of a quantity in the first block with
its median in the last: a trend across blocks, not the extreme of a single layer.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from nndiag.records import LayerRecord
from nndiag.records.layers import ATTENTION_ROLES


@dataclass
class BlockSpan:
    """The layers of one kind in the first and the last block that hold any.

    Attributes:
        key: The place in the block (``place_in_block``).
        first_block: Index of the first block.
        last_block: Index of the last block.
        first: The kind's layers in the first block, with their value.
        last: Those in the last block.
        first_median: Median value in the first block.
        last_median: Median value in the last block.
    """

    key: str
    first_block: int
    last_block: int
    first: list[tuple[LayerRecord, float]]
    last: list[tuple[LayerRecord, float]]
    first_median: float
    last_median: float


def place_in_block(record: LayerRecord) -> str:
    """What a layer is in its block: attention layers by role, the others by their position.

    Query, key and value projections are one kind wherever a family nests them; a
    normalization inside a gated branch is not compared with one on the residual path.
    """
    if record.role in ATTENTION_ROLES:
        return record.role
    return record.block_position or record.role or "hidden"


def block_spans(values: Iterable[tuple[LayerRecord, float]],
                key: Callable[[LayerRecord], str] = place_in_block) -> list[BlockSpan]:
    """Group layers in blocks by ``key``; a kind found in at least two blocks gets a span."""
    grouped: dict[str, dict[int, list[tuple[LayerRecord, float]]]] = {}
    for record, value in values:
        if record.block is not None:
            grouped.setdefault(key(record), {}).setdefault(record.block, []).append(
                (record, value))
    spans = []
    for kind, blocks in grouped.items():
        if len(blocks) < 2:
            continue
        first, last = min(blocks), max(blocks)
        spans.append(BlockSpan(kind, first, last, blocks[first], blocks[last],
                               statistics.median(v for _, v in blocks[first]),
                               statistics.median(v for _, v in blocks[last])))
    return spans
