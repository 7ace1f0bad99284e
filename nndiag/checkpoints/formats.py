"""Reading every common checkpoint format, safely, without loading the whole file.

Formats: PyTorch ``torch.save`` files (zip and legacy), PyTorch Lightning ``.ckpt``, training
checkpoints that bundle model, optimizer and epoch, ``.safetensors``, Hugging Face-style
directories (config plus one or several shards, with or without an index JSON), TorchScript
archives, and whole pickled ``nn.Module``s (only with ``unsafe_load``).

Safety: nothing is unpickled beyond what ``torch.load(weights_only=True)`` allows; a file
whose loading would run code is refused with a message naming ``--unsafe-load``.

TorchScript archives are read by the same restricted unpickler as torch files: their code is
not run (a scripted class's ``__setstate__`` could write files or never end); the module
itself is loaded by ``torch.jit.load`` only with ``unsafe_load``.

Memory: a zip-format torch file or TorchScript archive has its pickled structure read by the
restricted unpickler (``unpickler``; at most ``MAX_PICKLE_BYTES`` of it), which reads no
tensor data; each tensor is then read from its own record of the zip (``ziplayout``) when it
is needed: in place when stored uncompressed, inflated chunk by chunk into the tensor's buffer
when compressed. Safetensors headers give offsets directly. Legacy (pre-1.6) torch files and
unsafe pickles are loaded whole by torch's own reader. A record shorter or longer than its
storage is a corrupt checkpoint, as it is for torch. Quantized tensors are read dequantized;
sparse ones, and views expanded far beyond their stored elements, are named in the
checkpoint's notes and not analysed.
"""

from __future__ import annotations

import contextlib
import json
import math
import pickle
import re
import struct
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from torch import nn

from nndiag.checkpoints.tensors import (
    QUANTIZED_STORAGE,
    NotAnalysed,
    TensorEntry,
    check_expansion,
    dequantize,
    in_memory,
    loaded_entry,
    read_strided,
    span,
    strided_view,
    unpack_sub_byte,
)
from nndiag.checkpoints.torchscript import code_record, declared_tensors, is_module, module_tensors
from nndiag.checkpoints.unpickler import (
    DisallowedGlobal,
    StoredTensor,
    restricted_load,
    source_of,
)
from nndiag.checkpoints.weights import find_weights
from nndiag.checkpoints.ziplayout import (
    MAX_PICKLE_BYTES,
    ZipLayout,
    corrupt,
    inflate_into,
    read_record,
    read_zip_layout,
)
from nndiag.errors import UsageError, describe_exception

UNSAFE_HINT = ("If you trust the file, pass --unsafe-load (loading it runs code from the file: "
               "never do that with a file from an unknown source).")
# Safetensors dtypes: bits per value and the torch dtype that holds them (``None``: torch has
# none). F4 values are packed two to a byte: torch's ``float4_e2m1fn_x2`` holds a pair, so its
# last dimension is half the header's.
_SAFETENSORS_DTYPES: dict[str, tuple[int, str | None]] = {
    "BOOL": (8, "bool"), "U8": (8, "uint8"), "I8": (8, "int8"), "U16": (16, "uint16"),
    "I16": (16, "int16"), "U32": (32, "uint32"), "I32": (32, "int32"), "U64": (64, "uint64"),
    "I64": (64, "int64"), "F16": (16, "float16"), "BF16": (16, "bfloat16"),
    "F32": (32, "float32"), "F64": (64, "float64"), "C64": (64, "complex64"),
    "F8_E4M3": (8, "float8_e4m3fn"), "F8_E5M2": (8, "float8_e5m2"),
    "F8_E4M3FNUZ": (8, "float8_e4m3fnuz"), "F8_E5M2FNUZ": (8, "float8_e5m2fnuz"),
    "F8_E8M0": (8, "float8_e8m0fnu"), "F4": (4, "float4_e2m1fn_x2"),
    "F6_E2M3": (6, None), "F6_E3M2": (6, None),
}
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
# torch's sizes, strides and element counts are signed 64-bit integers.
_MAX_TORCH_INDEX = 2**63 - 1
# The largest shard index or config.json read: real ones are kilobytes to a few megabytes.
MAX_JSON_SIDE_FILE = 64 * 1024 * 1024
# Tensors named in the note on those not analysed (the rest are counted).
_LISTED = 8


