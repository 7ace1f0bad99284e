"""The probe: forward and backward on a few batches with every measurement hook attached.

Hooks are module forward pre/post hooks (naming and module statistics), tensor hooks on layer
outputs (the backward signal, read before any in-place op that follows), and a
``TorchFunctionMode`` that sees activations applied as functions (``F.relu`` inside
``forward``). Gradients are taken with ``torch.autograd.grad`` so the user's ``.grad`` stay
untouched. Statistics stay on the device until one transfer at the end of the probe.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.nn.utils import parametrize

from nndiag.batches import Batch, check_finite_batch, check_not_empty, iter_tensors, move_to
from nndiag.capture.layers import (
    TRANSPOSED_KINDS,
    has_init_expectation,
    is_parametrization,
    is_weight_name,
    layer_kind,
    weight_of,
)
from nndiag.capture.sites import ROOT_NAME, SiteRecorder
from nndiag.capture.state import materialized, preserved_state
from nndiag.errors import UsageError, UserCodeError, describe_exception
from nndiag.losses import Loss, compute_loss
from nndiag.records import ParamGroup, ProbeRecord, attach_parameters
from nndiag.specs import call_model, model_call_error, primary_output
from nndiag.stats.activations import depth_gain, square_sum
from nndiag.stats.weights import fans

__all__ = ["ROOT_NAME", "Owner", "ProbeConfig", "owners", "run_probe"]


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
class Owner:
    """A module and the parameters it holds first (in definition order).

    The parameters of a re-parametrized weight (``parametrizations.weight.original0``...)
    belong to the module whose weight they compute.
    """

    name: str
    module: nn.Module
    params: list[tuple[str, nn.Parameter]]

    def weights(self, trainable_only: bool = False) -> list[nn.Parameter]:
        """Its weights (parameters other than biases), or all its parameters if none."""
        params = [(n, p) for n, p in self.params if p.requires_grad or not trainable_only]
        return [p for n, p in params if is_weight_name(n)] or [p for _, p in params]

    @property
    def reparametrized(self) -> bool:
        """True when a weight is computed from parameters (``weight_norm``, ``spectral_norm``)."""
        return parametrize.is_parametrized(self.module) or any(
            n.endswith(("_g", "_v", "_orig")) and hasattr(self.module, n.rsplit("_", 1)[0])
            for n, _ in self.params)

    def scale_tensors(self) -> list[torch.Tensor]:
        """The tensors whose norm is the weights' scale (the computed weight if re-parametrized)."""
        if self.reparametrized:
            weight = getattr(self.module, "weight", None)
            if isinstance(weight, torch.Tensor):
                return [weight.detach()]
        return [w.detach() for w in self.weights()]

    def vector_only(self) -> bool:
        """True when every weight is a vector (gains, layer-scales, tokens)."""
        return all(sum(size > 1 for size in w.shape) <= 1 for w in self.weights())


def owners(model: nn.Module) -> list[Owner]:
    """Each parameter once, attributed to the first module (in definition order) holding it."""
    seen: set[int] = set()
    found: dict[str, Owner] = {}
    for name, module in model.named_modules():
        owner_name, prefix, owner_module = name or ROOT_NAME, "", module
        if is_parametrization(module):  # ``conv.parametrizations.weight`` -> ``conv``
            parent, _, attr = name.rpartition(".parametrizations.")
            owner_name, prefix = parent or ROOT_NAME, f"parametrizations.{attr}."
            owner_module = model.get_submodule(parent)
        own = []
        for pname, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                own.append((prefix + pname, param))
        if own:
            found.setdefault(owner_name, Owner(owner_name, owner_module, [])).params.extend(own)
    return list(found.values())


def owner_fans(owner: Owner) -> tuple[int | None, int | None]:
    """Fans of a Linear/conv-like owner's weight, else ``(None, None)``."""
    if has_init_expectation(owner.module):
        fan_in, fan_out = fans(weight_of(owner.module))
        if layer_kind(owner.module) in TRANSPOSED_KINDS:
            return fan_out, fan_in
        return fan_in, fan_out
    return None, None


