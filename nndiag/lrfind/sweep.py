"""The sweep and the trials: train, record the loss, restore.

``lr_find`` trains on the user's data with the learning rate growing exponentially from
``start_lr`` to ``end_lr``, one value per optimizer step, records the loss and stops early once
the loss diverges. ``nndiag.lrfind.suggestion.suggest_lr`` reads the curve and proposes a few
candidate learning rates; each is then trained for a short budget (``train_trial``) from the
same starting state, the same RNG state and the same batches, and scored by its loss on a few
fixed batches in eval mode (of ``val_data`` if given; else, when the trials cycle the data, of
a held-out slice of it that they do not train on; else of the training data's first batches);
``choose_lr`` keeps the best. That stage is on by default and can be
turned off (``trials=False``, ``--no-trials``): the curve's own reading, one sweep only.

Every stage starts from the user's state: the model, its optimizer, the torch/Python/NumPy RNG
and a DataLoader's own generator are restored after the sweep, after each trial and at the end
(``nndiag.capture.state.preserved_state``).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nndiag.findings import LRFindResult
from nndiag.records.lrcurve import Trial

if TYPE_CHECKING:
    from nndiag.batches import BatchSource
from nndiag.lrfind.suggestion import (
    MIN_POINTS,
    RULE,
    Rule,
    budget_trial_steps,
    choose_lr,
    eval_scatter,
    plateau_candidates,
    suggest_lr,
)

SCHEMA = LRFindResult.schema

# Fewest steps before the early-stopping rule starts judging (their median is the start level).
EARLY_STOP_WARMUP = 5
# Each trial is scored in eval mode on the first batches of the data: enough of them for
# EVAL_SAMPLES samples, at most EVAL_MAX_BATCHES (a cost/precision trade-off: about 1-2 training
# steps' worth of forward passes per trial).
EVAL_SAMPLES = 256
EVAL_MAX_BATCHES = 16
# When the trials cycle the data: the last HOLDOUT_FRACTION of one pass over the batches (at
# least one batch) scores the trials, which train on the others; only with MIN_HOLDOUT_BATCHES,
# and only the first HOLDOUT_MAX_BATCHES of a longer pass are split.
HOLDOUT_FRACTION = 0.2
MIN_HOLDOUT_BATCHES = 3
HOLDOUT_MAX_BATCHES = 5 * EVAL_MAX_BATCHES


def holds_out(epoch_batches: int | None, trial_steps: int) -> bool:
    """Whether the trials are scored on a held-out slice of the batches (pure).

    When the trials' steps reach the batches of one pass over the data, they cycle it, and the
    loss on batches they trained on rewards the rate that memorizes fastest.

    Args:
        epoch_batches: Batches in one pass over the data (``None``: unknown, a stream).
        trial_steps: Steps of each trial.
    """
    return epoch_batches is not None and MIN_HOLDOUT_BATCHES <= epoch_batches <= trial_steps


def epoch_batches(source: BatchSource) -> int | None:
    """Batches in one pass over the data: its length (``None`` for a stream or one batch)."""
    if source.single or source.iterator is not None:
        return None
    try:
        return int(len(source.data))
    except TypeError:
        return None


def _early_stop(start: float, best: float, current: float, noise: float) -> str | None:
    """Stop rule on the EMA of the loss; differences only, so negative losses work too.

    ``diverged``: the loss has risen above its start level by twice its fall (or by six times
    the noise, for curves that never fell). The start level and the noise (1.4826 x MAD) come
    from the first ``max(EARLY_STOP_WARMUP, steps // 10)`` steps, whose learning rates are too
    small to move the loss, so a loss that explodes cannot raise its own threshold.

    A curve that has merely turned up past its minimum runs on, as fastai's does: the valley is
    read on the whole descent and the rise after it, and stopping there (an earlier rule) made
    the suggestion worse on the benchmark's problems (``benchmarks/README.md``).
    """
    if current > start + 2 * max(start - best, 3 * noise, 1e-12):
        return "diverged"
    return None


def _context(model: Any, data: Any, loss: Any, seed: int, accumulate: int,
             make_optimizer: Callable[[], Any], val_data: Any = None,
             holdout: bool = False) -> _Context:
    """The set-up the sweep, the trials and the trial baseline share.

    Every stage (the sweep, each trial, the eval batches) then sees the same first batches.
    """
    import torch

    from nndiag.losses import as_loss

    ctx = _Context(model, _source(data), as_loss(loss), torch.Generator().manual_seed(seed),
                   next((p.device for p in model.parameters()), torch.device("cpu")),
                   accumulate, make_optimizer, val_data)
    if holdout:
        ctx.hold_out()
    return ctx


def _source(data: Any) -> BatchSource:
    """A source whose first stream starts where the data's order stands now.

    Asking a DataLoader for an iterator draws from its generator, so the source is created
    under its own data-order guard.
    """
    from nndiag.batches import BatchSource

    with _same_data_order(data):
        return BatchSource(data)


def cycle_batches(data: Any) -> Iterator[Any]:
    """Batches forever: re-iterate the data, or replay what a one-shot iterator gave."""
    from nndiag.batches import BatchSource

    return BatchSource(data).stream()


def _loader_generators(data: Any) -> list[Any]:
    """A DataLoader's own generators (its and its sampler's), whose state shuffles the data."""
    import torch

    found: list[Any] = []
    for owner in (data, getattr(data, "sampler", None), getattr(data, "batch_sampler", None),
                  getattr(getattr(data, "batch_sampler", None), "sampler", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


@contextmanager
def _same_data_order(data: Any) -> Iterator[None]:
    """Restore a DataLoader's own generators afterwards, so the next stage sees the same order."""
    generators = _loader_generators(data)
    states = [g.get_state() for g in generators]
    try:
        yield
    finally:
        for generator, state in zip(generators, states, strict=True):
            generator.set_state(state)


