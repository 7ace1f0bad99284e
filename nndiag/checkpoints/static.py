"""Data-free measurements of a checkpoint: per-tensor statistics read one tensor at a time.

Module kinds are guessed from tensor names and shapes (``running_var`` means BatchNorm, a 1-D
``weight`` a normalization layer, a 2-D ``weight`` a Linear layer unless the module is named
like an embedding, a 3- to 5-D one a convolution). ``roles`` then reads what each module does
in its architecture (attention projections, MLP, embeddings, heads, the GPT-2 ``Conv1D``
layout) and groups layers in series into chains that normalization layers interrupt; the rules
judge the product of their scales and, for a transformer, each weight against its family's
init scale. Everything judged depends on names, shapes and values only, never on the order
in which the file stores them.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from nndiag.checkpoints import roles
from nndiag.checkpoints.formats import Checkpoint, read_json_file
from nndiag.errors import UsageError
from nndiag.records import CheckpointRecord, ModuleWeights, TensorStats
from nndiag.stats.weights import fans_from_shape, he_std, xavier_std

ROOT = "(root)"
_EMBEDDING_NAME = re.compile(r"(embed|wte|wpe|tok_emb|pos_emb|word_embeddings|"
                             r"position_embeddings|token_type_embeddings|shared|"
                             r"relative_attention_bias)", re.I)
# The config.json values the analysis reads (numbers and names only).
_CONFIG_KEYS = ("model_type", "architectures", "initializer_range", "initializer_factor",
                "init_std", "n_layer", "num_hidden_layers", "num_layers", "hidden_size",
                "n_embd", "d_model", "num_attention_heads", "n_head", "num_heads",
                "vocab_size", "tie_word_embeddings")
_RECURRENT_NAME = re.compile(r"^(weight|bias)_(ih|hh|hr)_l\d+")
# A BatchNorm channel is dead when gamma or the running variance is this small against the
# layer's largest value.
DEAD_GAMMA_RATIO = 1e-3
DEAD_VARIANCE_RATIO = 1e-6
# Elements reduced at a time by ``tensor_stats`` (8 MB once upcast to float32).
CHUNK = 1 << 21
# A chunk is reduced in float32 (float64 for float64 tensors) when its mean square is at least
# this in that precision: any square too small for it to hold is then negligible.
_TINY_MEAN_SQUARE = {torch.float32: 1e-30, torch.float64: 1e-290}


def tensor_stats(name: str, tensor: torch.Tensor) -> TensorStats:
    """RMS, mean and non-finite count of one tensor.

    The tensor is reduced in chunks of ``CHUNK`` elements (``_chunks``), so the memory this
    needs beyond the tensor itself is about one chunk. Complex tensors give the RMS of their
    magnitudes and no mean; integers, booleans and float types torch cannot convert (packed
    4-bit floats) give no statistics.
    """
    stats = TensorStats(name, list(tensor.shape), str(tensor.dtype).removeprefix("torch."),
                        tensor.numel())
    if tensor.numel() == 0 or tensor.layout != torch.strided or not _reducible(tensor.dtype):
        return stats  # sparse tensors are not weights: their shape and dtype are enough
    moments = _Moments()
    for part in _chunks(tensor.detach()):
        moments.add(part)
    stats.nonfinite = moments.nonfinite
    stats.rms, mean = moments.rms(), moments.mean()
    stats.mean = None if tensor.is_complex() else mean
    return stats


def _real_numbers(dtype: torch.dtype) -> bool:
    """Integers, booleans and the float types torch can convert (not complex numbers)."""
    return not dtype.is_complex and (_reducible(dtype) or not dtype.is_floating_point)


@functools.cache
def _reducible(dtype: torch.dtype) -> bool:
    """A float or complex dtype whose values torch can check and convert to float32."""
    if not (dtype.is_floating_point or dtype.is_complex):
        return False
    try:
        with warnings.catch_warnings():  # complex32 is "experimental"
            warnings.simplefilter("ignore")
            size = torch.empty((), dtype=dtype).element_size()
            sample = torch.zeros(size, dtype=torch.uint8).view(dtype)
            values = _Moments.upcast(sample)
            torch.isfinite(sample if dtype.is_complex else values)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def _chunks(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """A tensor's elements as contiguous 1-D pieces of at most ``CHUNK`` elements.

    A non-contiguous tensor (a strided view, one third of a fused projection) is split along
    its first dimension, so that a piece, not the whole tensor, is copied at a time.
    """
    if tensor.is_contiguous():
        flat = tensor.reshape(-1)
        for start in range(0, flat.numel(), CHUNK):
            yield flat[start: start + CHUNK]
        return
    rows = max(1, CHUNK // max(1, tensor[0].numel()))
    for start in range(0, tensor.shape[0], rows):
        block = tensor[start: start + rows]
        if block.numel() <= CHUNK:
            yield block.reshape(-1)
        else:  # a single row larger than a chunk
            yield from _chunks(block[0])


class _Moments:
    """Count, sum of squares and sum of the finite values of a tensor, chunk by chunk.

    A chunk is reduced in float32 (float64 for float64 tensors), as fast as the hardware
    goes, when its sum of squares fits that precision; one whose squares overflow it (finite
    float32 weights near 1e18) or underflow it (weights near 1e-20) is reduced again in
    float64, divided by its largest magnitude. The sums are kept in units of the largest
    scale seen, in Python floats (double precision), so that they never overflow or underflow
    either, whatever the values.
    """

    def __init__(self) -> None:
        self.count = self.nonfinite = 0
        self.scale: float | None = None
        self.squares = self.total = 0.0

    def add(self, part: torch.Tensor) -> None:
        """Reduce one contiguous 1-D chunk."""
        values = self.upcast(part)
        count = part.numel()
        squares, total = float(torch.dot(values, values)), float(values.sum())
        if not (math.isfinite(squares) and math.isfinite(total)):
            if part.is_complex():  # a complex value is finite when both its parts are
                finite = torch.isfinite(part)
                values = self.upcast(part[finite])
            else:
                finite = torch.isfinite(values)
                values = values[finite]
            count = int(finite.sum())
            self.nonfinite += part.numel() - count
            squares, total = float(torch.dot(values, values)), float(values.sum())
        self.count += count
        if math.isfinite(squares) and squares >= _TINY_MEAN_SQUARE[values.dtype] * max(
                values.numel(), 1):
            self._merge(squares, total, 1.0)
            return
        peak = float(values.abs().max()) if values.numel() else 0.0
        if peak > 0:  # zeros add to the count only
            scaled = values.double() / peak
            self._merge(float(torch.dot(scaled, scaled)), float(scaled.sum()), peak)

    @staticmethod
    def upcast(part: torch.Tensor) -> torch.Tensor:
        """A chunk's values in float32 (float64 stays float64), complex ones as real pairs."""
        values = torch.view_as_real(part).reshape(-1) if part.is_complex() else part
        return values if values.dtype in (torch.float32, torch.float64) else values.float()

    def _merge(self, squares: float, total: float, scale: float) -> None:
        """Add sums measured in units of ``scale``."""
        if self.scale is None or scale > self.scale:
            ratio = self.scale / scale if self.scale is not None else 0.0
            self.squares = self.squares * ratio * ratio + squares
            self.total = self.total * ratio + total
            self.scale = scale
        else:
            ratio = scale / self.scale
            self.squares += squares * ratio * ratio
            self.total += total * ratio

    def rms(self) -> float:
        """Root mean square of the finite values (of the magnitudes for complex values)."""
        if not self.count:
            return math.nan
        return (self.scale or 1.0) * math.sqrt(self.squares / self.count)

    def mean(self) -> float:
        """Mean of the finite values."""
        return (self.scale or 1.0) * (self.total / self.count) if self.count else math.nan


