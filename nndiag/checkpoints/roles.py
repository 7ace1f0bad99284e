"""Roles of a checkpoint's modules in their architecture, from names and shapes (no torch).

A state dict has no forward pass to watch, so the data-free analysis reads what the keys and
shapes say, in this order:

1. Kinds from shapes (``static``): 1-D weights are normalization, 2-D weights Linear (or an
   embedding, by name), 3- to 5-D convolutions; ``in_proj_weight`` is ``nn.MultiheadAttention``.
2. Attention projections by name inside an attention module (``attn``, ``attention``,
   ``SelfAttention``...): query, key, value (parallel: they all read the same normalized
   input), fused q/k/v (``c_attn``, ``qkv``, ``in_proj``), and the output projection that
   writes back into the residual stream. Only a model with attention is treated as a
   transformer; everything else keeps the plain-network reading.
3. Blocks: the first numbered container of a module's path (``transformer.h.3``,
   ``model.layers.3``, ``encoder.block.3``). Inside a block of a transformer, MLP projections
   by name: in (``c_fc``, ``up_proj``, ``intermediate.dense``...), gate (``gate_proj``) and out
   (``c_proj``, ``down_proj``, ``output.dense``...).
4. Orientation from shapes: an input projection reads the residual width ``d`` (the size of
   the blocks' norms), an output projection writes it. ``nn.Linear`` stores (out, in); Hugging
   Face's GPT-2 ``Conv1D`` stores (in, out), which shows as ``d`` in the other dimension. A
   square weight takes the orientation the model's other projections showed.
5. The family (the init convention the names belong to) and whether the weights are still
   their initialization (every normalization gain exactly 1 and bias exactly 0).

Chains: the product of signal gains is only meaningful along layers in series. In a
transformer those are the two layers of a residual branch (value then output projection; MLP
in then out), each starting from a normalized input; queries and keys feed the softmax and
chain nothing; a normalization layer ends any chain. Other layers are chained as in a plain
network, in the canonical order of their names (stored order differs between formats:
safetensors sorts its keys), with normalization layers and block boundaries ending chains.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable

from nndiag.records.checkpoint import (
    HF_INIT_STD,
    INPUT_ROLES,
    NORMAL_INIT_FAMILIES,
    OUTPUT_ROLES,
    PROJECTION_ROLES,
    QKV_ROLES,
    ROLE_ATTENTION,
    ROLE_ATTENTION_OUT,
    ROLE_EMBEDDING,
    ROLE_HEAD,
    ROLE_HIDDEN,
    ROLE_KEY,
    ROLE_MLP_GATE,
    ROLE_MLP_IN,
    ROLE_MLP_OUT,
    ROLE_NORM,
    ROLE_QUERY,
    ROLE_VALUE,
    CheckpointRecord,
    ModuleWeights,
    TensorStats,
    canonical_key,
)
from nndiag.stats.weights import fans_from_shape, he_std, xavier_std

_ATTENTION_CONTEXT = re.compile(r"attn|attention", re.I)
_QUERY = frozenset({"q", "query", "q_proj", "wq", "to_q", "q_lin", "query_proj", "q_linear"})
_KEY = frozenset({"k", "key", "k_proj", "wk", "to_k", "k_lin", "key_proj", "k_linear"})
_VALUE = frozenset({"v", "value", "v_proj", "wv", "to_v", "v_lin", "value_proj", "v_linear"})
_FUSED = frozenset({"c_attn", "qkv", "qkv_proj", "wqkv", "w_pack", "in_proj", "att_proj",
                    "query_key_value"})
# Fused projections laid out [q; k; v] (NeoX-style ``query_key_value`` interleaves heads).
_SLICEABLE = _FUSED - {"query_key_value"}
_ATTENTION_OUT = frozenset({"o_proj", "out_proj", "o", "wo", "out_lin", "c_proj", "proj",
                            "dense", "to_out", "out", "attn_out"})
_MLP_IN = frozenset({"c_fc", "fc1", "linear1", "up_proj", "gate_up_proj", "w3", "wi", "wi_1",
                     "lin1", "dense_h_to_4h", "fc_in", "w_in", "up"})
_MLP_GATE = frozenset({"gate_proj", "w1", "wi_0", "gate"})
_MLP_OUT = frozenset({"c_proj", "fc2", "linear2", "down_proj", "w2", "wo", "lin2",
                      "dense_4h_to_h", "fc_out", "w_out", "down"})
_HEADS = frozenset({"lm_head", "classifier", "score", "qa_outputs", "head", "heads", "cls"})
_PATCH_EMBEDDING = re.compile(r"patch_embed", re.I)
_GPT2_NAMES = re.compile(r"(^|\.)(attn\.c_attn|mlp\.c_fc)$")
_T5_NAMES = re.compile(r"(^|\.)(SelfAttention|EncDecAttention|DenseReluDense)(\.|$)")
_BERT_NAMES = re.compile(r"(^|\.)attention\.(self|attention)\.(query|key|value)$")
_LLAMA_NAMES = re.compile(r"(^|\.)(gate_proj|up_proj|down_proj)$")
_LAYER_KINDS = frozenset({"linear", "conv", "attention"})
_NORM_KINDS = frozenset({"norm", "batch_norm"})


# ----------------------------------------------------------------------------- names


def is_sliceable_fused(module_name: str, param: str) -> bool:
    """True for a fused q/k/v weight laid out as three consecutive blocks (query, key, value)."""
    return param == "in_proj_weight" or (
        param == "weight" and module_name.rsplit(".", 1)[-1].lower() in _SLICEABLE)


def block_of(name: str) -> str | None:
    """The repeated block a module sits in: its path up to the first numbered component.

    ``transformer.h.3.attn.c_attn`` -> ``transformer.h.3``; ``None`` when no numbered
    component precedes the module's own name (a layer of a plain ``nn.Sequential``).
    """
    parts = name.split(".")
    for index, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: index + 1])
    return None


def _attention_scope(name: str, block: str | None) -> str | None:
    """The path up to the first attention-named component after the block, if any."""
    parts = name.split(".")
    start = len(block.split(".")) if block else 0
    for index in range(start, len(parts)):
        if _ATTENTION_CONTEXT.search(parts[index]):
            return ".".join(parts[: index + 1])
    return None


def _name_role(module: ModuleWeights, block: str | None) -> str | None:
    """The role a module's name and kind give it, before knowing if the model is a transformer."""
    if module.kind in _NORM_KINDS:
        return ROLE_NORM
    if module.kind == "embedding":
        return ROLE_EMBEDDING
    if module.kind == "conv" and _PATCH_EMBEDDING.search(module.name):
        return ROLE_EMBEDDING
    if module.kind == "attention":
        return ROLE_ATTENTION
    if module.kind != "linear":
        return None
    parts = module.name.split(".")
    last = parts[-1].lower()
    scope = _attention_scope(module.name, block)
    if scope is not None and scope != module.name:
        if last in _QUERY:
            return ROLE_QUERY
        if last in _KEY:
            return ROLE_KEY
        if last in _VALUE:
            return ROLE_VALUE
        if last in _FUSED:
            return ROLE_ATTENTION
        inner = [p.lower() for p in parts[len(scope.split(".")):]]
        if last in _ATTENTION_OUT or "output" in inner or "to_out" in inner:
            return ROLE_ATTENTION_OUT
        return None
    if block is None and (last in _HEADS or any(p.lower() in _HEADS for p in parts[:-1])):
        return ROLE_HEAD
    return None


