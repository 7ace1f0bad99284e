"""Learning-rate range test: an exponential sweep, and a suggestion read from the curve.

The sweep (``lr_find``) trains on the user's data with the learning rate growing
exponentially from ``start_lr`` to ``end_lr``, one value per optimizer step, records the loss,
and restores the model, its optimizer and the RNG afterwards.

The suggestion (``suggest_lr``) is a pure function of the recorded curve:

1. The curve is cut at the first non-finite loss.
2. It is smoothed in log-lr: a running median over ``MEDIAN_WINDOW_DECADES`` (removes spikes),
   then a Gaussian of ``GAUSS_SIGMA_DECADES`` (removes noise). Derivatives are taken with
   respect to log10(lr), never lr.
3. ``lr_high`` is the learning rate at the minimum of the smoothed curve; past it the loss
   rises. ``lr_low`` is where the smoothed loss has made ``LOW_FRACTION`` of its total drop:
   learning has clearly started.
4. The suggestion is ``lr_high / MIN_DIVISOR``, capped at the steepest point of the descent
   when that point is lower (on curves whose minimum sits far right of the descent, as for
   transformers).
5. Noise is the robust spread (1.4826 x MAD) of the raw loss around the smoothed curve; the
   smoothed curve's own noise is that divided by the square root of the points the Gaussian
   averages. A drop smaller than ``FLAT_NOISE_RATIO`` x the curve's noise (or below
   ``FLAT_RELATIVE_DROP`` of the loss) is "flat": the suggestion then falls back to a tenth of
   where the loss starts to rise, with a warning. Raw noise above ``NOISY_FRACTION`` of the
   drop is "noisy": a warning.

The constants were chosen on the tasks of ``benchmarks/lr_find_quality.py`` (see
``benchmarks/README.md`` for the regret of each alternative rule).
"""

from __future__ import annotations

import copy
import math
import random
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from nndiag.findings import Finding, severity_rank

MEDIAN_WINDOW_DECADES = 0.4
GAUSS_SIGMA_DECADES = 0.2
LOW_FRACTION = 0.1
MIN_DIVISOR = 10.0
FLAT_NOISE_RATIO = 3.0
FLAT_RELATIVE_DROP = 0.01
NOISY_FRACTION = 0.3
MIN_POINTS = 8
SCHEMA = "nndiag.lr-find/1"


@dataclass
class Suggestion:
    """What ``suggest_lr`` read from a curve.

    Attributes:
        lr: The suggested learning rate (``None`` when the curve does not allow one).
        lr_low: Lower end of the useful range.
        lr_high: Upper end: the learning rate at the smoothed minimum.
        smoothed: The smoothed curve (NaN past the first non-finite loss).
        reason: Why this learning rate, in words.
        findings: Warnings about the curve (flat, noisy, range too narrow).
        noise: Robust spread of the raw loss around the smoothed curve.
        drop: Fall of the smoothed loss from its start to its minimum.
    """

    lr: float | None
    lr_low: float | None
    lr_high: float | None
    smoothed: list[float]
    reason: str
    findings: list[Finding] = field(default_factory=list)
    noise: float | None = None
    drop: float | None = None


def _running_median(values: np.ndarray, window: int) -> np.ndarray:
    half = window // 2
    padded = np.pad(values, half, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1)
    return np.median(windows, axis=1)


