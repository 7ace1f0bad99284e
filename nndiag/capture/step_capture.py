"""What a recorded training step measures: activations, gradients, weights and updates.

``StepCapture`` owns every hook ``Monitor`` puts on the model and its optimizer. Before each
step ``prepare(step, sampled)`` attaches or detaches the sampling hooks; after a sampled step
``finish`` reduces everything on the device (and over ranks, in one all-reduce), moves it to
the host in one transfer with the caller's losses, and returns the ``StepRecord``:

- activations per call site (``capture.sites``, lean mode);
- gradient norms after accumulation and before clipping, as they are when backward ends (a
  big gradient is read in its hook the moment it is accumulated, while still in cache, and
  read again at the end if the pass did not touch it; small ones at the end, in one foreach;
  at the optimizer step under ``torch.distributed``, once the gradients are averaged),
  unscaled when a ``GradScaler`` still scales them;
- the true update-to-weight ratio ``||w_after - w_before|| / ||w_before||`` from the
  optimizer's step hooks, on a fixed subset of big tensors (``_subset_layout``), and for
  embedding tables on rows spread over those the step's gradient touched (``_sample_rows``);
- weight norms, taken on the elements a rank holds (``capture.shards``).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from nndiag.capture.layers import layer_kind
from nndiag.capture.probe import ROOT_NAME, Owner, owner_fans, owners
from nndiag.capture.shards import is_dtensor, local, sum_weight
from nndiag.capture.sites import SiteRecorder
from nndiag.records import ParamGroup, StepRecord, attach_parameters
from nndiag.records.layers import LOOKUP_KINDS

# Activations applied as functions are looked for in the whole forward pass only on the first
# two and then every this many sampled steps; in between, only inside the modules that
# applied one. Watching costs a Python call per torch function (~6% of a small MLP's step,
# more in attention, which calls dozens).
FUNCTIONAL_RECHECK = 100


# Gradients of fewer elements are read at the end of backward, in one foreach with the others
# not read in their hook; bigger ones in their hook, while still in cache.
SMALL_GRADIENT = 1 << 12


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over every rank, in place."""
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


# The update-ratio subset of a big tensor: this many evenly spaced runs of contiguous elements
# (contiguous runs read a few cache lines; a plain stride would touch every line of the tensor).
_SUBSET_RUNS = 16


def stored_values(tensor: torch.Tensor) -> torch.Tensor:
    """The values a tensor stores: a sparse gradient's (``sparse=True`` embeddings), else itself.

    A sparse tensor's norm is its values' norm (coalesced: repeated indices summed first).
    """
    if tensor.layout == torch.sparse_coo:
        return tensor.coalesce()._values()
    if tensor.layout in (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc):
        return tensor.values()
    return tensor


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


