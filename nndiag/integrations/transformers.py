"""``NndiagCallback`` for the Hugging Face ``Trainer``: record a run, judge it at the end.

    from nndiag.integrations.transformers import NndiagCallback
    trainer = Trainer(model, args, train_dataset=data, callbacks=[NndiagCallback(every=50)])

Imports ``transformers``; ``import nndiag`` does not.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from nndiag.findings import Report
from nndiag.integrations._common import (
    TrainingFindingsError,
    finish,
    fresh_run_dir,
    tensorboard_dir,
    validate_options,
    warn_once,
)
from nndiag.monitor import Monitor

__all__ = ["NndiagCallback", "TrainingFindingsError"]


def _plain_classification_loss(output: Any, labels: Any) -> torch.Tensor | None:
    """The mean cross-entropy of a classifier's logits (``None`` for any other output)."""
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits",
                                                                                None)
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor) or \
            logits.dim() != 2 or labels.dim() != 1 or labels.dtype != torch.long or \
            logits.shape[0] != labels.shape[0] or not logits.is_floating_point():
        return None
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(logits.detach().float(), labels,
                                                 ignore_index=-100)


def _loss_of(output: Any) -> torch.Tensor | None:
    """The ``loss`` of a model output (a ``ModelOutput`` or a mapping)."""
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