def _gaussian(values: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return values.copy()
    radius = max(1, int(math.ceil(3 * sigma)))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(values, radius, mode="edge")
    return np.convolve(padded, kernel, mode="valid")


def smooth_curve(log_lrs: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Median then Gaussian smoothing with widths in decades of learning rate."""
    if len(losses) < 3:
        return losses.copy()
    step = float(np.median(np.diff(log_lrs))) if len(log_lrs) > 1 else 1.0
    step = step if step > 0 else 1.0
    window = max(3, int(round(MEDIAN_WINDOW_DECADES / step)) | 1)
    window = min(window, len(losses) if len(losses) % 2 else len(losses) - 1)
    return _gaussian(_running_median(losses, window), GAUSS_SIGMA_DECADES / step)


def _finding(finding_id: str, summary: str, explanation: str, severity: str = "warning",
             **evidence: Any) -> Finding:
    return Finding(finding_id, severity, [], summary, explanation, evidence)


def suggest_lr(lrs: Sequence[float], losses: Sequence[float]) -> Suggestion:
    """Suggest a learning rate from a range-test curve (a pure function; see module docstring).

    Args:
        lrs: Increasing learning rates, one per step.
        losses: The loss recorded at each learning rate (NaN/Inf allowed at the end).

    Returns:
        The suggestion, the range, the smoothed curve, the reason and any warnings.
    """
    lr_arr = np.asarray(lrs, dtype=float)
    loss_arr = np.asarray(losses, dtype=float)
    finite = np.isfinite(loss_arr) & np.isfinite(lr_arr) & (lr_arr > 0)
    cut = len(loss_arr) if finite.all() else int(np.argmin(finite))
    smoothed_full = np.full(len(loss_arr), np.nan)
    if cut < MIN_POINTS:
        return Suggestion(None, None, None, smoothed_full.tolist(),
                          f"only {cut} finite loss values before the curve ended: too few to "
                          "read a learning rate from",
                          [_finding("lr_curve_too_short", "too few finite points to suggest a "
                                    "learning rate", "Run more --steps, or lower --start-lr "
                                    "if the loss diverges at once.", "error", points=cut)])
    log_lrs, raw = np.log10(lr_arr[:cut]), loss_arr[:cut]
    smoothed = smooth_curve(log_lrs, raw)
    smoothed_full[:cut] = smoothed
    noise = float(1.4826 * np.median(np.abs(raw - smoothed)))
    step = float(np.median(np.diff(log_lrs)))
    # The smoothed curve averages about 2*sqrt(pi)*sigma points: its own noise is that much lower.
    averaged = max(1.0, 2 * math.sqrt(math.pi) * GAUSS_SIGMA_DECADES / step) if step > 0 else 1.0
    curve_noise = noise / math.sqrt(averaged)
    start = float(smoothed[0])
    low_index = int(np.argmin(smoothed))
    drop = start - float(smoothed[low_index])
    scale = max(abs(start), abs(float(smoothed[low_index])), 1e-12)
    findings: list[Finding] = []

    if drop <= FLAT_NOISE_RATIO * curve_noise or drop <= FLAT_RELATIVE_DROP * scale:
        rise = np.nonzero(smoothed > start + max(FLAT_NOISE_RATIO * curve_noise,
                                                 FLAT_RELATIVE_DROP * scale))[0]
        findings.append(_finding(
            "lr_curve_flat", "the loss barely falls over the whole range",
            "A flat curve (a pretrained model, a task already learned, or too few steps) holds "
            "no valley to read a learning rate from. The suggestion is a tenth of where the "
            "loss starts to rise, a safe upper bound rather than an optimum.",
            "warning" if len(rise) else "error", drop=drop, noise=noise))
        if len(rise):
            lr_rise = float(lr_arr[rise[0]])
            return Suggestion(lr_rise / 10, None, lr_rise, smoothed_full.tolist(),
                              f"flat curve: a tenth of {lr_rise:.2e}, where the loss starts to "
                              "rise", findings, noise, drop)
        return Suggestion(None, None, None, smoothed_full.tolist(),
                          "flat curve with no rise: no learning rate can be read from it",
                          findings, noise, drop)

    if noise > NOISY_FRACTION * drop:
        findings.append(_finding(
            "lr_curve_noisy", "the loss is noisy against its fall",
            f"The raw loss scatters by {noise:.3g} around the smoothed curve against a fall of "
            f"{drop:.3g}: use a larger batch or --accumulate, or more --steps.",
            drop=drop, noise=noise))
    if low_index >= cut - max(2, cut // 20) and cut == len(loss_arr):
        findings.append(_finding(
            "lr_range_too_narrow", "the loss still falls at the end of the range",
            "The minimum sits at the end of the sweep: raise --end-lr to see where the loss "
            "turns up.", end_lr=float(lr_arr[cut - 1])))

    lr_high = float(lr_arr[low_index])
    descent = smoothed[: low_index + 1]
    slope = np.gradient(descent, log_lrs[: low_index + 1]) if low_index >= 2 else \
        np.zeros(low_index + 1)
    steep_index = int(np.argmin(slope))
    lr_steep = float(lr_arr[steep_index])
    started = np.nonzero(descent <= start - LOW_FRACTION * drop)[0]
    lr_low = float(lr_arr[started[0]]) if len(started) else float(lr_arr[0])
    lr = lr_high / MIN_DIVISOR
    reason = (f"a tenth of {lr_high:.2e}, where the smoothed loss is lowest "
              f"({float(smoothed[low_index]):.4g}, down {drop:.3g} from {start:.4g})")
    if lr_steep < lr:
        lr = lr_steep
        reason = (f"the steepest point of the descent ({lr_steep:.2e}), below a tenth of the "
                  f"minimum at {lr_high:.2e}")
    lr = max(lr, lr_low)
    return Suggestion(lr, lr_low, lr_high, smoothed_full.tolist(), reason, findings, noise, drop)


# ----------------------------------------------------------------------------- the sweep

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


@dataclass
class LRFindResult:
    """The range test and its suggestion.

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

    suggested_lr: float | None
    lr_low: float | None
    lr_high: float | None
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    stopped_because: str
    reason: str
    findings: list[Finding] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    schema: str = SCHEMA

    @property
    def status(self) -> str:
        """``ok``, or the highest severity among the findings (``info`` counts as ``ok``)."""
        worst = max((severity_rank(f.severity) for f in self.findings), default=0)
        return ("ok", "warning", "error")[worst]

    def fails(self, fail_on: str) -> bool:
        """True when a finding is at or above ``fail_on``."""
        threshold = severity_rank(fail_on)
        return any(severity_rank(f.severity) >= threshold for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        """The JSON contract (``nndiag.lr-find/1``) as plain data."""
        data = asdict(self)
        data.pop("schema")
        return {"schema": self.schema, "status": self.status, **data}


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


class _ModelState:
    """Everything a sweep changes, saved and restored bitwise."""

    def __init__(self, model: Any, optimizer: Any | None) -> None:
        import torch

        self.model = model
        self.tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.grads = [(p, None if p.grad is None else p.grad.detach().clone())
                      for p in model.parameters()]
        self.modes = [(m, m.training) for m in model.modules()]
        self.optimizer = optimizer
        self.optimizer_state = copy.deepcopy(optimizer.state_dict()) if optimizer else None
        self.torch_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.python_rng = random.getstate()
        self.numpy_rng = np.random.get_state()

    def restore(self) -> None:
        import torch

        with torch.no_grad():
            current = self.model.state_dict()
            for key, value in self.tensors.items():
                current[key].copy_(value)
        for param, grad in self.grads:
            param.grad = grad
        for module, mode in self.modes:
            module.training = mode
        if self.optimizer is not None and self.optimizer_state is not None:
            self.optimizer.load_state_dict(self.optimizer_state)
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        random.setstate(self.python_rng)
        np.random.set_state(self.numpy_rng)


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
    state = _ModelState(model, user_optimizer)
    generator = torch.Generator().manual_seed(seed)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    lrs = [start_lr * (end_lr / start_lr) ** (i / (steps - 1)) for i in range(steps)]
    losses: list[float] = []
    stopped = "completed"
    try:
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
    finally:
        state.restore()

    recorded = lrs[: len(losses)]
    suggestion = suggest_lr(recorded, losses)
    summary = {"optimizer": type(opt).__name__, "steps": steps, "steps_run": len(losses),
               "start_lr": start_lr, "end_lr": end_lr, "accumulate": accumulate,
               "param_group_lr_ratios": ratios, "loss_name": loss_spec.name,
               "noise": suggestion.noise, "drop": suggestion.drop}
    return LRFindResult(suggestion.lr, suggestion.lr_low, suggestion.lr_high, recorded, losses,
                        suggestion.smoothed, stopped, suggestion.reason, suggestion.findings,
                        summary)
