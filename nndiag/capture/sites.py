"""The measurement core: call sites, their naming and their activation statistics.

One ``SiteRecorder`` serves the probe (``nndiag inspect``, the CI gate) and ``Monitor``
(recorded training runs), so both see the same sites under the same names and reduce them with
the same statistics (``nndiag.stats.activations``):

- Two global module hooks (``register_module_forward_pre_hook`` / ``..._forward_hook``) keep
  the stack of running modules and name every call of a measured module (``act``, ``act#2``).
  Registering two global hooks costs less than hundreds of per-module ones; they ignore
  modules outside the model and do nothing unless the recorder is ``active``. A model run by
  ``torch.compile`` gets per-module hooks instead, registered for good and gated by
  ``active`` (``_compiled_hooks``), and no functional-activation mode.
- A ``TorchFunctionMode``, entered when the model's outermost module starts and left when it
  returns (or raises), sees activations applied as functions (``F.relu`` inside ``forward``)
  and names them ``<module>/<activation>``.
- Each output is reduced the moment it appears, to a few device scalars: it is still in the
  cache then, and an in-place op that follows (``nn.ReLU(inplace=True)``, ``+=``) cannot
  change what was measured. (Holding outputs to reduce them stacked at the end of the pass was
  measured slower on CPU: the stack is a large temporary, and the outputs are cold by then.)
  ``exact`` mode (the probe) shifts the sums and reads the largest value; the lean mode
  (``Monitor``) does not, and measures a plain module output on a short path
  (``_record_lean``: a ReLU-family output's column sums stand for both its sum and its
  fired units).
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
import torch.nn.functional as F
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
    is_pass_through,
    layer_kind,
    module_activation,
    module_role,
    module_unit_layout,
)
from nndiag.records import LayerRecord
from nndiag.records.layers import (
    ROLE_ATTENTION,
    ROLE_HEAD,
    ROLE_KEY,
    ROLE_NORM,
    ROLE_QUERY,
    ROLE_VALUE,
)
from nndiag.records.params import DataFlow
from nndiag.specs import primary_output
from nndiag.stats.activations import (
    CALL_FIELDS,
    dead_fractions,
    finish_moments,
    mean_std,
    output_moments,
    pool_calls,
    pool_sums,
    square_sum,
    unit_peaks,
    unit_sums,
)

ROOT_NAME = "(model)"
_CALL_WIDTH = len(CALL_FIELDS)

_no_torch_function = getattr(torch._C, "DisableTorchFunction", contextlib.nullcontext)


@dataclass(frozen=True)
class _ModuleInfo:
    name: str
    kind: str
    activation: str | None
    measured: bool
    role: str | None
    pass_through: bool
    unit_layout: str | None  # where its output's units lie (``module_unit_layout``)


@dataclass
class _Site:
    """One call site: its identity and the gradients its calls received (device tensors)."""

    index: int
    name: str
    module: str
    kind: str
    activation: str | None
    functional: bool
    shape: list[int]
    grad_sq: list[torch.Tensor] = field(default_factory=list)

    def add_grad(self, grad: torch.Tensor) -> None:
        with _no_torch_function():
            self.grad_sq.append(square_sum(grad))


class SiteRecorder:
    """Names and measures every call of a model's measured modules and functional activations.

    Args:
        model: The model to measure.
        output_grads: Also read the gradient reaching every output (the probe).
        exact: Shifted sums and the largest value of every output (the probe); ``False`` is
            the lean mode of recorded training steps.

    Use ``measuring()`` (or ``attach()`` / ``detach()`` and ``active``) around the passes,
    then ``collect()`` once and ``records()`` on the host numbers; ``reset()`` starts over.
    """

    def __init__(self, model: nn.Module, *, output_grads: bool = False,
                 exact: bool = True, compiled: bool = False) -> None:
        self.model = model
        self.compiled = compiled
        self.output_grads = output_grads
        self.exact = exact
        # The lean mode's short path for plain module outputs (``_record_lean``).
        self._lean = not exact and not output_grads
        self.info: dict[int, _ModuleInfo] = {}
        self.modules: dict[str, nn.Module] = {}
        for name, module in model.named_modules():
            if id(module) not in self.info:
                info = _ModuleInfo(name or ROOT_NAME, layer_kind(module),
                                   module_activation(module), is_measured_module(module),
                                   module_role(name, module), is_pass_through(module),
                                   module_unit_layout(module))
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
        # Where passes watch for functional activations: everywhere (``watch_all``), or only
        # inside the modules whose own forward applied one before (``functional_parents``).
        # The mode costs a Python call per torch function it sees.
        self.watch_all = True
        self.functional_parents: set[str] = set()
        # Every call's scalars, where each goes (call * len(CALL_FIELDS) + field), element
        # counts and site: stacked once in ``collect``, not per call.
        self._scalars: list[torch.Tensor] = []
        self._positions: list[int] = []
        self._numels: list[tuple[int, int]] = []
        self._call_sites: list[int] = []
        # Every call was reduced to its sum and sum of squares alone (``pool_sums``).
        self._sums_only = not exact
        # Per ReLU-family call: its unit peaks and site.
        self._peaks: list[tuple[torch.Tensor, int]] = []
        # Lean ReLU-family calls: (index in ``_scalars``, column sums standing in for the sum).
        self._column_sums: list[tuple[int, torch.Tensor]] = []
        # Column sums stacked per unit count, by the ids of their rows (``_filled_scalars``).
        self._stacked: dict[tuple[int, ...], torch.Tensor] = {}
        # Which site each dead fraction and output gradient ``collect`` returned belongs to.
        self._dead_sites: list[int] = []
        self._grad_sites: list[int] = []
        # Roles seen in the data flow (module name -> role), kept across steps: which output
        # fed scaled_dot_product_attention as query, key or value, which one is the model's
        # output. ``_storages`` maps an output's storage to its module while a pass runs, and
        # holds the output itself until the pass ends: a freed output's memory can be reused
        # by a later tensor (``repeat_kv``'s copy of the keys), which must not inherit its
        # module.
        # The model's input, measured once when asked (``Monitor``'s run start).
        self.measure_input = False
        self.input_moments: torch.Tensor | None = None
        self.learned_roles: dict[str, str] = {}
        self._storages: dict[int, tuple[str, torch.Tensor]] = {}
        # The data flow seen on watched passes, kept across steps: module -> the modules that
        # took its output as input (``data_flow`` reads which outputs are normalized).
        self.consumers: dict[str, set[str]] = {}
        self._flow: DataFlow | None = None  # ``data_flow()``, until ``consumers`` changes
        # Per ReLU-family site, where its units lie, learned from the producer of its input
        # on watched passes and kept across steps (``_unit_layout``).
        self._site_layouts: dict[str, str | None] = {}
        # The innermost module a forward pass raised in (hooks run while it propagates).
        self.failed_in: str | None = None
        self._failure: int | None = None

    # ------------------------------------------------------------------ lifetime

    def attach(self) -> None:
        """Register the two global hooks (idempotent)."""
        if self._handles:
            return
        if not self.compiled:
            self._handles = [register_module_forward_pre_hook(self._pre_hook),
                             register_module_forward_hook(self._post_hook, always_call=True)]
            return
        pre_hook, post_hook = _compiled_hooks(self)
        for module in {id(m): m for m in self.modules.values()}.values():
            self._handles += [module.register_forward_pre_hook(pre_hook),
                              module.register_forward_hook(post_hook, always_call=True)]

    def detach(self) -> None:
        """Remove the hooks and leave the functional-activation mode if a pass was cut short."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._leave_mode()
        self.stack.clear()
        self.inside_activation = 0

    def reset(self) -> None:
        """Forget every site and measurement (a new training step)."""
        self.sites = {}
        self.calls.clear()
        self._scalars, self._positions, self._numels, self._call_sites = [], [], [], []
        self._sums_only = not self.exact
        self._peaks = []
        self._column_sums = []
        self._stacked = {}
        self._storages = {}

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

    def _watch(self, on: bool) -> None:
        if on:
            self._enter_mode()
        else:
            self._leave_mode()

    def _enter_mode(self) -> None:
        if not self._mode_entered and not self.compiled:
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
            if self.measure_input and self.input_moments is None:
                self._measure_input(args)
            if self.watch_all:
                self._enter_mode()
        self.stack.append(info.name)
        if self.watch_all and args and isinstance(args[0], torch.Tensor):
            producer = self.producer(args[0])
            if producer is not None and producer != info.name:
                consumers = self.consumers.setdefault(producer, set())
                if info.name not in consumers:
                    consumers.add(info.name)
                    self._flow = None
        if not self.watch_all and (self._mode_entered or self.functional_parents):
            self._watch(info.name in self.functional_parents)
        if info.activation is not None:
            self.inside_activation += 1

    def _measure_input(self, args: tuple[Any, ...]) -> None:
        """Sum, sum of squares and count of the pass's floating-point input (device scalars)."""
        source = args[0] if args else None
        if not isinstance(source, torch.Tensor) or not source.is_floating_point() or \
                not source.numel():
            return
        with _no_torch_function():
            flat = source.detach().reshape(-1).float()
            self.input_moments = torch.stack([flat.sum(), torch.dot(flat, flat),
                                              torch.full((), float(flat.numel()),
                                                         device=flat.device)])

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
        if info.pass_through and self.watch_all and args and isinstance(args[0], torch.Tensor) \
                and isinstance(output, torch.Tensor):  # dropout & co. carry their producer
            producer = self.producer(args[0])
            if producer is not None:
                self._storages[storage_id(output)] = (producer, output)
        elif self.watch_all and not info.measured and info.unit_layout is not None \
                and type(output) is torch.Tensor:  # a pooling: where the units lie
            self._storages[storage_id(output)] = (info.name, output)
        if info.measured and self.active:
            if self._lean and not self._mode_entered and type(output) is torch.Tensor and \
                    info.activation not in SATURATING and not self.watch_all:
                self._record_lean(info, output)
            else:
                self._record_output(module, info, args, output)
        if not self.stack:  # the pass ended (or raised)
            if self.watch_all:
                self._learn_head(output)
            self._storages = {}
            self._leave_mode()
        elif not self.watch_all and (self._mode_entered or self.functional_parents):
            self._watch(self.stack[-1] in self.functional_parents)

    def _record_output(self, module: nn.Module, info: _ModuleInfo, args: tuple[Any, ...],
                       output: Any) -> None:
        """Measure a module's output (``record``)."""
        with _no_torch_function():
            tensor = primary_output(output)
            if tensor is not None and tensor.is_floating_point():
                pre = args[0] if args and isinstance(args[0], torch.Tensor) else None
                activation = info.activation
                bounds = (hardtanh_bounds(activation, module) if activation in SATURATING
                          else (-1.0, 1.0))
                self.record(info.name, info.name, info.kind, activation, False, tensor,
                            None if pre is tensor else pre, bounds, source=pre)

    def _record_lean(self, info: _ModuleInfo, tensor: torch.Tensor) -> None:
        """``record`` of a module's plain tensor output in the lean mode, on its short path.

        What a recorded training step measures on nearly every site (no saturation, no
        functional-activation mode, no data flow to learn): the sum and the sum of squares,
        and for the ReLU family the per-unit sums (``unit_sums``: never negative, a unit fired when
        its sum is above zero). The same numbers ``record`` takes, with a
        fraction of its Python work (it runs once per layer per sampled step).
        """
        numel = tensor.numel()
        if not numel or not tensor.is_floating_point():
            return
        name = info.name
        count = self.calls.get(name, 0)
        self.calls[name] = count + 1
        site_name = name if not count else f"{name}#{count + 1}"
        site = self.sites.get(site_name)
        if site is None:
            site = self.sites[site_name] = _Site(len(self.sites), site_name, name, info.kind,
                                                 info.activation, False, list(tensor.shape))
        values = tensor.detach()
        flat = values.reshape(-1)
        if flat.dtype != torch.float32:
            flat = flat.float()
        base = len(self._call_sites) * _CALL_WIDTH
        if info.activation in RELU_FAMILY and values.dim():
            # Never negative: a unit fired in the batch exactly when its sum over the batch is
            # above zero, and the column sums add up to the call's sum (in ``_filled_scalars``).
            columns = unit_sums(values, self._site_layouts.get(site_name))
            self._column_sums.append((len(self._scalars), columns))
            self._scalars += (columns, torch.dot(flat, flat))
            self._peaks.append((columns, site.index))
        else:
            self._scalars += (flat.sum(), torch.dot(flat, flat))
            if info.activation in RELU_FAMILY:
                self._peaks.append((unit_peaks(values, self._site_layouts.get(site_name)),
                                    site.index))
        self._positions += (base, base + 1)
        self._numels.append((numel, 0))
        self._call_sites.append(site.index)

    # ------------------------------------------------------------------ measuring

    def record(self, name: str, module_name: str, kind: str, activation: str | None,
               functional: bool, tensor: torch.Tensor, pre: torch.Tensor | None,
               bounds: tuple[float, float], source: Any = None) -> None:
        """Measure one output of a site (the hooks and the functional mode call this).

        ``source`` is the tensor the activation was applied to (where a ReLU's units lie
        follows from the module that made it).
        """
        numel = tensor.numel()
        if numel == 0:
            return
        with _no_torch_function():
            count = self.calls[name]
            self.calls[name] = count + 1
            site_name = name if count == 0 else f"{name}#{count + 1}"
            site = self.sites.get(site_name)
            if site is None:
                site = _Site(len(self.sites), site_name, module_name, kind, activation,
                             functional, list(tensor.shape))
                self.sites[site_name] = site
                if functional:
                    self.functional_parents.add(module_name)
            saturation = activation if activation in SATURATING else None
            pre = pre if saturation is not None and pre is not None and pre.numel() else None
            base = len(self._call_sites) * len(CALL_FIELDS)
            moments = output_moments(tensor, saturation=saturation, bounds=bounds,
                                     pre_activation=pre, exact=self.exact)
            self._scalars += [value for _, value in moments]
            self._positions += [base + field_index for field_index, _ in moments]
            if len(moments) != 2:
                self._sums_only = False
            self._numels.append((numel, pre.numel() if pre is not None else 0))
            self._call_sites.append(site.index)
            if activation in RELU_FAMILY:
                self._peaks.append((unit_peaks(tensor, self._unit_layout(site_name, source)),
                                    site.index))
            if not functional and self.watch_all:  # the data flow is learned on watched passes
                if activation in RELU_FAMILY:  # in place, the output is its producer's
                    self._storages.setdefault(storage_id(tensor), (module_name, tensor))
                else:
                    self._storages[storage_id(tensor)] = (module_name, tensor)
            if self.output_grads and tensor.requires_grad:
                tensor.register_hook(site.add_grad)

    def _learn_head(self, output: Any) -> None:
        """The module whose output is the model's output is its head (if it has weights)."""
        with _no_torch_function():
            tensor = primary_output(output)
            module = self.producer(tensor) if tensor is not None else None
        if module is None or module in self.learned_roles:
            return
        info = self.info_by_name(module)
        if info.measured and info.role is None and info.activation is None:
            self.learned_roles[module] = ROLE_HEAD

    def learn_attention(self, query: Any, key: Any, value: Any) -> None:
        """Mark the layers whose outputs feed an attention product as query, key and value.

        One layer feeding several of them (a fused ``qkv`` projection) is fused attention.
        """
        found: dict[str, list[str]] = {}
        with _no_torch_function():
            for tensor, role in ((query, ROLE_QUERY), (key, ROLE_KEY), (value, ROLE_VALUE)):
                if isinstance(tensor, torch.Tensor):
                    module = self.producer(tensor)
                    if module is not None:
                        found.setdefault(module, []).append(role)
        for module, roles in found.items():
            self.learned_roles[module] = roles[0] if len(roles) == 1 else ROLE_ATTENTION

    def _unit_layout(self, site_name: str, source: Any) -> str | None:
        """Where the units of a ReLU-family site's output lie (``None``: by its shape).

        On a watched pass, from the module that made ``source`` (``module_unit_layout``), when
        ``source`` is that module's output itself: a view with its dimensions moved
        (a transpose, an unflatten) keeps the shape rule. Remembered per site, for the passes
        that do not watch. A ``Conv1d``'s ``(N, C, L)`` through a ReLU has a unit per channel,
        as a ``Conv2d``'s feature map does; a ``Linear``'s ``(N, T, D)`` a unit per feature.
        """
        if not self.watch_all:
            return self._site_layouts.get(site_name)
        layout = None
        if isinstance(source, torch.Tensor):
            entry = self._storages.get(storage_id(source))
            if entry is not None and entry[1].shape == source.shape \
                    and entry[1].stride() == source.stride():
                layout = self.info_by_name(entry[0]).unit_layout
        self._site_layouts[site_name] = layout
        return layout

    def producer(self, tensor: torch.Tensor) -> str | None:
        """The module whose output ``tensor`` is (or is a view of) in the running pass."""
        entry = self._storages.get(storage_id(tensor))
        return entry[0] if entry is not None else None

    def data_flow(self) -> DataFlow:
        """Where outputs went, and which reach a normalization before any other weight layer.

        An output is normalized when a normalization layer takes it as input, directly or
        through activation modules (a ReLU is positively homogeneous; a GELU or SiLU on a
        small signal is nearly linear): the loss then does not depend on the producer's scale.
        """
        if self._flow is not None:
            return self._flow
        memo: dict[str, bool] = {}

        def normalized(name: str) -> bool:
            if name not in memo:
                memo[name] = False  # a cycle (a module fed by its own output) is not normalized
                memo[name] = any(
                    (self.info_by_name(c).role == ROLE_NORM
                     and self.info_by_name(c).kind != "LocalResponseNorm")
                    or (self.info_by_name(c).activation is not None and normalized(c))
                    for c in self.consumers.get(name, ()))
            return memo[name]

        self._flow = DataFlow({k: set(v) for k, v in self.consumers.items()},
                              {name for name in self.consumers if normalized(name)})
        return self._flow

    def info_by_name(self, name: str) -> _ModuleInfo:
        """The module facts of a module name."""
        return self.info[id(self.modules[name])]

    def role_of(self, site: _Site) -> str | None:
        """A site's role: what the data flow showed, else the module's type and name."""
        if site.functional:
            return None
        static = self.info_by_name(site.module).role
        if static == ROLE_ATTENTION:  # a fused projection stays fused, whatever fed what
            return static
        return self.learned_roles.get(site.module) or static

    # ------------------------------------------------------------------ results

    def payload(self) -> torch.Tensor:
        """What ranks sum under ``torch.distributed`` (lean mode), as one float64 tensor.

        The calls' scalars (sums and sums of squares), their element counts, and per unit of
        each ReLU-family site whether it fired (a unit is dead only if it fired on no rank).
        The caller sums it over ranks with its own numbers, in one collective, and passes the
        sum to ``collect``.

        Raises:
            ValueError: In exact mode (the probe runs on one process).
        """
        if self.exact:
            raise ValueError("only the lean mode reduces over ranks")
        if not self._call_sites:
            return torch.zeros(0, dtype=torch.float64)
        with _no_torch_function():
            scalars = torch.stack(self._filled_scalars()).double()
            counts = torch.tensor(self._numels, dtype=torch.float64, device=scalars.device)
            fired = [((p > 0) | p.isnan()).double() for _, p in self._site_peaks()]
            return torch.cat([scalars, counts.reshape(-1), *fired])

    def collect(self, summed: torch.Tensor | None = None) -> torch.Tensor:
        """Every measurement as one flat float64 device tensor (``records`` reads it back).

        Per-site pooling is done on the host, in ``records``; on the device only what must
        be: the dead fraction of each ReLU-family site (its calls' unit peaks combined, one
        reduction per unit count) and, for the probe, the gradient reaching each output.

        Args:
            summed: Under ``torch.distributed``, ``payload()`` summed over ranks (ranks must
                run the same layers).

        Returns:
            The calls' scalars, [the calls' element counts, when summed over ranks,] then the
            dead fractions of the ReLU-family sites (grouped by unit count) and the mean
            square of the gradient reaching each output that has one (``output_grads``);
            ``records`` knows which site each belongs to.
        """
        self._dead_sites, self._grad_sites = [], []
        if not self._call_sites:
            return torch.zeros(0, dtype=torch.float64)
        with _no_torch_function():
            peaks = self._site_peaks()
            if summed is None:
                pieces = [torch.stack(self._filled_scalars())]
            else:  # fired counts: a unit that fired on no rank sums to 0, "never above 0"
                head = len(self._scalars) + 2 * len(self._numels)
                pieces = [summed[:head]]
                parts = summed[head:].split([p.numel() for _, p in peaks])
                peaks = [(i, part) for (i, _), part in zip(peaks, parts, strict=True)]
            for members in _by_length(peaks).values():
                self._dead_sites += [i for i, _ in members]
                stacked = self._stacked.get(tuple(id(p) for _, p in members))
                if stacked is None:
                    stacked = torch.stack([p for _, p in members])
                pieces.append(dead_fractions(stacked))
            grads = [site for site in self.sites.values() if site.grad_sq]
            if grads:
                self._grad_sites = [site.index for site in grads]
                pieces.append(torch.stack([torch.stack(site.grad_sq).double().mean()
                                           for site in grads]))
            return torch.cat(pieces).double()  # float64 (promoted) or float32 scalars alone

    def _filled_scalars(self) -> list[torch.Tensor]:
        """The calls' scalars; lean ReLU-family calls' sums come from their column sums.

        One reduction per unit count fills them in, where each call would take a kernel.
        """
        if self._column_sums:
            groups: dict[int, list[tuple[int, torch.Tensor]]] = {}
            for position, columns in self._column_sums:
                groups.setdefault(columns.numel(), []).append((position, columns))
            for members in groups.values():
                stacked = torch.stack([columns for _, columns in members])
                # Kept for ``collect``, whose dead fractions read the same rows.
                self._stacked[tuple(id(columns) for _, columns in members)] = stacked
                sums = stacked.sum(1).unbind(0)
                for (position, _), total in zip(members, sums, strict=True):
                    self._scalars[position] = total
            self._column_sums = []
        return self._scalars

    def _site_peaks(self) -> list[tuple[int, torch.Tensor]]:
        """Unit peaks per (site, unit count): the calls of a site combined by a maximum."""
        if len({site for _, site in self._peaks}) == len(self._peaks):  # one call per site
            return [(site, peaks) for peaks, site in self._peaks]
        merged: dict[tuple[int, int], list[torch.Tensor]] = {}
        for peaks, site in self._peaks:
            merged.setdefault((site, peaks.numel()), []).append(peaks)
        return [(site, rows[0] if len(rows) == 1 else torch.stack(rows).amax(0))
                for (site, _), rows in merged.items()]

    def records(self, values: Sequence[float]) -> list[LayerRecord]:
        """Turn ``collect``'s numbers (on the host, in order) into one record per site."""
        count = len(self.sites)
        scalars = len(self._scalars)
        numels: Sequence[tuple[float, float]] = self._numels
        tail = len(self._dead_sites) + len(self._grad_sites) if self._call_sites else 0
        if len(values) > scalars + tail:  # reduced over ranks: the counts follow
            flat = values[scalars: scalars + 2 * len(self._numels)]
            numels = list(zip(flat[::2], flat[1::2], strict=True))
        if self._sums_only:
            pooled = pool_sums(values[:scalars], numels, self._call_sites, count)
        else:
            pooled = pool_calls(values[:scalars], self._positions, numels, self._call_sites,
                                count)
        dead = [math.nan] * count
        grads = [math.nan] * count
        if tail:
            found = values[len(values) - tail:]
            for site, fraction in zip(self._dead_sites, found, strict=False):
                held = dead[site]  # a site with calls of several unit counts: the smallest
                dead[site] = fraction if held != held or fraction < held else held
            for site, value in zip(self._grad_sites, found[len(self._dead_sites):],
                                   strict=True):
                grads[site] = value
        layers = []
        for site in self.sites.values():
            row = pooled[site.index]
            n = row[0]
            if not (n == n and n):
                stats = {}
            elif self._sums_only:  # mean and std only (what ``finish_moments`` gives them)
                mean, std = mean_std(n, row[1], row[2])
                stats = {"mean": mean, "std": std}
            else:
                stats = finish_moments(row)
                if not self.exact:  # the lean mode does not read the largest value
                    stats.pop("absmax", None)
            grad_sq = grads[site.index]
            layers.append(LayerRecord(
                name=site.name, module=site.module, kind=site.kind, index=site.index,
                activation=site.activation, functional=site.functional, shape=site.shape,
                dead_fraction=None if dead[site.index] != dead[site.index] else dead[site.index],
                grad_out_norm=math.sqrt(grad_sq) if grad_sq == grad_sq else None,
                role=self.role_of(site), **stats))
        return layers


