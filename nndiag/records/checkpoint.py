"""Records of a data-free checkpoint analysis (no torch).

Also the vocabulary the data-free analysis and its rules share: module roles, architecture
families, and the canonical order of module names (the same in every checkpoint format).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from nndiag.records.rows import Row

# Roles (``ModuleWeights.role``): the same strings as the live probe's ``LayerRecord.role``,
# plus the finer MLP roles a state dict needs to pair the layers of a residual branch.
ROLE_QUERY, ROLE_KEY, ROLE_VALUE = "attention_query", "attention_key", "attention_value"
ROLE_ATTENTION, ROLE_ATTENTION_OUT = "attention", "attention_output"
ROLE_MLP_IN, ROLE_MLP_GATE, ROLE_MLP_OUT = "mlp_in", "mlp_gate", "mlp_out"
ROLE_EMBEDDING, ROLE_NORM, ROLE_HEAD, ROLE_HIDDEN = ("embedding", "normalization", "head",
                                                     "hidden")
QKV_ROLES = frozenset({ROLE_QUERY, ROLE_KEY, ROLE_VALUE, ROLE_ATTENTION})
# Projections that read the residual stream (a block's normalized input) and that write it.
INPUT_ROLES = QKV_ROLES | {ROLE_MLP_IN, ROLE_MLP_GATE}
OUTPUT_ROLES = frozenset({ROLE_ATTENTION_OUT, ROLE_MLP_OUT})
PROJECTION_ROLES = INPUT_ROLES | OUTPUT_ROLES

# Families (``CheckpointRecord.family``) and how to name them in a sentence.
FAMILY_LABELS = {"gpt2": "GPT-2", "bert": "BERT", "llama": "Llama", "vit": "ViT", "t5": "T5",
                 "torch": "torch.nn.Transformer", "hf": "Hugging Face-style transformer"}
# Families whose Linear and embedding weights start at N(0, initializer_range) ...
NORMAL_INIT_FAMILIES = frozenset({"gpt2", "bert", "llama", "vit", "hf"})
# ... with the initializer_range of every one of their configs.
HF_INIT_STD = 0.02

_TRAILING_NUMBER = re.compile(r"^(.*?)(\d+)$")
_NORM_KINDS = frozenset({"norm", "batch_norm"})


def canonical_key(name: str, kind: str = "") -> tuple[tuple[int, int, int, str], ...]:
    """A sort key that orders module names as a model defines them, from the names alone.

    Numbered components sort numerically (``h.2`` before ``h.10``), named siblings with a
    number by that number (``conv1``, ``bn1``, ``conv2``), a weight layer before the
    normalization of the same number. The stored order is not used: safetensors sorts its keys
    alphabetically, so only the names are the same in every format.

    Args:
        name: A module name (``transformer.h.3.attn``).
        kind: The module's kind (``norm`` and ``batch_norm`` sort after weight layers).
    """
    parts = name.split(".")
    rank = 1 if kind in _NORM_KINDS else 0
    key = []
    for index, part in enumerate(parts):
        leaf_rank = rank if index == len(parts) - 1 else 0
        if part.isdigit():
            key.append((0, int(part), leaf_rank, ""))
            continue
        match = _TRAILING_NUMBER.match(part)
        if match and match.group(1):
            key.append((1, int(match.group(2)), leaf_rank, match.group(1)))
        else:
            key.append((2, 0, leaf_rank, part))
    return tuple(key)


@dataclass
class TensorStats:
    """Data-free statistics of one checkpoint tensor.

    Attributes:
        name: The state-dict key.
        shape: Its shape.
        dtype: Its dtype, without the ``torch.`` prefix.
        numel: Number of elements.
        rms: Root mean square (``None`` for non-float tensors).
        mean: Mean (``None`` for non-float tensors).
        nonfinite: Number of NaN/Inf elements.
        stacked: For a stack of mixture-of-experts matrices, how many experts it holds;
            ``shape`` is then one expert's matrix (``numel`` counts them all).
    """

    name: str
    shape: list[int]
    dtype: str
    numel: int
    rms: float | None = None
    mean: float | None = None
    nonfinite: int = 0
    stacked: int | None = None


@dataclass
class ModuleWeights(Row):
    """A checkpoint's tensors grouped by module, with what they imply (no data needed).

    Attributes:
        name: Module prefix of the tensors (``features.3``), ``(root)`` for top-level ones.
        kind: ``linear``, ``conv``, ``batch_norm``, ``norm``, ``embedding``, ``recurrent``,
            ``attention`` or ``other``, guessed from tensor names and shapes.
        params: Number of elements of the module's tensors (buffers included).
        tensors: Per-tensor statistics.
        fan_in: Fan-in of a linear/conv weight.
        fan_out: Fan-out of a linear/conv weight.
        weight_rms: RMS of the module's weight.
        init_scale_he: ``weight_rms`` over the He std ``sqrt(2/fan_in)``: the signal gain of
            the layer followed by a ReLU.
        init_scale_xavier: ``weight_rms`` over the Xavier std.
        chain: Index of the run of linear/conv layers with no normalization in between.
        channels: Channels of a BatchNorm layer.
        dead_channels: BatchNorm channels with near-zero gamma or running variance.
        zero_initialized: True for a BatchNorm whose gamma is exactly zero everywhere and whose
            running statistics were never updated (the zero-init residual trick).
        role: What the module does in its architecture (``nndiag.checkpoints.roles``):
            ``attention_query``, ``attention_key``, ``attention_value``, ``attention`` (fused
            q/k/v), ``attention_output``, ``mlp_in``, ``mlp_gate``, ``mlp_out``, ``embedding``,
            ``normalization``, ``head`` or ``hidden``.
        block: The repeated block the module sits in (``transformer.h.3``), if any.
        transposed: True for a weight stored as (in, out), as Hugging Face's GPT-2 ``Conv1D``
            stores it; its fans are read the other way round.
        fused_rms: RMS of the query, key and value thirds of a fused projection.
        reference_std: The std the module's architecture family initializes it with (GPT-2:
            0.02, its residual projections 0.02/sqrt(2 n_layer)); ``None`` when unknown.
        init_ratio: ``weight_rms`` over ``reference_std``.
        signal_gain: Predicted factor on the scale of a unit-scale input through the layer
            (and the ReLU-like activation after it, if any); chains multiply these.
        tied_to: The module whose weight this one repeats exactly (a tied LM head).
    """

    name: str
    kind: str
    params: int
    tensors: list[TensorStats]
    fan_in: int | None = None
    fan_out: int | None = None
    weight_rms: float | None = None
    init_scale_he: float | None = None
    init_scale_xavier: float | None = None
    chain: int | None = None
    channels: int | None = None
    dead_channels: int | None = None
    zero_initialized: bool = False
    role: str | None = None
    block: str | None = None
    transposed: bool = False
    fused_rms: dict[str, float] | None = None
    reference_std: float | None = None
    init_ratio: float | None = None
    signal_gain: float | None = None
    tied_to: str | None = None

    json_properties: ClassVar[tuple[str, ...]] = ("nonfinite",)

    @property
    def nonfinite(self) -> int:
        """NaN/Inf elements over all the module's tensors."""
        return sum(t.nonfinite for t in self.tensors)

    def tensor(self, param: str) -> TensorStats | None:
        """The statistics of one of the module's tensors by parameter name (``bias``).

        A stack of expert matrices is its module's ``weight``.
        """
        return next((t for t in self.tensors if t.name.rsplit(".", 1)[-1] == param
                     or (param == "weight" and t.stacked)), None)

    @property
    def weight(self) -> TensorStats | None:
        """The module's weight (``in_proj_weight`` for ``nn.MultiheadAttention``)."""
        return self.tensor("weight") or self.tensor("in_proj_weight")