@dataclass
class Checkpoint:
    """What a checkpoint holds.

    Attributes:
        path: The file or directory.
        format: ``state_dict``, ``lightning``, ``training_checkpoint``, ``safetensors``,
            ``hf_directory``, ``torchscript`` or ``pickled_module``.
        entries: The model's weights and buffers, in stored order, read on demand.
        weights_key: Where in the file the weights were found (``state_dict``, ``model``...).
        extras: What else the file holds (optimizer state, epoch...), described in words.
        module: The module itself for pickled modules, and for TorchScript archives loaded
            with ``unsafe_load`` (loading one runs its code).
        files: The files read (several for a sharded directory).
        embeddings: Modules known to be lookup tables (a live model's ``nn.Embedding``s);
            in a file, a 2-D weight is taken for one by its name.
    """

    path: Path
    format: str
    entries: list[TensorEntry]
    weights_key: str | None = None
    extras: dict[str, str] = field(default_factory=dict)
    module: nn.Module | None = None
    files: list[Path] = field(default_factory=list)
    embeddings: frozenset[str] = frozenset()

    @property
    def total_bytes(self) -> int:
        """Bytes of all weight tensors."""
        return sum(entry.nbytes for entry in self.entries)

    def state_dict(self, progress: Callable[[int, int], None] | None = None
                   ) -> dict[str, torch.Tensor]:
        """Read every tensor into a state dict (progress gets bytes done and total)."""
        done, total = 0, self.total_bytes
        result = {}
        for entry in self.entries:
            result[entry.name] = entry.read()
            done += entry.nbytes
            if progress is not None:
                progress(done, total)
        return result


def model_checkpoint(model: nn.Module) -> Checkpoint:
    """A live model's weights and buffers as a checkpoint, read in place (nothing is copied).

    The data-free analysis then reads the live model exactly as it reads the same weights
    saved to a file.
    """
    entries = [in_memory(name, tensor.detach())
               for name, tensor in model.state_dict(keep_vars=True).items()
               if isinstance(tensor, torch.Tensor)]
    embeddings = frozenset(name for name, module in model.named_modules()
                           if isinstance(module, nn.Embedding | nn.EmbeddingBag))
    return Checkpoint(Path(f"({type(model).__name__})"), "live_model", entries,
                      embeddings=embeddings)


def load_checkpoint(path: str | Path, *, unsafe_load: bool = False) -> Checkpoint:
    """Open a checkpoint file or directory and locate the model's weights.

    Args:
        path: A file (``.pt``, ``.pth``, ``.bin``, ``.ckpt``, ``.safetensors``, TorchScript)
            or a Hugging Face-style directory.
        unsafe_load: Allow full unpickling (runs code from the file).

    Returns:
        The checkpoint, with tensors read lazily where the format allows.

    Raises:
        UsageError: Missing, empty, corrupt, truncated, unsafe or non-checkpoint input.
    """
    target = Path(path)
    if target.is_dir():
        return _load_directory(target, unsafe_load)
    if not target.exists():
        raise UsageError(f"checkpoint {str(target)!r} not found")
    if not target.is_file():
        raise UsageError(f"checkpoint {str(target)!r} is not a file or directory")
    return _load_file(target, unsafe_load)


def _load_file(path: Path, unsafe_load: bool) -> Checkpoint:
    size = path.stat().st_size
    if size == 0:
        raise UsageError(f"checkpoint {str(path)!r} is empty (0 bytes)")
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head.startswith(b"PK\x03\x04"):
        return _load_zip(path, unsafe_load)
    if _looks_like_safetensors(head, size):
        return _load_safetensors(path)
    if head[:1] == b"\x80":  # a pickle stream: the legacy torch.save format
        return _load_torch_whole(path, unsafe_load, legacy=True)
    raise UsageError(
        f"{str(path)!r} is not a checkpoint nndiag can read (expected a torch.save file, a "
        "Lightning .ckpt, .safetensors, a TorchScript archive or a Hugging Face directory)"
    )


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 0 < header_len <= min(size - 8, _MAX_SAFETENSORS_HEADER) and head[8:9] == b"{"


def _load_zip(path: Path, unsafe_load: bool) -> Checkpoint:
    try:
        with zipfile.ZipFile(path) as archive:
            layout = read_zip_layout(path, archive)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError,
            RuntimeError, zlib.error) as exc:  # RuntimeError: an encrypted entry
        raise UsageError(f"{str(path)!r} is a corrupt or truncated zip archive "
                         f"({describe_exception(exc)})") from exc
    if layout.torchscript:
        return _load_torchscript(path, layout, unsafe_load)
    if layout.record("data.pkl") is None:
        raise UsageError(f"{str(path)!r} is a zip archive but not a PyTorch checkpoint "
                         "(no data.pkl inside)")
    try:
        structure = _read_pickle(layout, "data")
    except DisallowedGlobal as exc:
        if unsafe_load:
            return _load_torch_whole(path, unsafe_load, legacy=False)
        raise _unsafe_error(path, exc) from exc
    return _interpret(path, structure, lambda name, t: _stored_entry(layout, name, t))


