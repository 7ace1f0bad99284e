"""The restricted unpickler of torch zip checkpoints and TorchScript archives.

A pickle is a program: unpickling calls whatever functions it names. This reader calls only
stand-ins of its own for the few names a checkpoint's structure needs (containers, dtypes,
torch's tensor rebuild functions), the set ``torch.load(weights_only=True)`` allows; any other
name is refused with ``DisallowedGlobal``. The stand-ins never read tensor data: each tensor
becomes a tensor on the ``meta`` device (shape, strides and dtype, no memory) that carries
where its bytes are (``source_of``), so the caller reads them later, one at a time.

TorchScript's ``data.pkl`` and ``constants.pkl`` are pickles of the same kind whose objects
are instances of scripted classes (``__torch__.*``): with ``script_objects`` they become
``ScriptObject`` records of their class name and pickled state. A scripted class's
``__setstate__`` (TorchScript code) is never run.
"""

from __future__ import annotations

import io
import math
import pickle
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from nndiag.checkpoints.tensors import QUANTIZED_STORAGE

_SOURCE = "_nndiag_source"
_MAX_DIMS = 64
_SCRIPT_NAME = re.compile(r"__torch__(\.[A-Za-z_][\w]*)*\Z")


class DisallowedGlobal(pickle.UnpicklingError):
    """The pickle names something outside the allowed set (loading it would run code).

    The message holds ``GLOBAL <name>``, as torch's own refusal does.
    """

    def __init__(self, name: str) -> None:
        super().__init__(f"Unsupported global: GLOBAL {name} is not allowed")
        self.name = name


@dataclass(frozen=True)
class StorageRef:
    """A storage of the archive: the record holding its bytes, its dtype and element count."""

    record: str
    dtype: torch.dtype
    numel: int

    @property
    def nbytes(self) -> int:
        """Bytes the record must hold."""
        return self.numel * _itemsize(self.dtype)


@dataclass(frozen=True)
class Quantization:
    """How a quantized tensor's integers map to values.

    Attributes:
        scale: One scale (per-tensor), or a tensor of one scale per index of ``axis``.
        zero_point: Likewise.
        axis: The channel axis; ``None`` for a per-tensor quantization.
    """

    scale: float | torch.Tensor
    zero_point: float | torch.Tensor
    axis: int | None


@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor's bytes are and how to read them.

    Attributes:
        storage: The storage; ``None`` for a tensor saved without data.
        offset: The tensor's first element in the storage (in elements of ``dtype``).
        shape: The tensor's shape.
        stride: Its strides, in elements.
        dtype: The dtype of the stored elements.
        quantization: Set for a quantized tensor.
        sparse_layout: ``sparse_coo``, ``sparse_csr``... for a sparse tensor (not read).
        negated: The stored values are the negation of the tensor's (torch's neg bit).
    """

    storage: StorageRef | None
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    quantization: Quantization | None = None
    sparse_layout: str | None = None
    negated: bool = False


class ScriptObject:
    """An instance of a scripted class, kept as its class name and pickled state."""

    qualified_name = "__torch__"

    def __new__(cls, *args: Any) -> ScriptObject:
        """An empty instance (its state comes with ``BUILD``); no scripted code runs."""
        del args
        instance = super().__new__(cls)
        instance.state = None
        return instance

    def __init__(self, *args: Any) -> None:
        del args

    def __setstate__(self, state: Any) -> None:
        self.state = state


def source_of(tensor: torch.Tensor) -> StoredTensor | None:
    """Where a tensor this reader produced keeps its bytes (``None`` for any other tensor)."""
    source = getattr(tensor, _SOURCE, None)
    return source if isinstance(source, StoredTensor) else None


def restricted_load(data: bytes, storage_dir: str, *, script_objects: bool = False) -> Any:
    """Unpickle ``data`` with only the allowed stand-ins.

    Args:
        data: The pickle (``data.pkl`` or ``constants.pkl``).
        storage_dir: The directory of the records its storages name (``data``, ``constants``).
        script_objects: Accept instances of scripted classes (TorchScript archives).

    Raises:
        DisallowedGlobal: The pickle names something outside the allowed set.
        Exception: Anything else a malformed pickle raises (it is hostile input: callers
            report it as a corrupt file).
    """
    return _Unpickler(data, storage_dir, script_objects).load()


class _Callable:
    """An allowed function, wrapped so a pickle can call it but not alter it (``BUILD``)."""

    __slots__ = ("function",)

    def __init__(self, function: Any) -> None:
        self.function = function

    def __call__(self, *args: Any) -> Any:
        return self.function(*args)

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("a pickle may not change an allowed function")


class _StorageType:
    """A storage class named by a pickle (``torch.FloatStorage``): the dtype it holds."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("a pickle may not change a storage type")


