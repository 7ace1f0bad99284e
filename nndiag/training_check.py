"""``check_training``: a CI gate for training code (``nndiag check --model --data``).

It works on deep copies, so the caller's model is left as found (its weights, buffers, modes
and the global RNG):

1. the model is inspected at init (NaN/Inf, gradient health, dead or saturated units, unused
   parameters), as ``nndiag inspect`` does;
2. pre-training sanity checks in the spirit of Karpathy's recipe, run through the training
   step: the user's own ``f(model, batch, optimizer) -> loss`` (``train_step``), a Lightning
   module's ``training_step`` with ``configure_optimizers``, or else nndiag's own step (zero
   the gradients, forward, loss, backward, optimizer step). The step is watched from outside,
   never edited:

   - a few calls with hooks on every trainable parameter (the gradient arriving in a backward
     pass, and what ``.grad`` held then), on the optimizer (the gradient each ``step()``
     applied) and on every module (its mode when it ran); the first call also sees, through a
     ``TorchFunctionMode``, every loss function the step calls and where its input came from
     (softmax, sigmoid or log_softmax; a module's output or the step's own code). Hence
     ``zero_grad_missing``, ``softmax_before_loss``, ``train_mode_off``,
     ``parameters_not_updated`` (with the reason) and the loss at init against log C;
   - the step on a batch and on each half of it, from the same start: a summed loss scores a
     batch twice its halves' mean (``loss_reduction_sum``);
   - overfitting one small batch (``cannot_overfit_batch``);
   - ``labels_misaligned``: two short trainings from the same start on the same batches, one
     with the data's pairing of inputs and targets and one with each batch's targets shuffled,
     scored through the step on a held-out batch;
   - batch mixing (a sample's output must not depend on another sample's input; checked in
     eval mode, where BatchNorm uses running statistics and legitimately couples nothing);
3. a short training run through the same step, recorded with ``Monitor`` and judged by the run
   rules.

Symptoms that a root cause explains (``nndiag.checking.EXPLAINS``) are tagged with it.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from nndiag.advice import advise_run, advise_sanity
from nndiag.checking import RUN_FINDINGS, build_run_report, explain_symptoms
from nndiag.errors import UsageError, UserCodeError, describe_exception
from nndiag.findings import Report
from nndiag.inspection import inspect_model
from nndiag.losses import Loss, as_loss, compute_loss
from nndiag.lrfind import cycle_batches
from nndiag.monitor import Monitor
from nndiag.optimizers import optimizer_factory
from nndiag.rules.pretraining import (
    SANITY_RULES,
    SUM_REDUCTION_RATIO,
    SanityRecord,
    cannot_overfit,
)
from nndiag.rules.run import run_rules
from nndiag.runlog import read_run
from nndiag.specs import (
    Batch,
    call_model,
    iter_tensors,
    load_object,
    move_to,
    primary_output,
    unpack_batch,
)

SANITY_FINDINGS = ("zero_grad_missing", "softmax_before_loss", "train_mode_off",
                   "loss_reduction_sum", "loss_at_init_unexpected", "parameters_not_updated",
                   "cannot_overfit_batch", "labels_misaligned", "batch_mixing")
INIT_FINDINGS = ("unused_parameters", "poor_initialization", "saturated_activations")
DEFAULT_LR = {"sgd": 1e-2, "rmsprop": 1e-3, "adam": 1e-3, "adamw": 1e-3}
OVERFIT_SAMPLES = 16
# Calls of the step watched for gradients and modes: until two optimizer steps and a backward
# pass after the second, at most this many (gradient accumulation over up to 7 micro-batches
# shows two steps, over up to 15 one).
TRACE_CALLS = 16
# Steps of each of the two trainings compared by the labels check (measured on the tests' and
# README's examples: enough for data with a learnable pairing to pull clearly ahead).
LABEL_STEPS = 30
LIGHTNING = "lightning"
# The loss functions whose input is classified (logits, probabilities, log-probabilities).
_LOSS_FUNCTIONS = frozenset({"cross_entropy", "nll_loss", "binary_cross_entropy_with_logits",
                             "kl_div"})
_PRODUCERS = frozenset({"softmax", "log_softmax", "sigmoid"})
_LABEL_KEYS = ("labels", "label", "targets", "target", "y")

TrainStep = Callable[[nn.Module, Any, torch.optim.Optimizer], Any]
"""The user's training step: ``f(model, batch, optimizer) -> loss``."""


