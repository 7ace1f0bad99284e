"""``Monitor``: record diagnostics inside your own training loop.

    monitor = nndiag.Monitor(model, optimizer, every=50, log_dir="runs/exp1")
    for x, y in loader:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        monitor.step(loss)
    monitor.close()          # or use ``with nndiag.Monitor(...) as monitor:``

Every step records the loss and the learning rate (kept on the device and written in batches,
so an unsampled step costs a list append). Every ``every``-th step is sampled: per layer the
activation mean and std, dead fraction (ReLU family) and saturation (sigmoid/tanh family) from
forward hooks; gradient norms after accumulation and before clipping (read at the end of each
backward pass); the true update-to-weight ratio ``||w_after - w_before|| / ||w_before||`` from
the optimizer's step hooks, valid for any optimizer (on a fixed strided subset of at most
``update_sample`` elements of each big tensor: copying every weight twice a step is what makes
``every=1`` expensive, and the ratio of a 65,536-element subset is within ~1% of the whole; with
an optimizer, the weight norm of such a tensor is its subset's, scaled by
sqrt(elements / subset)); and the global gradient norm. Statistics are reduced on the device
and moved to the host once per sampled step.

Hook policy: the optimizer's step hooks are registered once and gated. Forward and gradient
hooks are attached just before a sampled step and removed after it (with ``every=1`` they stay):
a module forward hook, even one that returns at once, moves every module call to PyTorch's slow
path and costs ~4% of a small model's step, which gated-but-registered hooks would pay on every
step (``benchmarks/monitor_overhead.py``).

Under ``torch.distributed`` every rank measures its own batch and rank 0 writes one log. The
reduction, done with two collectives per sampled step and none otherwise: losses, activation
sums and sums of squares are summed over ranks (so means and stds are those of the union of the
ranks' batches), saturation counts summed; "unit fired" masks take the maximum (a unit is
dead only if it never fired on any rank). Gradient norms, weights and update
ratios are read from rank 0. Under DDP the gradients are read at the optimizer step, once DDP
has averaged them (so after any clipping the loop does), not at the end of backward, where
each rank still holds its own.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from nndiag.capture.layers import (
    RELU_FAMILY,
    SATURATING,
    hardtanh_bounds,
    is_measured_module,
    is_weight_name,
    layer_kind,
    module_activation,
)
from nndiag.capture.probe import ROOT_NAME, _owners
from nndiag.errors import UsageError
from nndiag.runlog import RunWriter
from nndiag.specs import primary_output
from nndiag.stats.activations import activation_sums, alive_units


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _SiteAccumulator:
    """One call site's per-micro-batch sums during a sampled step."""

    def __init__(self, name: str, kind: str, activation: str | None) -> None:
        self.name, self.kind, self.activation = name, kind, activation
        self.vectors: list[torch.Tensor] = []
        self.numels: list[int] = []
        self.alive: torch.Tensor | None = None


