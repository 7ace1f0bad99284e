"""Leave the user's model as found: weights, buffers, gradients, modes, optimizer and RNG.

One helper serves every command that runs the user's model: the probe under ``inspect``, the
lr-find sweep (which trains, so it also asks for the ``.grad`` tensors and the optimizer's state
back) and the gate's copies. A model whose lazy modules (``nn.LazyLinear``...) have not run yet
cannot be put back once they have (their parameters and classes change for good): commands run
such a model as a copy, materialized by one forward pass (``materialized``).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, is_lazy

from nndiag.errors import NndiagError, UsageError, describe_exception

# Integer types of each width, to compare floating-point tensors bit by bit (NaN payloads too).
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _cuda_devices() -> list[int]:
    """Every CUDA device once CUDA is in use (a CUDA model means it is), else none.

    CUDA is never initialized here: a CPU model on a GPU machine leaves it untouched.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(range(torch.cuda.device_count()))
    return []


def _same_bits(tensor: torch.Tensor, saved: torch.Tensor) -> bool:
    """True when ``tensor`` holds exactly ``saved``: shape, dtype, device and every bit."""
    if (tensor.shape != saved.shape or tensor.dtype != saved.dtype
            or tensor.device != saved.device):
        return False
    try:
        bits = _BITS.get(tensor.element_size()) if tensor.is_floating_point() else None
        if bits is not None:
            return torch.equal(tensor.view(bits), saved.view(bits))
        return torch.equal(tensor, saved)
    except (RuntimeError, TypeError):  # a layout torch cannot compare: write it back
        return False


def _put_back(tensor: torch.Tensor, saved: torch.Tensor) -> None:
    """Make ``tensor`` (the same object) hold ``saved`` again; untouched if it already does.

    Writing only what changed keeps the version counters of untouched tensors, so a graph the
    user built before the call can still be backpropagated afterwards.
    """
    if _same_bits(tensor, saved):
        return
    if (tensor.shape, tensor.dtype, tensor.device) == (saved.shape, saved.dtype, saved.device):
        tensor.copy_(saved)
    else:  # its data was swapped (``p.data = ...``): give it the saved copy, which is ours
        tensor.data = saved


def _restore_dict(current: dict[str, Any], saved: dict[str, Any]) -> None:
    """Put back a module's slot dictionary (parameters, buffers, children) as it was, in place."""
    if current.keys() != saved.keys() or any(current[k] is not v for k, v in saved.items()):
        current.clear()
        current.update(saved)


def _tensor_attributes(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value for name, value in vars(module).items()
            if isinstance(value, torch.Tensor)}


def _restore_tensor_attributes(module: nn.Module, tensors: dict[str, torch.Tensor],
                               saved: dict[str, Any]) -> None:
    """Put back plain tensor attributes (the weight ``weight_norm`` computes) replaced or added.

    Only entries where a tensor is involved are touched: a replaced tensor attribute gets its
    object back, one set during the run is removed (or gets its earlier value back).
    """
    current = vars(module)
    for name, value in tensors.items():
        if current.get(name) is not value:
            current[name] = value
    for name in [n for n, v in current.items() if isinstance(v, torch.Tensor)
                 and n not in tensors]:
        if name in saved:
            current[name] = saved[name]
        else:
            del current[name]


