"""``Monitor``: record diagnostics inside your own training loop.

    monitor = nndiag.Monitor(model, optimizer, every=50, log_dir="runs/exp1")
    for x, y in loader:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        monitor.step(loss)
    monitor.close()          # or use ``with nndiag.Monitor(...) as monitor:``

Every step records the loss and the learning rate it ran at (read at the optimizer's step
hook; ``capture.step_values``: on an accelerator
they stay on the device and reach the host in asynchronous blocks, so an unsampled step never
waits for the device; on the CPU each step is written at the next one). Every ``every``-th step
is sampled, with the same measurement core as ``nndiag inspect`` (``nndiag.capture.sites``) in
its lean mode: per call site (modules and activations applied as functions, named alike) the
activation mean and std, the dead fraction (ReLU family) and saturation (sigmoid/tanh family),
each output reduced on the device the moment it appears; gradient norms
after accumulation and before clipping (as they are at the end of each backward pass; a big
gradient is read the moment it is accumulated, while still in cache); the true
update-to-weight ratio ``||w_after - w_before|| / ||w_before||`` from the optimizer's step
hooks, valid for any optimizer; and the global gradient norm. The update ratio of a big tensor
is measured on a fixed subset of at most ``update_sample`` elements, 16 evenly spaced runs of
contiguous elements (a 4,096-element subset is within a few percent of the whole tensor's ratio,
against the orders of magnitude the rules judge; copying every weight twice a step is what would
make ``every=1`` expensive); the weight norm of such a tensor is its subset's, scaled by
sqrt(elements / subset). Statistics are reduced on the device and moved to the host once per
sampled step.

Hook policy: the optimizer's step hooks are registered once and gated. The recorder's two
global module hooks and the gradient hooks are attached just before a sampled step and removed
after it (with ``every=1`` they stay): a module forward hook, even one that returns at once,
moves every module call to PyTorch's slow path, which unsampled steps should not pay.

Mixed precision: with a ``GradScaler`` (``scaler=``, or found on a wrapper such as
Accelerate's ``AcceleratedOptimizer``), gradient norms read at the end of backward, where the
gradients are still multiplied by the loss scale, are divided by the scale they were computed
with (read on the device, no synchronisation); norms read after ``unscale_`` are not. A step the
scaler skipped (inf/NaN in the scaled gradients: the optimizer's step hooks did not run) is
counted in ``skipped_steps``, written to ``amp.jsonl`` in the run directory and recorded
without gradient norms or update ratios, so that the normal overflows of loss scaling are
reported as an ``info`` finding (``nndiag.amp``), not as ``nan_inf``.

Under ``torch.distributed`` every rank measures its own batch and rank 0 writes one log. On a
sampled step one packed all-reduce sums everything over ranks: the losses (averaged), the
activation sums and counts (means and stds are those of the union of the ranks' batches),
whether each unit fired (a unit is dead only if it fired on no rank), and every squared norm.
Norms are taken on the elements a rank holds (an FSDP2 ``DTensor``'s local shard; DDP's
replica), each rank's share weighted by how many ranks hold those elements (``capture.shards``),
so the sums are the whole parameters' norms, equal to a single process's on the global batch.
Gradients are read at the optimizer step, once DDP or FSDP2 has averaged them (so after any
clipping the loop does), not at the end of backward, where each rank still holds its own.
"""

from __future__ import annotations

import contextlib
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from nndiag.capture.step_capture import StepCapture
from nndiag.capture.step_values import StepValues
from nndiag.errors import UsageError
from nndiag.optimizers import find_scaler, is_grad_scaler, unwrap_optimizer
from nndiag.records import StepRecord
from nndiag.runlog import RunWriter

# Sampled steps kept in memory when a run log holds every one (``Monitor.samples``): a long
# run sampled every step would otherwise grow without bound (about 94 kB a step for 50 layers).
KEPT_SAMPLES = 1000

__all__ = ["Monitor", "Sink", "find_scaler", "unwrap_optimizer"]


class Sink(Protocol):
    """Where a monitor's records go: the run log (``RunWriter``), TensorBoard."""

    def write_steps(self, first: int, losses: list[float], lrs: list[float | None]) -> None:
        """Consecutive steps' loss and learning rate, from step ``first``."""

    def write_sample(self, record: StepRecord) -> None:
        """A sampled step's record."""

    def close(self) -> None:
        """Flush and close."""


