"""Running a training step: the user's own, a Lightning module's, or nndiag's.

A ``Stepper`` knows how one call of the step runs (and turns what it returned into a loss) and
gives each phase of the gate a fresh step and a fresh optimizer:

- the user's ``f(model, batch, optimizer) -> loss`` (``--train-step``), or a class or factory
  of such steps (``load_train_step``); an object with state is copied afresh for each phase;
- a LightningModule's ``training_step`` with ``configure_optimizers``, run as its Trainer does
  under automatic optimization;
- nndiag's own step: train mode, zero the gradients, forward, loss, backward, optimizer step.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nndiag.batches import Batch, check_batch, move_to, unpack_batch
from nndiag.errors import UsageError, UserCodeError, describe_exception, user_code
from nndiag.losses import Loss, compute_loss
from nndiag.optimizers import optimizer_factory
from nndiag.specs import call_model, load_object

LIGHTNING = "lightning"

TrainStep = Callable[[nn.Module, Any, torch.optim.Optimizer], Any]
"""The user's training step: ``f(model, batch, optimizer) -> loss``."""


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
            with user_code():
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
class Stepper:
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

        Anything the step raises is the user's code raising, ``GeneratorExit`` and
        ``sys.exit()`` too; only ``KeyboardInterrupt`` goes through, to stop the check.

        Raises:
            UserCodeError: The step raised.
            UsageError: A batch nndiag cannot use (without a sample, nested absurdly deep),
                or the step returned something that is not a loss.
        """
        check_batch(batch)
        try:
            value = step(model, batch, optimizer)
        except (UsageError, UserCodeError, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: BLE001 - GeneratorExit, SystemExit: the user's code
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


def optimizer_builder(optimizer: Any, rate: float
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
            with user_code():
                made = fn(_trainable(model), rate) if takes_lr else fn(model)
        except Exception as exc:
            raise UserCodeError(f"--optimizer {label!r} raised {describe_exception(exc)}"
                                ) from exc
        if not isinstance(made, torch.optim.Optimizer):
            raise UsageError(f"--optimizer {label!r}: expected a torch.optim.Optimizer, got "
                             f"{type(made).__name__}")
        return made

    return build, None


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _loss(loss: Loss, model: nn.Module, batch: Batch, generator: torch.Generator
          ) -> tuple[torch.Tensor, str, int | None]:
    device = model_device(model)
    try:
        outputs = call_model(model, move_to(batch.inputs, device))
    except Exception as exc:
        raise UserCodeError(f"the model raised: {describe_exception(exc)}") from exc
    return compute_loss(loss, outputs, move_to(batch.targets, device), generator)


def standard_stepper(loss: Loss, build: Callable[[nn.Module], torch.optim.Optimizer],
                      seed: int, optimizer_name: str | None) -> Stepper:
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

    return Stepper("standard", "the training step", build, new_step, optimizer_name)


def user_stepper(step: TrainStep, build: Callable[[nn.Module], torch.optim.Optimizer],
                  optimizer_name: str | None) -> Stepper:
    """The user's step; an object with state (a counter) is copied afresh for each phase."""
    name = f"--train-step {getattr(step, '__qualname__', type(step).__name__)!r}"

    def new_step() -> TrainStep:
        if inspect.isfunction(step) or inspect.ismethod(step):
            return step
        try:
            return copy.deepcopy(step)
        except Exception:  # an object that cannot be copied keeps its state across phases
            return step

    return Stepper("user", name, build, new_step, optimizer_name)


def _first_optimizer(configured: Any) -> torch.optim.Optimizer | None:
    """The optimizer in whatever ``configure_optimizers`` returned."""
    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, Mapping):
        return _first_optimizer(configured.get("optimizer"))
    if isinstance(configured, list | tuple) and configured:
        return _first_optimizer(configured[0])
    return None


def lightning_stepper(model: nn.Module) -> Stepper:
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
            with user_code():
                configured = copy_.configure_optimizers()  # type: ignore[operator]
        except Exception as exc:
            raise UserCodeError(f"configure_optimizers raised {describe_exception(exc)}"
                                ) from exc
        optimizer = _first_optimizer(configured)
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
                out = module.training_step(  # type: ignore[operator]
                    move_to(raw, model_device(module)), next(index))
            value = out.get("loss") if isinstance(out, Mapping) else out
            if not isinstance(value, torch.Tensor) or not value.requires_grad:
                raise UsageError("--train-step lightning: training_step must return the loss "
                                 "(a tensor that requires grad, or a dict with 'loss')")
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            return value

        return step

    return Stepper("lightning", "training_step", build, new_step, "configure_optimizers")

