"""Leave the user's model as found: weights, buffers, gradients, modes, optimizer and RNG.

One helper serves every command that runs the user's model: the probe under ``inspect`` (which
never writes parameters) and the lr-find sweep (which trains, so it also asks for the weights,
the ``.grad`` tensors and the optimizer's state back).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn


def _cuda_devices() -> list[int]:
    """Every CUDA device once CUDA is in use (a CUDA model means it is), else none.

    CUDA is never initialized here: a CPU model on a GPU machine leaves it untouched.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(range(torch.cuda.device_count()))
    return []


class _Saved:
    """A snapshot of what a block may change; ``restore`` writes it back bitwise."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 weights: bool, grads: bool) -> None:
        self.model = model
        self.modes = [(module, module.training) for module in model.modules()]
        self.requires_grad = [(param, param.requires_grad) for param in model.parameters()]
        self.buffers = [(buf, buf.detach().clone()) for buf in model.buffers()]
        self.weights = ({key: value.detach().clone() for key, value in
                         model.state_dict().items()} if weights else None)
        self.grads = ([(p, None if p.grad is None else p.grad.detach().clone())
                       for p in model.parameters()] if grads else None)
        self.optimizer = optimizer
        self.optimizer_state = (copy.deepcopy(optimizer.state_dict())
                                if optimizer is not None else None)
        self.cuda_devices = _cuda_devices()
        self.cuda_rng = [torch.cuda.get_rng_state(d) for d in self.cuda_devices]
        self.torch_rng = torch.get_rng_state()
        self.python_rng = random.getstate()
        self.numpy_rng = np.random.get_state()

    def restore(self) -> None:
        with torch.no_grad():
            if self.weights is not None:
                current = self.model.state_dict()
                for key, value in self.weights.items():
                    current[key].copy_(value)
            for buf, saved in self.buffers:
                buf.copy_(saved)
        if self.grads is not None:
            for param, grad in self.grads:
                param.grad = grad
        for param, flag in self.requires_grad:
            param.requires_grad_(flag)
        for module, training in self.modes:
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
    """Run a block and restore, bitwise, what it may have changed, even if it raised.

    Always restored: every module's train/eval flag, every buffer (running statistics,
    counters), each parameter's ``requires_grad``, and the torch (CPU and, when CUDA is in use,
    CUDA), Python and NumPy RNG states. On request: the weights, the ``.grad`` tensors and the
    optimizer's state. Restoration happens in ``finally``, so after an exception or a
    ``KeyboardInterrupt`` too.

    Args:
        model: The user's model.
        optimizer: An optimizer whose ``state_dict`` (moments, step counts, learning rates)
            comes back afterwards; ``None`` for none.
        weights: Also restore every tensor of ``model.state_dict()`` (for blocks that train).
            Probes that take gradients with ``torch.autograd.grad`` never write parameters
            and leave this off.
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