def _mlp_role(module: ModuleWeights) -> str | None:
    """The MLP role of a Linear inside a transformer block (no attention in its path)."""
    parts = module.name.split(".")
    last = parts[-1].lower()
    parent = parts[-2].lower() if len(parts) > 1 else ""
    if last in _MLP_GATE:
        return ROLE_MLP_GATE
    if last in _MLP_IN or (last == "dense" and parent == "intermediate"):
        return ROLE_MLP_IN
    if last in _MLP_OUT or (last == "dense" and parent == "output"):
        return ROLE_MLP_OUT
    return None


def _family(modules: list[ModuleWeights]) -> str:
    names = [m.name for m in modules]
    if any(_GPT2_NAMES.search(n) for n in names):
        return "gpt2"
    if any(_T5_NAMES.search(n) for n in names):
        return "t5"
    if any(m.kind == "attention" for m in modules):
        return "torch"
    if any(_BERT_NAMES.search(n) for n in names):
        return "bert"
    if any(_LLAMA_NAMES.search(n) for n in names):
        return "llama"
    if any(m.role == ROLE_EMBEDDING and m.kind == "conv" for m in modules):
        return "vit"
    return "hf"


# ----------------------------------------------------------------------------- annotation


def tensor(module: ModuleWeights, param: str) -> TensorStats | None:
    """The statistics of one of a module's tensors by parameter name (``weight``, ``bias``)."""
    return module.tensor(param)


