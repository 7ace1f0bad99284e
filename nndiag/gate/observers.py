"""Watching a training step from outside, without editing it.

- ``StepWatch``: hooks on every trainable parameter (the gradient a backward pass delivers,
  and what ``.grad`` held then), on the optimizer (the gradient each ``step()`` applied) and
  on every module (its mode when it ran, and which module returned which tensor);
- ``LossInputs``: a ``TorchFunctionMode`` that sees every loss function the step calls and
  where its input came from (softmax, sigmoid or log_softmax; a module's output or the step's
  own code), and whether that input holds logits, probabilities or log-probabilities;
- ``mode_dependent``: whether a module that ran in eval mode computes something else there.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from nndiag.batches import iter_tensors
from nndiag.capture.sites import storage_id

# The loss functions whose input is classified (logits, probabilities, log-probabilities).
_LOSS_FUNCTIONS = frozenset({"cross_entropy", "nll_loss", "binary_cross_entropy_with_logits",
                             "kl_div"})
_PRODUCERS = frozenset({"softmax", "log_softmax", "sigmoid"})


def _input_kind(name: str, tensor: torch.Tensor, produced_by: str | None
                ) -> tuple[str, int | None]:
    """``logits``, ``probabilities`` or ``log-probabilities``, and the class count."""
    classes = None
    class_dim = 1 if tensor.dim() >= 2 else 0
    if name in ("cross_entropy", "nll_loss") and tensor.dim() >= 1:
        classes = int(tensor.shape[class_dim])
    if produced_by in ("softmax", "sigmoid"):
        return "probabilities", classes
    if produced_by == "log_softmax":
        return "log-probabilities", classes
    if classes is None or classes < 2 or not tensor.is_floating_point() or not tensor.numel():
        return "logits", classes
    values = tensor.detach().float()
    if not bool(torch.isfinite(values).all()):
        return "logits", classes
    if float(values.min()) >= -1e-6 and float(values.max()) <= 1 + 1e-6 and \
            float((values.sum(class_dim) - 1).abs().max()) <= 1e-3:
        return "probabilities", classes
    if float(values.max()) <= 1e-6 and float(values.logsumexp(class_dim).abs().max()) <= 1e-3:
        return "log-probabilities", classes
    return "logits", classes


class LossInputs(TorchFunctionMode):
    """Sees every loss function the step calls, and where its input came from."""

    def __init__(self, module_outputs: dict[int, str]) -> None:
        super().__init__()
        self.module_outputs = module_outputs
        self.produced: list[tuple[str, torch.Tensor]] = []  # kept alive: storages stay unique
        self.calls: list[dict[str, Any]] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in _PRODUCERS and isinstance(out, torch.Tensor):
            self.produced.append((name, out))
        elif name in _LOSS_FUNCTIONS and args and isinstance(args[0], torch.Tensor) \
                and isinstance(out, torch.Tensor) and out.requires_grad:
            self.calls.append(self._describe(name, args[0], kwargs))
        return out

    def _describe(self, name: str, tensor: torch.Tensor, kwargs: dict[str, Any]
                  ) -> dict[str, Any]:
        pointer = storage_id(tensor)
        produced_by = next((kind for kind, t in reversed(self.produced)
                            if storage_id(t) == pointer), None)
        kind, classes = _input_kind(name, tensor, produced_by)
        where = self.module_outputs.get(pointer)
        if where is None and produced_by is not None:
            where = "step"
        reduction = kwargs.get("reduction", "mean")
        return {"name": name, "classes": classes, "input": kind, "produced_by": produced_by,
                "where": where, "reduction": reduction if isinstance(reduction, str) else None,
                "shape": list(tensor.shape)}


def mode_dependent(module: nn.Module) -> bool:
    """Whether a module computes something else in eval mode than in training mode."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0
    if isinstance(module, nn.modules.batchnorm._BatchNorm | nn.modules.instancenorm._InstanceNorm):
        return bool(module.track_running_stats)
    rate = getattr(module, "dropout", None)  # RNN, LSTM, GRU, MultiheadAttention
    return isinstance(rate, float) and rate > 0


