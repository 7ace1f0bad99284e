"""Which modules and functions are measured, and what kind of layer each one is."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from nndiag.records.layers import (
    ROLE_ATTENTION,
    ROLE_ATTENTION_OUT,
    ROLE_EMBEDDING,
    ROLE_HEAD,
    ROLE_KEY,
    ROLE_NORM,
    ROLE_QUERY,
    ROLE_VALUE,
)
from nndiag.stats.activations import CHANNELS_FIRST, CHANNELS_LAST

# Activations whose units can die (output exactly zero for every sample).
RELU_FAMILY = frozenset({"relu", "relu6"})
# Activations whose derivative vanishes for large inputs.
SATURATING = frozenset({"sigmoid", "tanh", "hardtanh", "hardsigmoid", "softsign", "relu6"})

_MODULE_ACTIVATIONS: list[tuple[type[nn.Module], str]] = [
    (nn.ReLU6, "relu6"),  # before Hardtanh: ReLU6 subclasses it
    (nn.ReLU, "relu"),
    (nn.Sigmoid, "sigmoid"),
    (nn.Tanh, "tanh"),
    (nn.Hardtanh, "hardtanh"),
    (nn.Hardsigmoid, "hardsigmoid"),
    (nn.Softsign, "softsign"),
    (nn.LeakyReLU, "leaky_relu"),
    (nn.ELU, "elu"),
    (nn.SELU, "selu"),
    (nn.CELU, "celu"),
    (nn.GELU, "gelu"),
    (nn.SiLU, "silu"),
    (nn.Mish, "mish"),
    (nn.Softplus, "softplus"),
    (nn.Hardswish, "hardswish"),
    (nn.PReLU, "prelu"),
]

FUNCTIONAL_ACTIVATIONS: dict[Callable[..., Any], str] = {
    F.relu: "relu",
    F.relu_: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    torch.Tensor.relu: "relu",
    torch.Tensor.relu_: "relu",
    F.relu6: "relu6",
    F.hardtanh: "hardtanh",
    F.hardtanh_: "hardtanh",
    torch.sigmoid: "sigmoid",
    torch.Tensor.sigmoid: "sigmoid",
    torch.Tensor.sigmoid_: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    torch.Tensor.tanh: "tanh",
    torch.Tensor.tanh_: "tanh",
    F.tanh: "tanh",
    F.hardsigmoid: "hardsigmoid",
    F.softsign: "softsign",
    F.leaky_relu: "leaky_relu",
    F.elu: "elu",
    F.selu: "selu",
    F.gelu: "gelu",
    F.silu: "silu",
    F.mish: "mish",
    F.softplus: "softplus",
    F.hardswish: "hardswish",
}

# Modules that only pass their input through (or reshape it): measuring them adds nothing.
_PASS_THROUGH = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                 nn.Identity, nn.Flatten, nn.Unflatten)


# Activation modules of other libraries, by class name (Hugging Face's ``NewGELUActivation``
# computes GELU with an inner ``tanh``; that tanh is part of a non-saturating activation, not a
# saturating layer). Parameter-free modules only.
_NAMED_ACTIVATIONS = (("gelu", "gelu"), ("silu", "silu"), ("swish", "silu"), ("mish", "mish"),
                      ("relusquared", "relu"))


def module_activation(module: nn.Module) -> str | None:
    """The activation kind of an activation module (``"relu"``, ``"tanh"``...), else ``None``."""
    for cls, kind in _MODULE_ACTIVATIONS:
        if isinstance(module, cls):
            return kind
    name = type(module).__name__.lower()
    if any(True for _ in module.parameters(recurse=False)):
        return None
    return next((kind for key, kind in _NAMED_ACTIVATIONS if key in name), None)


_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm)
_NAME_ROLES = (
    (re.compile(r"(^|[._])(q|query|q_proj|wq|to_q)$"), ROLE_QUERY),
    (re.compile(r"(^|[._])(k|key|k_proj|wk|to_k)$"), ROLE_KEY),
    (re.compile(r"(^|[._])(v|value|v_proj|wv|to_v)$"), ROLE_VALUE),
    (re.compile(r"(^|[._])(c_attn|qkv|qkv_proj|in_proj|query_key_value|wqkv)$"),
     ROLE_ATTENTION),
    (re.compile(r"(^|[._])(o_proj|out_proj|wo|to_out|attention\.output\.dense|attn\.c_proj|"
                r"attn\.o|attention\.o)$"), ROLE_ATTENTION_OUT),
    (re.compile(r"(^|[._])(lm_head|classifier|head|score|qa_outputs|cls\.predictions\.decoder|"
                r"fc_out|output_layer)$"), ROLE_HEAD),
)


def module_role(name: str, module: nn.Module) -> str | None:
    """A module's role from its type, then its name (``None``: decided from the data flow).

    Structure comes first: embeddings, normalization layers (by type, or a class name ending
    in ``Norm``, as ``LlamaRMSNorm``) and fused attention are known by type; which Linear
    feeds ``scaled_dot_product_attention`` as query, key or value is seen while the model runs
    (``SiteRecorder``); names are the fallback for the rest.
    """
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        return ROLE_EMBEDDING
    kind = type(module).__name__
    if isinstance(module, _NORM_TYPES) or kind.endswith(("Norm", "LayerNorm", "RMSNorm")):
        return ROLE_NORM
    if isinstance(module, nn.MultiheadAttention):
        return ROLE_ATTENTION
    if kind.endswith("Embedding") or kind.endswith("Embeddings"):
        return ROLE_EMBEDDING
    for pattern, role in _NAME_ROLES:
        if pattern.search(name):
            return role
    return None


def hardtanh_bounds(kind: str, module: nn.Module | None = None,
                    args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
                    ) -> tuple[float, float]:
    """The clipping bounds of a hardtanh-family activation, from its module or call."""
    if kind == "relu6":
        return 0.0, 6.0
    if kind == "hardsigmoid":
        return 0.0, 1.0
    if module is not None and isinstance(module, nn.Hardtanh):
        return float(module.min_val), float(module.max_val)
    kwargs = kwargs or {}
    low = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
    high = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
    return float(low), float(high)


def is_pass_through(module: nn.Module) -> bool:
    """True for modules that only pass their input through (dropout, identity, reshapes)."""
    return isinstance(module, _PASS_THROUGH)


def is_parametrization(module: nn.Module) -> bool:
    """True for the container of a re-parametrized weight (``weight_norm``, ``spectral_norm``).

    Its call computes a weight, not an activation: it is not a site, and its parameters
    belong to the module whose weight it computes.
    """
    return isinstance(module, parametrize.ParametrizationList)


def is_measured_module(module: nn.Module) -> bool:
    """True for modules with their own parameters and for activation modules."""
    if isinstance(module, _PASS_THROUGH) or is_parametrization(module):
        return False
    if module_activation(module) is not None:
        return True
    return any(True for _ in module.parameters(recurse=False))


def is_weight_name(param_name: str) -> bool:
    """True for parameters that are weights rather than biases (``weight``, ``weight_hh_l0``)."""
    return "bias" not in param_name


def layer_kind(module: nn.Module) -> str:
    """The module's class name; for a TorchScript submodule, the class it was scripted from."""
    return str(getattr(module, "original_name", None) or type(module).__name__)