def weight_tensor(module: ModuleWeights) -> TensorStats | None:
    """The module's weight (``in_proj_weight`` for ``nn.MultiheadAttention``)."""
    return module.weight


def annotate(record: CheckpointRecord) -> None:
    """Give every module its role, block, orientation, init reference and signal gain.

    Sets the record's ``family``, ``width``, ``blocks`` and ``untrained``, then numbers the
    chains (``assign_chains``). Pure: reads the statistics, never a tensor.
    """
    modules = record.modules
    for module in modules:
        block = block_of(module.name)
        module.block = block
        module.role = _name_role(module, block)
    transformer = any(m.role in QKV_ROLES for m in modules)
    attention_blocks = {m.block for m in modules if m.role in QKV_ROLES and m.block}
    for module in modules:
        if not transformer:
            if module.role in PROJECTION_ROLES:
                module.role = None
            continue
        if module.role is None and module.kind in ("linear", "conv"):
            mlp = module.kind == "linear" and module.block in attention_blocks and \
                _attention_scope(module.name, module.block) is None
            module.role = (_mlp_role(module) if mlp else None) or ROLE_HIDDEN
    record.untrained = _untrained(modules)
    if transformer:
        record.family = _family(modules)
        record.blocks = len(attention_blocks)
        record.width = _width(modules)
        _orient(modules, record.width)
        _mark_tied(modules)
        for module in modules:
            _reference(module, record)
    for module in modules:
        _signal_gain(module, transformer)
    assign_chains(modules)


def _untrained(modules: list[ModuleWeights]) -> bool | None:
    """True when the weights are their initialization, False when training moved them.

    Every normalization layer starts with gains 1 (or all 0: the zero-init residual trick),
    biases 0 and untouched running statistics, in PyTorch and in Hugging Face's init; any
    trained model has moved them. Without normalization, biases all exactly 0 also show an
    untouched init (Hugging Face zeroes them; PyTorch's default does not, so nonzero biases
    prove nothing).
    """
    norms = [m for m in modules if m.kind in _NORM_KINDS]
    if norms:
        return all(_at_init(m) for m in norms)
    biases = [t for m in modules if m.kind in _LAYER_KINDS for t in m.tensors
              if t.name.endswith("bias") and t.rms is not None]
    if biases and all(t.rms == 0 for t in biases):
        return True
    return None


def _at_init(norm: ModuleWeights) -> bool:
    gain, bias = tensor(norm, "weight"), tensor(norm, "bias")
    mean, var = tensor(norm, "running_mean"), tensor(norm, "running_var")
    ones = gain is None or (gain.rms == 1.0 and gain.mean == 1.0) or gain.rms == 0.0
    zero_bias = bias is None or bias.rms == 0.0
    untouched = (mean is None or mean.rms == 0.0) and (
        var is None or (var.rms == 1.0 and var.mean == 1.0))
    return ones and zero_bias and untouched


