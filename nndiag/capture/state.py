"""Leave the user's model as found: modes, buffers, ``requires_grad``, gradients and RNG."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Run a block and restore the model's train/eval flags, buffers and the RNG afterwards.

    Parameters are never written by nndiag's probes (gradients are taken with
    ``torch.autograd.grad``, which leaves ``.grad`` alone), so they are not copied; the tests
    check that they come back bitwise identical all the same.
    """
    modes = [(module, module.training) for module in model.modules()]
    buffers = [(buf, buf.detach().clone()) for buf in model.buffers()]
    requires_grad = [(param, param.requires_grad) for param in model.parameters()]
    devices = sorted({b.device.index or 0 for b, _ in buffers if b.device.type == "cuda"} | {
        p.device.index or 0 for p, _ in requires_grad if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for buf, saved in buffers:
                    buf.copy_(saved)
            for param, flag in requires_grad:
                param.requires_grad_(flag)
            for module, training in modes:
                module.training = training