def _by_length(peaks: list[tuple[int, torch.Tensor]]
               ) -> dict[int, list[tuple[int, torch.Tensor]]]:
    """Unit peaks grouped by unit count (rows of one length stack into one reduction)."""
    groups: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for site, peaks_of_site in peaks:
        groups.setdefault(peaks_of_site.numel(), []).append((site, peaks_of_site))
    return groups


def storage_id(tensor: torch.Tensor) -> int:
    """Identity of a tensor's memory, shared by its views (``view``, ``transpose``...).

    A tensor without a storage of its own (sparse, some wrapper subclasses) is its own id.
    """
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return id(tensor)


def _compiled_hooks(recorder: SiteRecorder) -> tuple[Callable[..., None], Callable[..., None]]:
    """Hooks for a model run by ``torch.compile``: a gate dynamo traces, the work run eagerly.

    Dynamo does not guard on module hooks being added or removed (a graph traced without them
    would never see them), and global hooks also fire on the compiled wrapper, outside its
    graph. So a compiled model gets per-module hooks on the modules it wraps, registered for
    the monitor's lifetime, that read ``recorder.active``, which dynamo guards: one graph for
    unsampled steps, with no trace of the hooks and no graph break, and one for sampled steps,
    whose measuring calls run outside the graph (``torch.compiler.disable``). Switching
    between them recompiles nothing once each has run.
    """
    record_pre = torch.compiler.disable(recorder._pre_hook, recursive=True)
    record_post = torch.compiler.disable(recorder._post_hook, recursive=True)

    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if recorder.active:
            record_pre(module, args)

    def post_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if recorder.active:
            record_post(module, args, output)

    return pre_hook, post_hook


class _FunctionalActivations(TorchFunctionMode):
    """Sees activation functions applied outside activation modules (``F.relu`` in forward)."""

    def __init__(self, recorder: SiteRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func: Callable[..., Any], types: Any,
                           args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        recorder = self.recorder
        if not recorder.active:
            return func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            recorder.learn_attention(*(list(args[:3]) + [kwargs.get(k) for k in
                                                         ("query", "key", "value")][len(args):]))
        activation = FUNCTIONAL_ACTIVATIONS.get(func)
        if activation is None or recorder.inside_activation:
            return func(*args, **kwargs)
        in_place = func.__name__.endswith("_") or bool(kwargs.get("inplace"))
        source = args[0] if args else kwargs.get("input")
        pre = source if isinstance(source, torch.Tensor) and not in_place else None
        output = func(*args, **kwargs)
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            bounds = hardtanh_bounds(activation, None, tuple(args), kwargs)
            parent = recorder.stack[-1] if recorder.stack else ROOT_NAME
            site = activation if parent == ROOT_NAME else f"{parent}/{activation}"
            recorder.record(site, parent, f"{activation}()", activation, True, output,
                            pre if output is not pre else None, bounds, source=source)
        return output