class NndiagCallback(TrainerCallback):
    """Records per-layer diagnostics of a ``Trainer`` run and judges the run when it ends.

    One step is recorded per optimizer step (``on_step_end``), however many micro-batches
    ``gradient_accumulation_steps`` puts into it: gradient norms are those of the
    accumulated gradient, read when the last backward of the step ends (before clipping;
    unscaled under fp16, whose ``GradScaler`` Accelerate's optimizer wrapper carries), and
    update ratios come from the step hooks of the torch optimizer inside the wrapper. The
    loss of a step is read from the model's outputs (``outputs.loss`` of the training
    forward passes), combined as the ``Trainer`` does: summed when the model normalised it
    by the items of the whole step (``num_items_in_batch``), else averaged. A model that
    returns no loss (a custom ``compute_loss``) falls back to the last logged loss
    (``logging_steps=1`` makes it exact).

    When training ends the run-level rules judge the log and the findings are printed
    (``verbose``, main process); with ``fail_on`` a finding at or above that severity raises
    ``TrainingFindingsError``.

    Args:
        every: Sample every ``every``-th optimizer step (the first is always sampled).
        log_dir: The run directory; default ``args.output_dir/nndiag`` (``nndiag-2``... when
            taken).
        tensorboard: Also write TensorBoard events: a directory, or ``True`` for
            ``args.logging_dir`` (the run directory's ``tensorboard/`` when unset).
        activations: Record activation statistics on sampled steps.
        fail_on: ``"warning"`` or ``"error"``: raise ``TrainingFindingsError`` at the end of
            training when a finding is at or above it. ``None`` (default) never raises.
        verbose: Print the findings when training ends.

    Raises:
        UsageError: ``every`` below 1 or an unknown ``fail_on``.

    Example:
        >>> trainer = Trainer(model, args, train_dataset=data,  # doctest: +SKIP
        ...                   callbacks=[NndiagCallback(every=50)])
        >>> trainer.train()  # doctest: +SKIP
    """

    def __init__(self, every: int = 50, log_dir: str | Path | None = None, *,
                 tensorboard: str | Path | bool | None = None, activations: bool = True,
                 fail_on: str | None = None, verbose: bool = True) -> None:
        validate_options(every, fail_on)
        self.every, self.log_dir, self.tensorboard = every, log_dir, tensorboard
        self.activations, self.fail_on, self.verbose = activations, fail_on, verbose
        self.monitor: Monitor | None = None
        self.report: Report | None = None
        self._losses: list[torch.Tensor] = []
        self._normalised = False
        # Plain classification losses of the first accumulated step's micro-batches (checked
        # once against the model's own: ``_check_accumulation_scaling``); ``None`` once done.
        self._plain_losses: list[torch.Tensor | None] | None = []
        self._logged_loss: float | None = None
        self._pending = False
        self._hook: Any = None
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ lifetime

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        """Attach a ``Monitor`` to the model and the optimizer inside Accelerate's wrapper."""
        self._close()
        run_dir = (Path(self.log_dir) if self.log_dir is not None
                   else fresh_run_dir(args.output_dir or "."))
        self.monitor = Monitor(model, optimizer, every=self.every, log_dir=run_dir,
                               activations=self.activations,
                               tensorboard=tensorboard_dir(self.tensorboard,
                                                           getattr(args, "logging_dir", None),
                                                           run_dir))
        self.report = None
        self._losses, self._logged_loss, self._pending = [], None, False
        self._plain_losses = []
        # always_call: a forward that raises (out of memory, a bad batch) ends the recording
        # with it. Transformers has no callback for an exception, and hooks left on the
        # model would slow its later use.
        self._hook = model.register_forward_hook(self._on_forward, with_kwargs=True,
                                                 always_call=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Close the monitor, judge the run and print (or raise on) its findings."""
        if self._pending:
            self._record(self._logged_loss)
        monitor = self._detach()
        if monitor is not None:
            self.report = finish(monitor, fail_on=self.fail_on,
                                 verbose=self.verbose and state.is_world_process_zero)

    def _detach(self) -> Monitor | None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        monitor, self.monitor = self.monitor, None
        return monitor

    def _close(self) -> None:
        monitor = self._detach()
        if monitor is not None:
            monitor.close()

    def __del__(self) -> None:
        try:
            self._close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown
            pass

    # ------------------------------------------------------------------ steps

    def _on_forward(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any],
                    output: Any) -> None:
        """Keep the loss of each training forward pass (on the device)."""
        if sys.exc_info()[1] is not None:  # the pass raised: stop recording, remove the hooks
            self._close()
            return
        if not module.training or not torch.is_grad_enabled():
            return
        loss = _loss_of(output)
        if loss is not None:
            self._losses.append(loss.detach().float().mean())
            self._normalised = kwargs.get("num_items_in_batch") is not None
            if self._normalised and self._plain_losses is not None:
                plain = _plain_classification_loss(output, kwargs.get("labels"))
                self._plain_losses.append(plain)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        """The logged training loss: the fallback of a model whose outputs carry none."""
        if logs and isinstance(logs.get("loss"), int | float):
            self._logged_loss = float(logs["loss"])
            if self._pending:  # logged right after the step it belongs to
                self._record(self._logged_loss)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """A step starts (its first micro-batch): settle the last one, drop evaluation passes.

        A step still waiting for its loss gets the last logged one; activations measured
        since the last step (an evaluation) are forgotten.
        """
        if self._pending:
            self._record(self._logged_loss)
        if self.monitor is not None:
            self.monitor.begin_step()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """One optimizer step done: record it with its loss (or wait for the logged one)."""
        if self.monitor is None:
            return
        losses, self._losses = self._losses, []
        if losses:
            stacked = torch.stack(losses)
            self._check_accumulation_scaling(stacked, args)
            self._record(stacked.sum() if self._normalised else stacked.mean())
            return
        warn_once(self._warned, "loss", "nndiag: the model's outputs carry no loss (label "
                  "smoothing or a custom compute_loss?): the logged training loss is recorded "
                  "(exact with logging_steps=1, the last logged value otherwise)")
        self._pending = True

    def _check_accumulation_scaling(self, losses: torch.Tensor, args: Any) -> None:
        """Once, on the first step of several micro-batches: warn when the gradients are k x.

        The Trainer passes ``num_items_in_batch`` to a model that accepts ``**kwargs`` and then
        leaves the division by the accumulation steps to it; a model that still returns each
        micro-batch's plain mean loss (its loss equal to the classification loss of its
        logits) gets the sum of k means as its loss and gradients.
        """
        plain, self._plain_losses = self._plain_losses, []
        if plain is None or len(losses) < 2:
            return
        self._plain_losses = None  # checked once per run (one read from the device)
        if len(plain) != len(losses) or any(p is None for p in plain):
            return
        ratio = float((losses / torch.stack(plain).clamp_min(1e-12)).mean())
        if 0.75 <= ratio <= 1.33:
            steps = getattr(args, "gradient_accumulation_steps", len(losses))
            if self.monitor is not None:
                self.monitor.add_meta(loss_summed_over=len(losses))
            warn_once(self._warned, "accumulation", (
                f"nndiag: the Trainer passed num_items_in_batch, but the model's loss is each "
                f"micro-batch's plain mean: with gradient_accumulation_steps={steps} the loss and "
                f"the gradients are {len(losses)}x the mean (transformers divides neither). "
                "nndiag records the loss the gradients came from; set "
                "model.accepts_loss_kwargs = False before building the Trainer for the mean"))

    def _record(self, loss: Any) -> None:
        self._pending = False
        monitor = self.monitor
        if monitor is None:
            return
        if loss is None:
            warn_once(self._warned, "no-loss", "nndiag: no training loss is known yet (the "
                      "model's outputs carry none and none was logged): nndiag stops recording; "
                      "set logging_steps=1 to record this run")
            self._close()
            return
        monitor.step(loss)
