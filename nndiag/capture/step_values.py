"""Each step's loss and learning rate, handed to the host without making it wait for the device.

Reading a value an accelerator computed (``.item()``, ``.tolist()``, ``.cpu()``) blocks the
host until the device has caught up: a training loop that reads its loss every step can no
longer queue the next step while the device runs this one. ``StepValues`` keeps the values as
they come (device tensors stay on the device) and delivers them in step order:

- on the CPU nothing waits: every value but the newest is written at each step, so a killed
  run loses at most one step;
- on an accelerator the values are copied to the host every ``flush_every`` steps with one
  asynchronous copy into pinned memory; a copy is written once its event reports it done,
  polled at each step without waiting. A killed run loses at most the last ``flush_every``
  steps plus the copies still in flight (typically none);
- a sampled step, which reads the device anyway, takes what is pending (``take``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Write = Callable[[int, list[float], list[float | None]], None]
"""``write(first_step, losses, learning_rates)``: consecutive steps from ``first_step``."""

# Steps whose values an accelerator copies to the host at once.
ACCELERATOR_FLUSH_EVERY = 32


def _on_device(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type != "cpu"


def _host(value: Any) -> float | None:
    """A value that is already on the host as a float (a CPU tensor is read without waiting)."""
    return None if value is None else float(value)


@dataclass
class _Copy:
    """Values of consecutive steps on their way to the host."""

    first: int
    host: torch.Tensor
    event: Any
    losses: list[Any]
    lrs: list[Any]

    def columns(self) -> tuple[list[float | None], list[float | None]]:
        """Each step's loss and learning rate, read from the copy or kept on the host."""
        copied = self.host.tolist()
        losses, lrs = ([copied[v[1]] if isinstance(v, tuple) else v for v in column]
                       for column in (self.losses, self.lrs))
        return losses, lrs


class StepValues:
    """The per-step loss and learning rate of a recorded run, in step order.

    Args:
        write: Receives consecutive steps' values, oldest first.
        flush_every: Steps copied to the host at once on an accelerator (``None``:
            ``ACCELERATOR_FLUSH_EVERY``); on the CPU every step is written at once.
    """

    def __init__(self, write: Write, flush_every: int | None = None) -> None:
        self._write = write
        self.flush_every = flush_every or ACCELERATOR_FLUSH_EVERY
        self.first = 0  # the step of losses[0]
        self.losses: list[Any] = []
        self.lrs: list[Any] = []
        self._copies: deque[_Copy] = deque()
        # Some pending value is on an accelerator (set by ``append``; reset when none is left).
        self._device_values = False

    def __len__(self) -> int:
        return len(self.losses)

    def append(self, loss: torch.Tensor | float, lr: torch.Tensor | float | None) -> None:
        """One step's loss and learning rate (tensors are kept as they are, not read)."""
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
            if loss.dim() or loss.dtype != torch.float32:
                loss = loss.reshape(-1)[0].float()
        elif loss is not None:
            loss = float(loss)
        if isinstance(lr, torch.Tensor):
            lr = lr.detach().reshape(-1)[0].clone() if _on_device(lr) else float(lr)
        self.losses.append(loss)
        self.lrs.append(lr)
        if not self._device_values and (_on_device(loss) or _on_device(lr)):
            self._device_values = True

    def step_done(self) -> None:
        """After a step that is not sampled: write what is ready, start copies, never wait."""
        if self._copies:
            self._write_finished(wait=False)
        if self._device_values:
            if len(self.losses) >= self.flush_every:
                self._start_copy(len(self.losses))
        elif len(self.losses) > 1 and not self._copies:  # on the host: all but this step's
            count = len(self.losses) - 1
            self._hand_over(count, [_host(v) for v in self.losses[:count]],
                            [_host(v) for v in self.lrs[:count]])

    def take(self) -> tuple[list[Any], list[Any]]:
        """Every pending step's loss and learning rate, to be read now (a sampled step).

        Copies in flight are written first (waiting for them); the caller writes the returned
        steps with ``hand_over``.
        """
        self._write_finished(wait=True)
        return list(self.losses), list(self.lrs)

    def hand_over(self, losses: list[float], lrs: list[float | None]) -> None:
        """Write the oldest ``len(losses)`` pending steps with these host values."""
        self._hand_over(len(losses), losses, lrs)

    def close(self) -> None:
        """Write everything, waiting for the device."""
        self._write_finished(wait=True)
        if self.losses:
            self._start_copy(len(self.losses))
            self._write_finished(wait=True)

    def _start_copy(self, count: int) -> None:
        """Copy the oldest ``count`` steps' device values to the host, asynchronously."""
        losses, lrs = self.losses[:count], self.lrs[:count]
        tensors: list[torch.Tensor] = []

        def column(values: list[Any]) -> list[Any]:
            out = []
            for value in values:
                if _on_device(value):
                    out.append(("copied", len(tensors)))
                    tensors.append(value.float())
                else:
                    out.append(_host(value))
            return out

        loss_column, lr_column = column(losses), column(lrs)
        event = None
        if tensors:
            values = torch.stack(tensors)
            try:
                host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            except RuntimeError:  # no pinned memory on this machine: still a valid copy
                host = torch.empty(values.shape, dtype=values.dtype)
            host.copy_(values, non_blocking=True)
            try:
                event = torch.Event(device=values.device)
                event.record()
            except (RuntimeError, ValueError):  # a device without events copies synchronously
                event = None
        else:
            host = torch.empty(0)
        self._copies.append(_Copy(self.first, host, event, loss_column, lr_column))
        self.first += count
        del self.losses[:count], self.lrs[:count]
        self._device_values = any(map(_on_device, self.losses)) or \
            any(map(_on_device, self.lrs))

    def _write_finished(self, wait: bool) -> None:
        """Write the copies whose transfer finished (all of them, waiting, with ``wait``)."""
        while self._copies:
            copy = self._copies[0]
            if copy.event is not None:
                if wait:
                    copy.event.synchronize()
                elif not copy.event.query():
                    return
            self._copies.popleft()
            self._write(copy.first, *copy.columns())

    def _hand_over(self, count: int, losses: list[float], lrs: list[float | None]) -> None:
        self._write(self.first, losses, lrs)
        self.first += count
        del self.losses[:count], self.lrs[:count]
        if self._device_values:
            self._device_values = any(map(_on_device, self.losses)) or \
                any(map(_on_device, self.lrs))