def _abandon(capture: StepCapture, sinks: list[Sink]) -> None:
    """A monitor dropped without ``close()``: remove its hooks and close its files.

    Runs when the monitor is garbage-collected (a notebook cell that raised between steps,
    then rebound the name): hooks left on the model would slow every later step of it and
    keep measurements piling up. What was still pending is lost, as in a killed run.
    """
    capture.close()
    for sink in sinks:
        try:
            sink.close()
        except Exception:  # noqa: BLE001, S110 - a finalizer must not raise
            pass


def _close_quietly(sink: Sink) -> None:
    """Close a sink; a failure to flush is a warning, never an error out of training."""
    try:
        sink.close()
    except OSError as exc:
        warnings.warn(f"nndiag: closing {type(sink).__name__} failed ({exc.strerror or exc})",
                      RuntimeWarning, stacklevel=3)


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class Monitor:
    """Records per-layer diagnostics of a training loop into a run log.

    Args:
        model: The model being trained.
        optimizer: Its optimizer (for learning rates and update ratios); optional. Wrapped
            optimizers (anything with an ``.optimizer`` attribute) are unwrapped.
        every: Sample every ``every``-th step (the first step is always sampled).
        log_dir: The run directory to write (one per run); ``None`` keeps records in memory
            only (``monitor.samples``).
        activations: Record activation statistics (forward hooks) on sampled steps.
        update_sample: Most elements per weight tensor the update ratio is measured on: a
            bigger tensor is measured on 16 evenly spaced runs of contiguous elements (a
            fixed subset, the same before and after the step). ``0`` measures every element.
        scaler: The AMP ``GradScaler`` scaling the loss (``torch.amp.GradScaler``); found on
            the optimizer's wrapper when it carries one (Accelerate). Gradient norms are then
            unscaled and steps the scaler skipped are counted (``skipped_steps``). A disabled
            scaler is ignored.
        tensorboard: Also write TensorBoard event files to this directory (rank 0): per
            layer the gradient norm, update ratio, activation std and dead fraction of each
            sampled step, the loss and learning rate of every step, and the findings of the
            run as text when the monitor closes (needs the ``tensorboard`` package).
        flush_every: On an accelerator, the per-step losses stay on the device and are copied
            to the host asynchronously this many steps at a time (default 32), so that an
            unsampled step never waits for the device; a killed run loses at most that many
            steps. On the CPU, where reading a value never waits, each step is written at the
            next one (a killed run loses at most one step).

    Attributes:
        samples: The sampled steps (``StepRecord``) in memory: every one without a
            ``log_dir`` (or once its run log stopped writing); with one, which holds them
            all, at least the last ``KEPT_SAMPLES`` (1,000; older ones are dropped in
            batches).
        skipped_steps: Steps whose optimizer step the ``GradScaler`` skipped.
        report: The findings of the run (a ``Report``), computed when a monitor writing
            TensorBoard closes; ``None`` otherwise.

    Raises:
        UsageError: ``every`` below 1, a ``model`` that is not an ``nn.Module``, a
            ``log_dir`` that already holds a run or cannot be written, or ``tensorboard``
            without the ``tensorboard`` package.

    Example:
        >>> with Monitor(model, optimizer, every=50, log_dir="runs/a") as monitor:  # doctest: +SKIP
        ...     for x, y in loader:
        ...         loss = step(x, y)
        ...         monitor.step(loss)
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 every: int = 50, log_dir: str | Path | None = None,
                 activations: bool = True, update_sample: int = 1 << 12,
                 scaler: Any = None, tensorboard: str | Path | None = None,
                 flush_every: int | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise UsageError(f"Monitor needs an nn.Module, got {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise UsageError(f"every must be a whole number of at least 1, got {every!r}")
        if update_sample < 0:
            raise UsageError(f"update_sample must be 0 or more, got {update_sample}")
        if flush_every is not None and (isinstance(flush_every, bool) or
                                        not isinstance(flush_every, int) or flush_every < 1):
            raise UsageError(f"flush_every must be a whole number of at least 1, got "
                             f"{flush_every!r}")
        if scaler is None:
            scaler = find_scaler(optimizer)
        elif not is_grad_scaler(scaler):
            raise UsageError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if scaler is not None and not (scaler.is_enabled() if callable(
                getattr(scaler, "is_enabled", None)) else True):
            scaler = None
        optimizer = unwrap_optimizer(optimizer)
        if scaler is not None and optimizer is None:
            raise UsageError("a GradScaler needs the optimizer it steps: "
                             "Monitor(model, optimizer, scaler=scaler)")
        self.model, self.optimizer, self.every = model, optimizer, every
        self.scaler = scaler
        self.rank, self.world_size = _distributed()
        self._capture = StepCapture(model, optimizer, scaler, every=every,
                                    world_size=self.world_size, activations=activations,
                                    update_sample=update_sample)
        self.weight_layers = self._capture.weight_layers
        self.step_count = 0
        self.samples: list[StepRecord] = []
        self._values = StepValues(self._write_steps, flush_every)
        self.closed = False
        self._optimizer_steps_seen = 0
        self.skipped_steps: list[int] = []
        self.report: Any = None
        self._meta = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": type(model).__name__,
            "optimizer": type(optimizer).__name__ if optimizer is not None else None,
            "every": every, "world_size": self.world_size,
            "weight_layers": [{"name": n, "kind": k} for n, k in self.weight_layers],
            "trainable_parameters": sum(p.numel() for p in self._capture.trainable),
        }
        if scaler is not None:
            self._meta["grad_scaler"] = type(scaler).__name__
        self._writer: RunWriter | None = None
        self._tensorboard: Any = None
        if tensorboard is not None and self.rank == 0:
            from nndiag.export import TensorBoardWriter

            # Without a run log the writer keeps the losses, for the findings at close.
            self._tensorboard = TensorBoardWriter(tensorboard, keep_losses=log_dir is None)
        if log_dir is not None and self.rank == 0:
            self._writer = RunWriter(log_dir, self._meta)
        self._sinks: list[Sink] = [s for s in (self._writer, self._tensorboard) if s is not None]
        # Neither the hooks nor the sinks hold the monitor: dropped, it is collected and this
        # removes what it attached.
        self._finalizer = weakref.finalize(self, _abandon, self._capture, list(self._sinks))
        self._capture.prepare(0)

    def read_gradients(self) -> None:
        """Read this step's gradients now, if this step is sampled and reads them at the step.

        For frameworks that run backward inside ``optimizer.step(closure)`` (Lightning): under
        ``torch.distributed`` the gradients are read at the optimizer's step pre-hook, which
        then runs before the closure's backward; a framework hook between the backward and the
        update (``on_before_optimizer_step``) calls this to read the synchronised gradients.
        Elsewhere a no-op: the gradients are read when backward ends.
        """
        self._capture.read_gradients()

    def add_meta(self, **facts: Any) -> None:
        """Add facts about the run to its ``meta.json`` (framework callbacks use it).

        ``loss_summed_over=k``: the framework trains on the sum of k micro-batches' mean
        losses (read by the run rule ``accumulation_unscaled``).
        """
        self._meta.update(facts)
        if self._writer is not None:
            self._writer.update_meta(**facts)

    def begin_step(self) -> None:
        """The next training step starts now: forget activations measured since ``step``.

        For framework callbacks: an evaluation pass run between two training steps (with the
        next step's hooks attached) is not part of the step. Optional in your own loop.
        """
        self._capture.begin_step()

    @property
    def run_dir(self) -> Path | None:
        """The run directory this monitor writes (``None``: no log, or not rank 0)."""
        return self._writer.directory if self._writer is not None else None

    # ------------------------------------------------------------------ steps

    def step(self, loss: torch.Tensor | float) -> None:
        """Record one optimizer step (call it once per step, after ``optimizer.step()``).

        Raises:
            UsageError: The monitor was closed.
        """
        if self.closed:
            raise UsageError("Monitor.step called after close()")
        lr = self._capture.take_step_lr()
        if lr is None and self.optimizer is not None:
            lr = self.optimizer.param_groups[0]["lr"]
        self._values.append(loss, lr)
        skipped = False
        if self.scaler is not None:
            skipped = self._capture.optimizer_steps == self._optimizer_steps_seen
            self._optimizer_steps_seen = self._capture.optimizer_steps
            if skipped:
                self._skipped()
        if self._capture.sampling:
            self._finish_sample(skipped)
        elif self.world_size == 1:  # under torch.distributed, losses are averaged when sampled
            self._values.step_done()
        self.step_count += 1
        self._capture.prepare(self.step_count)

    def _skipped(self) -> None:
        """The scaler skipped this step's update (inf/NaN gradients): count and log it."""
        self.skipped_steps.append(self.step_count)
        if self._writer is not None:
            from nndiag.amp import append_skipped

            append_skipped(self._writer.directory, self.step_count,
                           float(self.scaler.get_scale()))

    def _loss_tensor(self, losses: list[Any]) -> torch.Tensor:
        """Losses (device tensors or floats) as one device tensor."""
        return torch.stack([v if isinstance(v, torch.Tensor) else torch.tensor(v) for v in
                            losses]).to(self._capture.device, torch.float32)

    def _to_sinks(self, method: str, *args: Any) -> None:
        """Call ``method`` on every sink; one that cannot write warns once and is dropped.

        Recording must never break training: a full disk or a file-size limit stops that
        sink (the run log has its own warning), and the loop goes on.
        """
        for sink in list(self._sinks):
            try:
                getattr(sink, method)(*args)
            except OSError as exc:
                self._sinks.remove(sink)
                if sink is self._tensorboard:
                    self._tensorboard = None
                with contextlib.suppress(OSError):  # the failure is warned about once, here
                    sink.close()
                warnings.warn(f"nndiag: writing to {type(sink).__name__} failed "
                              f"({exc.strerror or exc}); it stopped, training goes on",
                              RuntimeWarning, stacklevel=4)

    def _write_steps(self, first: int, losses: list[float], lrs: list[float | None]) -> None:
        """Write consecutive steps' loss and learning rate to every sink."""
        self._to_sinks("write_steps", first, losses, lrs)

    def _finish_sample(self, skipped: bool) -> None:
        """The sampled step's record, with every pending loss, to memory and the sinks."""
        pending, lrs = self._values.take()
        losses, record = self._capture.finish(self.step_count, self._loss_tensor(pending),
                                              skipped)
        self.samples.append(record)
        if len(self.samples) >= 2 * KEPT_SAMPLES and self._writer in self._sinks:
            del self.samples[:-KEPT_SAMPLES]  # the run log, still writing, has them
        if self._capture.input_stats is not None and "input" not in self._meta:
            mean, std = self._capture.input_stats
            self.add_meta(input={"mean": mean, "std": std})
        self._values.hand_over(losses, [None if lr is None else float(lr) for lr in lrs])
        self._to_sinks("write_sample", record)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Write what is pending and remove every hook (safe to call twice).

        With TensorBoard, the run is judged (``nndiag.diagnosis.diagnose``, through
        ``check_run``) and its findings written as text before the writer closes.
        """
        if self.closed:
            return
        self._finalizer.detach()
        if self.world_size > 1 and len(self._values):
            pending, lrs = self._values.take()
            values = self._loss_tensor(pending)
            torch.distributed.all_reduce(values)
            values /= self.world_size
            self._values.hand_over(values.cpu().tolist(),
                                   [None if lr is None else float(lr) for lr in lrs])
        self._values.close()
        self._capture.close()
        if self._writer is not None:
            self._writer.close()
        if self._tensorboard is not None:
            self._close_tensorboard()
        self.closed = True

    def _close_tensorboard(self) -> None:
        """The findings of the run as text, then close the TensorBoard writer.

        The findings are judged on the run log when there is one, else on what the writer
        and ``samples`` kept; a run too short to judge gets none. Never raises.
        """
        from nndiag.run_check import check_run, judge_run
        from nndiag.runlog import RunLog

        tensorboard = self._tensorboard
        try:
            if not self.step_count:
                return
            if self._writer is not None:
                self.report = check_run(self._writer.directory)
            else:
                log = RunLog(Path(tensorboard.directory), {"schema": None, **self._meta},
                             *tensorboard.kept_losses(), samples=list(self.samples))
                self.report = judge_run(log, self.skipped_steps)
            tensorboard.write_findings(self.report, max(self.step_count - 1, 0))
        except Exception as exc:  # noqa: BLE001 - a report must never break training
            import warnings

            warnings.warn(f"nndiag: the findings could not be written to TensorBoard ({exc})",
                          RuntimeWarning, stacklevel=3)
        finally:
            _close_quietly(tensorboard)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