def _qualified(owner: str, pname: str) -> str:
    return pname if owner == ROOT_NAME else f"{owner}.{pname}"


def _model_device(model: nn.Module) -> torch.device:
    for tensor in iter_tensors(list(model.parameters()) + list(model.buffers())):
        return tensor.device
    return torch.device("cpu")


def _forward(model: nn.Module, recorder: SiteRecorder, inputs: Any) -> Any:
    try:
        return call_model(model, inputs)
    except Exception as exc:
        culprit = recorder.failed_in
        module = recorder.modules.get(culprit) if culprit else None
        raise model_call_error(exc, inputs, culprit, module) from exc


def _skipped_in_training(model: nn.Module, batch: Batch, device: torch.device,
                         candidates: list[Owner]) -> set[str]:
    """Which of the modules that never ran in training mode run in an eval-mode pass.

    LayerDrop and stochastic depth skip whole layers at random in training mode: a layer
    skipped in the probe is not unused. One forward pass in eval mode, without gradients, with
    the model's state restored afterwards; only when some module never ran.
    """
    if not candidates:
        return set()
    ran: set[int] = set()
    handle = register_module_forward_pre_hook(lambda module, args: ran.add(id(module)))
    try:
        with preserved_state(model, weights=True), torch.no_grad():
            model.eval()
            call_model(model, move_to(batch.inputs, device))
    except Exception:  # noqa: BLE001 - a model that cannot run in eval mode: nothing learned
        return set()
    finally:
        handle.remove()
    return {o.name for o in candidates if id(o.module) in ran}


