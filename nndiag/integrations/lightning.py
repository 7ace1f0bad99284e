"""``NndiagCallback`` for PyTorch Lightning: record a run with nndiag, judge it at the end.

    from nndiag.integrations.lightning import NndiagCallback
    trainer = Trainer(callbacks=[NndiagCallback(every=50)])

Imports ``pytorch_lightning`` (or ``lightning.pytorch`` when only the unified package is
installed); ``import nndiag`` does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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

try:
    import pytorch_lightning as pl
except ImportError:  # the unified ``lightning`` package
    import lightning.pytorch as pl  # type: ignore[no-redef]

__all__ = ["NndiagCallback", "TrainingFindingsError"]


def _loss_of(outputs: Any) -> Any:
    """The loss in what ``training_step`` returned (a tensor, or a mapping with ``loss``)."""
    if isinstance(outputs, dict):
        outputs = outputs.get("loss")
    return outputs if hasattr(outputs, "detach") else None


class NndiagCallback(pl.Callback):
    """Records per-layer diagnostics of a Lightning run and judges the run when it ends.

    One step is recorded per optimizer step (``trainer.global_step``), however many
    batches ``accumulate_grad_batches`` puts into it: gradient norms are those of the
    accumulated gradient, read when the last backward of the step ends (before clipping;
    unscaled under 16-bit mixed precision, whose ``GradScaler`` is taken from the precision
    plugin), update ratios come from the optimizer's step hooks, and the loss of the step is
    the sum of its batches' losses as Lightning normalises them (the mean over the
    accumulated batches). The first optimizer (``trainer.optimizers[0]``) is followed.

    When training ends the run-level rules judge the log and the findings are printed
    (``verbose``); with ``fail_on`` a finding at or above that severity raises
    ``TrainingFindingsError``.

    Args:
        every: Sample every ``every``-th optimizer step (the first is always sampled).
        log_dir: The run directory; default ``trainer.log_dir/nndiag`` (``nndiag-2``... when
            taken).
        tensorboard: Also write TensorBoard events: a directory, or ``True`` for the
            run directory's ``tensorboard/`` subdirectory.
        activations: Record activation statistics on sampled steps.
        fail_on: ``"warning"`` or ``"error"``: raise ``TrainingFindingsError`` at the end of
            training when a finding is at or above it. ``None`` (default) never raises.
        verbose: Print the findings when training ends.

    Raises:
        UsageError: ``every`` below 1 or an unknown ``fail_on``.

    Example:
        >>> callback = NndiagCallback(every=50)
        >>> trainer = pl.Trainer(max_epochs=3, callbacks=[callback])  # doctest: +SKIP
        >>> trainer.fit(model, loader)  # doctest: +SKIP
        >>> callback.report.status  # doctest: +SKIP
    """

    def __init__(self, every: int = 50, log_dir: str | Path | None = None, *,
                 tensorboard: str | Path | bool | None = None, activations: bool = True,
                 fail_on: str | None = None, verbose: bool = True) -> None:
        validate_options(every, fail_on)
        self.every, self.log_dir, self.tensorboard = every, log_dir, tensorboard
        self.activations, self.fail_on, self.verbose = activations, fail_on, verbose
        self.monitor: Monitor | None = None
        self.report: Report | None = None
        self._step_loss: Any = None
        self._last_loss: Any = None
        self._global_step = 0
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ lifetime

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Attach a ``Monitor`` to the module and the first optimizer."""
        if self.monitor is not None:
            self.monitor.close()
        base = trainer.log_dir or trainer.default_root_dir
        run_dir = Path(self.log_dir) if self.log_dir is not None else fresh_run_dir(base)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        if len(trainer.optimizers) > 1:
            warn_once(self._warned, "optimizers", "nndiag: several optimizers; update ratios "
                      "and learning rates are recorded for the first one only")
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.monitor = Monitor(pl_module, optimizer, every=self.every, log_dir=run_dir,
                               activations=self.activations, scaler=scaler,
                               tensorboard=tensorboard_dir(self.tensorboard, None, run_dir))
        self.report = None
        self._step_loss, self._last_loss = None, None
        self._global_step = trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Close the monitor, judge the run and print (or raise on) its findings."""
        monitor, self.monitor = self.monitor, None
        if monitor is not None:
            self.report = finish(monitor, fail_on=self.fail_on, verbose=self.verbose)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        """Training failed: write what was recorded and remove every hook."""
        monitor, self.monitor = self.monitor, None
        if monitor is not None:
            monitor.close()

    # ------------------------------------------------------------------ steps

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        """After the step's backward passes (and DDP's reduction): read gradients if due."""
        if self.monitor is not None:
            self.monitor.read_gradients()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        """The first batch of an optimizer step: forget passes run since (validation)."""
        if self.monitor is not None and self._step_loss is None:
            self.monitor.begin_step()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        """Add the batch's loss; record a step when the optimizer stepped."""
        monitor = self.monitor
        if monitor is None:
            return
        loss = _loss_of(outputs)
        if loss is not None:
            loss = loss.detach()
            self._step_loss = loss if self._step_loss is None else self._step_loss + loss
        if trainer.global_step == self._global_step:
            return  # accumulating: the optimizer has not stepped yet
        self._global_step = trainer.global_step
        step_loss, self._step_loss = self._step_loss, None
        if step_loss is None:
            step_loss = self._fallback_loss(trainer)
        if step_loss is None:
            warn_once(self._warned, "loss", "nndiag: training_step returned no loss and none "
                      "was logged as 'train_loss' or 'loss': nndiag stops recording (return "
                      "the loss, or self.log('train_loss', loss))")
            self.monitor = None
            monitor.close()
            return
        self._last_loss = step_loss
        monitor.step(step_loss)

    def _fallback_loss(self, trainer: pl.Trainer) -> Any:
        """A step without a returned loss: the logged one, else the last step's."""
        metrics = trainer.callback_metrics
        for key in ("train_loss", "loss", "train_loss_step"):
            value = metrics.get(key)
            if value is not None:
                return value.detach() if hasattr(value, "detach") else float(value)
        return self._last_loss