@dataclass
class _Context:
    """What the sweep and the trials share: the model, data, loss and optimizer set-up."""

    model: Any
    source: BatchSource
    loss_spec: Any
    generator: Any
    device: Any
    accumulate: int
    make_optimizer: Callable[[], Any]
    val_data: Any = None
    ratios: list[float] = field(default_factory=list)
    _eval_batches: list[Any] | None = field(default=None, init=False, repr=False)
    # With a held-out slice: the batches the trials train on (the others of one pass).
    _train_batches: list[Any] | None = field(default=None, init=False, repr=False)

    @property
    def held_out(self) -> int:
        """Batches held out of the training data to score the trials on (0: none)."""
        return 0 if self._train_batches is None else len(self._eval_batches or [])

    def hold_out(self) -> None:
        """Split one pass over the data into batches to score the trials on and to train on.

        The last ``HOLDOUT_FRACTION`` (at least one batch) scores the trials; the others are
        what they train on, cycled in that order. Only the first ``HOLDOUT_MAX_BATCHES`` of a
        longer pass are split.
        """
        from nndiag.capture.state import preserved_state

        count = min(epoch_batches(self.source) or 0, HOLDOUT_MAX_BATCHES)
        with preserved_state(self.model), _same_data_order(self.source.data):
            batches = list(itertools.islice(self.source.stream(), count))
        held = max(1, round(HOLDOUT_FRACTION * count))
        self._train_batches = batches[: count - held]
        self._eval_batches = _first_distinct(batches[count - held:], "--data")

    def trial_stream(self) -> Iterator[Any]:
        """The batches a trial trains on: the data's, or the batches not held out, cycled."""
        if self._train_batches is None:
            return self.source.stream()
        return itertools.cycle(self._train_batches)

    @property
    def eval_option(self) -> str:
        """The option the eval batches come from, named in errors."""
        return "--data" if self.val_data is None else "--val-data"

    def eval_batches(self) -> list[Any]:
        """The batches the trials are scored on (read once; RNG and data order restored).

        The first ``EVAL_SAMPLES`` samples (at most ``EVAL_MAX_BATCHES`` batches) of the
        validation data if given, else of the training data.
        """
        from nndiag.capture.state import preserved_state
        from nndiag.errors import UsageError

        if self._eval_batches is None:
            # A DataLoader without a generator of its own shuffles with the global RNG.
            with preserved_state(self.model):
                source = self.source if self.val_data is None else _source(self.val_data)
                with _same_data_order(source.data):
                    batches = _first_batches(source, self.eval_option)
                if not batches:
                    raise UsageError(f"{self.eval_option}: the data yielded no batch")
                if self.val_data is not None:  # checked before the sweep: fail early
                    self._check_val_batches(batches)
            self._eval_batches = batches
        return self._eval_batches

    def _check_val_batches(self, val_batches: list[Any]) -> None:
        """Refuse validation batches holding NaN or not matching the training batches' targets.

        Without targets the loss would be scored against random labels.
        """
        from nndiag.batches import check_finite_batch, unpack_batch
        from nndiag.errors import UsageError

        for batch in val_batches:
            check_finite_batch(unpack_batch(batch, "--val-data"), "--val-data", allow_inf=True,
                               targets=True)

        with _same_data_order(self.source.data):
            first = next(self.source.stream(), None)
        if first is None:
            raise UsageError("--data: the data yielded no batch")
        trained_with = unpack_batch(first).targets is not None
        for batch in val_batches:
            if (unpack_batch(batch, "--val-data").targets is not None) != trained_with:
                has, lacks = ("--data", "--val-data") if trained_with else \
                    ("--val-data", "--data")
                raise UsageError(f"--val-data: the {has} batches carry targets and the {lacks} "
                                 "batches do not; give (inputs, targets) batches to both")

    def batch_loss(self, batch: Any, option: str) -> Any:
        """The loss of one batch (a tensor with its graph).

        Raises:
            UsageError: A batch the model's layers reject, or NaN in the batch when the loss is
                not finite (the data's fault; otherwise a non-finite loss is the rate's).
            UserCodeError: The user's model or loss raised.
        """
        import torch

        from nndiag.batches import check_finite_batch, move_to, unpack_batch
        from nndiag.losses import compute_loss
        from nndiag.specs import call_model, explain_model_failure

        unpacked = unpack_batch(batch, option)
        inputs = move_to(unpacked.inputs, self.device)
        try:
            outputs = call_model(self.model, inputs)
        except Exception as exc:
            raise explain_model_failure(self.model, inputs, exc) from exc
        value, _, _ = compute_loss(self.loss_spec, outputs,
                                   move_to(unpacked.targets, self.device), self.generator)
        if not torch.isfinite(value):
            check_finite_batch(unpacked, option, allow_inf=True, targets=True)
        return value

    def step_loss(self, batches: Iterator[Any]) -> float:
        """Forward and backward over ``accumulate`` micro-batches; the mean loss."""
        from nndiag.errors import UsageError, UserCodeError, describe_exception

        total = 0.0
        for _ in range(self.accumulate):
            try:
                batch = next(batches)
            except StopIteration:
                raise UsageError("--data: the data yielded no batch") from None
            except UsageError:
                raise
            except Exception as exc:
                raise UserCodeError(f"--data: iterating the data raised "
                                    f"{describe_exception(exc)}") from exc
            value = self.batch_loss(batch, "--data")
            (value / self.accumulate).backward()
            total += float(value.detach()) / self.accumulate
        return total

    def set_lr(self, opt: Any, lr: float) -> None:
        for group, ratio in zip(opt.param_groups, self.ratios, strict=True):
            group["lr"] = lr * ratio

    def eval_loss(self, batches: list[Any]) -> float:
        """Mean loss on fixed batches in eval mode (no backward pass, no update)."""
        self.model.eval()
        total = 0.0
        for batch in batches:  # with autograd on: the loss checks that gradients can flow
            total += float(self.batch_loss(batch, self.eval_option).detach()) / len(batches)
        self.model.train()
        return total