def _width(modules: list[ModuleWeights]) -> int | None:
    """The residual width: the most common size of the blocks' norms (else of embeddings)."""
    sizes = Counter(w.shape[0] for m in modules if m.role == ROLE_NORM
                    and (w := tensor(m, "weight")) is not None and len(w.shape) == 1)
    if not sizes:
        sizes = Counter(w.shape[-1] for m in modules if m.role == ROLE_EMBEDDING
                        and m.kind == "embedding" and (w := tensor(m, "weight")) is not None)
    return sizes.most_common(1)[0][0] if sizes else None


def _orient(modules: list[ModuleWeights], width: int | None) -> None:
    """Decide which projections are stored (in, out), as GPT-2's ``Conv1D``, from shapes.

    An input projection reads the residual width, an output projection writes it; a weight
    whose shape says so in only one way is decided, a square one follows the majority of the
    decided ones. Fans and He/Xavier scales are recomputed for transposed weights.
    """
    decided: dict[int, bool] = {}
    for module in modules:
        weight = weight_tensor(module)
        if module.role not in PROJECTION_ROLES or weight is None or len(weight.shape) != 2:
            continue
        rows, cols = weight.shape
        if module.role == ROLE_ATTENTION and module.kind == "linear" and (
                cols == 3 * rows or rows == 3 * cols):
            decided[id(module)] = cols == 3 * rows
            continue
        if width is None or rows == cols:
            continue
        reads = module.role in INPUT_ROLES
        standard = cols == width if reads else rows == width
        transposed = rows == width if reads else cols == width
        if standard != transposed:
            decided[id(module)] = transposed
    votes = Counter(decided.values())
    default = votes[True] > votes[False]
    for module in modules:
        weight = weight_tensor(module)
        if module.role not in PROJECTION_ROLES or weight is None or len(weight.shape) != 2:
            continue
        module.transposed = decided.get(id(module), default)
        shape = weight.shape[::-1] if module.transposed else weight.shape
        _set_scales(module, weight, shape)


def _set_scales(module: ModuleWeights, weight: TensorStats, shape: list[int]) -> None:
    module.fan_in, module.fan_out = fans_from_shape(shape)
    module.weight_rms = weight.rms
    module.init_scale_he = module.init_scale_xavier = None
    if weight.rms is not None and module.fan_in > 0 and module.fan_out > 0:
        module.init_scale_he = weight.rms / he_std(module.fan_in)
        module.init_scale_xavier = weight.rms / xavier_std(module.fan_in, module.fan_out)


def _mark_tied(modules: list[ModuleWeights]) -> None:
    """Mark weights that repeat an embedding exactly (a tied LM head, T5's ``embed_tokens``).

    Tied weights are one tensor: ``torch.save`` stores every name, ``save_pretrained`` and
    safetensors one of them. The copy is judged once, as the embedding.
    """
    seen: dict[tuple[tuple[int, ...], float | None, float | None], str] = {}
    # The embedding with the shortest path is the original (T5's ``shared``, not
    # ``encoder.embed_tokens``): the one ``save_pretrained`` keeps.
    for module in sorted(modules, key=lambda m: (m.role != ROLE_EMBEDDING, m.name.count("."),
                                                 canonical_key(m.name, m.kind))):
        weight = tensor(module, "weight")
        if weight is None or len(weight.shape) != 2 or not weight.rms:
            continue
        key = (tuple(weight.shape), weight.rms, weight.mean)
        if key in seen and module.role in (ROLE_EMBEDDING, ROLE_HEAD):
            module.tied_to = seen[key]
        elif module.role == ROLE_EMBEDDING:
            seen[key] = module.name