class _TensorType:
    """``torch.Tensor`` as a class a pickle names (``_rebuild_from_type_v2``); never built."""

    def __new__(cls, *args: Any) -> Any:
        raise pickle.UnpicklingError("a pickle may not build a bare torch.Tensor")

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("a pickle may not change torch.Tensor")


class _Parameter:
    """``torch.nn.Parameter``: the tensor it wraps."""

    def __new__(cls, data: Any = None, requires_grad: bool = True) -> Any:
        del requires_grad
        return _tensor_arg(data)

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("a pickle may not change torch.nn.Parameter")


def _itemsize(dtype: torch.dtype) -> int:
    if dtype in QUANTIZED_STORAGE:
        return QUANTIZED_STORAGE[dtype][0].itemsize
    return dtype.itemsize


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list | torch.Size) or len(value) > _MAX_DIMS or \
            not all(type(v) is int for v in value):
        raise pickle.UnpicklingError(f"a tensor's {what} is not a tuple of integers")
    return tuple(value)


def _tensor_arg(value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or source_of(value) is None:
        raise pickle.UnpicklingError("expected a tensor")
    return value


def _meta(source: StoredTensor) -> torch.Tensor:
    """The ``meta`` tensor standing for ``source``."""
    if any(size < 0 for size in source.shape) or any(step < 0 for step in source.stride) or \
            len(source.shape) != len(source.stride) or source.offset < 0:
        raise pickle.UnpicklingError("a tensor has a negative size, stride or offset, or "
                                     "sizes and strides of different lengths")
    if math.prod(source.shape) >= 2 ** 62:
        raise pickle.UnpicklingError("a tensor has more than 2**62 elements")
    meta_dtype = torch.float32 if source.dtype in QUANTIZED_STORAGE else source.dtype
    tensor = torch.empty_strided(source.shape, source.stride, dtype=meta_dtype, device="meta")
    setattr(tensor, _SOURCE, source)
    return tensor


def _rebuild(storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype | None = None,
             metadata: Any = None, quantization: Quantization | None = None) -> torch.Tensor:
    if not isinstance(storage, StorageRef):
        raise pickle.UnpicklingError("a tensor's storage is not a storage of the archive")
    if type(offset) is not int:
        raise pickle.UnpicklingError("a tensor's storage offset is not an integer")
    dtype = dtype or storage.dtype
    if (dtype in QUANTIZED_STORAGE) != (quantization is not None):
        raise pickle.UnpicklingError("a quantized dtype without quantization parameters, or "
                                     "the reverse")
    negated = isinstance(metadata, dict) and metadata.get("neg") is True and (
        dtype.is_floating_point or dtype.is_complex)
    return _meta(StoredTensor(storage, offset, _ints(size, "size"), _ints(stride, "stride"),
                              dtype, quantization, None, negated))


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> torch.Tensor:
    return _rebuild(storage, offset, size, stride)


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, metadata: Any = None) -> torch.Tensor:
    del requires_grad, backward_hooks
    return _rebuild(storage, offset, size, stride, metadata=metadata)