def _trial(ctx: _Context, lr: float, steps: int, eval_batches: list[Any],
           eval_at: Sequence[int]) -> tuple[Trial, dict[int, float | None]]:
    """Train ``steps`` steps at a constant ``lr`` from the current state; losses at ``eval_at``."""
    opt = ctx.make_optimizer()
    ctx.set_lr(opt, lr)
    batches = ctx.trial_stream()
    ctx.model.train()
    evals: dict[int, float | None] = {}
    done = 0
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = ctx.step_loss(batches)
        if not math.isfinite(loss):
            break
        opt.step()
        done = step
        if step in eval_at:
            value = ctx.eval_loss(eval_batches)
            evals[step] = value if math.isfinite(value) else None
            if not math.isfinite(value):
                break
    diverged = done < steps or any(v is None for v in evals.values())
    final = None if diverged else evals.get(steps)
    return (Trial(lr=lr, steps=done, loss=final, diverged=diverged),
            {k: evals.get(k) for k in eval_at if k <= done})


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
    trials: bool = True,
    trial_steps: int | None = None,
    candidates: Sequence[float] | None = None,
    val_data: Any = None,
    budget: int | None = None,
    seed: int = 0,
    rule: Rule = RULE,
    progress: Callable[[int, int], None] | None = None,
) -> LRFindResult:
    """Run a learning-rate range test, then train its candidates briefly and suggest the best.

    The sweep records the loss while the learning rate grows exponentially; the curve gives a
    reading (fastai's valley) and the candidate learning rates around it. With ``trials`` (the
    default) each candidate is trained ``trial_steps`` steps at a constant rate from the same
    starting state, RNG state and batches, scored by its loss on the first batches of
    ``val_data`` if given, else, when the trials cycle the data (``holds_out``,
    ``rule.holdout``), of a held-out fifth of one pass that they do not train on, else of the
    training data (``EVAL_SAMPLES`` samples), in eval mode, and the best, lowered by
    ``rule.trial_shrink`` decades, is suggested: at most
    ``rule.candidates x rule.trial_fraction`` sweeps' worth of steps more. On the benchmark's
    held-out problems this beat the curve's own reading (``benchmarks/README.md``);
    ``trials=False`` keeps the curve's reading and costs one sweep.

    The model, its buffers, train/eval flags, ``.grad``, the optimizer's state (when an
    optimizer instance is passed), the torch, Python and NumPy RNG states and a DataLoader's own
    generator are restored bitwise afterwards. A model whose lazy modules have not run yet is
    swept as a copy, materialized on the first batch (it stays lazy).

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
        early_stop: Stop once the loss diverges.
        trials: Train the curve's candidates briefly and suggest the best (default); False:
            the curve's own reading, one sweep only.
        trial_steps: Steps of each trial (default ``rule.trial_fraction`` x ``steps``).
        candidates: Learning rates to trial instead of those read from the curve.
        val_data: Validation batches to score the trials on (their first ``EVAL_SAMPLES``
            samples, at most ``EVAL_MAX_BATCHES`` batches); default: a held-out fifth of one
            pass over ``data`` when the trials cycle it, else its first batches, which the
            trials also train on.
        budget: Steps of the run the learning rate is for. The trials then train
            ``budget_trial_steps`` steps each (``rule.budget_fraction`` of it, at most
            ``BUDGET_MAX_TRIAL_FACTOR`` times the default), and when they cycle the data
            (``holds_out``) and no ``val_data`` is given they train on all but its last fifth
            of a pass and are scored on that (``summary.trial_scored_on`` is ``held_out``;
            without a budget too, unless ``rule.holdout`` is off).
            Default: none, the trials last ``trial_steps`` and the choice is lowered for a run
            longer than they are.
        seed: Seed for random targets when the data has none.
        rule: The suggestion's constants (``nndiag.lrfind.RULE``).
        progress: Called with (step, total) after each step of the sweep and the trials.

    Returns:
        The curve, the suggestion, the trials and warnings.

    Raises:
        UsageError: A bad range, no data, a batch a ``torch.nn`` layer rejects, NaN in a batch
            whose loss is not finite (at any step), a loss that is not finite from the first
            step, or ``val_data`` that is empty, lacks the training batches' targets or comes
            with ``trials=False``.
        UserCodeError: The model, loss or optimizer factory raised.

    Example:
        >>> result = lr_find(model, loader, optimizer="adamw", steps=100)  # doctest: +SKIP
        >>> result.suggested_lr, result.reason  # doctest: +SKIP
    """
    import torch

    from nndiag.capture.state import preserved_state
    from nndiag.errors import UsageError, validate_seed
    from nndiag.optimizers import optimizer_factory
    from nndiag.specs import require_usable_model

    if not (start_lr > 0 and end_lr > 0 and math.isfinite(start_lr) and math.isfinite(end_lr)):
        raise UsageError(f"learning rates must be positive, got {start_lr:g} .. {end_lr:g}")
    if end_lr <= start_lr:
        raise UsageError(f"--end-lr ({end_lr:g}) must be larger than --start-lr ({start_lr:g})")
    if steps < MIN_POINTS:
        raise UsageError(f"--steps must be at least {MIN_POINTS}, got {steps}")
    if accumulate < 1:
        raise UsageError(f"--accumulate must be at least 1, got {accumulate}")
    if trial_steps is not None and trial_steps < 1:
        raise UsageError(f"--trial-steps must be at least 1, got {trial_steps}")
    if candidates is not None and not all(c > 0 and math.isfinite(c) for c in candidates):
        raise UsageError("candidate learning rates must be positive")
    if val_data is not None and not trials:
        raise UsageError("--val-data scores the trials, and --no-trials runs none: drop one")
    if budget is not None and budget < 1:
        raise UsageError(f"--budget must be at least 1 step, got {budget}")
    if budget is not None and not trials:
        raise UsageError("--budget aims the trials, and --no-trials runs none: drop one")
    validate_seed(seed, "--seed")
    require_usable_model(model, trainable=True)
    user_optimizer = optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
    model, data = _materialized(model, data, user_optimizer)
    if user_optimizer is None:
        factory = optimizer if callable(optimizer) and not isinstance(optimizer, str) else \
            optimizer_factory(str(optimizer), momentum=momentum, weight_decay=weight_decay)
    n_trial = trial_steps or max(1, round(rule.trial_fraction * steps))
    if budget is not None and trial_steps is None:
        n_trial = budget_trial_steps(budget, n_trial, rule)

    def make_optimizer() -> Any:
        if user_optimizer is not None:
            return user_optimizer
        return factory([p for p in model.parameters() if p.requires_grad], start_lr)

    lrs = [start_lr * (end_lr / start_lr) ** (i / (steps - 1)) for i in range(steps)]
    trial_records: list[Trial] = []
    plateau: list[float] = []
    scatter, start_loss = 0.0, None
    with preserved_state(model, user_optimizer, weights=True, grads=True), \
            _same_data_order(data):
        ctx = _context(model, data, loss, seed, accumulate, make_optimizer, val_data)
        if val_data is not None:  # an empty or target-less validation set fails before the sweep
            ctx.eval_batches()
        with preserved_state(model, user_optimizer, weights=True, grads=True), \
                _same_data_order(data):
            opt, losses, stopped = _sweep(ctx, lrs, early_stop, progress)
        suggestion = suggest_lr(lrs[: len(losses)], losses, rule)
        tried = list(candidates) if candidates is not None else suggestion.candidates
        if trials and tried:
            if (rule.holdout or budget is not None) and val_data is None and \
                    holds_out(epoch_batches(ctx.source), n_trial):
                ctx.hold_out()
            eval_batches = ctx.eval_batches()
            with preserved_state(model):
                start_loss = ctx.eval_loss(eval_batches)
            scatter = _scatter(eval_batches, suggestion.noise, accumulate)
            total = len(losses) + n_trial * len(tried)

            def run_trials(rates: Sequence[float]) -> None:
                for lr in rates:
                    with preserved_state(model, user_optimizer, weights=True, grads=True), \
                            _same_data_order(data):
                        record, _ = _trial(ctx, lr, n_trial, eval_batches, (n_trial,))
                    trial_records.append(record)
                    if progress is not None:
                        progress(len(losses) + n_trial * len(trial_records), total)

            run_trials(tried)
            if candidates is None:  # the trials saw a plateau: the rates above them too
                plateau = plateau_candidates(tried, [_score(r) for r in trial_records],
                                             start_loss, suggestion.top, rule)
                total += n_trial * len(plateau)
                run_trials(plateau)

    findings = list(suggestion.findings)
    suggested, reason = suggestion.lr, suggestion.reason
    if trial_records:
        choice = choose_lr([r.lr for r in trial_records], [_score(r) for r in trial_records],
                           n_trial, rule, scatter, start_loss, suggestion.lr, plateau)
        suggested, reason = choice.lr, choice.reason
        findings += choice.findings
        if budget is not None:
            reason += (f"; aimed at a run of {budget} steps: trials of {n_trial} steps" +
                       (f", scored on {ctx.held_out} batches held out of the data (the last "
                        "fifth of one pass), which they did not train on" if ctx.held_out
                        else ""))
    summary = {"optimizer": type(opt).__name__, "steps": steps, "steps_run": len(losses),
               "start_lr": start_lr, "end_lr": end_lr, "accumulate": accumulate,
               "param_group_lr_ratios": ctx.ratios, "loss_name": ctx.loss_spec.name,
               "noise": suggestion.noise, "drop": suggestion.drop, "shape": suggestion.shape,
               "trial_steps": n_trial if trial_records else 0,
               "trial_steps_run": sum(r.steps for r in trial_records),
               "trial_start_loss": start_loss, "trial_loss_scatter": scatter,
               "trial_scored_on": (None if not trial_records else
                                   "validation" if val_data is not None else
                                   "held_out" if ctx.held_out else "training"),
               "trial_held_out_batches": ctx.held_out, "budget": budget,
               "trial_eval_samples": sum(_batch_samples(b) for b in ctx.eval_batches())
               if trial_records else 0}
    return LRFindResult(
        suggested_lr=suggested, lr_low=suggestion.lr_low, lr_high=suggestion.lr_high,
        lrs=lrs[: len(losses)], losses=losses, smoothed=suggestion.smoothed,
        stopped_because=stopped, reason=reason, findings=findings, summary=summary,
        curve_lr=suggestion.lr, trials=trial_records)


