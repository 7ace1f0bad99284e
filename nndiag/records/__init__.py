"""Records: the plain numbers that capture produces and rules read (no torch in here).

- ``layers``: ``LayerRecord`` (one call site) and ``ProbeRecord`` (one inspection);
- ``steps``: ``StepRecord``, one sampled training step, its layers as ``LayerRecord``s;
- ``params``: ``ParamGroup`` and ``attach_parameters``, which put a module's parameter
  statistics on its first call site (shared by the probe, ``Monitor`` and the run-log reader);
- ``checkpoint``: ``TensorStats``, ``ModuleWeights``, ``CheckpointRecord`` (data-free analysis);
- ``sanity``: ``SanityRecord``, what the CI gate measured of the user's training step.
"""

from nndiag.records.checkpoint import CheckpointRecord, LoadResult, ModuleWeights, TensorStats
from nndiag.records.layers import LayerRecord, ProbeRecord
from nndiag.records.params import ParamGroup, ancestors, attach_parameters
from nndiag.records.sanity import SanityRecord
from nndiag.records.steps import STEP_COLUMNS, StepRecord

__all__ = ["STEP_COLUMNS", "CheckpointRecord", "LayerRecord", "LoadResult", "ModuleWeights",
           "ParamGroup",
           "ProbeRecord", "SanityRecord", "StepRecord", "TensorStats", "ancestors",
           "attach_parameters"]