def take_samples(obj: Any, count: int) -> Any:
    """The first ``count`` samples of every tensor in nested inputs (batch dimension first)."""
    if isinstance(obj, torch.Tensor):
        return obj[:count] if obj.dim() else obj
    if isinstance(obj, Mapping):
        return {k: take_samples(v, count) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(take_samples(v, count) for v in obj)
    return obj


def iter_tensors_with_batch(obj: Any) -> Any:
    """Tensors with a batch dimension inside nested inputs."""
    return (t for t in iter_tensors(obj) if t.dim() >= 1)


# ----------------------------------------------------------------------------- the step


def load_train_step(spec: str) -> TrainStep | str:
    """Resolve ``--train-step``: ``lightning``, or a spec of the user's step.

    The spec names ``f(model, batch, optimizer) -> loss``, a class whose instances are such
    steps (a fresh instance per phase of the check), or a factory called with no arguments
    that returns one.

    Args:
        spec: ``lightning`` or ``package.module:attr`` / ``path/to/file.py:attr``.

    Returns:
        ``"lightning"`` or the step.

    Raises:
        UsageError: The spec cannot be resolved or names something that is not a step.
        UserCodeError: Importing the user's module, or building the step, raised.
    """
    if spec.strip().lower() == LIGHTNING:
        return LIGHTNING
    obj = load_object(spec, "--train-step")
    if isinstance(obj, type) or (callable(obj) and _positional_count(obj) == 0):
        try:
            obj = obj()
        except Exception as exc:
            raise UserCodeError(f"--train-step {spec!r}: building the step raised "
                                f"{describe_exception(exc)}") from exc
    if not callable(obj):
        raise UsageError(f"--train-step {spec!r}: expected a function f(model, batch, "
                         f"optimizer) -> loss, got {type(obj).__name__}")
    return obj


def _positional_count(fn: Any) -> int:
    """How many positional arguments ``fn`` accepts (a large number for ``*args``)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 99
    kinds = [p.kind for p in parameters]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return 99
    return sum(k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
               for k in kinds)


@dataclass
class _Stepper:
    """How one training step runs, and how each phase of the check gets a fresh one.

    Attributes:
        kind: ``standard`` (nndiag's own), ``user`` or ``lightning``.
        name: How errors name the step.
        build_optimizer: A new optimizer for a model (a fresh copy for each phase).
        new_step: A fresh step ``f(model, batch, optimizer)`` for one phase.
        optimizer_name: For the summary.
    """

    kind: str
    name: str
    build_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    new_step: Callable[[], TrainStep]
    optimizer_name: str | None = None

    def run(self, step: TrainStep, model: nn.Module, batch: Any,
            optimizer: torch.optim.Optimizer) -> float:
        """Call the step once and return its loss as a number.

        Raises:
            UserCodeError: The step raised.
            UsageError: It returned something that is not a loss.
        """
        try:
            value = step(model, batch, optimizer)
        except (UsageError, UserCodeError):
            raise
        except Exception as exc:
            raise UserCodeError(f"{self.name} raised {describe_exception(exc)}") from exc
        return _loss_number(value, self.name)


def _loss_number(value: Any, name: str) -> float:
    if isinstance(value, Mapping) and "loss" in value:
        value = value["loss"]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach().reshape(()).float())
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    kind = "None" if value is None else type(value).__name__
    raise UsageError(f"{name} must return the loss (a scalar tensor or a number), got {kind}")


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _optimizer_builder(optimizer: Any, rate: float
                       ) -> tuple[Callable[[nn.Module], torch.optim.Optimizer], str | None]:
    """A new optimizer per model: a name, ``f(params, lr)`` or ``f(model)`` (or their spec)."""
    if isinstance(optimizer, str) and ":" not in optimizer:
        factory = optimizer_factory(optimizer)
        return (lambda model: factory(_trainable(model), rate)), optimizer.lower()
    label = optimizer if isinstance(optimizer, str) else getattr(optimizer, "__name__", None)
    fn = load_object(optimizer, "--optimizer") if isinstance(optimizer, str) else optimizer
    if not callable(fn):
        raise UsageError(f"--optimizer {label!r}: expected a callable f(params, lr) or "
                         f"f(model), got {type(fn).__name__}")
    takes_lr = _positional_count(fn) >= 2

    def build(model: nn.Module) -> torch.optim.Optimizer:
        try:
            made = fn(_trainable(model), rate) if takes_lr else fn(model)
        except Exception as exc:
            raise UserCodeError(f"--optimizer {label!r} raised {describe_exception(exc)}"
                                ) from exc
        if not isinstance(made, torch.optim.Optimizer):
            raise UsageError(f"--optimizer {label!r}: expected a torch.optim.Optimizer, got "
                             f"{type(made).__name__}")
        return made

    return build, None


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _loss(loss: Loss, model: nn.Module, batch: Batch, generator: torch.Generator
          ) -> tuple[torch.Tensor, str, int | None]:
    device = _device(model)
    try:
        outputs = call_model(model, move_to(batch.inputs, device))
    except Exception as exc:
        raise UserCodeError(f"the model raised: {describe_exception(exc)}") from exc
    return compute_loss(loss, outputs, move_to(batch.targets, device), generator)


def _standard_stepper(loss: Loss, build: Callable[[nn.Module], torch.optim.Optimizer],
                      seed: int, optimizer_name: str | None) -> _Stepper:
    """The built-in step: train mode, zero the gradients, forward, loss, backward, step."""

    def new_step() -> TrainStep:
        def step(model: nn.Module, raw: Any, optimizer: torch.optim.Optimizer) -> torch.Tensor:
            model.train()
            # Targets drawn for unlabeled data are the same for the same batch on every call.
            value, _, _ = _loss(loss, model, unpack_batch(raw), torch.Generator().manual_seed(seed))
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            return value

        return step

    return _Stepper("standard", "the training step", build, new_step, optimizer_name)


def _user_stepper(step: TrainStep, build: Callable[[nn.Module], torch.optim.Optimizer],
                  optimizer_name: str | None) -> _Stepper:
    """The user's step; an object with state (a counter) is copied afresh for each phase."""
    name = f"--train-step {getattr(step, '__qualname__', type(step).__name__)!r}"

    def new_step() -> TrainStep:
        if inspect.isfunction(step) or inspect.ismethod(step):
            return step
        try:
            return copy.deepcopy(step)
        except Exception:  # an object that cannot be copied keeps its state across phases
            return step

    return _Stepper("user", name, build, new_step, optimizer_name)


def _first_optimizer(configured: Any) -> torch.optim.Optimizer | None:
    """The optimizer in whatever ``configure_optimizers`` returned."""
    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, Mapping):
        return _first_optimizer(configured.get("optimizer"))
    if isinstance(configured, list | tuple) and configured:
        return _first_optimizer(configured[0])
    return None


def _lightning_stepper(model: nn.Module) -> _Stepper:
    """A LightningModule's ``training_step`` and ``configure_optimizers``.

    Run as its Trainer does under automatic optimization: train mode, the batch on the
    model's device, zero_grad, backward, step.
    """
    if not (callable(getattr(model, "training_step", None))
            and callable(getattr(model, "configure_optimizers", None))):
        raise UsageError(f"--train-step lightning: the model ({type(model).__name__}) has no "
                         "training_step and configure_optimizers")
    if getattr(model, "automatic_optimization", True) is False:
        raise UsageError("--train-step lightning: the module uses manual optimization, which "
                         "needs a Trainer; pass its step as --train-step f(model, batch, "
                         "optimizer) instead")

    def build(copy_: nn.Module) -> torch.optim.Optimizer:
        try:
            optimizer = _first_optimizer(copy_.configure_optimizers())  # type: ignore[operator]
        except Exception as exc:
            raise UserCodeError(f"configure_optimizers raised {describe_exception(exc)}"
                                ) from exc
        if optimizer is None:
            raise UsageError("--train-step lightning: configure_optimizers returned no "
                             "torch.optim.Optimizer")
        return optimizer

    def new_step() -> TrainStep:
        index = itertools.count()

        def step(module: nn.Module, raw: Any, optimizer: torch.optim.Optimizer) -> Any:
            module.train()
            with warnings.catch_warnings():  # self.log() without a Trainer warns, harmlessly
                warnings.simplefilter("ignore")
                out = module.training_step(move_to(raw, _device(module)),  # type: ignore[operator]
                                           next(index))
            value = out.get("loss") if isinstance(out, Mapping) else out
            if not isinstance(value, torch.Tensor) or not value.requires_grad:
                raise UsageError("--train-step lightning: training_step must return the loss "
                                 "(a tensor that requires grad, or a dict with 'loss')")
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            return value

        return step

    return _Stepper("lightning", "training_step", build, new_step, "configure_optimizers")


# ----------------------------------------------------------------------------- batches


def _raw_batches(data: Any, limit: int) -> list[Any]:
    """Up to ``limit`` batches as the data yields them, in one pass (no unpacking)."""
    if isinstance(data, torch.Tensor | Mapping | tuple):
        return [data]
    batches: list[Any] = []
    try:
        for item in data:
            batches.append(item)
            if len(batches) >= limit:
                break
    except TypeError as exc:
        raise UsageError(f"--data: expected batches (a DataLoader, a list of batches) or one "
                         f"batch, got {type(data).__name__}") from exc
    except Exception as exc:
        raise UserCodeError(f"--data: iterating the data raised {describe_exception(exc)}"
                            ) from exc
    if not batches:
        raise UsageError("--data: the data yielded no batch")
    return batches


def _batch_size(raw: Any) -> int | None:
    first = next(iter_tensors_with_batch(raw), None)
    return int(first.shape[0]) if first is not None else None


def _rebuild(obj: Any, items: list[Any]) -> Any:
    if hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*items)
    return type(obj)(items)