_INIT_KINDS = frozenset({"Linear", "Bilinear", "LazyLinear", "NonDynamicallyQuantizableLinear",
                         "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
                         "ConvTranspose3d", "Conv1D"})
# Hugging Face's ``Conv1D`` (GPT-2) is a Linear layer whose weight is stored as (in, out).
TRANSPOSED_KINDS = frozenset({"Conv1D"})


def weight_of(module: nn.Module) -> Any:
    """A module's ``weight`` attribute, without computing a re-parametrized one.

    Reading a spectral-normalized weight in training mode runs a power iteration that updates
    the module's buffers; for a re-parametrized weight this returns the stored parameter of
    the weight's shape (weight norm's direction, spectral norm's original) instead.
    """
    if parametrize.is_parametrized(module, "weight"):
        originals = list(module.parametrizations.weight.parameters(recurse=False))
        return max(originals, key=lambda p: p.dim()) if originals else None
    return getattr(module, "weight", None)


def has_init_expectation(module: nn.Module) -> bool:
    """True for layers whose weight scale has a He/Xavier expectation (Linear- and conv-like).

    Embeddings, normalization layers, recurrent cells and attention keep their own
    conventions, so their scale is reported but not judged against He/Xavier.
    """
    weight = weight_of(module)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        return False
    return layer_kind(module) in _INIT_KINDS or isinstance(
        module, nn.Linear | nn.Bilinear | nn.modules.conv._ConvNd)


# Producers whose output is ``(N, C, *positions)`` (subclasses and re-parametrized ones too).
_CHANNELS_FIRST_TYPES = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm,
                         nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                         nn.modules.pooling._AdaptiveAvgPoolNd,
                         nn.modules.pooling._AdaptiveMaxPoolNd)
# Producers whose output is ``(N, *positions, D)``: a layer applied to the last dimension.
_CHANNELS_LAST_TYPES = (nn.Linear, nn.Bilinear, nn.LayerNorm, nn.RMSNorm, nn.Embedding)


def module_unit_layout(module: nn.Module) -> str | None:
    """Where the units of the module's output lie (``None``: unknown, decided by shape).

    ``CHANNELS_FIRST`` for convolutions, batch/instance/group norms and pooling (``(N, C,
    *positions)``), ``CHANNELS_LAST`` for layers applied to the last dimension (Linear,
    Hugging Face's ``Conv1D``, LayerNorm, RMSNorm, Embedding).
    """
    if isinstance(module, _CHANNELS_FIRST_TYPES):
        return CHANNELS_FIRST
    if isinstance(module, _CHANNELS_LAST_TYPES) or layer_kind(module) in TRANSPOSED_KINDS:
        return CHANNELS_LAST
    return None