def _split(name: str, shape: tuple[int, ...] = ()) -> tuple[str, str]:
    """Module and parameter of a key; a stack of expert matrices is a module of its own.

    Mixture-of-experts layers may keep every expert's matrix in one 3-D tensor
    (``mlp.experts.gate_up_proj``: experts x out x in): it is read as the Linear weight of a
    module ``mlp.experts.gate_up_proj``.
    """
    module, _, param = name.rpartition(".")
    if _is_expert_stack(module, param, shape):
        return name, "weight"
    return (module or ROOT), param


def _is_expert_stack(module: str, param: str, shape: tuple[int, ...]) -> bool:
    return (len(shape) == 3 and param not in ("weight", "bias")
            and module.rsplit(".", 1)[-1] == "experts")


def _kind(module: str, tensors: dict[str, TensorStats], embedding: bool = False) -> str:
    weight = tensors.get("weight")
    if embedding and weight is not None:
        return "embedding"
    if module.endswith("relative_attention_bias") and weight is not None:
        return "embedding"
    if "running_var" in tensors:
        return "batch_norm"
    if any(_RECURRENT_NAME.match(p) for p in tensors):
        return "recurrent"
    if "in_proj_weight" in tensors:
        return "attention"
    if weight is None:
        return "other"
    if len(weight.shape) == 1:
        return "norm"
    if len(weight.shape) == 2:
        return "embedding" if _EMBEDDING_NAME.search(module.rsplit(".", 1)[-1]) else "linear"
    if 3 <= len(weight.shape) <= 5:
        return "conv"
    return "other"