def _slice(raw: Any, start: int, stop: int, size: int) -> Any:
    """Samples ``start:stop`` of every tensor whose first dimension is the batch size."""
    if isinstance(raw, torch.Tensor):
        return raw[start:stop] if raw.dim() and raw.shape[0] == size else raw
    if isinstance(raw, Mapping):
        return {k: _slice(v, start, stop, size) for k, v in raw.items()}
    if isinstance(raw, tuple | list):
        return _rebuild(raw, [_slice(v, start, stop, size) for v in raw])
    return raw


def _permute(obj: Any, order: torch.Tensor) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj[order.to(obj.device)] if obj.dim() and obj.shape[0] == len(order) else obj
    if isinstance(obj, Mapping):
        return {k: _permute(v, order) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return _rebuild(obj, [_permute(v, order) for v in obj])
    return obj


def _shuffle_targets(raw: Any, generator: torch.Generator) -> Any | None:
    """The batch with its targets shuffled across samples (``None``: no targets found)."""
    size = _batch_size(raw)
    if size is None or size < 2:
        return None
    order = torch.randperm(size, generator=generator)
    if isinstance(raw, tuple | list) and len(raw) == 2 and next(iter_tensors(raw[1]), None) \
            is not None:
        return _rebuild(raw, [raw[0], _permute(raw[1], order)])
    if isinstance(raw, Mapping):
        key = next((k for k in _LABEL_KEYS if isinstance(raw.get(k), torch.Tensor)), None)
        if key is not None:
            return {**raw, key: _permute(raw[key], order)}
    return None


# ----------------------------------------------------------------------------- watching


def _storage(tensor: torch.Tensor) -> int:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return id(tensor)


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


class _LossInputs(TorchFunctionMode):
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
        pointer = _storage(tensor)
        produced_by = next((kind for kind, t in reversed(self.produced)
                            if _storage(t) == pointer), None)
        kind, classes = _input_kind(name, tensor, produced_by)
        where = self.module_outputs.get(pointer)
        if where is None and produced_by is not None:
            where = "step"
        reduction = kwargs.get("reduction", "mean")
        return {"name": name, "classes": classes, "input": kind, "produced_by": produced_by,
                "where": where, "reduction": reduction if isinstance(reduction, str) else None,
                "shape": list(tensor.shape)}


def _mode_dependent(module: nn.Module) -> bool:
    """Whether a module computes something else in eval mode than in training mode."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0
    if isinstance(module, nn.modules.batchnorm._BatchNorm | nn.modules.instancenorm._InstanceNorm):
        return bool(module.track_running_stats)
    rate = getattr(module, "dropout", None)  # RNN, LSTM, GRU, MultiheadAttention
    return isinstance(rate, float) and rate > 0


class _StepWatch:
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
            self.module_outputs.setdefault(_storage(tensor), name or "forward")
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


@contextmanager
def _seeded(seed: int, model: nn.Module) -> Iterator[None]:
    """Seed the global RNG (dropout, shuffles) and restore the caller's state afterwards."""
    device = _device(model)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# ----------------------------------------------------------------------------- the checks


def check_training(model: nn.Module, data: Any, *, loss: Any = None, optimizer: Any = "adamw",
                   lr: float | None = None, steps: int = 50, overfit_steps: int = 100,
                   log_dir: str | Path | None = None, seed: int = 0,
                   train_step: TrainStep | str | None = None) -> Report:
    """Gate training code: inspection at init, sanity checks through the step, a short run.

    Args:
        model: The model (left unchanged: every check works on a copy). For
            ``train_step="lightning"``, a LightningModule.
        data: Training batches (cycled) or one batch, as the step receives them.
        loss: ``None`` (from the targets), a name, a spec or ``f(outputs, targets)``: the loss
            of nndiag's own step, and of the inspection at init.
        optimizer: ``sgd``, ``adam``, ``adamw``, ``rmsprop``, ``f(params, lr)`` or
            ``f(model)`` (or a spec of either); ignored for ``lightning``.
        lr: Learning rate for a named optimizer or ``f(params, lr)`` (default 1e-3, 1e-2 for
            SGD).
        steps: Steps of the short training run.
        overfit_steps: Steps spent trying to overfit one small batch.
        log_dir: Keep the run log here (default: a temporary directory).
        seed: Seed of the global RNG during the checks (restored afterwards) and of drawn
            targets.
        train_step: The user's step ``f(model, batch, optimizer) -> loss``, which zeroes the
            gradients, runs forward and backward and steps the optimizer itself; or
            ``"lightning"`` for the model's ``training_step`` and ``configure_optimizers``;
            ``None`` runs nndiag's own step with ``loss``.

    Returns:
        A ``nndiag.check/1`` report.

    Raises:
        UsageError: Bad arguments or unusable data.
        UserCodeError: The model, loss, optimizer or step code raised.

    Example:
        >>> report = check_training(build_model(), batches,  # doctest: +SKIP
        ...                         train_step=my_train_step, optimizer="sgd", lr=0.1)
        >>> [f.id for f in report.findings]  # doctest: +SKIP
        ['zero_grad_missing']
    """
    if steps < 2:
        raise UsageError(f"--steps must be at least 2, got {steps}")
    name = optimizer.lower() if isinstance(optimizer, str) and ":" not in optimizer else None
    rate = lr if lr is not None else DEFAULT_LR.get(name or "", 1e-3)
    loss_spec = as_loss(loss)
    if train_step == LIGHTNING:
        stepper = _lightning_stepper(model)
    else:
        build, optimizer_name = _optimizer_builder(optimizer, rate)
        if train_step is None:
            stepper = _standard_stepper(loss_spec, build, seed, optimizer_name)
        elif callable(train_step):
            stepper = _user_stepper(train_step, build, optimizer_name)
        else:
            raise UsageError(f"train_step: expected f(model, batch, optimizer) or "
                             f"'lightning', got {type(train_step).__name__}")
    pool = _raw_batches(data, LABEL_STEPS + 1)
    if not isinstance(data, torch.Tensor | Mapping | tuple) and iter(data) is data:
        data = itertools.chain(pool, data)  # a one-shot iterator: the run starts from its start
    notes: list[str] = []

    with _seeded(seed, model):
        init = _inspect_at_init(model, pool[0], loss_spec, seed, stepper, notes)
        record = _sanity(model, pool, stepper, overfit_steps, init, seed, notes)
        findings = [advise_sanity(f, record) for rule in SANITY_RULES
                    if (f := rule(record)) is not None]
        with tempfile.TemporaryDirectory() as temp:
            run_dir = Path(log_dir) if log_dir is not None else Path(temp) / "run"
            _train(copy.deepcopy(model), data, stepper, steps, run_dir)
            log = read_run(run_dir)
            run_findings = [advise_run(f, log) for f in run_rules(log)]
            report = build_run_report(log, [])
            if log_dir is None:
                report.summary["run"] = None
    # Each phase judges its own evidence (a probe at init, the sanity checks, the recorded
    # run): a finding id may come from two phases, and both are kept, tagged with their phase.
    phases = (("init", init.findings if init is not None else []), ("sanity", findings),
              ("training", run_findings))
    for phase, found in phases:
        for finding in found:
            finding.evidence["phase"] = phase
    report.findings = explain_symptoms([f for _, found in phases for f in found])
    report.summary.update({
        "mode": "training", "lr": None if stepper.kind == LIGHTNING else rate,
        "train_step": None if stepper.kind == "standard" else stepper.name,
        "loss_at_init": record.loss_at_init, "expected_loss_at_init": record.expected_loss,
        "rules": [*SANITY_FINDINGS, *INIT_FINDINGS, *RUN_FINDINGS]})
    report.notes = (init.notes if init is not None else []) + notes + report.notes
    return report


def _inspect_at_init(model: nn.Module, raw: Any, loss: Loss, seed: int, stepper: _Stepper,
                     notes: list[str]) -> Report | None:
    """The probe at init; skipped (with a note) when the user's step feeds the model otherwise."""
    try:
        first = unpack_batch(raw)
        return inspect_model(copy.deepcopy(model), (first.inputs, first.targets), loss=loss,
                             seed=seed)
    except (UsageError, UserCodeError) as exc:
        if stepper.kind == "standard":
            raise
        notes.append(f"inspection at init skipped (it calls the model on the batch's inputs "
                     f"with --loss): {exc}")
        return None


def _sanity(model: nn.Module, pool: list[Any], stepper: _Stepper, overfit_steps: int,
            init: Report | None, seed: int, notes: list[str]) -> SanityRecord:
    first = pool[0]
    record = SanityRecord(loss_at_init=math.nan, step_kind=stepper.kind)
    full_loss = _watch_calls(model, pool, stepper, record, notes)
    size = _batch_size(first)
    _expected_loss(record, init)
    if size is not None and size >= 4:
        _reduction(model, first, size, full_loss, stepper, record, notes)
    if record.reduction_ratio is not None:  # measured: a sum divided by hand is a mean
        summed = record.reduction_ratio >= SUM_REDUCTION_RATIO
    else:
        summed = any(c.get("reduction") == "sum" for c in record.loss_calls)
    if summed and size and record.expected_loss is not None and stepper.kind != "standard":
        record.expected_loss *= size  # a summed loss starts at the sum of chance losses
    small = _slice(first, 0, OVERFIT_SAMPLES, size) if size else first
    fitted = copy.deepcopy(model)
    opt = stepper.build_optimizer(fitted)
    step = stepper.new_step()
    losses = []
    # With gradient accumulation over k calls, a step of the check is k calls of the step.
    per_update = min(max(record.backward_per_step or 1, 1), TRACE_CALLS)
    for _ in range(overfit_steps * per_update):
        losses.append(stepper.run(step, fitted, small, opt))
        if not math.isfinite(losses[-1]):
            break
    record.overfit_losses = losses[::per_update] if per_update > 1 else losses
    record.overfit_batch_size = min(size or 0, OVERFIT_SAMPLES)
    if cannot_overfit(record) is None and len(losses) >= 2:
        _labels(model, pool, stepper, seed, record, per_update)
    try:
        batch = unpack_batch(first)
        record.mixing_ratio, record.mixing_method = _mixing(copy.deepcopy(model), batch)
    except Exception as exc:  # the step may feed the model otherwise than (inputs, targets)
        if stepper.kind == "standard":
            raise
        notes.append(f"batch mixing not checked: calling the model on the batch's inputs "
                     f"failed ({describe_exception(exc)})")
    return record


def _watch_calls(model: nn.Module, pool: list[Any], stepper: _Stepper, record: SanityRecord,
                 notes: list[str]) -> float:
    """Call the step on a copy under watch; fill the record; return the first call's loss."""
    watched = copy.deepcopy(model)
    opt = stepper.build_optimizer(watched)
    step = stepper.new_step()
    before = {n: p.detach().clone() for n, p in watched.named_parameters() if p.requires_grad}
    watch = _StepWatch(watched, opt)
    first_loss = math.nan
    try:
        tracer = _LossInputs(watch.module_outputs)
        watch.record_outputs = True
        with tracer:
            first_loss = stepper.run(step, watched, pool[0], opt)
        watch.record_outputs = False
        watch._outputs_alive = []
        record.loss_calls = tracer.calls
        tracer.produced = []
        calls = 1
        while calls < TRACE_CALLS and not watch.done():
            stepper.run(step, watched, pool[calls % len(pool)], opt)
            calls += 1
    finally:
        watch.close()
    record.loss_at_init = first_loss
    record.step_calls = calls
    record.optimizer_steps = watch.steps
    record.steps_checked = watch.steps_checked
    record.backward_per_step = watch.backward_per_step
    record.carried_steps = watch.carried_steps
    names = [n for n, _ in watch.params]
    record.carried_parameters = [names[i] for i in sorted(watch.carried)]
    if watch.carried and watch.fresh_sq > 0:
        record.carried_ratio = math.sqrt(watch.stale_sq / watch.fresh_sq)
    moved = {n for n, p in watched.named_parameters() if n in before
             and not torch.equal(p.detach(), before[n])}
    unchanged = [i for i, n in enumerate(names) if watch.had_grad[i] and n not in moved]
    record.not_updated = [names[i] for i in unchanged]
    if unchanged:
        if not watch.steps:
            record.not_updated_reason = "no_step"
        elif not any(watch.grad_at_step[i] for i in unchanged):
            record.not_updated_reason = "zeroed_before_step"
        else:
            record.not_updated_reason = "not_in_optimizer"
    if not watch.steps and moved:
        notes.append(f"the step changed the parameters without calling step() on the "
                     f"optimizer it was given ({calls} calls): gradients were not checked")
    dependent = [(n, m) for n, m in watch.eval_ran.items() if _mode_dependent(m)]
    record.eval_modules = [n or "(model)" for n, _ in dependent]
    record.eval_kinds = [type(m).__name__ for _, m in dependent]
    record.eval_root = "" in watch.eval_ran
    if watch.eval_ran:
        record.mode_changes_output = _mode_changes_output(model, pool[0], set(watch.eval_ran))
    return first_loss


def _mode_changes_output(model: nn.Module, raw: Any, eval_names: set[str]) -> bool | None:
    """Whether the model's output in the modes the step used differs from training mode."""
    try:
        inputs = move_to(unpack_batch(raw).inputs, _device(model))
        outputs = []
        for as_ran in (True, False):
            probe = copy.deepcopy(model)
            for name, module in probe.named_modules():
                module.training = not (as_ran and name in eval_names)
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                outputs.append(primary_output(call_model(probe, inputs)))
    except Exception:
        return None
    ran, trained = outputs
    if ran is None or trained is None or ran.shape != trained.shape:
        return None
    return not torch.allclose(ran.float(), trained.float(), rtol=1e-4, atol=1e-6)


def _expected_loss(record: SanityRecord, init: Report | None) -> None:
    """What an uninformed model scores: log C for cross-entropy (from the probe or the step)."""
    if record.step_kind == "standard" and init is not None:
        record.loss_at_init = float(init.summary["loss"])
        classes = init.summary.get("num_classes")
        if classes and init.summary.get("loss_name") in ("cross_entropy", "nll"):
            record.classes, record.expected_loss = classes, math.log(classes)
        return
    calls = record.loss_calls
    if len(calls) != 1 or calls[0]["name"] not in ("cross_entropy", "nll_loss"):
        return
    call = calls[0]
    classes = call.get("classes")
    if not classes or classes < 2 or call["input"] == "probabilities":
        return
    record.classes, record.expected_loss = classes, math.log(classes)


def _reduction(model: nn.Module, raw: Any, size: int, full: float, stepper: _Stepper,
               record: SanityRecord, notes: list[str]) -> None:
    """The step's loss on each half of the batch, from the same start as on the whole batch."""
    half = size // 2
    losses = []
    for start, stop in ((0, half), (half, size)):
        part = _slice(raw, start, stop, size)
        copy_ = copy.deepcopy(model)
        try:
            losses.append(stepper.run(stepper.new_step(), copy_, part,
                                      stepper.build_optimizer(copy_)))
        except (UsageError, UserCodeError) as exc:
            notes.append(f"loss reduction not checked: the step failed on half a batch ({exc})")
            return
    if not all(math.isfinite(v) and v > 0 for v in (full, *losses)):
        return
    mean = (half * losses[0] + (size - half) * losses[1]) / size
    record.batch_size = size
    record.reduction_ratio = full / mean
    record.reduction_losses = [full, *losses]


def _labels(model: nn.Module, pool: list[Any], stepper: _Stepper, seed: int,
            record: SanityRecord, per_update: int) -> None:
    """A held-out batch's loss after training on the data's pairing and on shuffled targets."""
    if len(pool) >= 2:
        held, train = pool[0], pool[1:]
    else:
        size = _batch_size(pool[0])
        if size is None or size < 8:
            return
        held = _slice(pool[0], size // 2, size, size)
        train = [_slice(pool[0], 0, size // 2, size)]
    generator = torch.Generator().manual_seed(seed + 1)
    shuffled = [_shuffle_targets(b, generator) for b in train]
    if any(b is None for b in shuffled):
        return
    scores = {"init": _score(model, held, stepper, seed)}
    for label, batches in (("paired", train), ("shuffled", shuffled)):
        trained = copy.deepcopy(model)
        opt = stepper.build_optimizer(trained)
        step = stepper.new_step()
        torch.manual_seed(seed)
        for i in range(LABEL_STEPS * per_update):
            stepper.run(step, trained, batches[i % len(batches)], opt)
        scores[label] = _score(trained, held, stepper, seed)
    record.heldout = scores
    record.label_steps = LABEL_STEPS


def _score(model: nn.Module, batch: Any, stepper: _Stepper, seed: int) -> float:
    """The step's loss on a batch, computed before its update, on a copy that is thrown away."""
    probe = copy.deepcopy(model)
    torch.manual_seed(seed)
    return stepper.run(stepper.new_step(), probe, batch, stepper.build_optimizer(probe))


def _replace_first(obj: Any, old: torch.Tensor, new: torch.Tensor) -> Any:
    if obj is old:
        return new
    if isinstance(obj, Mapping):
        return {k: _replace_first(v, old, new) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(_replace_first(v, old, new) for v in obj)
    return obj


def _mixing(model: nn.Module, batch: Batch) -> tuple[float | None, str | None]:
    """How much sample 0's output depends on the other samples' inputs (eval mode)."""
    model.eval()
    device = _device(model)
    inputs = move_to(batch.inputs, device)
    target = next((t for t in iter_tensors_with_batch(inputs) if t.shape[0] > 1), None)
    if target is None:
        return None, None
    if target.is_floating_point():
        probe = target.detach().clone().requires_grad_(True)
        output = primary_output(call_model(model, _replace_first(inputs, target, probe)))
        if output is None or not output.requires_grad:
            return None, None
        (grad,) = torch.autograd.grad(output[0].float().sum(), probe, allow_unused=True)
        if grad is None:
            return None, None
        per_sample = grad.reshape(grad.shape[0], -1).norm(dim=1)
        own, others = float(per_sample[0]), float(per_sample[1:].max())
        return (others / own if own > 0 else (math.inf if others > 0 else 0.0)), "gradient"
    with torch.no_grad():
        base = primary_output(call_model(model, inputs))
        changed = target.clone()
        changed[1:] = target[1:].roll(1, dims=0) if target.shape[0] > 2 else target[1:].flip(-1)
        moved = primary_output(call_model(model, _replace_first(inputs, target, changed)))
    if base is None or moved is None:
        return None, None
    delta = float((moved[0] - base[0]).float().norm())
    return delta / max(float(base[0].float().norm()), 1e-12), "perturbation"


def _train(model: nn.Module, data: Any, stepper: _Stepper, steps: int, run_dir: Path) -> None:
    """The short run through the step, recorded with ``Monitor``."""
    optimizer = stepper.build_optimizer(model)
    step = stepper.new_step()
    batches = cycle_batches(data)
    with Monitor(model, optimizer, every=max(1, steps // 10), log_dir=run_dir) as monitor:
        for _ in range(steps):
            try:
                raw = next(batches)
            except StopIteration:
                raise UsageError("--data: the data yielded no batch") from None
            monitor.step(stepper.run(step, model, raw, optimizer))