def _t5_heads(modules: Iterable[ModuleWeights]) -> int | None:
    """T5's attention heads: the width of its relative position bias (buckets x heads)."""
    for module in modules:
        if module.name.endswith("relative_attention_bias"):
            weight = tensor(module, "weight")
            if weight is not None and len(weight.shape) == 2:
                return weight.shape[1]
    return None


def reference_std(module: ModuleWeights, record: CheckpointRecord,
                  untrained: bool | None = None) -> float | None:
    """The std the module's family initializes its weight with (``None`` when unknown).

    Hugging Face's BERT, GPT-2, Llama and ViT: N(0, 0.02) for every Linear, conv and
    embedding; GPT-2 scales its residual projections (``c_proj``) by 1/sqrt(2 n_layer), which
    only an untrained model still shows (training moves them to the others' scale). T5:
    1/sqrt(fan_in) for projections (untrained queries also 1/sqrt(d_kv), for the same reason),
    1 for embeddings and an untied LM head. ``nn.Transformer``: Xavier for the fused q/k/v,
    PyTorch's default 1/sqrt(3 fan_in) for Linear layers, 1 for ``nn.Embedding``.
    """
    family = record.family
    if family is None or module.role in (None, ROLE_NORM):
        return None
    if untrained is None:
        untrained = bool(record.untrained)
    fan_in, fan_out = module.fan_in, module.fan_out
    if family in NORMAL_INIT_FAMILIES:
        if family == "gpt2" and module.role in OUTPUT_ROLES and untrained and record.blocks:
            return HF_INIT_STD / math.sqrt(2 * record.blocks)
        return HF_INIT_STD
    if module.kind == "embedding" or module.role == ROLE_EMBEDDING:
        if family == "t5" and module.name.endswith("relative_attention_bias"):
            return record.width ** -0.5 if record.width else None
        return 1.0
    if not fan_in or not fan_out:
        return None
    if family == "t5":
        if module.role == ROLE_HEAD:
            return 1.0 if module.name.rsplit(".", 1)[-1] == "lm_head" else fan_in ** -0.5
        if module.role == ROLE_QUERY and untrained:
            heads = _t5_heads(record.modules)
            return (fan_in * fan_out / heads) ** -0.5 if heads else None
        return fan_in ** -0.5
    if module.role == ROLE_ATTENTION and module.kind == "attention":
        return xavier_std(fan_in, fan_out)
    return (3 * fan_in) ** -0.5


def _reference(module: ModuleWeights, record: CheckpointRecord) -> None:
    if module.kind not in ("linear", "conv", "embedding", "attention") or module.tied_to:
        return
    weight = weight_tensor(module)
    if weight is None or weight.rms is None:
        return
    if module.fan_in is None and len(weight.shape) >= 2 and module.kind != "embedding":
        _set_scales(module, weight, weight.shape)
    module.reference_std = reference_std(module, record)
    if module.reference_std:
        module.init_ratio = weight.rms / module.reference_std


def _signal_gain(module: ModuleWeights, transformer: bool) -> None:
    """The factor a layer multiplies a unit-scale input's RMS by (with its activation).

    A plain network's layers, and MLP input projections, are taken to feed a ReLU-like
    activation: their gain is the He scale RMS * sqrt(fan_in / 2). The value, output and MLP
    output projections of a transformer, and its heads, are linear: RMS * sqrt(fan_in).
    Queries, keys and gates chain nothing.
    """
    if not transformer or module.role is None:
        module.signal_gain = module.init_scale_he
        return
    if module.role in (ROLE_QUERY, ROLE_KEY, ROLE_MLP_GATE, ROLE_EMBEDDING, ROLE_NORM) or \
            module.fan_in is None or module.weight_rms is None:
        return
    rms = module.weight_rms
    if module.role == ROLE_ATTENTION and module.fused_rms:
        rms = module.fused_rms.get("value", rms)
    relu = module.role == ROLE_MLP_IN
    module.signal_gain = rms * math.sqrt(module.fan_in / (2 if relu else 1))