def _read_pickle(layout: ZipLayout, archive_name: str, *, script_objects: bool = False) -> Any:
    """Unpickle ``<archive_name>.pkl`` with the restricted unpickler (its tensors stay on disk).

    Raises:
        DisallowedGlobal: It names something whose loading would run code.
        UsageError: It is missing, too large, or not a pickle of a checkpoint.
    """
    member = f"{archive_name}.pkl"
    record = layout.record(member)
    if record is None:
        raise corrupt(layout.path, f"no {member} record")
    data = read_record(layout, record, MAX_PICKLE_BYTES, "pickled structure")
    try:
        return restricted_load(data, archive_name, script_objects=script_objects)
    except DisallowedGlobal:
        raise
    except Exception as exc:  # a malformed pickle can raise anything; it is the file's fault
        raise corrupt(layout.path, f"its {member} cannot be read "
                                   f"({describe_exception(exc)})") from exc


def _stored_entry(layout: ZipLayout, name: str, meta: torch.Tensor) -> TensorEntry:
    """An entry read from the tensor's record when it is needed (dequantized if quantized).

    Raises:
        NotAnalysed: A sparse tensor, one saved without data, or an expanded view.
        UsageError: The record is missing, shorter or longer than the tensor's storage, or
            the tensor reaches past its storage.
    """
    source = source_of(meta)
    if source is None or source.storage is None:
        raise NotAnalysed(f"{source.sparse_layout} tensor" if source and source.sparse_layout
                          else "saved without data")
    quantization = source.quantization
    check_expansion(source.shape, source.stride,
                    source.dtype if quantization is None else torch.float32)
    if quantization is None:
        return TensorEntry(name, source.shape, source.dtype, _raw_reader(layout, name, source))
    stored_as, per_byte = QUANTIZED_STORAGE[source.dtype]
    count = math.prod(source.shape)
    if per_byte > 1:  # packed: read the whole contiguous storage, then unpack
        if source.offset or tuple(source.stride) != _contiguous(source.shape):
            raise NotAnalysed(f"a non-contiguous {source.dtype} view")
        packed = replace(source, shape=(-(-count // per_byte),), stride=(1,), dtype=stored_as,
                         quantization=None)
        read_packed = _raw_reader(layout, name, packed)

        def read_raw() -> torch.Tensor:
            return unpack_sub_byte(read_packed(), per_byte, count).reshape(source.shape)
    else:
        read_raw = _raw_reader(layout, name, replace(source, dtype=stored_as,
                                                     quantization=None))
    scale, zero_point = (_stored_entry(layout, f"{name} (scales)", value).read
                         if isinstance(value, torch.Tensor) else (lambda v=value: v)
                         for value in (quantization.scale, quantization.zero_point))

    def read() -> torch.Tensor:
        return dequantize(read_raw(), scale(), zero_point(), quantization.axis)

    return TensorEntry(name, source.shape, torch.float32, read, source.dtype)


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(torch.empty(shape, device="meta").stride())


def _raw_reader(layout: ZipLayout, name: str,
                source: StoredTensor) -> Callable[[], torch.Tensor]:
    """A reader of a tensor's stored elements.

    A stored record is read in place; a compressed one is inflated chunk by chunk straight
    into the tensor's buffer.

    Raises:
        UsageError: The record is missing, is not exactly the storage's size, or the tensor
            reaches past its storage.
    """
    path, storage = layout.path, source.storage
    assert storage is not None
    itemsize = source.dtype.itemsize
    reach = span(source.shape, source.stride)
    needed = (source.offset + reach) * itemsize if reach else 0
    if needed > storage.nbytes:
        raise corrupt(path, f"tensor {name!r} reaches byte {needed} of a "
                            f"{storage.nbytes}-byte storage")
    record = layout.record(storage.record)
    if record is None:
        raise corrupt(path, f"tensor {name!r} names the record {storage.record!r}, which the "
                            "archive does not hold")
    if record.size != storage.nbytes:
        raise corrupt(path, f"the zip entry {record.name!r} holds {record.size} bytes but "
                            f"tensor {name!r} needs a {storage.nbytes}-byte storage (truncated "
                            "or tampered with)")
    shape, stride, dtype = source.shape, source.stride, source.dtype
    negate = source.negated
    if reach == 0:
        return lambda: torch.empty(shape, dtype=dtype)
    if record.stored:
        entry = _entry_at(path, name, record.data_offset + source.offset * itemsize, dtype,
                          shape, stride, swap=layout.swapped)
        return (lambda: entry.read().neg()) if negate else entry.read

    def read() -> torch.Tensor:
        buffer = torch.empty(reach * itemsize, dtype=torch.uint8)
        inflate_into(layout, record, source.offset * itemsize, memoryview(buffer.numpy()))
        tensor = strided_view(buffer, dtype, shape, stride, layout.swapped)
        return tensor.neg() if negate else tensor

    return read


def _load_torch_whole(path: Path, unsafe_load: bool, legacy: bool) -> Checkpoint:
    """Load everything with torch's own reader.

    For legacy (pre-1.6) files, and trusted files that pickle more than a state dict.
    """
    try:
        with _torch_notices_silenced():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not unsafe_load:
            raise _unsafe_error(path, exc) from exc
        obj = _unsafe_torch_load(path)
    except Exception as exc:
        if legacy:
            raise UsageError(f"{str(path)!r} could not be read as a PyTorch checkpoint "
                             f"({describe_exception(exc)}); it may be truncated or "
                             "corrupt") from exc
        raise corrupt(path, f"torch.load refuses it ({describe_exception(exc)})") from exc
    return _interpret(path, obj, loaded_entry)


@contextlib.contextmanager
def _torch_notices_silenced() -> Iterator[None]:
    """Silence the warnings torch's own readers raise about torch itself.

    Deprecated typed storages, quantized dtypes, sparse tensors in beta, ``torch.jit``: none
    is about the checkpoint.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch(\.|$)")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch(\.|$)")
        yield


def _unsafe_torch_load(path: Path) -> Any:
    try:
        with _torch_notices_silenced():
            return torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise UsageError(f"{str(path)!r} pickles a class that cannot be imported here "
                         f"({describe_exception(exc)}): make the model's code importable "
                         "(run from its project directory) or save a state_dict instead") from exc
    except Exception as exc:
        raise UsageError(f"{str(path)!r} could not be unpickled "
                         f"({describe_exception(exc)})") from exc


def _unsafe_error(path: Path, exc: Exception) -> UsageError:
    found = re.findall(r"GLOBAL ([\w.]+)", str(exc))
    what = f" (it references {', '.join(sorted(set(found)))})" if found else ""
    return UsageError(
        f"refusing to load {str(path)!r}: it holds pickled Python objects whose loading would "
        f"run code{what}, which torch.load(weights_only=True) does not allow. {UNSAFE_HINT}"
    )


def _interpret(path: Path, obj: Any,
               make_entry: Callable[[str, torch.Tensor], TensorEntry]) -> Checkpoint:
    """Find the model weights in a loaded object and describe the rest."""
    if isinstance(obj, torch.jit.ScriptModule):
        return _module_checkpoint(path, obj, "torchscript")
    if isinstance(obj, nn.Module):
        return _module_checkpoint(path, obj, "pickled_module")
    located = find_weights(obj)
    if located is None:
        keys = list(obj)[:12] if isinstance(obj, dict) else type(obj).__name__
        raise UsageError(f"{str(path)!r} holds no model weights nndiag can find "
                         f"(top level: {keys})")
    entries, notes = _entries(located.weights, make_entry)
    return Checkpoint(path, located.format, entries, located.key, located.extras | notes,
                      files=[path])


def _entries(weights: dict[str, torch.Tensor],
             make_entry: Callable[[str, torch.Tensor], TensorEntry]
             ) -> tuple[list[TensorEntry], dict[str, str]]:
    """An entry per tensor, and notes on those read dequantized or not analysed."""
    entries: list[TensorEntry] = []
    skipped: list[str] = []
    for name, tensor in weights.items():
        try:
            entries.append(make_entry(name, tensor))
        except NotAnalysed as reason:
            skipped.append(f"{name} ({reason})")
    notes = {}
    quantized = Counter(str(e.stored_dtype).removeprefix("torch.") for e in entries
                        if e.stored_dtype is not None)
    if quantized:
        notes["quantized"] = (f"{sum(quantized.values())} tensor(s) "
                              f"({', '.join(f'{k} {v}' for k, v in sorted(quantized.items()))})"
                              ", analysed as their dequantized values")
    if skipped:
        more = f"; and {len(skipped) - _LISTED} more" if len(skipped) > _LISTED else ""
        notes["not analysed"] = "; ".join(skipped[:_LISTED]) + more
    return entries, notes


def _module_checkpoint(path: Path, module: nn.Module, fmt: str) -> Checkpoint:
    entries, notes = _entries(dict(module.state_dict(keep_vars=False)), loaded_entry)
    return Checkpoint(path, fmt, entries, None, {"module": type(module).__name__} | notes,
                      module=module, files=[path])


def _load_torchscript(path: Path, layout: ZipLayout, unsafe_load: bool) -> Checkpoint:
    """Read a TorchScript archive's weights without running it.

    The module itself is loaded (which runs its code) only with ``unsafe_load``.
    """
    if unsafe_load:
        try:
            with _torch_notices_silenced():
                module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise UsageError(f"{str(path)!r} could not be read as a TorchScript archive "
                             f"({describe_exception(exc)})") from exc
        return _module_checkpoint(path, module, "torchscript")
    try:
        root = _read_pickle(layout, "data", script_objects=True)
        constants = _read_pickle(layout, "constants", script_objects=True)
    except DisallowedGlobal as exc:
        raise corrupt(path, f"its pickled module names {exc.name!r}, which no TorchScript "
                            "archive does") from exc
    if not is_module(root):
        raise corrupt(path, "its data.pkl holds no scripted module")
    code: dict[str, str] = {}

    def declared(qualified_name: str) -> set[str] | None:
        file = code_record(qualified_name)
        if file not in code:
            record = layout.record(file)
            code[file] = "" if record is None else read_record(
                layout, record, MAX_PICKLE_BYTES, "code").decode("utf-8", "replace")
        return declared_tensors(code[file], qualified_name.rsplit(".", 1)[-1])

    entries, notes = _entries(module_tensors(root, declared),
                              lambda name, t: _stored_entry(layout, name, t))
    extras = {"module": type(root).qualified_name.rsplit(".", 1)[-1],
              "code": "not run (a live inspection loads the module, which runs its code: "
                      "only with --unsafe-load)"}
    if isinstance(constants, tuple) and constants:
        extras["constants"] = f"{len(constants)} value(s) used by its code"
    return Checkpoint(path, "torchscript", entries, None, extras | notes, files=[path])


@dataclass(frozen=True)
class HeaderTensor:
    """One tensor as a safetensors header declares it (checked against the file).

    Attributes:
        name: The tensor's key.
        dtype: The header's dtype name (``BF16``, ``F4``...).
        shape: The header's shape (for ``F4``, in 4-bit values).
        begin: First byte, relative to the end of the header.
        end: One past the last byte, relative to the end of the header.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_safetensors_header(path: Path) -> tuple[list[HeaderTensor], dict[str, str], int]:
    """Parse and check a safetensors header.

    Returns:
        The tensors it declares, its ``__metadata__`` (values as strings) and the offset where
        tensor data starts.

    Raises:
        UsageError: A malformed or truncated header, an unknown dtype, sizes that do not
            match the shapes, offsets beyond the file, or tensors sharing bytes.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise UsageError(f"{str(path)!r}: truncated safetensors file")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise UsageError(f"{str(path)!r}: safetensors header of {header_len} bytes does not "
                             f"fit in a {size}-byte file (truncated or corrupt)")
        raw = handle.read(header_len)
    header = _parse_json(raw, f"{str(path)!r}: corrupt safetensors header")
    if not isinstance(header, dict):
        raise UsageError(f"{str(path)!r}: corrupt safetensors header (not an object)")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict):
        raise UsageError(f"{str(path)!r}: corrupt safetensors header (__metadata__ is not an "
                         "object)")
    data_start = 8 + header_len
    tensors = [_header_tensor(path, name, info) for name, info in header.items()]
    for tensor in tensors:
        if data_start + tensor.end > size:
            raise UsageError(f"{str(path)!r}: tensor {tensor.name!r} lies outside the file "
                             "(truncated or corrupt)")
    _refuse_shared_bytes(path, tensors)
    return tensors, {k: str(v) for k, v in metadata.items()}, data_start


def _header_tensor(path: Path, name: str, info: Any) -> HeaderTensor:
    """One header entry, checked as the safetensors format defines it.

    Raises:
        UsageError: Not an object, an unknown dtype, dims or offsets that are not
            non-negative integers torch can index, or a byte range of the wrong size.
    """
    def corrupt_entry(reason: str) -> UsageError:
        return UsageError(f"{str(path)!r}: corrupt safetensors entry {name!r} ({reason})")

    if not isinstance(info, dict):
        raise corrupt_entry("not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
        raise corrupt_entry(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_index(v) for v in shape):
        raise corrupt_entry(f"the shape must be a list of integers from 0 to 2^63 - 1, got "
                            f"{_clipped(shape)}")
    if not isinstance(offsets, list) or len(offsets) != 2 or \
            not all(_is_index(v) for v in offsets) or offsets[0] > offsets[1]:
        raise corrupt_entry(f"data_offsets must be two integers from 0 to 2^63 - 1, in "
                            f"order, got {_clipped(offsets)}")
    if math.prod(max(dim, 1) for dim in shape) > _MAX_TORCH_INDEX:
        raise corrupt_entry(f"a shape of more than 2^63 elements: {_clipped(shape)}")
    bits = math.prod(shape) * _SAFETENSORS_DTYPES[dtype][0]
    begin, end = offsets
    if bits % 8 or end - begin != bits // 8:
        raise UsageError(f"{str(path)!r}: tensor {name!r} has the wrong size for its shape "
                         f"and dtype ({end - begin} bytes for {_clipped(shape)} {dtype}; "
                         "truncated or corrupt)")
    return HeaderTensor(name, dtype, tuple(shape), begin, end)


def _is_index(value: Any) -> bool:
    """A JSON integer torch can use as a size or offset (booleans and floats are not)."""
    return type(value) is int and 0 <= value <= _MAX_TORCH_INDEX


def _clipped(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _refuse_shared_bytes(path: Path, tensors: list[HeaderTensor]) -> None:
    """Refuse tensors whose byte ranges overlap: each byte of the data holds one tensor.

    Raises:
        UsageError: Two tensors share bytes (the ``safetensors`` package refuses such a file).
    """
    previous: HeaderTensor | None = None
    for tensor in sorted((t for t in tensors if t.end > t.begin), key=lambda t: t.begin):
        if previous is not None and tensor.begin < previous.end:
            raise UsageError(f"{str(path)!r}: tensors {previous.name!r} and {tensor.name!r} "
                             "share bytes, which the safetensors format does not allow "
                             "(corrupt or crafted file)")
        previous = tensor


def _parse_json(raw: bytes, context: str) -> Any:
    """Parse JSON from an untrusted file.

    Args:
        raw: The file's bytes.
        context: What the error message starts with (the file and what it is).

    Raises:
        UsageError: Not JSON, not UTF-8, or nested too deeply to parse.
    """
    try:
        return json.loads(raw)
    except RecursionError as exc:
        raise UsageError(f"{context} (JSON nested too deeply to read)") from exc
    except (UnicodeDecodeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise UsageError(f"{context} ({describe_exception(exc)})") from exc


def read_json_file(path: Path, what: str) -> Any:
    """Read a JSON side file of a checkpoint (a shard index, ``config.json``).

    At most ``MAX_JSON_SIDE_FILE`` bytes are read: a larger file is refused, not loaded.

    Args:
        path: The file.
        what: What the file is, for messages (``shard index``).

    Raises:
        UsageError: Unreadable, larger than the bound, or not JSON.
    """
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_JSON_SIDE_FILE + 1)
    except OSError as exc:
        raise UsageError(f"{str(path)!r}: the {what} could not be read "
                         f"({describe_exception(exc)})") from exc
    if len(raw) > MAX_JSON_SIDE_FILE:
        raise UsageError(f"{str(path)!r}: the {what} is larger than "
                         f"{MAX_JSON_SIDE_FILE // 2**20} MB, far more than one needs; refusing "
                         "to read it")
    return _parse_json(raw, f"{str(path)!r} is not a valid {what}")


def _safetensors_entries(path: Path) -> tuple[list[TensorEntry], dict[str, str]]:
    tensors, metadata, data_start = read_safetensors_header(path)
    entries, unread = [], []
    for tensor in tensors:
        bits, attribute = _SAFETENSORS_DTYPES[tensor.dtype]
        dtype = getattr(torch, attribute, None) if attribute else None
        shape = tensor.shape
        if dtype is not None and bits < 8:  # packed pairs: the last dimension halves
            shape = shape[:-1] + (shape[-1] // 2,) if shape and shape[-1] % 2 == 0 else None
        if dtype is None or shape is None:
            unread.append(f"{tensor.name} ({tensor.dtype} {list(tensor.shape)})")
            continue
        entries.append(_entry_at(path, tensor.name, data_start + tensor.begin, dtype, shape,
                                 _contiguous_stride(shape)))
    extras = {f"metadata.{k}": v for k, v in metadata.items()}
    if unread:
        extras["not read"] = (f"{len(unread)} tensor(s) in a dtype torch cannot hold here: "
                              + ", ".join(unread[:5]) + (" ..." if len(unread) > 5 else ""))
    return entries, extras


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides of a shape, as torch computes them (empty dims count as 1)."""
    stride, step = [], 1
    for dim in reversed(shape):
        stride.append(step)
        step *= max(dim, 1)
    return tuple(reversed(stride))


def _entry_at(path: Path, name: str, offset: int, dtype: torch.dtype, shape: tuple[int, ...],
              stride: tuple[int, ...], swap: bool = False) -> TensorEntry:
    """An entry that reads its tensor from ``offset`` of ``path`` when asked.

    ``swap``: the tensor was saved in the other byte order.
    """
    def read() -> torch.Tensor:
        try:
            return read_strided(str(path), offset, dtype, shape, stride, swap)
        except (EOFError, OSError) as exc:
            raise UsageError(f"{str(path)!r}: tensor {name!r} could not be read "
                             f"({describe_exception(exc)}); the file may be truncated") from exc

    return TensorEntry(name, shape, dtype, read)


def _load_safetensors(path: Path) -> Checkpoint:
    entries, extras = _safetensors_entries(path)
    if not entries:
        unread = extras.get("not read")
        raise UsageError(f"{str(path)!r} is a safetensors file with no tensor"
                         + (f" torch can hold ({unread})" if unread else ""))
    return Checkpoint(path, "safetensors", entries, None, extras, files=[path])


def _load_directory(path: Path, unsafe_load: bool) -> Checkpoint:
    """Every shard's tensors; where a shard index names a tensor's shard, that shard's copy."""
    shards, owners, skipped = _directory_shards(path)
    if not shards:
        raise UsageError(
            f"directory {str(path)!r} holds no weights (expected model.safetensors, "
            "pytorch_model.bin, shards with an index JSON, or a single .pt/.pth/.ckpt file)"
        )
    chosen: dict[str, TensorEntry] = {}
    extras: dict[str, str] = {}
    for shard in shards:
        part = load_checkpoint(shard, unsafe_load=unsafe_load)
        for entry in part.entries:
            if entry.name not in chosen or owners.get(entry.name) == shard:
                chosen[entry.name] = entry
        extras.update({f"{shard.name}: {k}": v for k, v in part.extras.items()
                       if k == "not read"})
    config = path / "config.json"
    if config.is_file():
        extras.update(_describe_config(config))
    extras["shards"] = str(len(shards))
    if skipped:
        extras["not read"] = ", ".join(skipped)
    return Checkpoint(path, "hf_directory", list(chosen.values()), None, extras, files=shards)


def _directory_shards(path: Path) -> tuple[list[Path], dict[str, Path], list[str]]:
    """The shard files, the shard an index names for each tensor, the weight files not read.

    Without a shard index, the second is empty; with one, the third.
    """
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            contents = read_json_file(index, "shard index")
            weight_map = contents.get("weight_map") if isinstance(contents, dict) else None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(f, str) and f for f in weight_map.values()):
                raise UsageError(f"{str(index)!r} is not a valid shard index (its weight_map "
                                 "must map tensor names to shard file names)")
            files = sorted(set(weight_map.values()))
            for name in files:
                _check_inside(path, index, name)
            missing = [f for f in files if not (path / f).is_file()]
            if missing:
                raise UsageError(f"{str(index)!r} names shards that are missing: "
                                 f"{', '.join(map(repr, missing))}")
            return ([path / f for f in files], {k: path / f for k, f in weight_map.items()},
                    [])
    for pattern in ("*.safetensors", "pytorch_model*.bin", "*.bin", "*.pt", "*.pth", "*.ckpt"):
        found = sorted(p for p in path.glob(pattern)
                       if p.is_file() and not _TRAINING_STATE.match(p.name))
        if found:
            chosen = _unindexed_weights(path, found)
            return chosen, {}, [p.name for p in found if p not in chosen]
    return [], {}, []


# A shard's file name (``model-00001-of-00003.safetensors``).
_SHARD_NAME = re.compile(r"^(?P<prefix>.+)-(?P<index>\d+)-of-(?P<total>\d+)(?P<suffix>\.[^.]+)$")
# The single weight file of an unsharded Hugging Face, diffusers or PEFT directory, by
# preference.
_SINGLE_FILE_NAMES = ("model.safetensors", "pytorch_model.bin",
                      "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                      "adapter_model.safetensors", "adapter_model.bin")
# What a training checkpoint directory holds beside the weights (the Trainer's, Lightning's).
_TRAINING_STATE = re.compile(r"^(training_args\.bin|optimizer\.(pt|bin)|scheduler\.(pt|bin)|"
                             r"scaler\.pt|rng_state.*\.pth)$")


def _unindexed_weights(path: Path, found: list[Path]) -> list[Path]:
    """Which of a directory's weight files (of one kind, no shard index) make the checkpoint.

    One file; else the standard single file (``model.safetensors``) beside others (variants,
    adapters, EMA copies), which are not read; else one complete set of shards named
    ``-NNNNN-of-NNNNN`` (the standard set, ``model-...``, beside variant sets). Several
    unrelated files (``epoch=1.ckpt`` and ``epoch=2.ckpt``, a model and an EMA copy, two
    sets of shards) would be merged into a checkpoint that is neither: the user names one.

    Raises:
        UsageError: Several weight files, none standard and not one set of shards, or a set
            with shards missing.
    """
    if len(found) == 1:
        return found
    names = {p.name: p for p in found}
    standard = next((names[n] for n in _SINGLE_FILE_NAMES if n in names), None)
    if standard is not None:
        return [standard]
    sets = _shard_sets(found)
    standard_sets = [key for key in sets if f"{key[0]}{key[2]}" in _SINGLE_FILE_NAMES]
    if len(sets) == 1 or len(standard_sets) == 1:  # one set, or the standard one beside variants
        key = standard_sets[0] if len(sets) > 1 else next(iter(sets))
        prefix, total, suffix = key
        shards = sets[key]
        missing = sorted(set(range(1, total + 1)) - set(shards))
        if missing:
            digits = _SHARD_NAME.match(next(iter(shards.values())).name)["total"]  # as written
            absent = [f"{prefix}-{i:0{len(digits)}d}-of-{digits}{suffix}" for i in missing[:4]]
            raise UsageError(
                f"directory {str(path)!r} has no shard index and its shards "
                f"{', '.join(map(repr, absent))}{' ...' if len(missing) > 4 else ''} are missing")
        return [shards[i] for i in sorted(shards)]
    listed = ", ".join(repr(p.name) for p in found[:6]) + (", ..." if len(found) > 6 else "")
    raise UsageError(f"directory {str(path)!r} holds {len(found)} weight files and no shard "
                     f"index ({listed}): pass the file to inspect, or a directory with one set "
                     "of shards")


def _shard_sets(files: list[Path]) -> dict[tuple[str, int, str], dict[int, Path]]:
    """Files named ``PREFIX-NNNNN-of-TOTAL.SUFFIX`` by set (prefix, total, suffix) and index.

    Empty unless every file is so named.
    """
    sets: dict[tuple[str, int, str], dict[int, Path]] = {}
    for file in files:
        match = _SHARD_NAME.match(file.name)
        if match is None:
            return {}
        sets.setdefault((match["prefix"], int(match["total"]), match["suffix"]), {})[
            int(match["index"])] = file
    return sets


def _check_inside(directory: Path, index: Path, name: str) -> None:
    """Refuse a shard name that leads out of the checkpoint directory.

    Absolute names, ``..`` components and symlinks resolving elsewhere are refused; the one
    exception is the Hugging Face cache, whose ``snapshots/<revision>/`` files are symlinks
    into the repository's ``blobs/``.

    Raises:
        UsageError: The name leads outside.
    """
    refused = UsageError(f"{str(index)!r} names a shard outside the checkpoint directory "
                         f"({name!r}); refusing to read it")
    relative = PurePosixPath(name.replace("\\", "/"))
    if relative.is_absolute() or PureWindowsPath(name).drive or ".." in relative.parts:
        raise refused
    if "\x00" in name:
        raise UsageError(f"{str(index)!r} names a shard with a NUL byte ({name!r})")
    try:
        root = directory.resolve()
        target = (directory / relative).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise UsageError(f"{str(index)!r} names a shard that cannot be resolved ({name!r}: "
                         f"{describe_exception(exc)})") from exc
    if target.is_relative_to(root):
        return
    if root.parent.name == "snapshots" and target.is_relative_to(root.parent.parent / "blobs"):
        return
    raise refused


def _describe_config(config: Path) -> dict[str, str]:
    try:
        data = read_json_file(config, "config.json")
    except UsageError as exc:
        return {"config": str(exc)}
    if not isinstance(data, dict):
        return {"config": "config.json"}
    keys = ("model_type", "architectures", "num_hidden_layers", "hidden_size", "vocab_size")
    return {f"config.{k}": str(data[k]) for k in keys if k in data}
