"""Checkpoints: safe loading of every common format and data-free analysis of the weights.

A package rather than one module: reading formats lazily (``formats``, ``tensors``), finding
the weights inside training bundles (``weights``), mapping keys onto an architecture
(``mapping``) and measuring without data (``static``) are separate concerns.
"""

from nndiag.checkpoints.formats import Checkpoint, load_checkpoint, model_checkpoint
from nndiag.checkpoints.mapping import LoadResult, load_into
from nndiag.checkpoints.static import measure_checkpoint

__all__ = ["Checkpoint", "LoadResult", "load_checkpoint", "load_into", "measure_checkpoint",
           "model_checkpoint"]