# ----------------------------------------------------------------------------- chains


def _parent(name: str) -> str:
    return name.rpartition(".")[0] or "(root)"


def _usable(module: ModuleWeights) -> bool:
    gain = module.signal_gain if module.signal_gain is not None else module.init_scale_he
    return gain is not None


def assign_chains(modules: list[ModuleWeights]) -> None:
    """Number the runs of layers in series that nothing is known to re-scale.

    Transformer branches first: in each block, the value path (value or fused q/k/v, then the
    output projection of the same attention) and the MLP path (in, then out) are chains of two
    layers; queries, keys, gates and embeddings chain nothing. The other layers are read as a
    plain network, in canonical name order: a normalization layer ends a chain, and so does a
    block boundary (``blocks.0`` holding two layers, then ``blocks.1``), where residual
    connections usually sit; a plain stack (``features.0``, ``features.2``...) whose container
    holds one layer per index stays one chain.
    """
    for module in modules:
        module.chain = None
    ordered = sorted(modules, key=lambda m: canonical_key(m.name, m.kind))
    chain = 0
    transformer = any(m.role in QKV_ROLES for m in modules)
    if transformer:
        chain = _branch_chains(ordered)
    generic = [m for m in ordered if m.kind in ("linear", "conv") and _usable(m)
               and m.chain is None and (not transformer or m.role in (ROLE_HEAD, ROLE_HIDDEN))]
    in_generic = {id(m) for m in generic}  # identity: dataclass equality compares every field
    siblings = Counter(_parent(m.name) for m in generic)
    previous_block: str | None = None
    chain += 1
    for record in ordered:
        if record.kind in _NORM_KINDS or (
                transformer and record.role not in (None, ROLE_HEAD, ROLE_HIDDEN)):
            chain, previous_block = chain + 1, None
        elif id(record) in in_generic:
            parent = _parent(record.name)
            block = parent if siblings[parent] >= 2 else None
            if previous_block is not None and block != previous_block:
                chain += 1
            record.chain, previous_block = chain, block
    _renumber(ordered)


def _branch_chains(ordered: list[ModuleWeights]) -> int:
    """Chain each block's value -> output and MLP in -> out projections; return the last id."""
    chain = 0
    blocks: dict[str, list[ModuleWeights]] = {}
    for module in ordered:
        if module.block is not None and module.role in PROJECTION_ROLES and _usable(module):
            blocks.setdefault(module.block, []).append(module)
    for block, members in blocks.items():
        for first_roles, second_role in (((ROLE_VALUE, ROLE_ATTENTION), ROLE_ATTENTION_OUT),
                                         ((ROLE_MLP_IN,), ROLE_MLP_OUT)):
            firsts = [m for m in members if m.role in first_roles]
            seconds = [m for m in members if m.role == second_role]
            for first, second in _pairs(firsts, seconds, block):
                chain += 1
                first.chain = second.chain = chain
    return chain


def _pairs(firsts: list[ModuleWeights], seconds: list[ModuleWeights], block: str
           ) -> list[tuple[ModuleWeights, ModuleWeights]]:
    """Pair the layers of a block's branches: one each, else by their shared scope."""
    if len(firsts) == 1 and len(seconds) == 1:
        return [(firsts[0], seconds[0])]
    pairs = []
    for first in firsts:
        scope = _attention_scope(first.name, block) or _parent(first.name)
        match = [s for s in seconds if s.name.startswith(scope + ".")]
        if len(match) == 1:
            pairs.append((first, match[0]))
    return pairs


def _renumber(ordered: list[ModuleWeights]) -> None:
    """Chain ids 0, 1, 2... in canonical order of each chain's first layer."""
    mapping: dict[int, int] = {}
    for module in ordered:
        if module.chain is not None and module.chain not in mapping:
            mapping[module.chain] = len(mapping)
    for module in ordered:
        if module.chain is not None:
            module.chain = mapping[module.chain]
