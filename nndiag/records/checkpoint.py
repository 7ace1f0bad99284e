"""Records of a data-free checkpoint analysis (no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    """

    name: str
    shape: list[int]
    dtype: str
    numel: int
    rms: float | None = None
    mean: float | None = None
    nonfinite: int = 0


@dataclass
class ModuleWeights:
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

    @property
    def nonfinite(self) -> int:
        """NaN/Inf elements over all the module's tensors."""
        return sum(t.nonfinite for t in self.tensors)


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
    """

    path: str
    format: str
    modules: list[ModuleWeights]
    weights_key: str | None = None
    extras: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    @property
    def parameters(self) -> int:
        """Number of elements over all tensors."""
        return sum(m.params for m in self.modules)
