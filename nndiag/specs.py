"""Loading user code from specs (``package.module:attr`` or ``path/file.py:attr``), and calling it.

A spec names an attribute; a callable attribute that is not already the wanted object (an
``nn.Module``, a loss function) is called with no arguments. Batches live in
``nndiag.batches``; their names are importable from here too.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nndiag.batches import (
    Batch,
    check_finite_batch,
    describe_value,
    iter_batches,
    iter_tensors,
    move_to,
    unpack_batch,
)
from nndiag.errors import UsageError, UserCodeError, describe_exception, user_code

__all__ = ["LOSS_NAMES", "Batch", "call_model", "check_finite_batch", "describe_value",
           "explain_model_failure", "iter_batches", "iter_tensors", "load_data", "load_model",
           "load_object", "model_call_error", "move_to", "primary_output",
           "require_usable_model", "unpack_batch", "user_code"]

LOSS_NAMES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
    "bce": F.binary_cross_entropy_with_logits,
    "l1": F.l1_loss,
    "huber": F.huber_loss,
    "nll": F.nll_loss,
}


def load_object(spec: str, option: str = "spec") -> Any:
    """Import the object a spec names.

    Args:
        spec: ``package.module:attr`` or ``path/to/file.py:attr`` (attr may be dotted).
        option: The option the spec came from, used in error messages (e.g. ``--model``).

    Returns:
        The named attribute (not called).

    Raises:
        UsageError: The spec is malformed, or its module, file or attribute does not exist.
        UserCodeError: Importing the user's module raised.

    """
    module_part, sep, attr_path = spec.rpartition(":")
    if not sep or not module_part or not attr_path:
        raise UsageError(
            f"{option} {spec!r}: expected 'package.module:attr' or 'path/to/file.py:attr'"
        )
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        module = _import_file(Path(module_part), spec, option)
    else:
        module = _import_module(module_part, spec, option)
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise UsageError(
                f"{option} {spec!r}: {module_part!r} has no attribute {attr_path!r}"
            )
        obj = getattr(obj, part)
    return obj


def _import_module(name: str, spec: str, option: str) -> Any:
    try:
        with user_code():
            return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise UsageError(f"{option} {spec!r}: no module named {name!r}") from exc
        raise UserCodeError(
            f"{option} {spec!r}: importing {name!r} raised {describe_exception(exc)}"
        ) from exc
    except Exception as exc:
        raise UserCodeError(
            f"{option} {spec!r}: importing {name!r} raised {describe_exception(exc)}"
        ) from exc


def _import_file(path: Path, spec: str, option: str) -> Any:
    if not path.is_file():
        raise UsageError(f"{option} {spec!r}: file {str(path)!r} not found")
    module_name = f"_nndiag_user_{abs(hash(str(path.resolve())))}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    file_spec = importlib.util.spec_from_file_location(module_name, path)
    if file_spec is None or file_spec.loader is None:
        raise UsageError(f"{option} {spec!r}: {str(path)!r} is not a Python file")
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[module_name] = module
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        with user_code():
            file_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise UserCodeError(
            f"{option} {spec!r}: running {str(path)!r} raised {describe_exception(exc)}"
        ) from exc
    finally:
        sys.path.pop(0)
    return module


def _call_factory(obj: Any, spec: str, option: str) -> Any:
    try:
        with user_code():
            return obj()
    except TypeError as exc:
        raise UsageError(
            f"{option} {spec!r}: the factory must be callable with no arguments "
            f"({describe_exception(exc)})"
        ) from exc
    except Exception as exc:
        raise UserCodeError(
            f"{option} {spec!r}: calling the factory raised {describe_exception(exc)}"
        ) from exc


def load_model(spec: str) -> nn.Module:
    """Load an ``nn.Module`` from a spec, calling it first if it is a factory.

    Raises:
        UsageError: The spec cannot be resolved or does not yield an ``nn.Module``.
        UserCodeError: The user's factory raised.

    """
    obj = load_object(spec, "--model")
    if not isinstance(obj, nn.Module) and callable(obj):
        obj = _call_factory(obj, spec, "--model")
    if not isinstance(obj, nn.Module):
        raise UsageError(
            f"--model {spec!r}: expected an nn.Module (or a function returning one), "
            f"got {type(obj).__name__}"
        )
    return obj


def load_data(spec: str, option: str = "--data") -> Any:
    """Load data from a spec: an iterable of batches, or one batch (calling a factory first).

    Args:
        spec: ``package.module:attr`` or ``path/file.py:attr``.
        option: The option the spec came from, named in errors.

    Raises:
        UsageError: The spec cannot be resolved.
        UserCodeError: The user's factory raised.

    """
    obj = load_object(spec, option)
    if callable(obj) and not isinstance(obj, Iterable | Mapping):
        obj = _call_factory(obj, spec, option)
    return obj


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call the model on a batch's inputs: a tuple as ``*args``, a dict as ``**kwargs``.

    Raises:
        UserExit: The model called ``sys.exit()``.

    """
    with user_code():
        if isinstance(inputs, Mapping):
            return model(**inputs)
        if isinstance(inputs, tuple | list):
            return model(*inputs)
        return model(inputs)