class StepWatch:
    """Hooks that watch calls of a training step: gradients, optimizer steps, module modes.

    A tensor hook on each trainable parameter runs when a backward pass delivers its gradient,
    before it is added to ``.grad``: if ``.grad`` still holds exactly the gradient the last
    ``optimizer.step()`` applied, that gradient is being carried into the next step.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        count = len(self.params)
        self.consumed: list[torch.Tensor | None] = [None] * count
        self.checked = [True] * count
        self.had_grad = [False] * count
        # Per parameter, the largest mean square of a gradient that arrived (its scale).
        self.grad_ms = [0.0] * count
        self.grad_at_step = [False] * count
        self.carried: set[int] = set()
        self.carried_steps = 0
        self._carried_now = False
        self.stale_sq = 0.0
        self.fresh_sq = 0.0
        self.steps = 0
        self.steps_checked = 0  # optimizer steps followed by a backward pass
        self.backwards = 0
        self.backward_per_step: int | None = None
        self._backwards_at_step: list[int] = []
        self._in_backward = False
        self.eval_ran: dict[str, nn.Module] = {}
        self.module_outputs: dict[int, str] = {}
        self.record_outputs = False
        self._outputs_alive: list[torch.Tensor] = []
        self._handles = [p.register_hook(partial(self._on_grad, i))
                         for i, (_, p) in enumerate(self.params)]
        self._handles.append(optimizer.register_step_pre_hook(self._before_step))
        for name, module in model.named_modules():
            self._handles.append(module.register_forward_pre_hook(partial(self._on_call, name)))
            self._handles.append(module.register_forward_hook(partial(self._on_output, name)))

    def close(self) -> None:
        """Remove every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._outputs_alive = []

    def _on_call(self, name: str, module: nn.Module, args: Any) -> None:
        # Only forward passes that can train count: metrics under no_grad may run in eval mode.
        if not module.training and torch.is_grad_enabled():
            self.eval_ran.setdefault(name, module)

    def _on_output(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        if not self.record_outputs:
            return
        for tensor in iter_tensors(output):
            # The innermost module that returned a tensor is named (its hook runs first).
            self.module_outputs.setdefault(storage_id(tensor), name or "forward")
            self._outputs_alive.append(tensor)

    def _on_grad(self, index: int, grad: torch.Tensor) -> None:
        if not self._in_backward:
            self._in_backward = True
            self.backwards += 1
            if self._backwards_at_step and self.backwards == self._backwards_at_step[-1] + 1:
                self.steps_checked += 1
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        with torch.no_grad():
            if grad is not None and bool((grad != 0).any()):
                self.had_grad[index] = True
                self.grad_ms[index] = max(self.grad_ms[index],
                                          float(grad.double().square().mean()))
            if self.checked[index]:
                return
            self.checked[index] = True
            held, applied = self.params[index][1].grad, self.consumed[index]
            if held is None or applied is None or held.shape != applied.shape \
                    or not torch.equal(held, applied):
                return
            self.carried.add(index)
            if not self._carried_now:
                self._carried_now = True
                self.carried_steps += 1
            self.stale_sq += float(applied.float().square().sum())
            if grad is not None:
                self.fresh_sq += float(grad.float().square().sum())

    def _end_backward(self) -> None:
        self._in_backward = False

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.steps += 1
        if self.backward_per_step is None:
            self.backward_per_step = self.backwards
        self._backwards_at_step.append(self.backwards)
        self._carried_now = False
        with torch.no_grad():
            for index, (_, p) in enumerate(self.params):
                grad = p.grad
                nonzero = grad is not None and bool((grad != 0).any())
                self.grad_at_step[index] = self.grad_at_step[index] or nonzero
                self.consumed[index] = grad.detach().clone() if nonzero and grad is not None \
                    else None
                self.checked[index] = False

    def done(self) -> bool:
        """Two optimizer steps seen, and a backward pass after the second."""
        return len(self._backwards_at_step) >= 2 and self.backwards > self._backwards_at_step[1]