def _score(trial: Trial) -> float:
    """A trial's loss for ``choose_lr`` (``inf``: diverged)."""
    return math.inf if trial.loss is None else trial.loss


def _materialized(model: Any, data: Any, user_optimizer: Any) -> tuple[Any, Any]:
    """The model to sweep, and its data: a copy materialized on the first batch if it is lazy.

    The sweep then trains that copy (the caller's lazy model stays as it is). A one-shot
    iterator's first batch, read to materialize, is put back in front of it.

    Raises:
        UsageError: An optimizer instance was passed with a lazy model (its parameters do not
            exist yet), or as ``nndiag.capture.state.materialized``.
        UserCodeError: As ``nndiag.capture.state.materialized``.
    """
    import itertools

    from nndiag.batches import unpack_batch
    from nndiag.capture.state import has_uninitialized, materialized
    from nndiag.errors import UsageError

    if not has_uninitialized(model):
        return model, data
    if user_optimizer is not None:
        raise UsageError("the model's lazy modules have not run yet, so the optimizer passed "
                         "holds parameters that do not exist yet: run the model once on a "
                         "batch, then build the optimizer")
    sources: list[BatchSource] = []

    def first_inputs() -> Any:
        with _same_data_order(data):
            sources.append(_source(data))
            first = next(sources[0].stream(), None)
        if first is None:
            raise UsageError("--data: the data yielded no batch")
        return unpack_batch(first).inputs

    copied = materialized(model, first_inputs)  # the RNG a DataLoader draws from: restored
    if sources and sources[0].iterator is not None:
        data = itertools.chain(sources[0].seen, data)
    return copied, data


