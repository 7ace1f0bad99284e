"""The loss a probe backpropagates: a named loss, the user's function, or one chosen from the data.

With no ``--loss``: integer targets get cross-entropy, floating targets of the output's shape get
MSE. With no targets at all (``--input-shape``), random labels over the last output dimension
are drawn for cross-entropy (MSE against standard-normal targets when that dimension is 1); a
seeded generator keeps the run reproducible and leaves the global RNG alone.

Class targets of ``IGNORE_INDEX`` (-100: padding in the Hugging Face convention) are ignored,
as ``F.cross_entropy`` and ``F.nll_loss`` ignore them: the loss is the mean over the others.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from nndiag.batches import describe_value
from nndiag.errors import UsageError, UserCodeError, describe_exception, user_code
from nndiag.specs import LOSS_NAMES, load_object, primary_output

# The label cross-entropy and NLL skip (their default ``ignore_index``).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Loss:
    """A loss to probe with.

    Attributes:
        name: ``auto``, a name from ``LOSS_NAMES``, or the user's spec.
        fn: For named losses, ``f(output_tensor, targets)``; for a spec, ``f(outputs, targets)``
            called with the model's raw outputs.
        user_code: True when ``fn`` is the user's own function (its errors are exit code 3).

    """

    name: str = "auto"
    fn: Callable[[Any, Any], torch.Tensor] | None = None
    user_code: bool = False


def resolve_loss(name_or_spec: str | None) -> Loss:
    """Turn ``--loss`` into a ``Loss``: ``None``/``auto``, a known name, or a spec.

    Raises:
        UsageError: Neither a known name nor a loadable callable.

    """
    if name_or_spec in (None, "auto"):
        return Loss()
    if name_or_spec in LOSS_NAMES:
        return Loss(name_or_spec, LOSS_NAMES[name_or_spec])
    if ":" not in name_or_spec:
        raise UsageError(
            f"--loss {name_or_spec!r}: unknown loss; use one of {', '.join(LOSS_NAMES)} "
            "or a spec 'module:function'"
        )
    obj = load_object(name_or_spec, "--loss")
    if isinstance(obj, type):
        try:
            with user_code():
                obj = obj()
        except Exception as exc:
            raise UserCodeError(
                f"--loss {name_or_spec!r}: constructing the loss raised {describe_exception(exc)}"
            ) from exc
    if not callable(obj):
        raise UsageError(
            f"--loss {name_or_spec!r}: expected a function f(outputs, targets) -> loss, "
            f"got {type(obj).__name__}"
        )
    return Loss(name_or_spec, obj, user_code=True)


def as_loss(loss: str | Loss | Callable[[Any, Any], torch.Tensor] | None) -> Loss:
    """Accept a name, a spec, a ``Loss`` or a function ``f(outputs, targets)``.

    Raises:
        UsageError: Anything else.
    """
    if loss is None or isinstance(loss, str):
        return resolve_loss(loss)
    if isinstance(loss, Loss):
        return loss
    if callable(loss):
        return Loss(getattr(loss, "__name__", type(loss).__name__), loss, user_code=True)
    raise UsageError(f"loss: expected a name, a spec or a function, got {type(loss).__name__}")


def synthetic_targets(output: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Targets for a model probed without data: random class labels, or normal values."""
    if output.dim() >= 2 and output.shape[-1] > 1:
        labels = torch.randint(0, output.shape[-1], output.shape[:-1], generator=generator)
        return labels.to(output.device)
    return torch.randn(output.shape, generator=generator).to(output.device, output.dtype)


def _hidden_states_only(outputs: Any) -> bool:
    """True for an encoder's output: hidden states and no logits (Hugging Face style)."""
    return isinstance(outputs, Mapping) and "logits" not in outputs and (
        "last_hidden_state" in outputs or "hidden_states" in outputs)