class Monitor:
    """Records per-layer diagnostics of a training loop into a run log.

    Args:
        model: The model being trained.
        optimizer: Its optimizer (for learning rates and update ratios); optional.
        every: Sample every ``every``-th step (the first step is always sampled).
        log_dir: The run directory to write (one per run); ``None`` keeps records in memory
            only (``monitor.samples``).
        activations: Record activation statistics (forward hooks) on sampled steps.
        update_sample: Most elements per weight tensor the update ratio is measured on: a
            bigger tensor is measured on every k-th element (a fixed strided subset, the
            same before and after the step). ``0`` measures every element.

    Raises:
        UsageError: ``every`` below 1, a ``model`` that is not an ``nn.Module``, or a
            ``log_dir`` that already holds a run.

    Example:
        >>> with Monitor(model, optimizer, every=50, log_dir="runs/a") as monitor:  # doctest: +SKIP
        ...     for x, y in loader:
        ...         loss = step(x, y)
        ...         monitor.step(loss)
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 every: int = 50, log_dir: str | Path | None = None,
                 activations: bool = True, update_sample: int = 1 << 16) -> None:
        if not isinstance(model, nn.Module):
            raise UsageError(f"Monitor needs an nn.Module, got {type(model).__name__}")
        if every < 1:
            raise UsageError(f"every must be at least 1, got {every}")
        self.model, self.optimizer, self.every = model, optimizer, every
        self.activations = activations
        self.rank, self.world_size = _distributed()

        self._names: dict[int, tuple[str, str, str | None]] = {}
        for name, module in model.named_modules():
            if id(module) not in self._names and is_measured_module(module):
                self._names[id(module)] = (name or ROOT_NAME, layer_kind(module),
                                           module_activation(module))
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        groups = []
        for owner in _owners(model):
            weights = [p for n, p in owner.params if p.requires_grad and is_weight_name(n)]
            weights = weights or [p for _, p in owner.params if p.requires_grad]
            if weights:
                groups.append((owner.name, layer_kind(owner.module), weights))
        self.weight_layers = [(name, kind) for name, kind, _ in groups]
        self._weights = [p for _, _, ws in groups for p in ws]
        self._weight_layer_index = torch.tensor(
            [i for i, (_, _, ws) in enumerate(groups) for _ in ws], dtype=torch.long)
        # Where each weight sits among the trainable parameters (whose gradients are read).
        trainable_index = {id(p): i for i, p in enumerate(self._trainable)}
        self._weight_positions = torch.tensor([trainable_index[id(p)] for p in self._weights],
                                              dtype=torch.long)

        self.step_count = 0
        self.samples: list[dict[str, Any]] = []
        self._pending_losses: list[Any] = []
        self._pending_lrs: list[float | None] = []
        self._pending_first = 0
        self._sites: dict[str, _SiteAccumulator] = {}
        self._calls: Counter[str] = Counter()
        self._forward_handles: list[RemovableHandle] = []
        self._grad_handles: list[RemovableHandle] = []
        self._grad_queued = False
        self._grad_sq: torch.Tensor | None = None
        self._before: list[torch.Tensor] | None = None
        self._before_norms: torch.Tensor | None = None
        self._update_strides = [max(1, math.ceil(p.numel() / update_sample))
                                if update_sample else 1 for p in self._weights]
        # Scales a strided subset's norm to the whole tensor's (1 for tensors read whole).
        self._norm_scale = torch.tensor(
            [math.sqrt(p.numel() / len(range(0, p.numel(), s))) if p.numel() else 1.0
             for p, s in zip(self._weights, self._update_strides, strict=True)])
        self._after_norms: torch.Tensor | None = None
        self._update: tuple[torch.Tensor, torch.Tensor] | None = None
        self._optimizer_handles: list[RemovableHandle] = []
        self._sampling = False
        self.closed = False
        # Under DDP the averaged gradient exists only once DDP's reducer has finished, after
        # the end of backward: read it at the optimizer step instead.
        self._reads_grads_at_step = self.world_size > 1 and optimizer is not None

        self._writer: RunWriter | None = None
        if log_dir is not None and self.rank == 0:
            self._writer = RunWriter(log_dir, {
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "model": type(model).__name__,
                "optimizer": type(optimizer).__name__ if optimizer is not None else None,
                "every": every, "world_size": self.world_size,
                "weight_layers": [{"name": n, "kind": k} for n, k in self.weight_layers],
                "trainable_parameters": sum(p.numel() for p in self._trainable),
            })
        if optimizer is not None:
            self._optimizer_handles = [optimizer.register_step_pre_hook(self._before_step),
                                       optimizer.register_step_post_hook(self._after_step)]
        self._prepare(0)

    # ------------------------------------------------------------------ hooks

    def _prepare(self, step: int) -> None:
        sampled = step % self.every == 0
        if sampled and not self._sampling:
            if self.activations:
                self._forward_handles = [m.register_forward_hook(self._on_forward)
                                         for m in self.model.modules() if id(m) in self._names]
            self._grad_handles = [p.register_post_accumulate_grad_hook(self._on_grad)
                                  for p in self._trainable]
        elif not sampled and self._sampling:
            self._detach_sampling_hooks()
        self._sampling = sampled
        self._sites, self._grad_sq, self._update, self._after_norms = {}, None, None, None
        self._calls.clear()

    def _detach_sampling_hooks(self) -> None:
        for handle in self._forward_handles + self._grad_handles:
            handle.remove()
        self._forward_handles, self._grad_handles = [], []

    def _on_forward(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        name, kind, activation = self._names[id(module)]
        tensor = primary_output(output)
        if tensor is None or not tensor.is_floating_point() or tensor.numel() == 0:
            return
        count = self._calls[name]
        self._calls[name] += 1
        site_name = name if count == 0 else f"{name}#{count + 1}"
        site = self._sites.get(site_name)
        if site is None:
            site = self._sites[site_name] = _SiteAccumulator(site_name, kind, activation)
        pre = args[0] if args and isinstance(args[0], torch.Tensor) else None
        saturating = activation if activation in SATURATING else None
        bounds = hardtanh_bounds(activation, module) if saturating else (-1.0, 1.0)
        with torch.no_grad():
            site.vectors.append(activation_sums(tensor, saturating,
                                                pre if saturating and pre is not tensor
                                                else None, bounds))
            site.numels.append(tensor.numel())
            if activation in RELU_FAMILY:
                alive = alive_units(tensor)
                if site.alive is None or site.alive.shape != alive.shape:
                    site.alive = alive
                else:
                    site.alive |= alive

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
            grads = [p.grad if p.grad is not None else torch.zeros((), device=p.device)
                     for p in self._trainable]
            self._grad_sq = torch.stack(torch._foreach_norm(grads)).float().square() \
                if grads else None

    def _update_views(self) -> list[torch.Tensor]:
        """The weight elements the update ratio is measured on (a strided subset of big ones)."""
        return [p.detach().reshape(-1)[::stride]
                for p, stride in zip(self._weights, self._update_strides, strict=True)]

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._sampling and self._reads_grads_at_step:
            self._read_grads()
        if self._sampling and self._weights:
            with torch.no_grad():
                views = self._update_views()
                self._before_norms = torch.stack(torch._foreach_norm(views)).float()
                if self._before is None:
                    self._before = [v.clone() for v in views]
                else:
                    torch._foreach_copy_(self._before, views)

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._before is None or not self._sampling:
            return
        with torch.no_grad():
            views = self._update_views()
            after = torch.stack(torch._foreach_norm(views)).float()
            self._after_norms = after * self._norm_scale.to(after.device)
            torch._foreach_sub_(self._before, views)
            self._update = (torch.stack(torch._foreach_norm(self._before)).float(),
                            self._before_norms)
        if self.every > 1:  # a copy of the weights is only kept while sampling every step
            self._before = None

    # ------------------------------------------------------------------ steps

    def step(self, loss: torch.Tensor | float) -> None:
        """Record one optimizer step (call it once per step, after ``optimizer.step()``).

        Raises:
            UsageError: The monitor was closed.
        """
        if self.closed:
            raise UsageError("Monitor.step called after close()")
        if isinstance(loss, torch.Tensor):
            self._pending_losses.append(loss.detach().reshape(-1)[0].float())
        else:
            self._pending_losses.append(float(loss))
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else None
        self._pending_lrs.append(float(lr) if lr is not None else None)
        if self._sampling:
            self._finish_sample()
        elif len(self._pending_losses) >= self.every and self.world_size == 1:
            self._flush_losses(self._loss_values())
        self.step_count += 1
        self._prepare(self.step_count)

    def _loss_tensor(self) -> torch.Tensor:
        device = next((p.device for p in self._trainable), torch.device("cpu"))
        return torch.stack([v if isinstance(v, torch.Tensor) else torch.tensor(v) for v in
                            self._pending_losses]).to(device, torch.float32)

    def _loss_values(self) -> list[float]:
        return self._loss_tensor().cpu().tolist()

    def _flush_losses(self, values: list[float]) -> None:
        if self._writer is not None:
            self._writer.write_steps(self._pending_first, values, self._pending_lrs)
        self._pending_first += len(values)
        self._pending_losses, self._pending_lrs = [], []

    def _finish_sample(self) -> None:
        """One device-to-host transfer (and, under DDP, two collectives) for the whole step."""
        sites = list(self._sites.values())
        device = next((p.device for p in self._trainable), torch.device("cpu"))
        with torch.no_grad():
            sums = self._site_sums(sites, device)
            dead = self._dead_fractions(sites, device)
            losses = self._loss_tensor()
            summable = torch.cat([losses.double(), sums.reshape(-1)])
            if self.world_size > 1:
                torch.distributed.all_reduce(summable)
                summable[: len(losses)] /= self.world_size
            if self._after_norms is not None:  # measured at the optimizer step already
                weights = self._after_norms
            elif self._weights:
                weights = torch.stack(torch._foreach_norm([p.detach() for p in self._weights]))
                weights = weights.float()
            else:
                weights = torch.zeros(0, device=device)
            pieces = [summable, dead.double(), self._per_layer(weights.square()).double()]
            grad_sq = self._grad_sq
            has_layer_grads = grad_sq is not None and bool(self._weights)
            if grad_sq is not None:
                pieces.append(grad_sq.sum().double().reshape(1))
                if has_layer_grads:
                    positions = self._weight_positions.to(grad_sq.device)
                    pieces.append(self._per_layer(grad_sq[positions]).double())
            update = self._update
            if update is not None:
                pieces += [self._per_layer(update[0].square()).double(),
                           self._per_layer(update[1].square()).double()]
            host = torch.cat([p.reshape(-1).cpu() for p in pieces]).tolist()
        self._record(sites, host, len(self._pending_losses), grad_sq is not None,
                     has_layer_grads, update is not None)

    def _per_layer(self, values: torch.Tensor) -> torch.Tensor:
        index = self._weight_layer_index.to(values.device)
        return torch.zeros(len(self.weight_layers), device=values.device,
                           dtype=values.dtype).index_add_(0, index, values)

    @staticmethod
    def _site_sums(sites: list[_SiteAccumulator], device: torch.device) -> torch.Tensor:
        """Per site, the summable [n, S1, S2, saturated count, pre S1, pre S2] (float64)."""
        if not sites:
            return torch.zeros(0, 6, dtype=torch.float64, device=device)
        counts = [len(site.vectors) for site in sites]
        v = torch.stack([vec for site in sites for vec in site.vectors]).double()
        n = torch.tensor([numel for site in sites for numel in site.numels],
                         dtype=torch.float64, device=v.device)
        shift, total, squares = v[:, 0], v[:, 1], v[:, 2]
        pre_shift, pre_total, pre_squares = v[:, 5], v[:, 6], v[:, 7]
        per_batch = torch.stack([
            n, total + n * shift, squares + 2 * shift * total + n * shift * shift, v[:, 4] * n,
            pre_total + n * pre_shift,
            pre_squares + 2 * pre_shift * pre_total + n * pre_shift * pre_shift], dim=1)
        site_index = torch.repeat_interleave(torch.arange(len(sites), device=v.device),
                                             torch.tensor(counts, device=v.device))
        return torch.zeros(len(sites), 6, dtype=torch.float64, device=v.device) \
            .index_add_(0, site_index, per_batch).to(device)

    def _dead_fractions(self, sites: list[_SiteAccumulator], device: torch.device
                        ) -> torch.Tensor:
        """Dead-unit fraction per site (NaN where not measured); DDP: a unit alive anywhere."""
        masks = [site.alive for site in sites if site.alive is not None]
        if self.world_size > 1 and masks:
            flat = torch.cat([m.float().reshape(-1) for m in masks])
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.MAX)
            masks = list(flat.split([m.numel() for m in masks]))
        fractions, it = [], iter(masks)
        for site in sites:
            if site.alive is None:
                fractions.append(torch.full((), math.nan, device=device))
            else:
                fractions.append(1.0 - next(it).float().mean().to(device))
        return torch.stack(fractions) if fractions else torch.zeros(0, device=device)

    def _record(self, sites: list[_SiteAccumulator], host: list[float], n_losses: int,
                has_grads: bool, has_layer_grads: bool, has_update: bool) -> None:
        values = iter(host)

        def take(count: int) -> list[float]:
            return [next(values) for _ in range(count)]

        losses = take(n_losses)
        sums = [take(6) for _ in sites]
        dead = [None if math.isnan(v) else v for v in take(len(sites))]
        weight_sq = take(len(self.weight_layers))
        grad_norm = math.sqrt(next(values)) if has_grads else None
        grad_layer = [math.sqrt(v) for v in take(len(self.weight_layers))] \
            if has_layer_grads else None
        update = None
        if has_update:
            deltas, before = take(len(self.weight_layers)), take(len(self.weight_layers))
            update = [math.sqrt(d) / math.sqrt(b) if b > 0 else None
                      for d, b in zip(deltas, before, strict=True)]
        means, stds, saturated, nonfinite = [], [], [], []
        for n, s1, s2, sat, _, _ in sums:
            mean = s1 / n if n else math.nan
            variance = s2 / n - mean * mean if n else math.nan
            means.append(mean)
            stds.append(math.sqrt(max(variance, 0.0)) if math.isfinite(variance) else variance)
            saturated.append(sat / n if n and sat == sat else None)
            nonfinite.append(not (math.isfinite(s1) and math.isfinite(s2)))
        record = {
            "step": self.step_count,
            "loss": losses[-1] if losses else None,
            "grad_norm": grad_norm,
            "sites": {"name": [s.name for s in sites], "kind": [s.kind for s in sites],
                      "activation": [s.activation for s in sites], "mean": means,
                      "std": stds, "dead": dead, "saturated": saturated,
                      "nonfinite": nonfinite},
            "weights": {"name": [n for n, _ in self.weight_layers],
                        "kind": [k for _, k in self.weight_layers],
                        "weight_norm": [math.sqrt(v) for v in weight_sq],
                        "grad_norm": grad_layer, "update_ratio": update},
        }
        self.samples.append(record)
        self._flush_losses(losses)
        if self._writer is not None:
            self._writer.write_sample(record)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Write what is pending and remove every hook (safe to call twice)."""
        if self.closed:
            return
        if self._pending_losses:
            values = self._loss_tensor()
            if self.world_size > 1:
                torch.distributed.all_reduce(values)
                values /= self.world_size
            self._flush_losses(values.cpu().tolist())
        self._detach_sampling_hooks()
        for handle in self._optimizer_handles:
            handle.remove()
        self._optimizer_handles = []
        if self._writer is not None:
            self._writer.close()
        self.closed = True

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