def _scatter(eval_batches: list[Any], noise: float | None, accumulate: int) -> float:
    """``eval_scatter`` for trials scored on ``eval_batches`` after steps of ``accumulate``."""
    samples = sum(_batch_samples(b) for b in eval_batches)
    per_step = accumulate * samples / max(1, len(eval_batches))
    return eval_scatter(noise, per_step, samples)


def trial_baseline(model: Any, data: Any, noise: float | None, *, loss: Any = None,
                   accumulate: int = 1, seed: int = 0, val_data: Any = None,
                   holdout: bool = False) -> tuple[float, float]:
    """What ``lr_find`` compares its trials with, for benchmarks that cache the trials.

    Args:
        model: The model before any training (left as it is).
        data: Batches, as for ``lr_find``.
        noise: The curve's noise (``Suggestion.noise``).
        loss: As for ``lr_find``.
        accumulate: Micro-batches per step.
        seed: Seed for random targets when the data has none.
        val_data: As for ``lr_find``.
        holdout: Scored on a held-out slice of ``data``, as ``train_trial``.

    Returns:
        The eval loss before any trial and ``eval_scatter`` for the first ``EVAL_SAMPLES``
        samples of the data the trials are scored on.
    """
    from nndiag.capture.state import preserved_state

    with preserved_state(model, weights=True), _same_data_order(data):
        ctx = _context(model, data, loss, seed, accumulate, lambda: None, val_data, holdout)
        eval_batches = ctx.eval_batches()
        start = ctx.eval_loss(eval_batches)
    return start, _scatter(eval_batches, noise, accumulate)


