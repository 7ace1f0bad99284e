"""``Monitor``: record diagnostics inside your own training loop.

    monitor = nndiag.Monitor(model, optimizer, every=50, log_dir="runs/exp1")
    for x, y in loader:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        monitor.step(loss)
    monitor.close()          # or use ``with nndiag.Monitor(...) as monitor:``

Every step records the loss and the learning rate (``capture.step_values``: on an accelerator
they stay on the device and reach the host in asynchronous blocks, so an unsampled step never
waits for the device; on the CPU each step is written at the next one). Every ``every``-th step
is sampled, with the same measurement core as ``nndiag inspect`` (``nndiag.capture.sites``) in
its lean mode: per call site (modules and activations applied as functions, named alike) the
activation mean and std, the dead fraction (ReLU family) and saturation (sigmoid/tanh family),
reduced a group of same-shaped outputs at a time when the forward pass ends; gradient norms
after accumulation and before clipping (read at the end of each backward pass); the true
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

import itertools
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from nndiag.capture.layers import layer_kind
from nndiag.capture.probe import ROOT_NAME, Owner, owner_fans, owners
from nndiag.capture.shards import local, sum_weight
from nndiag.capture.sites import SiteRecorder
from nndiag.capture.step_values import StepValues
from nndiag.errors import UsageError
from nndiag.records import ParamGroup, StepRecord, attach_parameters
from nndiag.runlog import RunWriter
from nndiag.stats.weights import update_ratio

# Activations applied as functions are looked for in the whole forward pass only on the first
# two and then every this many sampled steps; in between, only inside the modules that
# applied one. Watching costs a Python call per torch function (~6% of a small MLP's step,
# more in attention, which calls dozens).
FUNCTIONAL_RECHECK = 100


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    reduce_op = torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM
    torch.distributed.all_reduce(tensor, op=reduce_op)
    return tensor


def _wrapper_chain(optimizer: Any) -> Iterator[Any]:
    """An optimizer, then what it wraps (``.optimizer``), innermost last; at most 8 levels down."""
    for _ in range(9):
        if optimizer is None:
            return
        yield optimizer
        inner = getattr(optimizer, "optimizer", None)
        if inner is optimizer:
            return
        optimizer = inner


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside a framework's wrapper (anything with an ``.optimizer``)."""
    found = optimizer
    for inner in itertools.islice(_wrapper_chain(optimizer), 1, None):
        if not hasattr(inner, "param_groups"):
            break
        found = inner
    return found


def _is_grad_scaler(scaler: Any) -> bool:
    return callable(getattr(scaler, "scale", None)) and callable(getattr(scaler, "unscale_",
                                                                         None)) and \
        callable(getattr(scaler, "get_scale", None))


def find_scaler(optimizer: Any) -> Any:
    """The ``GradScaler`` an optimizer wrapper carries (Accelerate's ``.scaler``), if any."""
    scalers = (getattr(wrapper, "scaler", None) for wrapper in _wrapper_chain(optimizer))
    return next((scaler for scaler in scalers if _is_grad_scaler(scaler)), None)


# The update-ratio subset of a big tensor: this many evenly spaced runs of contiguous elements
# (contiguous runs read a few cache lines; a plain stride would touch every line of the tensor).
_SUBSET_RUNS = 16


def _subset_layout(numel: int, budget: int) -> tuple[int, int, int]:
    """``(runs, pitch, width)``: ``runs`` runs of ``width`` elements every ``pitch`` elements.

    ``(0, 0, 0)`` means the whole tensor (small enough, or ``budget`` 0).
    """
    if not budget or numel <= budget:
        return 0, 0, 0
    runs = min(_SUBSET_RUNS, budget)
    return runs, numel // runs, max(1, budget // runs)