def run_probe(model: nn.Module, batches: Sequence[Batch],
              config: ProbeConfig | None = None) -> ProbeRecord:
    """Measure a model on a few batches; the model is left exactly as found.

    The model runs in training mode (as it would while training), its gradients are taken
    with ``torch.autograd.grad`` and its weights, buffers, modes and RNG are restored
    afterwards (``preserved_state``). A model whose lazy modules have not run yet is measured
    as a copy materialized on the first batch (``materialized``).

    Args:
        model: Any ``nn.Module``.
        batches: Probe batches (inputs and optional targets).
        config: Loss and seed.

    Returns:
        The measurements as plain numbers.

    Raises:
        UsageError: Inputs with NaN/Inf or without a sample, a batch the model's layers
            reject, targets that do not fit the loss, or a model with nothing trainable.
        UserCodeError: The model or the user's loss raised.

    """
    config = config or ProbeConfig()
    if not batches:
        raise UsageError("no batch to probe the model with")
    for batch in batches:
        check_not_empty(batch.inputs)
        check_finite_batch(batch)
    model = materialized(model, lambda: batches[0].inputs)
    device = _model_device(model)
    held = owners(model)
    trainable = [(o, pname, p) for o in held for pname, p in o.params if p.requires_grad]
    if not trainable:
        raise UsageError("the model has no trainable parameter: nothing to diagnose")
    generator = torch.Generator().manual_seed(config.seed)
    recorder = SiteRecorder(model, output_grads=True)

    losses: list[torch.Tensor] = []
    output_grad_sq: list[torch.Tensor] = []
    output_stds: list[torch.Tensor] = []
    grad_norms: list[tuple[list[int], torch.Tensor]] = []
    used = [False] * len(trainable)
    loss_name, num_classes = config.loss.name, None

    # The forward pass may rescale the model's own weights in place: they are restored too.
    with preserved_state(model, weights=True):
        model.train()
        for batch in batches:
            inputs = move_to(batch.inputs, device)
            targets = move_to(batch.targets, device)
            with recorder.measuring():
                outputs = _forward(model, recorder, inputs)
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
        # Inside the preserved state: computing a spectral-normalized weight in training mode
        # runs a power iteration that updates its buffers.
        with torch.no_grad():
            scales = [o.scale_tensors() for o in held]

    weights = [o.weights() for o in held]
    flat_weights = [w for ws in scales for w in ws]
    weight_norms = torch.stack(torch._foreach_norm([w.float() for w in flat_weights]))

    # One host transfer for everything measured.
    pieces: list[torch.Tensor] = [weight_norms, torch.stack(losses)]
    pieces += [torch.stack(output_grad_sq) if output_grad_sq else weight_norms.new_zeros(0)]
    pieces += [torch.stack(output_stds) if output_stds else weight_norms.new_zeros(0)]
    pieces += [norms for _, norms in grad_norms]
    site_values = recorder.collect()
    pieces += [site_values]
    host = iter(torch.cat([p.detach().double().reshape(-1).cpu() for p in pieces]).tolist())

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
    layers = recorder.records(take(site_values.numel()))
    output_grad_norm = (math.sqrt(sum(output_grad_values) / len(output_grad_values))
                        if output_grad_values else None)
    for layer in layers:
        layer.depth_gain = depth_gain(layer.grad_out_norm, output_grad_norm)

    grads_by_param = {id(p): (sq, u) for (_, _, p), sq, u in
                      zip(trainable, param_grad_sq, used, strict=True)}
    groups = []
    offset = 0
    for owner, owner_weights, owner_scales in zip(held, weights, scales, strict=True):
        norms = weight_norm_values[offset: offset + len(owner_scales)]
        offset += len(owner_scales)
        grads = [grads_by_param[id(w)] for w in owner_weights if id(w) in grads_by_param]
        fan_in, fan_out = owner_fans(owner)
        groups.append(ParamGroup(
            owner.name, layer_kind(owner.module), sum(p.numel() for _, p in owner.params),
            any(p.requires_grad for _, p in owner.params),
            math.sqrt(sum(n * n for n in norms)), sum(w.numel() for w in owner_scales),
            grad_norm=math.sqrt(sum(sq for sq, _ in grads) / len(batches))
            if any(u for _, u in grads) else None,
            used=all(grads_by_param.get(id(p), (0.0, True))[1] for _, p in owner.params),
            any_used=any(grads_by_param.get(id(p), (0.0, False))[1] for _, p in owner.params),
            fan_in=fan_in, fan_out=fan_out, vector_only=owner.vector_only(),
            reparametrized=owner.reparametrized))
    not_run = attach_parameters(layers, groups, ROOT_NAME, recorder.data_flow())
    unused = [(o, pname) for (o, pname, _), was_used in zip(trainable, used, strict=True)
              if not was_used]
    skipped = _skipped_in_training(model, batches[0], device,
                                   [o for o, _ in unused if o.name in not_run])

    float_inputs = [t for b in batches for t in iter_tensors(b.inputs) if t.is_floating_point()]
    first_input = next(iter(iter_tensors(batches[0].inputs)), None)
    input_std = input_mean = None
    if float_inputs:
        joined = torch.cat([t.detach().float().reshape(-1).cpu() for t in float_inputs])
        input_std, input_mean = (float(v) for v in torch.std_mean(joined, correction=0))
    all_params = {id(p): p for o in held for _, p in o.params}.values()
    return ProbeRecord(
        layers=layers,
        loss=sum(loss_values) / len(loss_values),
        loss_name=loss_name,
        num_classes=num_classes,
        output_grad_norm=output_grad_norm,
        output_std=sum(output_std_values) / len(output_std_values) if output_std_values else None,
        input_std=input_std,
        input_mean=input_mean,
        batches=len(batches),
        batch_size=int(first_input.shape[0]) if first_input is not None and first_input.dim()
        else None,
        trainable_parameters=sum(p.numel() for p in all_params if p.requires_grad),
        frozen_parameters=sum(p.numel() for p in all_params if not p.requires_grad),
        unused_parameters=[_qualified(o.name, pname) for o, pname in unused
                           if o.name not in skipped],
        not_run=[name for name in not_run if name not in skipped],
        skipped_in_training=sorted(skipped),
        model_class=type(model).__name__,
    )
