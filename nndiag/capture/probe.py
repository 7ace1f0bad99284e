"""The probe: forward and backward on a few batches with every measurement hook attached.

Hooks are module forward pre/post hooks (naming and module statistics), tensor hooks on layer
outputs (the backward signal, read before any in-place op that follows), and a
``TorchFunctionMode`` that sees activations applied as functions (``F.relu`` inside
``forward``). Gradients are taken with ``torch.autograd.grad`` so the user's ``.grad`` stay
untouched. Statistics stay on the device until one transfer at the end of the probe.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Callable, Sequence
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
    has_init_expectation,
    is_measured_module,
    is_weight_name,
    layer_kind,
    module_activation,
)
from nndiag.capture.state import preserved_state
from nndiag.errors import UsageError, UserCodeError, describe_exception
from nndiag.losses import Loss, compute_loss
from nndiag.records import LayerRecord, ProbeRecord
from nndiag.specs import Batch, call_model, describe_value, iter_tensors, move_to, primary_output
from nndiag.stats.activations import (
    VECTOR_FIELDS,
    activation_vector,
    alive_units,
    pool_batches,
    square_sum,
)
from nndiag.stats.weights import expected_std, fans

_no_torch_function = getattr(torch._C, "DisableTorchFunction", contextlib.nullcontext)

# Activations after which a layer's weights are judged against He rather than Xavier.
HE_ACTIVATIONS = frozenset({"relu", "relu6", "leaky_relu", "prelu", "elu", "celu", "gelu",
                            "silu", "mish", "hardswish"})
ROOT_NAME = "(model)"


@dataclass
class ProbeConfig:
    """How to probe.

    Attributes:
        loss: The loss to backpropagate.
        seed: Seed of the generator for synthetic targets (the global RNG is not consumed).

    """

    loss: Loss = field(default_factory=Loss)
    seed: int = 0


@dataclass
class _Site:
    name: str
    module: str
    kind: str
    activation: str | None
    functional: bool
    shape: list[int]
    vectors: list[torch.Tensor] = field(default_factory=list)
    numels: list[int] = field(default_factory=list)
    alive: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)
    grad_sq: torch.Tensor | None = None
    grad_batches: int = 0

    def add(self, vector: torch.Tensor, numel: int, alive: torch.Tensor | None,
            unit_shape: tuple[int, ...]) -> None:
        self.vectors.append(vector)
        self.numels.append(numel)
        if alive is not None:
            held = self.alive.get(unit_shape)
            self.alive[unit_shape] = alive if held is None else held | alive

    def add_grad(self, grad: torch.Tensor) -> None:
        square = square_sum(grad)
        self.grad_sq = square if self.grad_sq is None else self.grad_sq + square
        self.grad_batches += 1


@dataclass(frozen=True)
class _ModuleInfo:
    name: str
    kind: str
    activation: str | None
    measured: bool


class _Recorder:
    """Forward hooks (naming, module statistics) and the functional-activation mode.

    The two forward hooks are registered globally (``register_module_forward_hook``) for the
    duration of a probe rather than on every module: registering hundreds of per-module
    handles costs more than the measurement of a small model. They ignore modules that are not
    part of the model and do nothing unless ``active``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.info: dict[int, _ModuleInfo] = {}
        self.modules: dict[str, nn.Module] = {}
        for name, module in model.named_modules():
            if id(module) not in self.info:
                info = _ModuleInfo(name or ROOT_NAME, layer_kind(module),
                                   module_activation(module), is_measured_module(module))
                self.info[id(module)] = info
                self.modules[info.name] = module
        self.stack: list[str] = []
        self.inside_activation = 0
        self.calls: Counter[str] = Counter()
        self.sites: dict[str, _Site] = {}
        self.active = False
        self.handles: list[RemovableHandle] = []

    def attach(self) -> None:
        self.handles.append(register_module_forward_pre_hook(self._pre_hook))
        self.handles.append(register_module_forward_hook(self._post_hook))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def start_pass(self) -> None:
        self.stack.clear()
        self.inside_activation = 0
        self.calls.clear()

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        info = self.info.get(id(module))
        if info is None or not self.active:
            return
        self.stack.append(info.name)
        if info.activation is not None:
            self.inside_activation += 1

    def _post_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        info = self.info.get(id(module))
        if info is None or not self.active:
            return
        if self.stack:
            self.stack.pop()
        if info.activation is not None:
            self.inside_activation -= 1
        if not info.measured:
            return
        tensor = primary_output(output)
        if tensor is None or not tensor.is_floating_point():
            return
        pre = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if pre is tensor:  # in-place: the input is gone
            pre = None
        activation = info.activation
        bounds = hardtanh_bounds(activation, module) if activation in SATURATING else (-1.0, 1.0)
        self._record(info.name, info.name, info.kind, activation, False, tensor, pre, bounds)

    def record_functional(self, activation: str, output: torch.Tensor,
                          pre: torch.Tensor | None, bounds: tuple[float, float]) -> None:
        parent = self.stack[-1] if self.stack else ROOT_NAME
        name = activation if parent == ROOT_NAME else f"{parent}/{activation}"
        self._record(name, parent, f"{activation}()", activation, True, output, pre, bounds)

    def _record(self, name: str, module_name: str, kind: str, activation: str | None,
                functional: bool, tensor: torch.Tensor, pre: torch.Tensor | None,
                bounds: tuple[float, float]) -> None:
        if tensor.numel() == 0:
            return
        # Our own reductions need not pass through the functional-activation mode.
        with _no_torch_function():
            self._measure(name, module_name, kind, activation, functional, tensor, pre, bounds)

    def _measure(self, name: str, module_name: str, kind: str, activation: str | None,
                 functional: bool, tensor: torch.Tensor, pre: torch.Tensor | None,
                 bounds: tuple[float, float]) -> None:
        count = self.calls[name]
        self.calls[name] += 1
        site_name = name if count == 0 else f"{name}#{count + 1}"
        site = self.sites.get(site_name)
        if site is None:
            site = _Site(site_name, module_name, kind, activation, functional, list(tensor.shape))
            self.sites[site_name] = site
        saturation = activation if activation in SATURATING else None
        vector = activation_vector(tensor, saturation, pre if saturation else None, bounds)
        alive = alive_units(tensor) if activation in RELU_FAMILY else None
        site.add(vector, tensor.numel(), alive, tuple(tensor.shape[1:]))
        if tensor.requires_grad:
            tensor.register_hook(site.add_grad)