class StepCapture:
    """The hooks and measurements of recorded training steps (see module docstring).

    Args:
        model: The model (a ``torch.compile`` wrapper is measured through the module it wraps).
        optimizer: Its torch optimizer, unwrapped, or ``None`` (no update ratios).
        scaler: An enabled ``GradScaler``, or ``None``.
        every: Sample every ``every``-th step (decides when functional activations are
            looked for everywhere).
        world_size: Ranks under ``torch.distributed`` (1 otherwise).
        activations: Record activation statistics on sampled steps.
        update_sample: Most elements per weight tensor the update ratio is measured on.

    Attributes:
        weight_layers: ``(name, kind)`` of every module with trainable weights.
        trainable: The trainable parameters.
        optimizer_steps: Optimizer steps that ran (the post-step hook): a ``GradScaler``
            skipped the others.
        sampling: The current step is sampled.
    """

    def __init__(self, model: nn.Module, optimizer: Any, scaler: Any, *, every: int,
                 world_size: int, activations: bool, update_sample: int) -> None:
        self.optimizer, self.scaler, self.every = optimizer, scaler, every
        self.world_size = world_size
        compiled = getattr(model, "_orig_mod", None)
        if isinstance(compiled, nn.Module):
            model = compiled
        self._recorder = SiteRecorder(model, exact=False, compiled=compiled is not None) \
            if activations else None

        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self._groups = [_WeightGroup(owner) for owner in owners(model)
                        if owner.weights(trainable_only=True)]
        self.weight_layers = [(g.name, g.kind) for g in self._groups]
        self._weights = [w for g in self._groups for w in g.weights]
        trainable_index = {id(p): i for i, p in enumerate(self.trainable)}
        # Where each weight sits among the trainable parameters (whose gradients are read).
        self._weight_positions = [trainable_index[id(p)] for p in self._weights]
        self._group_positions = [[trainable_index[id(p)] for p in g.params]
                                 for g in self._groups]

        self._grad_handles: list[RemovableHandle] = []
        self._grad_queued = False
        # Per trainable parameter: (backward pass, squared norm) taken in its gradient hook.
        self._backward_id = 0
        self._hook_sq: list[tuple[int, torch.Tensor] | None] = [None] * len(self.trainable)
        # Gradients small enough to stay in cache (biases, gains): read at the end of backward.
        self._small_grads = frozenset(i for i, p in enumerate(self.trainable)
                                      if local(p).numel() < SMALL_GRADIENT)
        self._grad_sq: torch.Tensor | None = None
        self._grad_present: list[bool] | None = None
        # The update subsets before the step, stacked per group of same-shaped subsets.
        self._before: list[torch.Tensor] | None = None
        # Norms are taken on the elements this rank holds (a sharded parameter's local shard)
        # and kept squared, so that ranks sum them (``capture.shards``).
        self._update_layout = [_subset_layout(local(p).numel(), update_sample)
                               for p in self._weights]
        # Scales a subset's squared norm to the whole (local) tensor's (1 when read whole).
        self._sq_scale = torch.tensor(
            [local(p).numel() / (rows * width) if rows else 1.0
             for p, (rows, _, width) in zip(self._weights, self._update_layout, strict=True)])
        self._weight_sum_weights = torch.tensor(
            [sum_weight(p, world_size) for p in self._weights], dtype=torch.float64)
        self._grad_sum_weights = torch.tensor(
            [sum_weight(p, world_size) for p in self.trainable], dtype=torch.float64)
        # Embedding tables: a batch updates the rows of its tokens, so a fixed subset may hold
        # none of them. Their update is measured on rows spread evenly over those whose
        # gradient is non-zero this step (``_sample_rows``), as many as the budget holds (rows
        # that only Adam's momentum still moves are not counted: a slight underestimate).
        self._row_sampled = [
            (i, max(_SUBSET_RUNS, update_sample // local(p).shape[1]))
            for i, (p, group) in enumerate((w, g) for g in self._groups for w in g.weights)
            if update_sample and group.kind in LOOKUP_KINDS and p.dim() == 2
            and local(p).shape[1]]
        self._rows: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._after_sq: torch.Tensor | None = None
        self._views: list[torch.Tensor] = []
        self._view_pointers: list[int] | None = None
        # Weights whose subsets have one shape (every big tensor's is runs x width), and where
        # each weight's value lands in their concatenation: a few stacked reductions a step
        # instead of several kernels per weight.
        self._shape_groups: list[list[int]] = []
        self._stack_buffers: dict[int, torch.Tensor] = {}
        self._group_order = torch.zeros(0, dtype=torch.long)
        self._sharded = any(is_dtensor(p) for p in self._weights)
        # A non-contiguous weight's flat view is a copy: it must be taken anew every time.
        self._views_cacheable = all(local(p).is_contiguous() for p in self._weights)
        self._update: tuple[torch.Tensor, torch.Tensor] | None = None
        self.sampling = False
        self.optimizer_steps = 0
        # The mean and std of the model's floating-point input at the first sampled step.
        self.input_stats: tuple[float, float] | None = None
        if self._recorder is not None:
            self._recorder.measure_input = True
        self._step_lr: Any = None
        # Under torch.distributed the averaged gradient exists only once DDP's reducer (or
        # FSDP's reduce-scatter) has finished, after the end of backward: read it at the
        # optimizer step instead.
        self._reads_grads_at_step = world_size > 1 and optimizer is not None
        self._optimizer_handles: list[RemovableHandle] = []
        if optimizer is not None:
            self._optimizer_handles = [optimizer.register_step_pre_hook(self._before_step),
                                       optimizer.register_step_post_hook(self._after_step)]

    @property
    def device(self) -> torch.device:
        """Where the trainable parameters live (the CPU without any)."""
        return next((p.device for p in self.trainable), torch.device("cpu"))

    def close(self) -> None:
        """Remove every hook (safe to call twice)."""
        self._detach_sampling_hooks()
        for handle in self._optimizer_handles:
            handle.remove()
        self._optimizer_handles = []

    def prepare(self, step: int) -> None:
        """Before ``step``: attach the sampling hooks if it is sampled, else detach them."""
        sampled = step % self.every == 0
        if sampled and not self.sampling:
            if self._recorder is not None:
                self._recorder.attach()
                self._recorder.active = True
            self._grad_handles = [p.register_post_accumulate_grad_hook(
                partial(self._on_grad, i)) for i, p in enumerate(self.trainable)]
        elif not sampled and self.sampling:
            self._detach_sampling_hooks(closing=False)
        elif not sampled:  # a step after an unsampled one: nothing was measured to forget
            return
        self.sampling = sampled
        self._grad_queued = False  # a backward that raised never ran its end-of-pass read
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

    def _on_grad(self, index: int, param: torch.Tensor) -> None:
        """A parameter's gradient is accumulated: its squared norm now, while it is in cache.

        Read at the end of backward instead, every gradient is cold again (a second pass
        over all of them, ~1 ms a step on a 1.7M-parameter MLP on CPU). Only a contiguous
        float32 gradient on the CPU is read here: any other (bf16/fp16 or strided, which a
        read here would copy to float32 at backward's memory peak; complex; on an
        accelerator, where a cache is not the point) waits for the end of backward.
        """
        if self._reads_grads_at_step:
            return
        if not self._grad_queued:
            self._grad_queued = True
            self._backward_id += 1
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        if index in self._small_grads:  # a Python call costs more than reading it cold
            return
        grad = param.grad
        if grad is not None and type(grad) is torch.Tensor and grad.layout == torch.strided \
                and grad.dtype == torch.float32 and grad.device.type == "cpu" \
                and grad.is_contiguous():
            flat = grad.detach().view(-1)  # detached: no graph even under create_graph
            self._hook_sq[index] = (self._backward_id, torch.dot(flat, flat))

    def _end_of_backward(self) -> None:
        self._grad_queued = False
        self._read_grads(self._backward_id)

    def _read_grads(self, backward_id: int = -1) -> None:
        """The accumulated, not yet clipped gradients (at the end of a backward pass).

        With ``backward_id``, the squared norms taken in the gradients' hooks during that
        pass are used as they are; the others (a gradient the pass did not touch, a sparse
        one; every one when read at the optimizer step) are taken now.
        """
        with torch.no_grad():
            present = self._grad_present = [p.grad is not None for p in self.trainable]
            squares: list[torch.Tensor | None] = [None] * len(present)
            missing = []
            for i, (taken, has_grad) in enumerate(zip(self._hook_sq, present, strict=True)):
                if taken is not None and taken[0] == backward_id and has_grad:
                    squares[i] = taken[1]
                else:
                    missing.append(i)
            if missing:
                grads = [self._grad_values(self.trainable[i]) if present[i]
                         else torch.zeros((), device=self.trainable[i].device)
                         for i in missing]
                read = torch.stack(torch._foreach_norm(grads)).float().square().unbind(0)
                for i, value in zip(missing, read, strict=True):
                    squares[i] = value
            grad_sq = torch.stack(squares) if squares else None  # in parameter order
            if grad_sq is not None and self.scaler is not None:
                scale = self._loss_scale()
                if scale is not None:  # still scaled: divide by the scale they were made with
                    grad_sq = grad_sq / scale.to(grad_sq.device, torch.float32).square()
            self._grad_sq = grad_sq

    def _grad_values(self, param: torch.Tensor) -> torch.Tensor:
        """The gradient values this rank holds (``stored_values`` of the local shard)."""
        grad = param.grad
        if type(grad) is torch.Tensor and grad.layout == torch.strided:
            return grad
        return stored_values(local(grad))

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
        weights = [local(p) for p in self._weights] if self._sharded else self._weights
        pointers = [p.data_ptr() for p in weights]
        if pointers != self._view_pointers or not self._views_cacheable:
            views = []
            for p, (rows, pitch, width) in zip(weights, self._update_layout, strict=True):
                flat = p.detach().reshape(-1)
                views.append(flat[: rows * pitch].view(rows, pitch)[:, :width] if rows else flat)
            keys = [(v.shape, v.dtype) for v in views]
            if keys != [(v.shape, v.dtype) for v in self._views]:
                groups: dict[tuple[torch.Size, torch.dtype], list[int]] = {}
                for i, key in enumerate(keys):
                    groups.setdefault(key, []).append(i)
                self._shape_groups = list(groups.values())
                order = [i for group in self._shape_groups for i in group]
                self._group_order = torch.empty(len(order), dtype=torch.long)
                self._group_order[order] = torch.arange(len(order))
            self._views, self._view_pointers = views, pointers
        return self._views

    def _stacked_subsets(self, slot: int) -> list[torch.Tensor] | None:
        """The update subsets now, copied into slot ``slot`` of one buffer per shape group.

        A group's buffer is ``(3, members, *subset shape)``: the subsets before the step
        (slot 0), after it (slot 1) and their difference (slot 2), so that one reduction
        takes all three norms. The buffers are kept between steps: a fresh allocation each
        step costs more than the copy on the CPU. ``None`` when the weights' subsets no
        longer fit the buffers filled before the step (nothing to compare with).
        """
        views = self._update_views()
        buffers = []
        for index, group in enumerate(self._shape_groups):
            members = [views[i] for i in group]
            buffer = self._stack_buffers.get(index)
            shape = (3, len(members), *members[0].shape)
            if buffer is None or buffer.shape != shape or buffer.dtype != members[0].dtype \
                    or buffer.device != members[0].device:
                if slot:
                    return None
                buffer = self._stack_buffers[index] = torch.empty(
                    shape, dtype=members[0].dtype, device=members[0].device)
            torch.stack(members, out=buffer[slot])
            buffers.append(buffer)
        return buffers

    def _squared_norms(self, buffers: list[torch.Tensor]) -> torch.Tensor:
        """Float32 squared norms of the subsets: ``(3, weights)``, in weight order.

        A complex weight's norm is its real and imaginary parts' together.
        """
        real = [torch.view_as_real(buffer) if buffer.is_complex() else buffer
                for buffer in buffers]
        norms = torch.cat([torch.linalg.vector_norm(values, dim=tuple(range(2, values.dim())),
                                                    dtype=torch.float32)
                           for values in real], dim=1)
        if self._group_order.device != norms.device:  # moved once, not at every step
            self._group_order = self._group_order.to(norms.device)
        return norms.square().index_select(1, self._group_order)

    def take_step_lr(self) -> Any:
        """The learning rate the last optimizer step ran at (``None``: no step since then).

        Read before the step ran: a scheduler stepped after it has changed the group's.
        """
        lr, self._step_lr = self._step_lr, None
        return lr

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._step_lr = optimizer.param_groups[0]["lr"] if optimizer.param_groups else None
        if self.sampling and self._reads_grads_at_step:
            self._read_grads()
        if self.sampling and self._weights:
            with torch.no_grad():
                self._before = self._stacked_subsets(0)
                self._rows = self._sample_rows()

    def _sample_rows(self) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """For each embedding table: ``(weight index, rows, rows before the step, scale)``.

        The rows are spread evenly over the rows whose gradient is non-zero (repeated when
        there are fewer than asked for), chosen on the device: no synchronisation, no random
        numbers. ``scale`` (rows with a gradient / rows taken) turns the rows' squared update
        into the whole table's.
        """
        sampled = []
        for index, count in self._row_sampled:
            weight = local(self._weights[index]).detach()
            grad = self._weights[index].grad
            if grad is None:
                continue
            grad = local(grad)
            if grad.layout == torch.sparse_coo:  # EmbeddingBag(sparse=True): the rows it holds
                moved = torch.zeros(grad.shape[0], dtype=torch.bool, device=grad.device)
                moved.index_fill_(0, grad._indices()[0], True)
            else:
                moved = grad.abs().amax(dim=1) > 0
            moved_count = moved.sum()
            order = torch.argsort(moved.to(torch.int8), descending=True, stable=True)
            spread = torch.arange(count, device=weight.device) * moved_count // count
            rows = order.index_select(0, spread)
            sampled.append((index, rows, weight.index_select(0, rows),
                            moved_count.float() / count))
        return sampled

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.optimizer_steps += 1
        if self._before is None or not self.sampling:
            return
        self._before = None
        with torch.no_grad():
            buffers = self._stacked_subsets(1)
            if buffers is None:
                self._rows = []
                return
            for buffer in buffers:
                torch.sub(buffer[1], buffer[0], out=buffer[2])
            # Scaled to the whole tensors', so that tensors measured on subsets of different
            # sizes add up in a layer's ratio.
            if self._sq_scale.device != buffers[0].device:
                self._sq_scale = self._sq_scale.to(buffers[0].device)
            squares = self._squared_norms(buffers) * self._sq_scale
            before_sq, self._after_sq, delta_sq = squares.unbind(0)
            if self._rows:
                indices = torch.tensor([i for i, *_ in self._rows], device=delta_sq.device)
                estimates = torch.stack([
                    torch.linalg.vector_norm(
                        local(self._weights[i]).detach().index_select(0, rows) - rows_before,
                        dtype=torch.float32).square() * rows_scale
                    for i, rows, rows_before, rows_scale in self._rows])
                delta_sq = delta_sq.index_copy(0, indices, estimates)
                self._rows = []
            self._update = (delta_sq, before_sq)
        if self.every > 1:  # the buffers are kept only while every step is sampled
            self._stack_buffers.clear()

    def read_gradients(self) -> None:
        """Read this step's gradients now, if it is sampled and reads them at the step.

        See ``Monitor.read_gradients``.
        """
        if self.sampling and self._reads_grads_at_step:
            self._read_grads()

    def begin_step(self) -> None:
        """Forget activations measured since the last step (see ``Monitor.begin_step``)."""
        if self.sampling and self._recorder is not None:
            self._recorder.reset()

    def finish(self, step: int, losses: torch.Tensor, skipped: bool = False
               ) -> tuple[list[float], StepRecord]:
        """One device-to-host transfer (and, under ``torch.distributed``, one sum) for the step.

        Returns the losses (averaged over ranks) and the step's record.

        Raw per-tensor numbers go to the host; grouping them per layer is cheaper there than
        a kernel per statistic on the device. Norms travel squared: over ranks, the losses,
        the activation sums and every squared norm (each rank's share weighted as
        ``capture.shards`` says) are summed in one packed all-reduce. A step the scaler
        skipped is recorded without its (non-finite) gradients: nothing was applied.
        """
        device = self.device
        recorder = self._recorder
        with torch.no_grad():
            losses = losses.to(device, torch.float64)
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
            inputs = recorder.input_moments if recorder is not None else None
            if inputs is not None:
                pieces.append(inputs)
            # One cat (float64 by type promotion: the losses are) and one transfer.
            host = torch.cat([p.reshape(-1).to(device) for p in pieces]).cpu().tolist()
        if inputs is not None:  # read once, at the first sampled step that had them
            total, squares, count = host[-3:]
            mean = total / count
            self.input_stats = (mean, math.sqrt(max(squares / count - mean * mean, 0.0)))
            recorder.measure_input, recorder.input_moments = False, None
        return self._record(step, host, len(losses), len(sites), grad_sq is not None,
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
        summed = list(all_reduce_sum(torch.cat(parts)).split(sizes))
        losses, payload_sum, weight_sq = summed[0], summed[1], summed[2]
        rest = summed[3:]
        if grad_sq is not None:
            grad_sq, rest = rest[0], rest[1:]
        if update is not None:
            update = (rest[0], rest[1])
        return losses, (payload_sum if payload is not None else None), weight_sq, grad_sq, update

    def _record(self, step: int, host: list[float], n_losses: int, n_sites: int,
                has_grads: bool, has_update: bool) -> tuple[list[float], StepRecord]:
        """The host numbers of a sampled step as its losses and its ``StepRecord``."""
        offset = 0

        def take(count: int) -> list[float]:
            nonlocal offset
            offset += count
            return host[offset - count: offset]

        losses = take(n_losses)
        layers = self._recorder.records(take(n_sites)) if self._recorder is not None else []
        weight_sq = take(len(self._weights))
        grad_sq = take(len(self.trainable)) if has_grads else None
        delta_sq, before_sq = ((take(len(self._weights)), take(len(self._weights)))
                               if has_update else (None, None))
        present = self._grad_present
        groups, first = [], 0
        for group, positions in zip(self._groups, self._group_positions, strict=True):
            last = first + len(group.weights)
            got = [present[j] for j in positions] if present is not None else []
            update = None
            if delta_sq is not None and before_sq is not None:  # ``update_ratio`` on squares
                base = sum(before_sq[first:last])
                update = math.sqrt(sum(delta_sq[first:last]) / base) if base > 0 else None
            grad = (math.sqrt(sum([grad_sq[j] for j in self._weight_positions[first:last]]))
                    if grad_sq is not None else None)
            groups.append(ParamGroup(
                group.name, group.kind, group.numel, True,
                math.sqrt(sum(weight_sq[first:last])), group.weight_numel,
                grad_norm=grad, used=all(got), any_used=any(got) or present is None,
                fan_in=group.fan_in, fan_out=group.fan_out, update_ratio=update,
                vector_only=group.vector_only, reparametrized=group.reparametrized))
            first = last
        attach_parameters(layers, groups, ROOT_NAME,
                          self._recorder.data_flow() if self._recorder is not None else None)
        grad_norm = math.sqrt(sum(grad_sq)) if grad_sq is not None else None
        return losses, StepRecord(step, losses[-1] if losses else None, grad_norm, layers)