def measure_checkpoint(checkpoint: Checkpoint,
                       progress: Callable[[int, int], None] | None = None) -> CheckpointRecord:
    """Read every tensor once and reduce it to plain numbers, grouped by module.

    Peak memory is about the largest tensor (plus the small BatchNorm vectors kept to count
    dead channels).

    Args:
        checkpoint: An opened checkpoint.
        progress: Called with (bytes done, bytes total) after each tensor.
    """
    order: list[str] = []
    grouped: dict[str, dict[str, TensorStats]] = {}
    batch_norm_vectors: dict[str, dict[str, torch.Tensor]] = {}
    fused: dict[str, dict[str, float]] = {}
    total, done = checkpoint.total_bytes, 0
    unreduced: list[str] = []
    for entry in checkpoint.entries:
        module, param = _split(entry.name, tuple(entry.shape))
        tensor = entry.read()
        stats = tensor_stats(entry.name, tensor)
        if (tensor.is_floating_point() or tensor.is_complex()) and not _reducible(tensor.dtype):
            unreduced.append(f"{entry.name} ({stats.dtype})")
        if module == entry.name:  # an expert stack: judged as the matrix each expert holds
            stats.stacked, stats.shape = int(tensor.shape[0]), list(tensor.shape[1:])
        if module not in grouped:
            grouped[module] = {}
            order.append(module)
        grouped[module][param] = stats
        if param in ("weight", "running_var", "running_mean", "num_batches_tracked") and \
                tensor.dim() <= 1 and _real_numbers(tensor.dtype):
            batch_norm_vectors.setdefault(module, {})[param] = tensor.detach().to(
                "cpu", torch.float32, copy=True)
        if roles.is_sliceable_fused(module, param):
            thirds = fused_thirds(entry.name, tensor)
            if thirds is not None:
                fused[module] = thirds
        del tensor
        done += entry.nbytes
        if progress is not None:
            progress(done, total)

    modules = [_module_record(name, grouped[name], batch_norm_vectors.get(name, {}),
                              name in checkpoint.embeddings)
               for name in order]
    for module in modules:
        module.fused_rms = fused.get(module.name)
    extras = dict(checkpoint.extras)
    if unreduced:
        extras["no statistics"] = (f"{len(unreduced)} tensor(s) in a float type torch cannot "
                                   "compute with: " + ", ".join(unreduced[:5])
                                   + (" ..." if len(unreduced) > 5 else ""))
    record = CheckpointRecord(str(checkpoint.path), checkpoint.format, modules,
                              checkpoint.weights_key, extras,
                              [str(f) for f in checkpoint.files],
                              config=read_config(checkpoint))
    roles.annotate(record)
    return record