def _batch_samples(batch: Any, option: str = "--data") -> int:
    """Samples in a batch: the first dimension of its first input tensor (1 if none)."""
    import torch

    from nndiag.batches import unpack_batch

    inputs = unpack_batch(batch, option).inputs
    values = inputs.values() if isinstance(inputs, dict) else \
        inputs if isinstance(inputs, tuple | list) else (inputs,)
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


def _first_batches(source: BatchSource, option: str) -> list[Any]:
    """The first distinct batches of the data: ``EVAL_SAMPLES`` samples or ``EVAL_MAX_BATCHES``."""
    return _first_distinct(source.stream(), option)


def _first_distinct(batches: Iterable[Any], option: str) -> list[Any]:
    """The first distinct of ``batches``: ``EVAL_SAMPLES`` samples or ``EVAL_MAX_BATCHES``."""
    out: list[Any] = []
    samples = 0
    for batch in batches:
        if any(batch is b for b in out):
            break
        out.append(batch)
        samples += _batch_samples(batch, option)
        if samples >= EVAL_SAMPLES or len(out) >= EVAL_MAX_BATCHES:
            break
    return out


def _sweep(ctx: _Context, lrs: list[float], early_stop: bool,
           progress: Callable[[int, int], None] | None) -> tuple[Any, list[float], str]:
    """The range test: one step per learning rate; the optimizer, the losses, why it stopped."""
    from nndiag.errors import UsageError

    opt = ctx.make_optimizer()
    base = opt.param_groups[0]["lr"] or 1.0
    ctx.ratios = [(group["lr"] / base) if base else 1.0 for group in opt.param_groups]
    batches = ctx.source.stream()
    ctx.model.train()
    steps = len(lrs)
    warmup = max(EARLY_STOP_WARMUP, steps // 10)
    start_level = best = ema = None
    noise = 0.0
    losses: list[float] = []
    stopped = "completed"
    for step, lr in enumerate(lrs):
        ctx.set_lr(opt, lr)
        opt.zero_grad(set_to_none=True)
        total = ctx.step_loss(batches)
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
            noise = 1.4826 * statistics.median(abs(v - start_level) for v in losses[:warmup])
        best = ema if best is None else min(best, ema)
        stop = _early_stop(start_level, best, ema, noise)
        if early_stop and stop:
            stopped = stop
            break
    return opt, losses, stopped


def train_trial(model: Any, data: Any, lr: float, *, loss: Any = None, optimizer: Any = "adamw",
                steps: int = 50, accumulate: int = 1, eval_at: Sequence[int] | None = None,
                seed: int = 0, val_data: Any = None, holdout: bool = False) -> dict[str, Any]:
    """One trial as ``lr_find`` runs it, from the current state, which is restored afterwards.

    Args:
        model: Any ``nn.Module``.
        data: Batches, as for ``lr_find``.
        lr: The constant learning rate.
        loss: As for ``lr_find``.
        optimizer: A name, or a callable ``f(params, lr)``.
        steps: Training steps.
        accumulate: Micro-batches per step.
        eval_at: Steps after which the loss on the fixed batches is recorded (default: the last).
        seed: Seed for random targets when the data has none.
        val_data: As for ``lr_find``.
        holdout: Train on the data less a held-out slice and score on that slice, as
            ``lr_find`` does when the trials cycle the data (``holds_out``).

    Returns:
        ``lr``, ``steps`` run, ``loss`` after ``steps`` (``None``: diverged), ``diverged`` and
        ``evals`` (the loss at each step of ``eval_at``).
    """
    from nndiag.capture.state import preserved_state
    from nndiag.optimizers import optimizer_factory

    factory = optimizer if callable(optimizer) and not isinstance(optimizer, str) else \
        optimizer_factory(str(optimizer))
    with preserved_state(model), _same_data_order(data):  # the user's RNG, as lr_find's trials
        ctx = _context(model, data, loss, seed, accumulate,
                       lambda: factory([p for p in model.parameters() if p.requires_grad], lr),
                       val_data, holdout)
        eval_batches = ctx.eval_batches()
    with preserved_state(model, weights=True, grads=True), _same_data_order(data):
        ctx.ratios = [1.0] * len(ctx.make_optimizer().param_groups)
        trial, evals = _trial(ctx, lr, steps, eval_batches, tuple(eval_at or (steps,)))
    return {**trial.to_dict(), "evals": evals}