def _rebuild_tensor_v3(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, dtype: Any, metadata: Any = None) -> torch.Tensor:
    del requires_grad, backward_hooks
    if not isinstance(dtype, torch.dtype):
        raise pickle.UnpicklingError("a tensor's dtype is not a dtype")
    return _rebuild(storage, offset, size, stride, dtype, metadata)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any,
                       state: Any = None) -> torch.Tensor:
    del requires_grad, backward_hooks, state
    return _tensor_arg(data)


def _rebuild_qtensor(storage: Any, offset: Any, size: Any, stride: Any, quantizer_params: Any,
                     requires_grad: Any, backward_hooks: Any) -> torch.Tensor:
    del requires_grad, backward_hooks
    if not isinstance(storage, StorageRef) or storage.dtype not in QUANTIZED_STORAGE:
        raise pickle.UnpicklingError("a quantized tensor's storage is not a quantized storage")
    if not isinstance(quantizer_params, tuple) or not quantizer_params:
        raise pickle.UnpicklingError("a quantized tensor has no quantizer parameters")
    scheme, *params = quantizer_params
    shape = _ints(size, "size")
    if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric) and len(params) == 2 \
            and all(isinstance(p, int | float) and math.isfinite(p) for p in params):
        quantization = Quantization(float(params[0]), float(params[1]), None)
    elif scheme in (torch.per_channel_affine, torch.per_channel_symmetric,
                    torch.per_channel_affine_float_qparams) and len(params) == 3 and \
            type(params[2]) is int and 0 <= params[2] < len(shape):
        scales, zero_points, axis = params
        for values in (scales, zero_points):
            if source_of(_tensor_arg(values)).quantization is not None or \
                    values.dim() != 1 or values.numel() != shape[axis]:
                raise pickle.UnpicklingError("a per-channel quantized tensor's scales do not "
                                             "match its channels")
        quantization = Quantization(scales, zero_points, axis)
    else:
        raise pickle.UnpicklingError(f"unknown quantization parameters {scheme!r}")
    return _rebuild(storage, offset, shape, stride, quantization=quantization)


def _rebuild_sparse_tensor(layout: Any, data: Any) -> torch.Tensor:
    if not isinstance(layout, str) or not isinstance(data, tuple) or len(data) < 3:
        raise pickle.UnpicklingError("a sparse tensor's parts are malformed")
    if layout == "sparse_coo":
        indices, values, size = data[:3]
    else:
        indices, values, size = data[0], data[2], data[3] if len(data) > 3 else None
    values = _tensor_arg(values)
    _tensor_arg(indices)
    shape = _ints(size, "size")
    stride = tuple(torch.empty(shape, device="meta").stride())
    return _meta(StoredTensor(None, 0, shape, stride, source_of(values).dtype,
                              sparse_layout=layout))


def _rebuild_meta_tensor_no_storage(dtype: Any, size: Any, stride: Any,
                                    requires_grad: Any = False) -> torch.Tensor:
    del requires_grad
    if not isinstance(dtype, torch.dtype):
        raise pickle.UnpicklingError("a tensor's dtype is not a dtype")
    return _meta(StoredTensor(None, 0, _ints(size, "size"), _ints(stride, "stride"), dtype))


def _rebuild_device_tensor_from_cpu_tensor(data: Any, dtype: Any, device: Any,
                                           requires_grad: Any) -> torch.Tensor:
    del dtype, device, requires_grad
    return _tensor_arg(data)


def _rebuild_from_type_v2(function: Any, new_type: Any, args: Any, state: Any) -> Any:
    del state
    if new_type not in (_TensorType, _Parameter) or not isinstance(args, tuple):
        raise pickle.UnpicklingError("only plain tensors and parameters are read")
    return function(*args)


def _get_layout(name: Any) -> str:
    if not isinstance(name, str) or not re.fullmatch(r"torch\.sparse_\w+|torch\.strided", name):
        raise pickle.UnpicklingError(f"unknown layout {name!r}")
    return name.removeprefix("torch.")


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode``, which protocol-2 pickles use for ``bytes`` (latin-1 only)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is allowed for latin-1 bytes only")
    return text.encode("latin-1")