class _WeightGroup:
    """One module's trainable weights as the recorder tracks them."""

    def __init__(self, owner: Owner) -> None:
        self.name, self.kind = owner.name, layer_kind(owner.module)
        self.params = [p for _, p in owner.params if p.requires_grad]
        self.weights = owner.weights(trainable_only=True)
        self.numel = sum(p.numel() for p in self.params)
        self.weight_numel = sum(w.numel() for w in self.weights)
        self.fan_in, self.fan_out = owner_fans(owner)
        self.vector_only, self.reparametrized = owner.vector_only(), owner.reparametrized


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
        samples: The sampled steps (``StepRecord``), in memory as well as in the log.
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
        elif not _is_grad_scaler(scaler):
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
        # A model wrapped by torch.compile is measured through the module it wraps (its names,
        # its modules; the wrapper itself is not a site).
        compiled = getattr(model, "_orig_mod", None)
        if isinstance(compiled, nn.Module):
            model = compiled
        self._recorder = SiteRecorder(model, exact=False, compiled=compiled is not None) \
            if activations else None

        self._trainable = [p for p in model.parameters() if p.requires_grad]
        self._groups = []
        for owner in owners(model):
            if owner.weights(trainable_only=True):
                self._groups.append(_WeightGroup(owner))
        self.weight_layers = [(g.name, g.kind) for g in self._groups]
        self._weights = [w for g in self._groups for w in g.weights]
        trainable_index = {id(p): i for i, p in enumerate(self._trainable)}
        # Where each weight sits among the trainable parameters (whose gradients are read).
        self._weight_positions = [trainable_index[id(p)] for p in self._weights]
        self._group_positions = [[trainable_index[id(p)] for p in g.params]
                                 for g in self._groups]

        self.step_count = 0
        self.samples: list[StepRecord] = []
        self._values = StepValues(self._write_steps, flush_every)
        self._grad_handles: list[RemovableHandle] = []
        self._grad_queued = False
        self._grad_sq: torch.Tensor | None = None
        self._grad_present: list[bool] | None = None
        self._before: list[torch.Tensor] | None = None
        self._before_sq: torch.Tensor | None = None
        # Norms are taken on the elements this rank holds (a sharded parameter's local shard)
        # and kept squared, so that ranks sum them (``capture.shards``).
        self._update_layout = [_subset_layout(local(p).numel(), update_sample)
                               for p in self._weights]
        # Scales a subset's squared norm to the whole (local) tensor's (1 when read whole).
        self._sq_scale = torch.tensor(
            [local(p).numel() / (rows * width) if rows else 1.0
             for p, (rows, _, width) in zip(self._weights, self._update_layout, strict=True)])
        self._weight_sum_weights = torch.tensor(
            [sum_weight(p, self.world_size) for p in self._weights], dtype=torch.float64)
        self._grad_sum_weights = torch.tensor(
            [sum_weight(p, self.world_size) for p in self._trainable], dtype=torch.float64)
        self._after_sq: torch.Tensor | None = None
        self._views: list[torch.Tensor] = []
        self._view_pointers: list[int] | None = None
        # A non-contiguous weight's flat view is a copy: it must be taken anew every time.
        self._views_cacheable = all(local(p).is_contiguous() for p in self._weights)
        self._update: tuple[torch.Tensor, torch.Tensor] | None = None
        self._optimizer_handles: list[RemovableHandle] = []
        self._sampling = False
        self.closed = False
        # Optimizer steps that ran (the post-step hook), to see the ones a GradScaler skipped.
        self._optimizer_steps = 0
        self._optimizer_steps_seen = 0
        self.skipped_steps: list[int] = []
        self.report: Any = None
        # Under DDP the averaged gradient exists only once DDP's reducer has finished, after
        # the end of backward: read it at the optimizer step instead.
        self._reads_grads_at_step = self.world_size > 1 and optimizer is not None

        self._writer: RunWriter | None = None
        self._meta = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": type(model).__name__,
            "optimizer": type(optimizer).__name__ if optimizer is not None else None,
            "every": every, "world_size": self.world_size,
            "weight_layers": [{"name": n, "kind": k} for n, k in self.weight_layers],
            "trainable_parameters": sum(p.numel() for p in self._trainable),
        }
        if scaler is not None:
            self._meta["grad_scaler"] = type(scaler).__name__
        self._tensorboard: Any = None
        if tensorboard is not None and self.rank == 0:
            from nndiag.export import TensorBoardWriter

            # Without a run log the writer keeps the losses, for the findings at close.
            self._tensorboard = TensorBoardWriter(tensorboard, keep_losses=log_dir is None)
        if log_dir is not None and self.rank == 0:
            self._writer = RunWriter(log_dir, self._meta)
        if optimizer is not None:
            self._optimizer_handles = [optimizer.register_step_pre_hook(self._before_step),
                                       optimizer.register_step_post_hook(self._after_step)]
        self._prepare(0)
    # ------------------------------------------------------------------ hooks

    def _prepare(self, step: int) -> None:
        sampled = step % self.every == 0
        if sampled and not self._sampling:
            if self._recorder is not None:
                self._recorder.attach()
                self._recorder.active = True
            self._grad_handles = [p.register_post_accumulate_grad_hook(self._on_grad)
                                  for p in self._trainable]
        elif not sampled and self._sampling:
            self._detach_sampling_hooks(closing=False)
        self._sampling = sampled
        self._grad_sq, self._grad_present, self._update, self._after_sq = (None, None, None,
                                                                           None)
        if self._recorder is not None:
            self._recorder.reset()
            # Activations applied as functions are looked for everywhere on the first sampled
            # steps and every FUNCTIONAL_RECHECK-th one; in between, only inside the modules
            # whose own forward applied one.
            self._recorder.watch_all = (step // self.every) % FUNCTIONAL_RECHECK < 2

    def _detach_sampling_hooks(self, closing: bool = True) -> None:
        if self._recorder is not None:
            self._recorder.active = False
            if closing or not self._recorder.compiled:  # a compiled model's hooks stay, gated
                self._recorder.detach()
        for handle in self._grad_handles:
            handle.remove()
        self._grad_handles = []

    def _on_grad(self, param: torch.Tensor) -> None:
        if self._reads_grads_at_step:
            return
        if not self._grad_queued:
            self._grad_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._read_grads)

    def _read_grads(self) -> None:
        """End of a backward pass: the accumulated, not yet clipped gradients."""
        self._grad_queued = False
        with torch.no_grad():
            self._grad_present = [p.grad is not None for p in self._trainable]
            grads = [local(p.grad) if p.grad is not None else torch.zeros((), device=p.device)
                     for p in self._trainable]
            grad_sq = torch.stack(torch._foreach_norm(grads)).float().square() \
                if grads else None
            if grad_sq is not None and self.scaler is not None:
                scale = self._loss_scale()
                if scale is not None:  # still scaled: divide by the scale they were made with
                    grad_sq = grad_sq / scale.to(grad_sq.device, torch.float32).square()
            self._grad_sq = grad_sq

    def _loss_scale(self) -> torch.Tensor | None:
        """The loss scale the gradients are multiplied by now (``None``: already unscaled).

        The scale is read as the device tensor (no synchronisation), at the time of the read:
        ``GradScaler.update`` changes it in place afterwards.
        """
        scaler = self.scaler
        states = getattr(scaler, "_per_optimizer_states", None)
        state = states.get(id(self.optimizer)) if isinstance(states, dict) else None
        stage = getattr(state.get("stage"), "name", None) if isinstance(state, dict) else None
        if stage in ("UNSCALED", "STEPPED"):
            return None
        scale = getattr(scaler, "_scale", None)
        if isinstance(scale, torch.Tensor):
            return scale
        return torch.tensor(float(scaler.get_scale()))

    def _update_views(self) -> list[torch.Tensor]:
        """The weight elements the update ratio is measured on (a subset of big tensors).

        The views are made once and reused while every weight keeps its storage (an
        optimizer updates in place; a ``load_state_dict`` into new tensors rebuilds them).
        """
        weights = [local(p) for p in self._weights]
        pointers = [p.data_ptr() for p in weights]
        if pointers != self._view_pointers or not self._views_cacheable:
            views = []
            for p, (rows, pitch, width) in zip(weights, self._update_layout, strict=True):
                flat = p.detach().reshape(-1)
                views.append(flat[: rows * pitch].view(rows, pitch)[:, :width] if rows else flat)
            self._views, self._view_pointers = views, pointers
        return self._views

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._sampling and self._reads_grads_at_step:
            self._read_grads()
        if self._sampling and self._weights:
            with torch.no_grad():
                views = self._update_views()
                self._before_sq = torch.stack(torch._foreach_norm(views)).float().square()
                if self._before is None:
                    self._before = [v.clone() for v in views]
                else:
                    torch._foreach_copy_(self._before, views)

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._optimizer_steps += 1
        if self._before is None or not self._sampling:
            return
        with torch.no_grad():
            views = self._update_views()
            after = torch.stack(torch._foreach_norm(views)).float().square()
            self._after_sq = after * self._sq_scale.to(after.device)
            torch._foreach_sub_(self._before, views)
            self._update = (torch.stack(torch._foreach_norm(self._before)).float().square(),
                            self._before_sq)
        if self.every > 1:  # a copy of the weights is only kept while sampling every step
            self._before = None

    def read_gradients(self) -> None:
        """Read this step's gradients now, if this step is sampled and reads them at the step.

        For frameworks that run backward inside ``optimizer.step(closure)`` (Lightning): under
        ``torch.distributed`` the gradients are read at the optimizer's step pre-hook, which
        then runs before the closure's backward; a framework hook between the backward and the
        update (``on_before_optimizer_step``) calls this to read the synchronised gradients.
        Elsewhere a no-op: the gradients are read when backward ends.
        """
        if self._sampling and self._reads_grads_at_step:
            self._read_grads()

    def begin_step(self) -> None:
        """The next training step starts now: forget activations measured since ``step``.

        For framework callbacks: an evaluation pass run between two training steps (with the
        next step's hooks attached) is not part of the step. Optional in your own loop.
        """
        if self._sampling and self._recorder is not None:
            self._recorder.reset()

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
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else None
        self._values.append(loss, lr)
        skipped = False
        if self.scaler is not None:
            skipped = self._optimizer_steps == self._optimizer_steps_seen
            self._optimizer_steps_seen = self._optimizer_steps
            if skipped:
                self._skipped()
        if self._sampling:
            self._finish_sample(skipped)
        elif self.world_size == 1:  # under torch.distributed, losses are averaged when sampled
            self._values.step_done()
        self.step_count += 1
        self._prepare(self.step_count)

    def _skipped(self) -> None:
        """The scaler skipped this step's update (inf/NaN gradients): count and log it."""
        self.skipped_steps.append(self.step_count)
        if self._writer is not None:
            from nndiag.amp import append_skipped

            append_skipped(self._writer.directory, self.step_count,
                           float(self.scaler.get_scale()))

    def _device(self) -> torch.device:
        return next((p.device for p in self._trainable), torch.device("cpu"))

    def _loss_tensor(self, losses: list[Any]) -> torch.Tensor:
        """Losses (device tensors or floats) as one device tensor."""
        return torch.stack([v if isinstance(v, torch.Tensor) else torch.tensor(v) for v in
                            losses]).to(self._device(), torch.float32)

    def _write_steps(self, first: int, losses: list[float], lrs: list[float | None]) -> None:
        """Write consecutive steps' loss and learning rate to the run log and TensorBoard."""
        if self._writer is not None:
            self._writer.write_steps(first, losses, lrs)
        if self._tensorboard is not None:
            self._tensorboard.write_steps(first, losses, lrs)

    def _finish_sample(self, skipped: bool = False) -> None:
        """One device-to-host transfer (and, under ``torch.distributed``, one sum) for the step.

        Raw per-tensor numbers go to the host; grouping them per layer is cheaper there than
        a kernel per statistic on the device. Norms travel squared: over ranks, the losses,
        the activation sums and every squared norm (each rank's share weighted as
        ``capture.shards`` says) are summed in one packed all-reduce. A step the scaler
        skipped is recorded without its (non-finite) gradients: nothing was applied.
        """
        device = self._device()
        recorder = self._recorder
        pending, lrs = self._values.take()
        with torch.no_grad():
            losses = self._loss_tensor(pending).double()
            if self._after_sq is not None:  # measured at the optimizer step already
                weight_sq = self._after_sq
            elif self._weights:
                weight_sq = torch.stack(torch._foreach_norm(
                    [local(p).detach() for p in self._weights])).float().square()
            else:
                weight_sq = torch.zeros(0, device=device)
            grad_sq = None if skipped else self._grad_sq
            update = self._update
            if self.world_size > 1:
                payload = recorder.payload() if recorder is not None else None
                losses, payload, weight_sq, grad_sq, update = self._sum_over_ranks(
                    losses, payload, weight_sq, grad_sq, update)
                sites = recorder.collect(payload) if recorder is not None else None
            else:
                sites = recorder.collect() if recorder is not None else None
            if sites is None:
                sites = torch.zeros(0, dtype=torch.float64, device=device)
            pieces = [losses, sites, weight_sq]
            if grad_sq is not None:
                pieces.append(grad_sq)
            if update is not None:
                pieces += list(update)
            host = torch.cat([p.double().reshape(-1).to(device) for p in pieces]).cpu().tolist()
        self._record(host, lrs, len(pending), len(sites), grad_sq is not None,
                     update is not None)

    def _sum_over_ranks(self, losses: torch.Tensor, payload: torch.Tensor | None,
                        weight_sq: torch.Tensor, grad_sq: torch.Tensor | None,
                        update: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[Any, ...]:
        """Every rank's numbers summed in one all-reduce: losses averaged, norms whole."""
        device = losses.device
        weights = self._weight_sum_weights.to(device)
        parts = [losses / self.world_size,
                 payload.to(device) if payload is not None else losses.new_zeros(0),
                 weight_sq.double() * weights]
        if grad_sq is not None:
            parts.append(grad_sq.double() * self._grad_sum_weights.to(device))
        if update is not None:
            parts += [update[0].double() * weights, update[1].double() * weights]
        sizes = [part.numel() for part in parts]
        summed = list(_all_reduce(torch.cat(parts), "sum").split(sizes))
        losses, payload_sum, weight_sq = summed[0], summed[1], summed[2]
        rest = summed[3:]
        if grad_sq is not None:
            grad_sq, rest = rest[0], rest[1:]
        if update is not None:
            update = (rest[0], rest[1])
        return losses, (payload_sum if payload is not None else None), weight_sq, grad_sq, update

    def _record(self, host: list[float], lrs: list[Any], n_losses: int, n_sites: int,
                has_grads: bool, has_update: bool) -> None:
        values = iter(host)

        def take(count: int) -> list[float]:
            return [next(values) for _ in range(count)]

        losses = take(n_losses)
        layers = self._recorder.records(take(n_sites)) if self._recorder is not None else []
        weight_sq = take(len(self._weights))
        grad_sq = take(len(self._trainable)) if has_grads else None
        deltas, before = (([math.sqrt(v) for v in take(len(self._weights))],
                           [math.sqrt(v) for v in take(len(self._weights))]) if has_update
                          else (None, None))
        present = self._grad_present
        groups, offset = [], 0
        for group, positions in zip(self._groups, self._group_positions, strict=True):
            own = range(offset, offset + len(group.weights))
            offset += len(group.weights)
            got = [present[j] for j in positions] if present is not None else []
            update = None
            if deltas is not None and before is not None:
                update = update_ratio([deltas[i] for i in own], [before[i] for i in own])
            grad = (math.sqrt(sum(grad_sq[self._weight_positions[i]] for i in own))
                    if grad_sq is not None else None)
            groups.append(ParamGroup(
                group.name, group.kind, group.numel, True,
                math.sqrt(sum(weight_sq[i] for i in own)), group.weight_numel,
                grad_norm=grad, used=all(got), any_used=any(got) or present is None,
                fan_in=group.fan_in, fan_out=group.fan_out, update_ratio=update,
                vector_only=group.vector_only, reparametrized=group.reparametrized))
        attach_parameters(layers, groups, ROOT_NAME,
                          self._recorder.data_flow() if self._recorder is not None else None)
        grad_norm = math.sqrt(sum(grad_sq)) if grad_sq is not None else None
        record = StepRecord(self.step_count, losses[-1] if losses else None, grad_norm, layers)
        self.samples.append(record)
        self._values.hand_over(losses, [None if lr is None else float(lr) for lr in lrs])
        if self._writer is not None:
            self._writer.write_sample(record)
        if self._tensorboard is not None:
            self._tensorboard.write_sample(record)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Write what is pending and remove every hook (safe to call twice)."""
        if self.closed:
            return
        if self.world_size > 1 and len(self._values):
            pending, lrs = self._values.take()
            values = self._loss_tensor(pending)
            torch.distributed.all_reduce(values)
            values /= self.world_size
            self._values.hand_over(values.cpu().tolist(),
                                   [None if lr is None else float(lr) for lr in lrs])
        self._values.close()
        self._detach_sampling_hooks()
        for handle in self._optimizer_handles:
            handle.remove()
        self._optimizer_handles = []
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
            tensorboard.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
