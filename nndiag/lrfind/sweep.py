"""The sweep: train with an exponentially growing learning rate and record the loss.

``lr_find`` trains on the user's data with the learning rate growing exponentially from
``start_lr`` to ``end_lr``, one value per optimizer step, records the loss, stops early once the
loss diverges or is clearly past its minimum, and restores the model, its optimizer and the RNG
afterwards (``nndiag.capture.state.preserved_state``). The suggestion is read from the recorded
curve by ``nndiag.lrfind.suggestion.suggest_lr``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from nndiag.findings import Report
from nndiag.lrfind.suggestion import MIN_POINTS, suggest_lr

SCHEMA = "nndiag.lr-find/1"

# Fewest steps before the early-stopping rule starts judging (their median is the start level).
EARLY_STOP_WARMUP = 5


def _early_stop(start: float, best: float, current: float, noise: float, since_best: int,
                steps: int) -> str | None:
    """Stop rule on the EMA of the loss; differences only, so negative losses work too.

    ``diverged``: the loss has risen above its start level by twice its fall (or by six times
    the noise, for curves that never fell). ``past_minimum``: a clear fall (eight times the
    noise and a tenth of the start level) has been half undone and the minimum is at least
    ``steps // 10`` steps old. The start level and the noise (1.4826 x MAD) come from the first
    ``max(EARLY_STOP_WARMUP, steps // 10)`` steps, whose learning rates are too small to move
    the loss, so a loss that explodes cannot raise its own threshold.
    """
    fall = start - best
    if current > start + 2 * max(fall, 3 * noise, 1e-12):
        return "diverged"
    clear = fall > max(8 * noise, 0.1 * abs(start))
    if clear and current > best + 0.5 * fall and since_best >= max(5, steps // 10):
        return "past_minimum"
    return None


@dataclass(kw_only=True)
class LRFindResult(Report):
    """The range test and its suggestion: a ``Report`` with the curve at the top level.

    ``status``, ``fails``, ``finding`` and ``to_dict`` come from ``Report``; the JSON
    contract (``nndiag.lr-find/1``) has no ``layers`` or ``notes`` (they stay empty).

    Attributes:
        suggested_lr: The learning rate to start training with (``None`` if unreadable).
        lr_low: Lower end of the useful range.
        lr_high: Upper end (the smoothed minimum).
        lrs: Learning rate of each step (for the first param group).
        losses: Loss recorded at each step (mean over ``accumulate`` micro-batches).
        smoothed: The smoothed curve the suggestion was read from.
        stopped_because: ``completed``, ``diverged``, ``past_minimum`` or ``non_finite_loss``.
        reason: Why the suggestion, in words.
        findings: Warnings about the curve.
        summary: Settings of the sweep (optimizer, steps, range, group ratios).
    """

    json_fields: ClassVar[tuple[str, ...]] = (
        "suggested_lr", "lr_low", "lr_high", "lrs", "losses", "smoothed", "stopped_because",
        "reason", "findings", "summary")

    schema: str = SCHEMA
    suggested_lr: float | None
    lr_low: float | None
    lr_high: float | None
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    stopped_because: str
    reason: str


def cycle_batches(data: Any) -> Iterator[Any]:
    """Batches forever: re-iterate the data, or replay what a one-shot iterator gave."""
    from collections.abc import Mapping

    import torch

    if isinstance(data, torch.Tensor | Mapping | tuple):
        while True:
            yield data
    seen: list[Any] = []
    one_shot = iter(data) is data
    for batch in data:
        if one_shot:
            seen.append(batch)
        yield batch
    while True:
        replay = seen if one_shot else data
        empty = True
        for batch in replay:
            empty = False
            yield batch
        if empty:
            return


def lr_find(
    model: Any,
    data: Any,
    *,
    loss: Any = None,
    optimizer: Any = "adamw",
    momentum: float | None = None,
    weight_decay: float = 0.0,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    steps: int = 100,
    accumulate: int = 1,
    early_stop: bool = True,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> LRFindResult:
    """Run a learning-rate range test and suggest a learning rate.

    The model, its buffers, train/eval flags, ``.grad``, the optimizer's state (when an
    optimizer instance is passed) and the torch, Python and NumPy RNG states are restored
    bitwise afterwards.

    Args:
        model: Any ``nn.Module``.
        data: Batches (a DataLoader, a list, an iterator) or one batch; cycled if it runs out.
        loss: ``None`` (from the targets), a name, a spec, or ``f(outputs, targets)``.
        optimizer: ``sgd``, ``adam``, ``adamw``, ``rmsprop``, a spec or callable
            ``f(params, lr)``, or an optimizer instance (its param groups keep their LR
            ratios and its state is restored).
        momentum: Momentum for ``sgd`` (default 0.9) and ``rmsprop``.
        weight_decay: Weight decay for the named optimizers.
        start_lr: First learning rate.
        end_lr: Last learning rate (must exceed ``start_lr``).
        steps: Number of optimizer steps (learning rates) in the sweep.
        accumulate: Micro-batches per step; the recorded loss is their mean.
        early_stop: Stop once the loss diverges or is clearly past its minimum.
        seed: Seed for random targets when the data has none.
        progress: Called with (step, steps) after each step.

    Returns:
        The curve, the suggestion and warnings.

    Raises:
        UsageError: A bad range, no data, or a loss that is not finite from the first step.
        UserCodeError: The model, loss or optimizer factory raised.

    Example:
        >>> result = lr_find(model, loader, optimizer="adamw", steps=100)  # doctest: +SKIP
        >>> result.suggested_lr, result.reason  # doctest: +SKIP
    """
    import torch

    from nndiag.capture.state import preserved_state
    from nndiag.errors import UsageError, UserCodeError, describe_exception
    from nndiag.losses import as_loss, compute_loss
    from nndiag.optimizers import optimizer_factory
    from nndiag.specs import call_model, move_to, unpack_batch

    if not (start_lr > 0 and end_lr > 0 and math.isfinite(start_lr) and math.isfinite(end_lr)):
        raise UsageError(f"learning rates must be positive, got {start_lr:g} .. {end_lr:g}")
    if end_lr <= start_lr:
        raise UsageError(f"--end-lr ({end_lr:g}) must be larger than --start-lr ({start_lr:g})")
    if steps < MIN_POINTS:
        raise UsageError(f"--steps must be at least {MIN_POINTS}, got {steps}")
    if accumulate < 1:
        raise UsageError(f"--accumulate must be at least 1, got {accumulate}")
    loss_spec = as_loss(loss)
    user_optimizer = optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
    generator = torch.Generator().manual_seed(seed)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    lrs = [start_lr * (end_lr / start_lr) ** (i / (steps - 1)) for i in range(steps)]
    losses: list[float] = []
    stopped = "completed"
    with preserved_state(model, user_optimizer, weights=True, grads=True):
        if user_optimizer is not None:
            opt = user_optimizer
        else:
            factory = optimizer if callable(optimizer) and not isinstance(optimizer, str) else \
                optimizer_factory(str(optimizer), momentum=momentum, weight_decay=weight_decay)
            opt = factory([p for p in model.parameters() if p.requires_grad], start_lr)
        base = opt.param_groups[0]["lr"] or 1.0
        ratios = [(group["lr"] / base) if base else 1.0 for group in opt.param_groups]
        batches = cycle_batches(data)
        model.train()
        warmup = max(EARLY_STOP_WARMUP, steps // 10)
        start_level = best = ema = None
        best_step = 0
        noise = 0.0
        for step, lr in enumerate(lrs):
            for group, ratio in zip(opt.param_groups, ratios, strict=True):
                group["lr"] = lr * ratio
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(accumulate):
                try:
                    batch = next(batches)
                except StopIteration:
                    raise UsageError("--data: the data yielded no batch") from None
                except UsageError:
                    raise
                except Exception as exc:
                    raise UserCodeError(f"--data: iterating the data raised "
                                        f"{describe_exception(exc)}") from exc
                unpacked = unpack_batch(batch)
                inputs = move_to(unpacked.inputs, device)
                try:
                    outputs = call_model(model, inputs)
                except Exception as exc:
                    raise UserCodeError(f"the model raised: {describe_exception(exc)}") from exc
                value, _, _ = compute_loss(loss_spec, outputs,
                                           move_to(unpacked.targets, device), generator)
                (value / accumulate).backward()
                total += float(value.detach()) / accumulate
            if not math.isfinite(total):
                if step == 0:
                    raise UsageError(
                        f"the loss is {total} from the first step (lr={lr:.1e}, before any "
                        "update): the model or the data produces it; check the inputs and "
                        "the loss with `nndiag inspect`")
                losses.append(total)
                stopped = "non_finite_loss"
                break
            opt.step()
            losses.append(total)
            if progress is not None:
                progress(step + 1, steps)
            ema = total if ema is None else 0.8 * ema + 0.2 * total
            if step < warmup:  # learning rates still tiny: the scatter is batch noise
                continue
            if start_level is None:
                start_level = statistics.median(losses[:warmup])
                noise = 1.4826 * statistics.median(abs(v - start_level)
                                                   for v in losses[:warmup])
            if best is None or ema < best:
                best, best_step = ema, step
            stop = _early_stop(start_level, best, ema, noise, step - best_step, steps)
            if early_stop and stop:
                stopped = stop
                break

    recorded = lrs[: len(losses)]
    suggestion = suggest_lr(recorded, losses)
    summary = {"optimizer": type(opt).__name__, "steps": steps, "steps_run": len(losses),
               "start_lr": start_lr, "end_lr": end_lr, "accumulate": accumulate,
               "param_group_lr_ratios": ratios, "loss_name": loss_spec.name,
               "noise": suggestion.noise, "drop": suggestion.drop}
    return LRFindResult(
        suggested_lr=suggestion.lr, lr_low=suggestion.lr_low, lr_high=suggestion.lr_high,
        lrs=recorded, losses=losses, smoothed=suggestion.smoothed, stopped_because=stopped,
        reason=suggestion.reason, findings=suggestion.findings, summary=summary)