@dataclass
class CheckpointRecord:
    """Everything the data-free analysis read from a checkpoint.

    Attributes:
        path: The file or directory.
        format: The format detected (see ``nndiag.checkpoints``).
        modules: Tensors grouped by module, in stored order.
        weights_key: Where the weights were found inside the file.
        extras: What else the file holds, described in words.
        files: Files read.
        family: The transformer family the names and shapes show (``gpt2``, ``bert``,
            ``llama``, ``vit``, ``t5``, ``torch`` for ``nn.Transformer`` layers, ``hf`` for
            other Hugging Face-style models), ``None`` for a model without attention.
        untrained: True when every normalization gain is exactly 1 and every bias exactly 0
            (the weights are their initialization), False when training moved them, ``None``
            when the checkpoint cannot tell.
        width: The residual stream's width (``d_model``), when known.
        blocks: Number of repeated blocks holding attention.
        config: Values read from a Hugging Face directory's ``config.json``
            (``initializer_range``, ``model_type``...).
    """

    path: str
    format: str
    modules: list[ModuleWeights]
    weights_key: str | None = None
    extras: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    family: str | None = None
    untrained: bool | None = None
    width: int | None = None
    blocks: int = 0
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def parameters(self) -> int:
        """Number of elements over all tensors."""
        return sum(m.params for m in self.modules)


@dataclass
class LoadResult:
    """How the checkpoint's keys met the model's.

    Attributes:
        prefix_removed: A prefix stripped from every checkpoint key (``net.``, ``module.``).
        prefix_added: A prefix added to every checkpoint key.
        missing: Model keys the checkpoint did not have (non-strict only).
        unexpected: Checkpoint keys the model did not have (non-strict only).
    """

    prefix_removed: str = ""
    prefix_added: str = ""
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