def fused_thirds(name: str, tensor: torch.Tensor) -> dict[str, float] | None:
    """RMS of the query, key and value thirds of a fused projection weight.

    The fused dimension is the one three times the other: (3d, d) for ``nn.Linear`` and
    ``in_proj_weight``, (d, 3d) for GPT-2's ``Conv1D``. ``None`` for any other shape (grouped
    queries make the parts unequal).
    """
    if tensor.dim() != 2 or not tensor.is_floating_point():
        return None
    rows, cols = tensor.shape
    if cols == 3 * rows and rows > 0:
        parts = tensor.chunk(3, dim=1)
    elif rows == 3 * cols and cols > 0:
        parts = tensor.chunk(3, dim=0)
    else:
        return None
    thirds = {}
    for part_name, part in zip(("query", "key", "value"), parts, strict=True):
        rms = tensor_stats(name, part).rms
        if rms is None or not math.isfinite(rms):
            return None
        thirds[part_name] = rms
    return thirds


def read_config(checkpoint: Checkpoint) -> dict[str, Any]:
    """The values of a Hugging Face directory's ``config.json`` the analysis uses.

    Only plain numbers, booleans, short strings and lists of strings are kept; anything
    unreadable, oversized or malformed yields ``{}`` (the config only refines explanations).
    """
    if checkpoint.format != "hf_directory":
        return {}
    path = Path(checkpoint.path) / "config.json"
    if not path.is_file():
        return {}
    try:
        data = read_json_file(path, "config.json")
    except UsageError:
        return {}
    if not isinstance(data, dict):
        return {}
    config: dict[str, Any] = {}
    for key in _CONFIG_KEYS:
        value = data.get(key)
        if isinstance(value, bool | int | float) and not (
                isinstance(value, float) and not math.isfinite(value)):
            config[key] = value
        elif isinstance(value, str) and len(value) <= 100:
            config[key] = value
        elif isinstance(value, list) and all(isinstance(v, str) and len(v) <= 100
                                             for v in value[:8]):
            config[key] = list(value[:8])
    return config


def _module_record(name: str, tensors: dict[str, TensorStats],
                   vectors: dict[str, torch.Tensor], embedding: bool = False) -> ModuleWeights:
    kind = _kind(name, tensors, embedding)
    record = ModuleWeights(name, kind, sum(t.numel for t in tensors.values()),
                           list(tensors.values()))
    weight = tensors.get("weight")
    if kind in ("linear", "conv") and weight is not None and weight.rms is not None:
        record.fan_in, record.fan_out = fans_from_shape(weight.shape)
        record.weight_rms = weight.rms
        if record.fan_in > 0 and record.fan_out > 0:
            record.init_scale_he = weight.rms / he_std(record.fan_in)
            record.init_scale_xavier = weight.rms / xavier_std(record.fan_in, record.fan_out)
    elif weight is not None:
        record.weight_rms = weight.rms
    if kind == "batch_norm":
        _dead_channels(record, vectors)
    return record


def _dead_channels(record: ModuleWeights, vectors: dict[str, torch.Tensor]) -> None:
    gamma, variance = vectors.get("weight"), vectors.get("running_var")
    reference = gamma if gamma is not None else variance
    if reference is None:
        return
    record.channels = int(reference.numel())
    if not record.channels:  # a BatchNorm over zero features: nothing to judge
        record.dead_channels = 0
        return
    dead = torch.zeros(record.channels, dtype=torch.bool)
    if gamma is not None and gamma.numel() == record.channels:
        top = float(gamma.abs().max())
        untouched = variance is not None and bool((variance == 1).all()) and bool(
            (vectors.get("running_mean", torch.zeros(1)) == 0).all())
        if top == 0 and untouched:
            record.zero_initialized = True
            record.dead_channels = 0
            return
        dead |= gamma.abs() <= DEAD_GAMMA_RATIO * top
    if variance is not None and variance.numel() == record.channels:
        top = float(variance.max())
        dead |= variance <= DEAD_VARIANCE_RATIO * top if top > 0 else torch.ones_like(dead)
    record.dead_channels = int(dead.sum())


def _assign_chains(modules: list[ModuleWeights]) -> None:
    """Number the runs of layers in series (``roles.assign_chains``)."""
    roles.assign_chains(modules)
