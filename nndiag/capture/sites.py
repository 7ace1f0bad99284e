"""The measurement core: call sites, their naming and their activation statistics.

One ``SiteRecorder`` serves the probe (``nndiag inspect``, the CI gate) and ``Monitor``
(recorded training runs), so both see the same sites under the same names and reduce them with
the same statistics (``nndiag.stats.activations``):

- Two global module hooks (``register_module_forward_pre_hook`` / ``..._forward_hook``) keep
  the stack of running modules and name every call of a measured module (``act``, ``act#2``).
  Registering two global hooks costs less than hundreds of per-module ones; they ignore
  modules outside the model and do nothing unless the recorder is ``active``.
- A ``TorchFunctionMode``, entered when the model's outermost module starts and left when it
  returns (or raises), sees activations applied as functions (``F.relu`` inside ``forward``)
  and names them ``<module>/<activation>``.
- Outputs are reduced in groups of one shape (``reduce_outputs``). In ``deferred`` mode (the
  recorder's lean mode for training steps) a pass's outputs are held until the pass ends and
  reduced then, a group at a time; an output that is about to be overwritten in place (the
  input of an in-place activation module, ``relu_``, ``+=``) is reduced first. Otherwise
  (the probe) each output is reduced as it appears.
- With ``output_grads`` (the probe), a tensor hook on every output reads the backward signal
  (``||dL/d out||``) before any in-place op that follows.

Everything stays on the device; ``collect`` returns one flat tensor to move to the host with
the caller's other numbers, and ``records`` turns the host numbers into ``LayerRecord``s.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from nndiag.capture.layers import (
    FUNCTIONAL_ACTIVATIONS,
    RELU_FAMILY,
    SATURATING,
    hardtanh_bounds,
    is_measured_module,
    layer_kind,
    module_activation,
)
from nndiag.records import LayerRecord
from nndiag.specs import primary_output
from nndiag.stats.activations import (
    ABSMAX,
    MOMENT_FIELDS,
    dead_fraction,
    finish_moments,
    reduce_outputs,
    square_sum,
)

ROOT_NAME = "(model)"
# Outputs larger than this are reduced at once even in deferred mode: stacking them buys
# nothing and holding them costs memory.
_DEFER_MAX_NUMEL = 1 << 20
# Largest stack reduced at a time (elements), to bound the temporary copy.
_GROUP_MAX_NUMEL = 1 << 22
_IN_PLACE_DUNDERS = frozenset({"__iadd__", "__isub__", "__imul__", "__itruediv__",
                               "__ifloordiv__", "__imod__", "__ipow__", "__iand__", "__ior__",
                               "__ixor__", "__ilshift__", "__irshift__", "__setitem__"})

_no_torch_function = getattr(torch._C, "DisableTorchFunction", contextlib.nullcontext)
AllReduce = Callable[[torch.Tensor, str], torch.Tensor]


@dataclass(frozen=True)
class _ModuleInfo:
    name: str
    kind: str
    activation: str | None
    measured: bool
    in_place: bool


@dataclass
class _Site:
    """One call site: its identity and what its calls measured (device tensors)."""

    index: int
    name: str
    module: str
    kind: str
    activation: str | None
    functional: bool
    shape: list[int]
    alive: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)
    grad_sq: list[torch.Tensor] = field(default_factory=list)

    def add_alive(self, unit_shape: tuple[int, ...], mask: torch.Tensor) -> None:
        held = self.alive.get(unit_shape)
        self.alive[unit_shape] = mask if held is None else held | mask

    def add_grad(self, grad: torch.Tensor) -> None:
        with _no_torch_function():
            self.grad_sq.append(square_sum(grad))


@dataclass
class _Pending:
    site: _Site
    output: torch.Tensor
    pre: torch.Tensor | None
    saturation: str | None
    bounds: tuple[float, float]
    version: int
    pre_version: int


class SiteRecorder:
    """Names and measures every call of a model's measured modules and functional activations.

    Args:
        model: The model to measure.
        output_grads: Also read the gradient reaching every output (the probe).
        deferred: Hold a pass's outputs and reduce them in groups when the pass ends (lean
            mode for training steps); otherwise reduce each output at once.

    Use ``attach()`` / ``detach()`` around the passes (``detach`` in a ``finally``), set
    ``active`` while a pass should be measured, then ``collect()`` once.
    """

    def __init__(self, model: nn.Module, *, output_grads: bool = False,
                 deferred: bool = False) -> None:
        self.model = model
        self.output_grads = output_grads
        self.deferred = deferred
        self.info: dict[int, _ModuleInfo] = {}
        self.modules: dict[str, nn.Module] = {}
        for name, module in model.named_modules():
            if id(module) not in self.info:
                info = _ModuleInfo(name or ROOT_NAME, layer_kind(module),
                                   module_activation(module), is_measured_module(module),
                                   bool(getattr(module, "inplace", False)))
                self.info[id(module)] = info
                self.modules[info.name] = module
        self.stack: list[str] = []
        self.inside_activation = 0
        self.calls: Counter[str] = Counter()
        self.sites: dict[str, _Site] = {}
        self.active = False
        self._handles: list[RemovableHandle] = []
        self._mode = _FunctionalActivations(self)
        self._mode_entered = False
        self._pending: dict[int, list[_Pending]] = {}
        self._moments: list[tuple[torch.Tensor, list[int]]] = []
        self._unreadable: set[str] = set()
        # The innermost module a forward pass raised in (hooks run while it propagates).
        self.failed_in: str | None = None
        self._failure: int | None = None

    # ------------------------------------------------------------------ lifetime

    def attach(self) -> None:
        """Register the two global hooks (idempotent)."""
        if not self._handles:
            self._handles = [register_module_forward_pre_hook(self._pre_hook),
                             register_module_forward_hook(self._post_hook, always_call=True)]

    def detach(self) -> None:
        """Remove the hooks and leave the functional-activation mode if a pass was cut short."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._leave_mode()
        self.stack.clear()
        self.inside_activation = 0

    @property
    def attached(self) -> bool:
        """True while the hooks are registered."""
        return bool(self._handles)

    def reset(self) -> None:
        """Forget every site (a new training step): names restart at the first call."""
        self.sites = {}
        self.calls.clear()
        self._pending = {}
        self._moments = []

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """Measure the passes run inside the block (hooks attached, recorder active)."""
        self.attach()
        self.active = True
        try:
            yield
        finally:
            self.active = False
            self.detach()

    # ------------------------------------------------------------------ hooks

    def _enter_mode(self) -> None:
        if not self._mode_entered:
            self._mode.__enter__()
            self._mode_entered = True

    def _leave_mode(self) -> None:
        if self._mode_entered:
            self._mode_entered = False
            self._mode.__exit__(None, None, None)

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        info = self.info.get(id(module))
        if info is None or not self.active:
            return
        if not self.stack:  # the outermost call of a pass
            self.calls.clear()
            self.inside_activation = 0
            self.failed_in = None
            self._enter_mode()
        self.stack.append(info.name)
        if info.activation is not None:
            self.inside_activation += 1
        if info.in_place and self._pending and args and isinstance(args[0], torch.Tensor):
            self._reduce_now(args[0])

    def _post_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        info = self.info.get(id(module))
        if info is None or not self.stack:
            return
        self.stack.pop()
        failure = sys.exc_info()[1]
        if failure is not None and id(failure) != self._failure:
            self._failure, self.failed_in = id(failure), info.name
        if info.activation is not None:
            self.inside_activation -= 1
        if info.measured and self.active:
            tensor = primary_output(output)
            if tensor is not None and tensor.is_floating_point():
                pre = args[0] if args and isinstance(args[0], torch.Tensor) else None
                activation = info.activation
                bounds = (hardtanh_bounds(activation, module) if activation in SATURATING
                          else (-1.0, 1.0))
                self.record(info.name, info.name, info.kind, activation, False, tensor,
                            None if pre is tensor else pre, bounds)
        if not self.stack:  # the pass ended (or raised)
            self._leave_mode()
            self.flush()

    def before_in_place(self, tensor: Any) -> None:
        """Reduce a held output before an in-place op overwrites it."""
        if self._pending and isinstance(tensor, torch.Tensor):
            self._reduce_now(tensor)

    # ------------------------------------------------------------------ measuring

    def record(self, name: str, module_name: str, kind: str, activation: str | None,
               functional: bool, tensor: torch.Tensor, pre: torch.Tensor | None,
               bounds: tuple[float, float]) -> None:
        """Measure one output of a site (the hooks and the functional mode call this)."""
        if tensor.numel() == 0:
            return
        with _no_torch_function():
            count = self.calls[name]
            self.calls[name] += 1
            site_name = name if count == 0 else f"{name}#{count + 1}"
            site = self.sites.get(site_name)
            if site is None:
                site = _Site(len(self.sites), site_name, module_name, kind, activation,
                             functional, list(tensor.shape))
                self.sites[site_name] = site
            saturation = activation if activation in SATURATING else None
            pre = pre if saturation else None
            deferred = (self.deferred and tensor.numel() <= _DEFER_MAX_NUMEL
                        and site_name not in self._unreadable and not tensor.is_inference()
                        and (pre is None or not pre.is_inference()))
            if deferred:
                pending = _Pending(site, tensor, pre, saturation, bounds, tensor._version,
                                   pre._version if pre is not None else 0)
                self._pending.setdefault(id(tensor), []).append(pending)
            else:
                self._reduce([_Pending(site, tensor, pre, saturation, bounds, 0, 0)])
            if self.output_grads and tensor.requires_grad:
                tensor.register_hook(site.add_grad)

    def _reduce_now(self, tensor: torch.Tensor) -> None:
        pending = self._pending.pop(id(tensor), None)
        if pending is not None:
            with _no_torch_function():
                for item in pending:
                    self._reduce([item])

    def flush(self) -> None:
        """Reduce every held output, a group of one shape at a time."""
        if not self._pending:
            return
        held = [item for items in self._pending.values() for item in items]
        self._pending = {}
        groups: dict[tuple[Any, ...], list[_Pending]] = {}
        for item in held:
            if item.output._version != item.version:
                # Overwritten in place by an op the recorder did not see: its numbers are
                # gone. Reduce this site at once from now on.
                self._unreadable.add(item.site.name)
                continue
            if item.pre is not None and item.pre._version != item.pre_version:
                item.pre = None
            out = item.output
            key = (tuple(out.shape), out.dtype, out.device, item.saturation, item.bounds,
                   item.pre is not None and item.pre.shape == out.shape,
                   item.site.activation in RELU_FAMILY)
            groups.setdefault(key, []).append(item)
        with _no_torch_function():
            for items in groups.values():
                size = max(1, _GROUP_MAX_NUMEL // max(1, items[0].output.numel()))
                for start in range(0, len(items), size):
                    self._reduce(items[start: start + size])

    def _reduce(self, items: Sequence[_Pending]) -> None:
        first = items[0]
        pres = None
        if first.pre is not None and all(i.pre is not None and i.pre.shape == i.output.shape
                                         for i in items):
            pres = [i.pre for i in items]  # type: ignore[misc]
        relu = first.site.activation in RELU_FAMILY
        moments, alive = reduce_outputs([i.output for i in items], saturation=first.saturation,
                                        bounds=first.bounds, pre_activations=pres,
                                        unit_mask=relu)
        self._moments.append((moments, [i.site.index for i in items]))
        if alive is not None:
            for row, item in zip(alive, items, strict=True):
                item.site.add_alive(tuple(item.output.shape[1:]), row)

    # ------------------------------------------------------------------ results

    def collect(self, all_reduce: AllReduce | None = None) -> torch.Tensor:
        """Pool every site's measurements into one flat float64 device tensor.

        Args:
            all_reduce: Under ``torch.distributed``, ``f(tensor, op)`` with ``op`` ``"sum"`` or
                ``"max"``, reducing over ranks (moments are summed, fired-unit masks OR-ed).

        Returns:
            Per site, in order: the pooled moments, the dead fraction (NaN when not a ReLU),
            and the gradient reaching the output's mean square (NaN without ``output_grads``).
        """
        self.flush()
        sites = list(self.sites.values())
        device = next((m.device for m, _ in self._moments), torch.device("cpu"))
        count = len(sites)
        pooled = torch.zeros(count, len(MOMENT_FIELDS), dtype=torch.float64, device=device)
        if self._moments:
            rows = torch.cat([m for m, _ in self._moments])
            index = torch.tensor([i for _, idx in self._moments for i in idx], device=device)
            summed = pooled.index_add(0, index, rows)
            absmax = torch.full((count,), -math.inf, dtype=torch.float64, device=device) \
                .scatter_reduce(0, index, rows[:, ABSMAX], "amax")
            pooled = torch.cat([summed[:, :ABSMAX], absmax.unsqueeze(1),
                                summed[:, ABSMAX + 1:]], dim=1)
        masks = [(site.index, mask) for site in sites for mask in site.alive.values()]
        if all_reduce is not None and count:
            # Two collectives: moments summed; largest values and fired units (as 0/1) maxed.
            absmax = pooled[:, ABSMAX].clone()
            pooled = all_reduce(pooled, "sum")
            maxed = all_reduce(torch.cat([absmax] + [m.double().reshape(-1) for _, m in masks]),
                               "max")
            pooled[:, ABSMAX] = maxed[:count]
            parts = maxed[count:].split([m.numel() for _, m in masks])
            masks = [(i, part > 0) for (i, _), part in zip(masks, parts, strict=True)]
        dead = self._dead_fractions(masks, count, device)
        grads = torch.full((count,), math.nan, dtype=torch.float64, device=device)
        for site in sites:
            if site.grad_sq:
                grads[site.index] = torch.stack(site.grad_sq).double().mean()
        return torch.cat([pooled, dead.unsqueeze(1), grads.unsqueeze(1)], dim=1).reshape(-1)

    @staticmethod
    def _dead_fractions(masks: list[tuple[int, torch.Tensor]], count: int,
                        device: torch.device) -> torch.Tensor:
        """Per site, the smallest dead fraction over its unit shapes (NaN: not a ReLU)."""
        dead = torch.full((count,), math.nan, dtype=torch.float64, device=device)
        if not masks:
            return dead
        by_units: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for index, mask in masks:
            by_units.setdefault(mask.numel(), []).append((index, mask))
        for entries in by_units.values():
            if len(entries) == 1:
                fractions = dead_fraction(entries[0][1]).reshape(1).double()
            else:
                fractions = 1.0 - torch.stack([m for _, m in entries]).float().mean(1).double()
            index = torch.tensor([i for i, _ in entries], device=device)
            held = dead.index_select(0, index)
            dead = dead.index_copy(0, index, torch.fmin(held, fractions.to(device)))
        return dead

    @property
    def width(self) -> int:
        """Numbers per site in ``collect``'s result."""
        return len(MOMENT_FIELDS) + 2

    def records(self, values: Sequence[float]) -> list[LayerRecord]:
        """Turn ``collect``'s numbers (on the host, in order) into one record per site."""
        width = self.width
        layers = []
        for site in self.sites.values():
            row = values[site.index * width: (site.index + 1) * width]
            stats = finish_moments(row[: len(MOMENT_FIELDS)]) if row[0] else {}
            dead, grad_sq = row[-2], row[-1]
            layers.append(LayerRecord(
                name=site.name, module=site.module, kind=site.kind, index=site.index,
                activation=site.activation, functional=site.functional, shape=site.shape,
                dead_fraction=None if dead != dead else dead,
                grad_out_norm=math.sqrt(grad_sq) if grad_sq == grad_sq else None,
                **stats))
        return layers


class _FunctionalActivations(TorchFunctionMode):
    """Sees activation functions applied outside activation modules (``F.relu`` in forward).

    It also sees in-place ops, so that a held output is reduced before it is overwritten.
    """

    def __init__(self, recorder: SiteRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func: Callable[..., Any], types: Any,
                           args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        recorder = self.recorder
        if not recorder.active:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        in_place = name.endswith("_") and not name.endswith("__") or \
            name in _IN_PLACE_DUNDERS or bool(kwargs.get("inplace"))
        if in_place and args:
            recorder.before_in_place(args[0])
        activation = FUNCTIONAL_ACTIVATIONS.get(func)
        if activation is None or recorder.inside_activation:
            return func(*args, **kwargs)
        source = args[0] if args else kwargs.get("input")
        pre = source if isinstance(source, torch.Tensor) and not in_place else None
        output = func(*args, **kwargs)
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            bounds = hardtanh_bounds(activation, None, tuple(args), kwargs)
            parent = recorder.stack[-1] if recorder.stack else ROOT_NAME
            site = activation if parent == ROOT_NAME else f"{parent}/{activation}"
            recorder.record(site, parent, f"{activation}()", activation, True, output,
                            pre if output is not pre else None, bounds)
        return output