class _FunctionalActivations(TorchFunctionMode):
    """Sees activation functions applied outside activation modules (``F.relu`` in forward)."""

    def __init__(self, recorder: _Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func: Callable[..., Any], types: Any,
                           args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        activation = FUNCTIONAL_ACTIVATIONS.get(func)
        recorder = self.recorder
        if activation is None or not recorder.active or recorder.inside_activation:
            return func(*args, **kwargs)
        source = args[0] if args else kwargs.get("input")
        in_place = func.__name__.endswith("_") or bool(kwargs.get("inplace"))
        pre = source if isinstance(source, torch.Tensor) and not in_place else None
        output = func(*args, **kwargs)
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            bounds = hardtanh_bounds(activation, None, tuple(args), kwargs)
            recorder.record_functional(activation, output, pre if output is not pre else None,
                                       bounds)
        return output


@dataclass
class _Owner:
    name: str
    module: nn.Module
    params: list[tuple[str, nn.Parameter]]


def _owners(model: nn.Module) -> list[_Owner]:
    """Each parameter once, attributed to the first module (in definition order) holding it."""
    seen: set[int] = set()
    owners = []
    for name, module in model.named_modules():
        own = []
        for pname, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                own.append((pname, param))
        if own:
            owners.append(_Owner(name or ROOT_NAME, module, own))
    return owners


def _qualified(owner: str, pname: str) -> str:
    return pname if owner == ROOT_NAME else f"{owner}.{pname}"


def _model_device(model: nn.Module) -> torch.device:
    for tensor in iter_tensors(list(model.parameters()) + list(model.buffers())):
        return tensor.device
    return torch.device("cpu")


def _forward(model: nn.Module, recorder: _Recorder, inputs: Any) -> Any:
    try:
        return call_model(model, inputs)
    except Exception as exc:
        culprit = recorder.stack[-1] if recorder.stack else None
        module = recorder.modules.get(culprit) if culprit else None
        builtin = module is not None and type(module).__module__.startswith("torch.nn")
        if builtin and isinstance(exc, RuntimeError | ValueError | IndexError):
            raise UsageError(
                f"the batch does not fit the model: layer {culprit!r} "
                f"({type(module).__name__}) rejected it with {describe_exception(exc)} "
                f"(inputs: {describe_value(inputs)})"
            ) from exc
        where = f" in {culprit!r}" if culprit else ""
        raise UserCodeError(f"the model raised{where}: {describe_exception(exc)}") from exc


def _check_inputs(batch: Batch) -> None:
    for tensor in iter_tensors(batch.inputs):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UsageError(
                f"the input batch holds NaN or Inf values ({describe_value(batch.inputs)}); "
                "clean the data before diagnosing the model"
            )


def run_probe(model: nn.Module, batches: Sequence[Batch],
              config: ProbeConfig | None = None) -> ProbeRecord:
    """Measure a model on a few batches; the model is left exactly as found.

    The model runs in training mode (as it would while training), its gradients are taken
    with ``torch.autograd.grad`` and its buffers, modes and RNG are restored afterwards.

    Args:
        model: Any ``nn.Module``.
        batches: Probe batches (inputs and optional targets).
        config: Loss and seed.

    Returns:
        The measurements as plain numbers.

    Raises:
        UsageError: Inputs with NaN/Inf, a batch the model's layers reject, targets that do
            not fit the loss, or a model with nothing trainable.
        UserCodeError: The model or the user's loss raised.

    """
    config = config or ProbeConfig()
    if not batches:
        raise UsageError("no batch to probe the model with")
    for batch in batches:
        _check_inputs(batch)
    device = _model_device(model)
    owners = _owners(model)
    trainable = [(o, pname, p) for o in owners for pname, p in o.params if p.requires_grad]
    if not trainable:
        raise UsageError("the model has no trainable parameter: nothing to diagnose")
    generator = torch.Generator().manual_seed(config.seed)
    recorder = _Recorder(model)
    mode = _FunctionalActivations(recorder)

    losses: list[torch.Tensor] = []
    output_grad_sq: list[torch.Tensor] = []
    output_stds: list[torch.Tensor] = []
    grad_norms: list[tuple[list[int], torch.Tensor]] = []
    used = [False] * len(trainable)
    loss_name, num_classes = config.loss.name, None

    with preserved_state(model):
        model.train()
        recorder.attach()
        try:
            for batch in batches:
                inputs = move_to(batch.inputs, device)
                targets = move_to(batch.targets, device)
                recorder.start_pass()
                recorder.active = True
                try:
                    with mode:
                        outputs = _forward(model, recorder, inputs)
                finally:
                    recorder.active = False
                loss, loss_name, num_classes = compute_loss(config.loss, outputs, targets,
                                                            generator)
                output = primary_output(outputs)
                wrt: list[torch.Tensor] = [p for _, _, p in trainable]
                track_output = output is not None and output.requires_grad
                if track_output:
                    wrt.append(output)
                try:
                    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
                except RuntimeError as exc:
                    raise UserCodeError(
                        f"backpropagating the loss raised {describe_exception(exc)}"
                    ) from exc
                param_grads = grads[: len(trainable)]
                present = [i for i, g in enumerate(param_grads) if g is not None]
                for i in present:
                    used[i] = True
                if present:
                    norms = torch._foreach_norm([param_grads[i].float() for i in present])
                    grad_norms.append((present, torch.stack(norms)))
                if track_output and grads[-1] is not None:
                    output_grad_sq.append(square_sum(grads[-1]))
                if output is not None:
                    output_stds.append(output.detach().float().std(correction=0))
                losses.append(loss.detach().float())
        finally:
            recorder.detach()

    weights = [[p for pname, p in o.params if is_weight_name(pname)] or [p for _, p in o.params]
               for o in owners]
    flat_weights = [w for ws in weights for w in ws]
    weight_norms = torch.stack(torch._foreach_norm([w.detach().float() for w in flat_weights]))

    # One host transfer for everything measured.
    sites = list(recorder.sites.values())
    dead = [
        torch.stack([1.0 - m.float().mean() for m in s.alive.values()]).min() if s.alive else None
        for s in sites
    ]
    pieces: list[torch.Tensor] = [weight_norms, torch.stack(losses)]
    pieces += [torch.stack(output_grad_sq) if output_grad_sq else weight_norms.new_zeros(0)]
    pieces += [torch.stack(output_stds) if output_stds else weight_norms.new_zeros(0)]
    pieces += [norms for _, norms in grad_norms]
    pieces += [torch.stack(s.vectors).reshape(-1) for s in sites]
    pieces += [d.reshape(1) for d in dead if d is not None]
    pieces += [s.grad_sq.reshape(1) for s in sites if s.grad_sq is not None]
    host = iter(torch.cat([p.detach().float().reshape(-1).cpu() for p in pieces]).tolist())

    def take(n: int) -> list[float]:
        return [next(host) for _ in range(n)]

    weight_norm_values = take(len(flat_weights))
    loss_values = take(len(losses))
    output_grad_values = take(len(output_grad_sq))
    output_std_values = take(len(output_stds))
    param_grad_sq = [0.0] * len(trainable)
    for present, norms in grad_norms:
        for i, value in zip(present, take(len(norms)), strict=True):
            param_grad_sq[i] += value * value
    site_vectors = [take(len(s.vectors) * len(VECTOR_FIELDS)) for s in sites]
    dead_values = {id(s): take(1)[0] for s, d in zip(sites, dead, strict=True) if d is not None}
    grad_values = {id(s): take(1)[0] for s in sites if s.grad_sq is not None}

    layers = [_layer_record(i, s, vec, s.numels, dead_values.get(id(s)), grad_values.get(id(s)))
              for i, (s, vec) in enumerate(zip(sites, site_vectors, strict=True))]
    not_run = _attach_parameters(layers, owners, weights, weight_norm_values, trainable,
                                 param_grad_sq, used, len(batches))

    float_inputs = [t for b in batches for t in iter_tensors(b.inputs) if t.is_floating_point()]
    first_input = next(iter(iter_tensors(batches[0].inputs)), None)
    input_std = input_mean = None
    if float_inputs:
        joined = torch.cat([t.detach().float().reshape(-1).cpu() for t in float_inputs])
        input_std, input_mean = (float(v) for v in torch.std_mean(joined, correction=0))
    all_params = {id(p): p for o in owners for _, p in o.params}.values()
    return ProbeRecord(
        layers=layers,
        loss=sum(loss_values) / len(loss_values),
        loss_name=loss_name,
        num_classes=num_classes,
        output_grad_norm=math.sqrt(sum(output_grad_values) / len(output_grad_values))
        if output_grad_values else None,
        output_std=sum(output_std_values) / len(output_std_values) if output_std_values else None,
        input_std=input_std,
        input_mean=input_mean,
        batches=len(batches),
        batch_size=int(first_input.shape[0]) if first_input is not None and first_input.dim()
        else None,
        trainable_parameters=sum(p.numel() for p in all_params if p.requires_grad),
        frozen_parameters=sum(p.numel() for p in all_params if not p.requires_grad),
        unused_parameters=[_qualified(o.name, pname)
                           for (o, pname, _), was_used in zip(trainable, used, strict=True)
                           if not was_used],
        not_run=not_run,
        model_class=type(model).__name__,
    )


def _layer_record(index: int, site: _Site, values: list[float], numels: list[int],
                  dead: float | None, grad_sq: float | None) -> LayerRecord:
    """Turn a site's per-batch sums into a record (pooled over the probe batches)."""
    pooled = pool_batches(values, numels)
    return LayerRecord(
        name=site.name,
        module=site.module,
        kind=site.kind,
        index=index,
        activation=site.activation,
        functional=site.functional,
        shape=site.shape,
        dead_fraction=dead,
        grad_out_norm=math.sqrt(grad_sq / site.grad_batches) if grad_sq is not None else None,
        **pooled,
    )


def _attach_parameters(layers: list[LayerRecord], owners: list[_Owner],
                       weights: list[list[nn.Parameter]], weight_norm_values: list[float],
                       trainable: list[tuple[_Owner, str, nn.Parameter]],
                       param_grad_sq: list[float], used: list[bool], batches: int) -> list[str]:
    """Put each module's parameter statistics on its first call site.

    A module that never ran but whose parameters got gradients (``out_proj`` inside
    ``nn.MultiheadAttention``, whose weights are used functionally) is folded into its nearest
    measured ancestor; with no such ancestor (submodules of a TorchScript module, whose calls
    Python hooks do not see) it gets a record of its own holding parameter statistics only.
    Returns the modules with parameters that stayed unmeasured.
    """
    first_site: dict[str, LayerRecord] = {}
    for layer in layers:
        if not layer.functional:
            first_site.setdefault(layer.module, layer)
    grads_by_param = {id(p): (sq, u) for (_, _, p), sq, u in
                      zip(trainable, param_grad_sq, used, strict=True)}
    groups: dict[str, list[tuple[_Owner, list[nn.Parameter], list[float]]]] = {}
    not_run = []
    offset = 0
    for owner, owner_weights in zip(owners, weights, strict=True):
        norms = weight_norm_values[offset: offset + len(owner_weights)]
        offset += len(owner_weights)
        target = owner.name if owner.name in first_site else None
        all_used = all(grads_by_param.get(id(p), (0.0, True))[1] for _, p in owner.params)
        if target is None and all_used:
            target = next((a for a in _ancestors(owner.name) if a in first_site), None)
        if target is None and any(grads_by_param.get(id(p), (0.0, False))[1]
                                  for _, p in owner.params):
            record = LayerRecord(owner.name, owner.name, layer_kind(owner.module), len(layers))
            layers.append(record)
            first_site[owner.name] = record
            target = owner.name
        if target is None:
            not_run.append(owner.name)
            continue
        groups.setdefault(target, []).append((owner, owner_weights, norms))

    for target, members in groups.items():
        layer = first_site[target]
        params = [p for owner, _, _ in members for _, p in owner.params]
        group_weights = [w for _, ws, _ in members for w in ws]
        norms = [n for _, _, ns in members for n in ns]
        layer.params = sum(p.numel() for p in params)
        layer.trainable = any(p.requires_grad for p in params)
        layer.weight_norm = math.sqrt(sum(n * n for n in norms))
        numel = sum(w.numel() for w in group_weights)
        layer.weight_rms = layer.weight_norm / math.sqrt(numel) if numel else 0.0
        grads = [grads_by_param[id(w)] for w in group_weights if id(w) in grads_by_param]
        if any(was_used for _, was_used in grads):
            layer.grad_norm = math.sqrt(sum(sq for sq, _ in grads) / batches)
            layer.grad_to_weight = (layer.grad_norm / layer.weight_norm
                                    if layer.weight_norm > 0 else math.inf)
        owner = members[0][0]
        if owner.name == target and has_init_expectation(owner.module):
            layer.fan_in, layer.fan_out = fans(owner.module.weight)
    for layer in layers:
        if layer.fan_in is not None and layer.fan_out is not None and layer.weight_rms:
            layer.init_reference = _init_reference(layers, layer)
            std = expected_std(layer.init_reference, layer.fan_in, layer.fan_out)
            layer.init_scale = layer.weight_rms / std
    return not_run


def _ancestors(name: str) -> list[str]:
    """Qualified names of a module's ancestors, nearest first (the root last)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)] + [ROOT_NAME]


def _init_reference(layers: list[LayerRecord], layer: LayerRecord) -> str:
    """He when the next activation before the next Linear/conv layer is ReLU-like, else Xavier."""
    for later in layers[layer.index + 1:]:
        if later.activation is not None:
            return "he" if later.activation in HE_ACTIVATIONS else "xavier"
        if later.fan_in is not None:
            break
    return "xavier"