class _Saved:
    """A snapshot of what a block may change; ``restore`` writes it back bitwise, in place."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 weights: bool, grads: bool) -> None:
        modules = list(model.modules())
        self.modes = [(module, module.training) for module in modules]
        # A TorchScript module's slots are fixed (and not Python dictionaries).
        self.slots = [(module, dict(module._parameters), dict(module._buffers),
                       set(module._non_persistent_buffers_set), dict(module._modules),
                       _tensor_attributes(module), dict(vars(module))) for module in modules
                      if not isinstance(module, torch.jit.ScriptModule)]
        params = list(model.parameters())
        self.requires_grad = [(param, param.requires_grad) for param in params
                              if not is_lazy(param)]
        tensors = [*model.buffers(), *(params if weights else [])]
        self.values = [(t, t.detach().clone()) for t in tensors if not is_lazy(t)]
        self.grads = ([(p, p.grad, None if p.grad is None else p.grad.detach().clone())
                       for p in params] if grads else None)
        self.optimizer = optimizer
        self.optimizer_state = (copy.deepcopy(optimizer.state_dict())
                                if optimizer is not None else None)
        self.cuda_devices = _cuda_devices()
        self.cuda_rng = [torch.cuda.get_rng_state(d) for d in self.cuda_devices]
        self.torch_rng = torch.get_rng_state()
        self.python_rng = random.getstate()
        self.numpy_rng = np.random.get_state()

    def restore(self) -> None:
        for module, params, buffers, non_persistent, children, tensors, attributes in self.slots:
            _restore_dict(module._parameters, params)
            _restore_dict(module._buffers, buffers)
            if module._non_persistent_buffers_set != non_persistent:
                module._non_persistent_buffers_set.clear()
                module._non_persistent_buffers_set.update(non_persistent)
            _restore_dict(module._modules, children)
            _restore_tensor_attributes(module, tensors, attributes)
        with torch.no_grad():
            for tensor, saved in self.values:
                _put_back(tensor, saved)
            for param, grad, saved_grad in self.grads or []:
                if grad is not None and saved_grad is not None:
                    _put_back(grad, saved_grad)
                param.grad = grad
        for param, flag in self.requires_grad:
            param.requires_grad_(flag)
        for module, training in self.modes:
            if module.training != training:
                module.training = training
        if self.optimizer is not None and self.optimizer_state is not None:
            self.optimizer.load_state_dict(self.optimizer_state)
        torch.set_rng_state(self.torch_rng)
        for device, state in zip(self.cuda_devices, self.cuda_rng, strict=True):
            torch.cuda.set_rng_state(state, device)
        random.setstate(self.python_rng)
        np.random.set_state(self.numpy_rng)


@contextmanager
def preserved_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                    weights: bool = False, grads: bool = False) -> Iterator[None]:
    """Run a block and restore, bitwise and in place, what it may have changed, even if it raised.

    Always restored: every module's train/eval flag, its parameter, buffer and submodule slots
    (a parameter or buffer registered, replaced or removed during the block is put back as it
    was), its plain tensor attributes (the weight ``torch.nn.utils.weight_norm`` and
    ``spectral_norm`` compute), every buffer's values (running statistics, counters, the
    power-iteration vectors of spectral norm), each parameter's ``requires_grad``, and the
    torch (CPU and, when CUDA is in use, CUDA), Python and NumPy RNG states. On request: the
    parameters' values, the ``.grad`` tensors and the optimizer's state. A tensor is written
    only if it changed, so untouched tensors keep their version counters. Restoration happens
    in ``finally``, so after an exception or a ``KeyboardInterrupt`` too.

    Uninitialized lazy parameters cannot be put back once materialized: run such a model
    through ``materialized`` first.

    Args:
        model: The user's model.
        optimizer: An optimizer whose ``state_dict`` (moments, step counts, learning rates)
            comes back afterwards; ``None`` for none.
        weights: Also restore the values of every parameter: for blocks that train or run the
            model's forward (which may rescale its own weights in place). Costs one copy of
            the parameters.
        grads: Also restore each parameter's ``.grad`` (``None`` stays ``None``).

    Yields:
        Nothing; the block runs with the model as it is.

    Example:
        >>> with preserved_state(model, optimizer, weights=True, grads=True):  # doctest: +SKIP
        ...     optimizer.step()
    """
    saved = _Saved(model, optimizer, weights, grads)
    try:
        yield
    finally:
        saved.restore()


def has_uninitialized(model: nn.Module) -> bool:
    """True when a lazy module of ``model`` has parameters or buffers not materialized yet."""
    return any(is_lazy(t) for t in [*model.parameters(), *model.buffers()])


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that nndiag may run, train or change at will.

    Tensors ``copy.deepcopy`` refuses are copied by hand: a weight computed by the old
    ``torch.nn.utils.weight_norm``/``spectral_norm`` (a non-leaf tensor, recomputed before each
    forward pass) is copied detached, and uninitialized lazy parameters and buffers stay
    uninitialized in the copy.

    Raises:
        UsageError: The model holds something that cannot be copied (a lock, an open file).
        UserCodeError: The model's own ``__deepcopy__`` raised.
    """
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in [*vars(module).values(), *module._parameters.values(),
                      *module._buffers.values()]:
            if not isinstance(value, torch.Tensor):
                continue
            if isinstance(value, UninitializedParameter):
                memo[id(value)] = UninitializedParameter(value.requires_grad, value.device,
                                                         value.dtype)
            elif isinstance(value, UninitializedBuffer):
                memo[id(value)] = UninitializedBuffer(value.requires_grad, value.device,
                                                      value.dtype)
            elif not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    try:
        return copy.deepcopy(model, memo)
    except NndiagError:
        raise
    except Exception as exc:
        raise UsageError(f"the model cannot be copied (copy.deepcopy raised "
                         f"{describe_exception(exc)}); nndiag runs on a copy to leave the "
                         "model as found") from exc


def materialized(model: nn.Module, inputs: Callable[[], Any]) -> nn.Module:
    """``model`` itself, or a materialized copy of it if lazy modules have not run yet.

    The copy runs one forward pass in training mode, without gradients, on ``inputs()``
    (the first batch's inputs); lazy modules then create their parameters, drawing their
    initial values from the global RNG, which is restored afterwards. The caller's model stays
    lazy and untouched.

    Args:
        model: The user's model.
        inputs: Returns the inputs to materialize with; called only for a lazy model.

    Raises:
        UsageError: The forward pass left lazy parameters uninitialized, or a built-in layer
            rejected the inputs.
        UserCodeError: The model raised.
    """
    if not has_uninitialized(model):
        return model
    from nndiag.batches import move_to
    from nndiag.specs import call_model, explain_model_failure

    copied = copy_model(model)
    device = next((t.device for t in [*copied.parameters(), *copied.buffers()]),
                  torch.device("cpu"))
    with preserved_state(copied), torch.no_grad():
        batch = move_to(inputs(), device)
        copied.train()
        try:
            call_model(copied, batch)
        except Exception as exc:
            error = explain_model_failure(copied, batch, exc)
            raise type(error)(f"materializing the lazy modules on a copy of the model (one "
                              f"forward pass on the first batch): {error}") from exc
    left = [name for name, t in [*copied.named_parameters(), *copied.named_buffers()]
            if is_lazy(t)]
    if left:
        raise UsageError(
            f"the model's lazy modules did not all run on the first batch ({', '.join(left[:3])}"
            f"{'...' if len(left) > 3 else ''} still uninitialized): run the model once on a "
            "batch that reaches them before passing it")
    return copied