def _bytearray(value: Any = b"") -> bytearray:
    if not isinstance(value, bytes | bytearray | list):  # not an int: a size to allocate
        raise pickle.UnpicklingError("bytearray is allowed from bytes only")
    return bytearray(value)


def _size(dims: Any = ()) -> tuple[int, ...]:
    return _ints(tuple(dims) if isinstance(dims, list) else dims, "size")


def _device(*args: Any) -> str:
    return ":".join(str(a) for a in args if isinstance(a, str | int))


def _identity(value: Any, *args: Any) -> Any:
    del args
    return value


def _allowed() -> dict[str, Any]:
    """The names a checkpoint's pickle may use, and what each stands for."""
    functions: dict[str, Any] = {
        "torch._utils._rebuild_tensor": _rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "torch._utils._rebuild_qtensor": _rebuild_qtensor,
        "torch._utils._rebuild_sparse_tensor": _rebuild_sparse_tensor,
        "torch._utils._rebuild_meta_tensor_no_storage": _rebuild_meta_tensor_no_storage,
        "torch._utils._rebuild_device_tensor_from_cpu_tensor":
            _rebuild_device_tensor_from_cpu_tensor,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
        "torch.serialization._get_layout": _get_layout,
        "_codecs.encode": _encode,
        "builtins.bytearray": _bytearray,
        "torch.Size": _size,
        "torch.device": _device,
        # TorchScript's pickler: typed containers and legacy lists, read as plain values.
        "torch.jit._pickle.restore_type_tag": _identity,
        "torch.jit._pickle.build_intlist": _identity,
        "torch.jit._pickle.build_doublelist": _identity,
        "torch.jit._pickle.build_boollist": _identity,
        "torch.jit._pickle.build_tensorlist": _identity,
        "torch.jit._pickle.build_complexlist": _identity,
    }
    allowed: dict[str, Any] = {name: _Callable(f) for name, f in functions.items()}
    allowed.update({
        "collections.OrderedDict": OrderedDict, "collections.Counter": Counter,
        "builtins.set": set, "builtins.frozenset": frozenset, "builtins.complex": complex,
        "torch.nn.parameter.Parameter": _Parameter, "torch.Tensor": _TensorType,
        "torch.storage.UntypedStorage": _StorageType(torch.uint8),
        "torch.UntypedStorage": _StorageType(torch.uint8),
    })
    for name, value in vars(torch).items():
        if isinstance(value, torch.dtype | torch.qscheme):
            allowed[f"torch.{name}"] = value
    for dtype, storage_name in torch.storage._dtype_to_storage_type_map().items():
        allowed[f"torch.{storage_name}"] = _StorageType(dtype)
    return allowed


_ALLOWED = _allowed()
_RENAMED_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, storage_dir: str, script_objects: bool) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._storage_dir = storage_dir
        self._script_objects = script_objects
        self._script_classes: dict[str, type[ScriptObject]] = {}
        self._storages: dict[str, StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        module = _RENAMED_MODULES.get(module, module)
        full = f"{module}.{name}"
        if full in _ALLOWED:
            return _ALLOWED[full]
        if self._script_objects and _SCRIPT_NAME.match(full):
            if full not in self._script_classes:
                self._script_classes[full] = type(name, (ScriptObject,),
                                                  {"qualified_name": full})
            return self._script_classes[full]
        raise DisallowedGlobal(full)

    def persistent_load(self, pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and type(pid[4]) is int and pid[4] >= 0):
            raise pickle.UnpicklingError("only storages of the archive may be referenced")
        _, storage_type, key, _, numel = pid
        reference = StorageRef(f"{self._storage_dir}/{key}", storage_type.dtype, numel)
        known = self._storages.setdefault(key, reference)
        if known != reference:
            raise pickle.UnpicklingError(f"storage {key!r} is named with two types or sizes")
        return known
