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

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nndiag.checkpoints import roles
from nndiag.checkpoints.formats import Checkpoint
from nndiag.records import CheckpointRecord, ModuleWeights, TensorStats
from nndiag.stats.weights import fans_from_shape, he_std, xavier_std

ROOT = "(root)"
_EMBEDDING_NAME = re.compile(r"(embed|wte|wpe|tok_emb|pos_emb|word_embeddings|"
                             r"position_embeddings|token_type_embeddings|shared|"
                             r"relative_attention_bias)", re.I)
# The config.json values the analysis reads (numbers and names only), and the largest
# config.json it reads at all.
_CONFIG_KEYS = ("model_type", "architectures", "initializer_range", "initializer_factor",
                "init_std", "n_layer", "num_hidden_layers", "num_layers", "hidden_size",
                "n_embd", "d_model", "num_attention_heads", "n_head", "num_heads",
                "vocab_size", "tie_word_embeddings")
_MAX_CONFIG_BYTES = 4 * 1024 * 1024
_RECURRENT_NAME = re.compile(r"^(weight|bias)_(ih|hh|hr)_l\d+")
# A BatchNorm channel is dead when gamma or the running variance is this small against the
# layer's largest value.
DEAD_GAMMA_RATIO = 1e-3
DEAD_VARIANCE_RATIO = 1e-6
# Elements reduced at a time by ``tensor_stats`` (8 MB once upcast to float32).
CHUNK = 1 << 21


def tensor_stats(name: str, tensor: torch.Tensor) -> TensorStats:
    """RMS, mean and non-finite count of one tensor.

    The tensor is reduced in chunks of ``CHUNK`` elements; float32 and float64 chunks are
    reduced in place, narrower types upcast to float32 chunk by chunk, so the memory this
    needs beyond the tensor itself is at most one chunk. Partial sums are accumulated in
    Python floats (double precision).
    """
    stats = TensorStats(name, list(tensor.shape), str(tensor.dtype).removeprefix("torch."),
                        tensor.numel())
    if not tensor.is_floating_point() or tensor.numel() == 0 or tensor.layout != torch.strided:
        return stats  # sparse tensors are not weights: their shape and dtype are enough
    flat = tensor.detach().reshape(-1)
    squares = total = 0.0
    nonfinite = 0
    for start in range(0, flat.numel(), CHUNK):
        part = flat[start: start + CHUNK]
        if part.dtype not in (torch.float32, torch.float64):
            part = part.float()
        part_squares, part_total = float(torch.dot(part, part)), float(part.sum())
        if not (math.isfinite(part_squares) and math.isfinite(part_total)):
            finite = torch.isfinite(part)
            nonfinite += int(part.numel() - int(finite.sum()))
            part = part[finite]
            part_squares, part_total = float(torch.dot(part, part)), float(part.sum())
        squares += part_squares
        total += part_total
    count = flat.numel() - nonfinite
    stats.nonfinite = nonfinite
    stats.rms = math.sqrt(squares / count) if count else math.nan
    stats.mean = total / count if count else math.nan
    return stats


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
    for entry in checkpoint.entries:
        module, param = _split(entry.name, tuple(entry.shape))
        tensor = entry.read()
        stats = tensor_stats(entry.name, tensor)
        if module == entry.name:  # an expert stack: judged as the matrix each expert holds
            stats.stacked, stats.shape = int(tensor.shape[0]), list(tensor.shape[1:])
        if module not in grouped:
            grouped[module] = {}
            order.append(module)
        grouped[module][param] = stats
        if param in ("weight", "running_var", "running_mean", "num_batches_tracked") and \
                tensor.dim() <= 1:
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
    record = CheckpointRecord(str(checkpoint.path), checkpoint.format, modules,
                              checkpoint.weights_key, dict(checkpoint.extras),
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
    try:
        if not path.is_file() or path.stat().st_size > _MAX_CONFIG_BYTES:
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
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