def model_call_error(exc: Exception, inputs: Any, culprit: str | None,
                     module: nn.Module | None) -> UsageError | UserCodeError:
    """The error to raise for a forward pass that raised ``exc`` in ``module``.

    A built-in ``torch.nn`` layer that rejects its input (a shape or dtype error) means the
    batch does not fit the model: the user's data, a usage error. Anything else is the
    user's own code raising.
    """
    builtin = module is not None and type(module).__module__.startswith("torch.nn")
    if builtin and isinstance(exc, RuntimeError | ValueError | IndexError) \
            and not _out_of_memory(exc):
        return UsageError(
            f"the batch does not fit the model: layer {culprit!r} "
            f"({type(module).__name__}) rejected it with {describe_exception(exc)} "
            f"(inputs: {describe_value(inputs)})"
        )
    where = f" in {culprit!r}" if culprit else ""
    return UserCodeError(f"the model raised{where}: {describe_exception(exc)}")


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))


def explain_model_failure(model: nn.Module, inputs: Any,
                          exc: Exception) -> UsageError | UserCodeError:
    """``model_call_error`` for a forward pass that raised without hooks attached.

    The pass is run once more with hooks, without gradients, to find the innermost module it
    raises in (not after running out of memory). Only for the failure path: the model's
    buffers may change (callers restore them).
    """
    if _out_of_memory(exc):
        return model_call_error(exc, inputs, None, None)
    handled = sys.exc_info()[1]  # called from an except block: that failure is not the rerun's
    failed: list[tuple[str, nn.Module]] = []

    def after(name: str, module: nn.Module) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            raised = sys.exc_info()[1]
            if not failed and raised is not None and raised is not handled:
                failed.append((name, module))
        return hook

    handles = [module.register_forward_hook(after(name, module), always_call=True)
               for name, module in model.named_modules()]
    try:
        with torch.no_grad():
            call_model(model, inputs)
    except Exception:  # noqa: BLE001 - the failure is the point; it may differ on a rerun
        pass
    finally:
        for handle in handles:
            handle.remove()
    culprit, module = failed[0] if failed else (None, None)
    return model_call_error(exc, inputs, culprit or None, module)


def require_usable_model(model: Any, *, trainable: bool = False) -> nn.Module:
    """Refuse a model nndiag cannot run: not a module, or holding tensors without data.

    Args:
        model: The model to check.
        trainable: Also require a parameter with ``requires_grad`` (something to train).

    Returns:
        The model.

    Raises:
        UsageError: Not an ``nn.Module``, a parameter or buffer on the ``meta`` device, or
            (``trainable``) no trainable parameter.

    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"expected an nn.Module, got {type(model).__name__}")
    meta = next((name for name, t in [*model.named_parameters(), *model.named_buffers()]
                 if t.is_meta), None)
    if meta is not None:
        raise UsageError(
            f"the model's tensors are on the 'meta' device ({meta!r} and others hold no data): "
            "materialize it first, e.g. model.to_empty(device='cpu') then initialize or load "
            "its weights (load_state_dict(..., assign=True))"
        )
    if trainable and not any(p.requires_grad for p in model.parameters()):
        raise UsageError("the model has no trainable parameter: nothing for an optimizer to "
                         "update")
    return model


def primary_output(output: Any) -> torch.Tensor | None:
    """The tensor a default loss applies to: the output itself, ``logits`` or the first float."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):
        return output.logits
    for tensor in iter_tensors(output):
        if tensor.is_floating_point():
            return tensor
    return None