def compute_loss(
    loss: Loss, outputs: Any, targets: Any, generator: torch.Generator
) -> tuple[torch.Tensor, str, int | None]:
    """Compute the probe loss.

    Returns:
        The scalar loss, the loss's display name, and the class count for cross-entropy.

    Raises:
        UsageError: Targets that do not fit the output, or a loss that is not a scalar tensor.
        UserCodeError: The user's loss function raised.

    """
    if loss.user_code:
        assert loss.fn is not None
        try:
            with user_code():
                value = loss.fn(outputs, targets)
        except Exception as exc:
            raise UserCodeError(f"--loss {loss.name!r} raised {describe_exception(exc)}") from exc
        return _check_scalar(value, loss.name), loss.name, None

    output = primary_output(outputs)
    if output is None:
        raise UsageError(
            f"the model output {describe_value(outputs)} holds no floating-point tensor to "
            "compute a loss on; pass --loss with a function f(outputs, targets)"
        )
    if targets is None and _hidden_states_only(outputs):
        raise UsageError(
            "the model returns hidden states (last_hidden_state, no logits) and the data has no "
            "targets: nndiag cannot guess what the encoder is trained for; pass --loss with a "
            "function f(outputs, targets) (for example a loss on the pooled embedding), or add "
            "the head the model is trained with"
        )
    if targets is None:
        targets = synthetic_targets(output, generator)
    elif not isinstance(targets, torch.Tensor):
        raise UsageError(
            f"targets must be a tensor for the built-in losses, got {describe_value(targets)}; "
            "pass --loss with a function f(outputs, targets)"
        )
    name = loss.name
    if name == "auto":
        name = "mse" if targets.is_floating_point() else "cross_entropy"
    if name in ("cross_entropy", "nll"):
        logits, labels = _class_layout(output, targets)
        fn = LOSS_NAMES[name]
        try:
            value = fn(logits, labels)
        except (RuntimeError, ValueError, IndexError) as exc:
            raise UsageError(
                f"{name} loss rejected the targets: {describe_exception(exc)}"
            ) from exc
        return _check_scalar(value, name), name, int(logits.shape[1])
    if targets.shape != output.shape:
        raise UsageError(
            f"targets of shape {tuple(targets.shape)} do not match the output shape "
            f"{tuple(output.shape)} for the {name} loss; pass --loss"
        )
    fn = loss.fn or F.mse_loss
    try:
        value = fn(output, targets.to(output.dtype))
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"{name} loss rejected the targets: {describe_exception(exc)}") from exc
    return _check_scalar(value, name), name, None


def _class_layout(output: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Arrange logits as (N, C, ...) against labels (N, ...), accepting class-last outputs."""
    if targets.is_floating_point():
        raise UsageError(
            f"cross-entropy needs integer class targets, got {str(targets.dtype)[6:]}; "
            "pass --loss mse (or another loss) for floating-point targets"
        )
    if output.dim() >= 2 and output.shape[:-1] == targets.shape:
        logits, labels = output.reshape(-1, output.shape[-1]), targets.reshape(-1)
    elif output.dim() >= 2 and output.shape[0] == targets.shape[0] and (
        output.shape[2:] == targets.shape[1:]
    ):
        logits, labels = output, targets
    else:
        raise UsageError(
            f"class targets of shape {tuple(targets.shape)} do not fit outputs of shape "
            f"{tuple(output.shape)} (expected targets shaped like the output without its "
            "class dimension)"
        )
    classes = logits.shape[1]
    kept = labels[labels != IGNORE_INDEX]
    if labels.numel() and not kept.numel():
        raise UsageError(
            f"every class target is {IGNORE_INDEX} (ignored, as padding is): the batch has no "
            "label to compute a loss on"
        )
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= classes):
        raise UsageError(
            f"class targets range over [{int(kept.min())}, {int(kept.max())}] but the "
            f"model outputs {classes} classes (labels must be in [0, {classes - 1}], or "
            f"{IGNORE_INDEX} to ignore a position)"
        )
    return logits, labels.long()


def _check_scalar(value: Any, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise UsageError(
            f"the loss {name!r} must return a scalar tensor, got {describe_value(value)}"
        )
    if not value.requires_grad:
        raise UsageError(
            f"the loss {name!r} does not depend on any trainable parameter (no gradient flows)"
        )
    return value.reshape(())
