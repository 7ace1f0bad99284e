"""The fix catalogue as data: each fix id with its summary, code and automation.

Summaries and code are ``str.format`` templates: a ``{name}`` placeholder is filled with a
value that depends on the model (its layer types, an activation, the measured input scale),
given to ``make_fix``. A fix phrased differently in some situations (BatchNorm after conv
layers versus after Linear layers) keeps its one id and names the alternative wording as a
variant. ``automatic`` marks the fixes ``--try-fixes`` can apply to a copy of the model and
re-measure (see ``nndiag.autofix``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nndiag.findings import Fix


@dataclass(frozen=True)
class Wording:
    """What a fix says and the code it shows, as templates.

    Attributes:
        summary: One line saying what to change, with ``{placeholders}``.
        code: The torch code to apply it, with ``{placeholders}``.
    """

    summary: str
    code: str


@dataclass(frozen=True)
class FixTemplate:
    """One entry of the catalogue.

    Attributes:
        summary: The default summary template.
        code: The default code template.
        automatic: True when ``--try-fixes`` can apply the fix and re-measure.
        variants: Alternative wordings by name, for situations the default does not fit.
    """

    summary: str
    code: str
    automatic: bool = False
    variants: Mapping[str, Wording] = field(default_factory=dict)


CATALOG: dict[str, FixTemplate] = {
    "he_init": FixTemplate(
        summary="re-initialize the layers that feed ReLUs with He (Kaiming) init, which keeps "
                "the signal's scale constant through ReLU layers",
        code="""
for m in model.modules():
    if isinstance(m, {layer_types}):
        nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)""",
        automatic=True),
    "xavier_init": FixTemplate(
        summary="re-initialize the layers that feed {activation} with Xavier (Glorot) init, "
                "which keeps pre-activations in the activation's linear range",
        code="""
for m in model.modules():
    if isinstance(m, {layer_types}):
        nn.init.xavier_normal_(m.weight, gain=nn.init.calculate_gain("{gain}"))
        if m.bias is not None:
            nn.init.zeros_(m.bias)""",
        automatic=True,
        variants={"output_layer": Wording(
            summary="initialize the output layer small so the logits start near zero",
            code="nn.init.normal_(model.head.weight, std=1e-3); nn.init.zeros_(model.head.bias)",
        )}),
    "orthogonal_init": FixTemplate(
        summary="initialize the recurrent (hidden-to-hidden) weights orthogonally, which "
                "preserves the signal's norm across steps",
        code="""
for name, p in rnn.named_parameters():
    if "weight_hh" in name:
        nn.init.orthogonal_(p)""",
        automatic=True),
    "batch_norm": FixTemplate(
        summary="insert normalization after each Linear layer (before its activation): "
                "BatchNorm1d, or LayerNorm for small or variable batches",
        code="nn.Sequential(nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), "
             "nn.ReLU())",
        variants={"conv": Wording(
            summary="insert BatchNorm after each conv layer (before its activation) so every "
                    "layer sees a unit-scale signal",
            code="""
nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
              nn.BatchNorm2d(c_out), nn.ReLU())""",
        )}),
    "layer_norm": FixTemplate(
        summary="normalize each block's input with LayerNorm (pre-norm)",
        code="x = x + block(nn.LayerNorm(dim)(x))   # keep the LayerNorm as a module of the block"),
    "norm_gain_init": FixTemplate(
        summary="start every normalization layer at the identity: gains 1, shifts 0",
        code="""
norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
for m in model.modules():
    if isinstance(m, norms) and m.weight is not None:
        nn.init.ones_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)"""),
    "gradient_clipping": FixTemplate(
        summary="clip the global gradient norm before each optimizer step",
        code="""
loss.backward()
torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
optimizer.step()"""),
    "skip_connections": FixTemplate(
        summary="add residual connections around blocks of layers, so the gradient has a path "
                "that does not shrink with depth",
        code="""
class Residual(nn.Module):
    def __init__(self, block): super().__init__(); self.block = block
    def forward(self, x): return x + self.block(x)"""),
    "non_saturating_activation": FixTemplate(
        summary="replace the hidden {activation} activations with ReLU (or GELU) and "
                "re-initialize with He init: ReLU passes the full gradient for every active unit",
        code="""
for m in list(model.modules()):
    for child_name, child in m.named_children():
        if isinstance(child, nn.{module}):
            setattr(m, child_name, nn.ReLU())
# then apply He init (he_init) to the Linear/conv layers""",
        automatic=True),
    "trainer_mean_loss": FixTemplate(
        summary="let the Trainer divide the loss by the accumulation steps",
        code="""
# before building the Trainer, which then averages the micro-batches' losses
model.accepts_loss_kwargs = False"""),
    "lower_learning_rate": FixTemplate(
        summary="lower the learning rate (try 10x lower, or run `nndiag lr-find`)",
        code="""
for group in optimizer.param_groups:  # your optimizer, its other settings kept
    group["lr"] = group["lr"] / 10"""),
    "raise_learning_rate": FixTemplate(
        summary="raise the learning rate",
        code="""
for group in optimizer.param_groups:  # your optimizer, its other settings kept
    group["lr"] = group["lr"] * 10"""),
    "normalize_inputs": FixTemplate(
        summary="standardize the inputs (measured mean {mean:.3g}, std {std:.3g}) to mean 0 "
                "and std 1",
        code="x = (x - {mean:.4g}) / {std:.4g}   # better: per-feature statistics of the "
             "training set",
        automatic=True),
    "bias_init": FixTemplate(
        summary="reset the biases feeding the dead units ({layers}) to zero (or a small "
                "positive value) so that units start active",
        code="""
for m in model.modules():
    if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
        nn.init.zeros_(m.bias)   # or nn.init.constant_(m.bias, 0.01)""",
        automatic=True),
    "gated_recurrent_unit": FixTemplate(
        summary="replace nn.RNN with nn.LSTM or nn.GRU, whose gates carry the gradient across "
                "time steps",
        code="rnn = nn.LSTM(input_size, hidden_size, batch_first=True)"),
    "scaled_residual_init": FixTemplate(
        summary="initialize like GPT-2: every Linear and embedding N(0, 0.02), the projections "
                "that write into the residual stream N(0, 0.02 / sqrt(2 x {n_blocks} blocks)), "
                "biases zero, LayerNorms at 1",
        code="""
import math
# the projections that write into the residual stream (GPT-2, Llama, BERT, T5, nn.Transformer)
residual_out = {{"c_proj", "o_proj", "out_proj", "down_proj", "fc2", "linear2", "o", "wo"}}
for name, m in model.named_modules():
    if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D":
        residual = name.rsplit(".", 1)[-1] in residual_out or name.endswith("output.dense")
        std = 0.02 / math.sqrt(2 * {n_blocks}) if residual else 0.02
        nn.init.normal_(m.weight, mean=0.0, std=std)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, mean=0.0, std=0.02)
    elif isinstance(m, nn.LayerNorm) and m.weight is not None:
        nn.init.ones_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)""",
        automatic=True),
    "qk_norm": FixTemplate(
        summary="normalize queries and keys per head before their dot product (QK-norm), "
                "which bounds the attention logits whatever the weights' scale",
        code="""
class QKNorm(nn.Module):
    def __init__(self, head_dim):
        super().__init__(); self.q, self.k = nn.LayerNorm(head_dim), nn.LayerNorm(head_dim)
    def forward(self, q, k):  # q, k: (batch, heads, tokens, head_dim)
        return self.q(q), self.k(k)
# in the attention: q, k = self.qk_norm(q, k) before scaled_dot_product_attention(q, k, v)"""),
    "lr_warmup": FixTemplate(
        summary="warm the learning rate up over the first steps",
        code="""
scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=500)
# call scheduler.step() after each optimizer.step()"""),
    # Fixes of the user's own training step: code changes, not hyperparameters. The code is
    # a step function (F = torch.nn.functional), ready to compare with the user's own.
    "zero_grad": FixTemplate(
        summary="zero the gradients once per optimizer step: backward() adds to .grad, it "
                "never overwrites it",
        code="""
def train_step(model, batch, optimizer):
    x, y = batch
    optimizer.zero_grad()              # every step, before backward()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss
# accumulating k micro-batches on purpose? zero right after each optimizer.step():
#     (loss / k).backward()
#     if (i + 1) % k == 0:
#         optimizer.step()
#         optimizer.zero_grad()""",
        variants={"order": Wording(
            summary="call optimizer.zero_grad() before loss.backward(), not between backward() "
                    "and step(): there it wipes the gradient the step was about to apply",
            code="""
def train_step(model, batch, optimizer):
    x, y = batch
    optimizer.zero_grad()              # first: clears the last step's gradient
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()                   # applies this step's gradient
    return loss""")}),
    "logits_to_loss": FixTemplate(
        summary="pass the raw logits to the loss (cross_entropy applies log_softmax itself): "
                "a softmax before it squashes the scores into [0, 1] and caps what the model "
                "can learn",
        code="""
def train_step(model, batch, optimizer):
    x, y = batch
    optimizer.zero_grad()
    logits = model(x)                  # no softmax before the loss
    loss = F.cross_entropy(logits, y)
    loss.backward()
    optimizer.step()
    return loss
# probabilities only where you need them (metrics, predictions): logits.softmax(dim=1)""",
        variants={
            "model": Wording(
                summary="remove the softmax from the end of the model's forward and give the "
                        "logits to the loss; apply softmax only to make predictions",
                code="""
class Classifier(nn.Module):
    def __init__(self, body, head):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x):
        return self.head(self.body(x))       # logits: no nn.Softmax / .softmax() here
# loss = F.cross_entropy(model(x), y); probabilities = model(x).softmax(dim=1)"""),
            "nll": Wording(
                summary="give nll_loss log-probabilities (log_softmax), not probabilities "
                        "(softmax); or pass the logits to cross_entropy",
                code="""
def classification_loss(logits, y):
    return F.nll_loss(F.log_softmax(logits, dim=1), y)   # = F.cross_entropy(logits, y)"""),
            "binary": Wording(
                summary="pass the raw logits to binary_cross_entropy_with_logits (it applies "
                        "the sigmoid itself), or use binary_cross_entropy on probabilities",
                code="""
def binary_loss(logits, y):
    return F.binary_cross_entropy_with_logits(logits, y.float())   # no sigmoid before it"""),
        }),
    "train_mode": FixTemplate(
        summary="put the model in training mode in the training step (model.train()), and "
                "use model.eval() only around evaluation, switching back afterwards",
        code="""
def train_step(model, batch, optimizer):
    model.train()                      # dropout on, BatchNorm on batch statistics
    x, y = batch
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss


def evaluate(model, batches):
    model.eval()
    with torch.no_grad():
        losses = [F.cross_entropy(model(x), y) for x, y in batches]
    model.train()                      # back to training mode
    return sum(losses) / len(losses)"""),
    "mean_reduction": FixTemplate(
        summary="average the loss over the batch (reduction=\"mean\", the default), so that "
                "the step size does not grow with the batch size",
        code="""
def classification_loss(logits, y):
    return F.cross_entropy(logits, y)  # reduction="mean": the average over the batch
    # summing per-sample losses by hand? divide by the number of samples:
    # return F.cross_entropy(logits, y, reduction="sum") / y.shape[0]"""),
    "align_inputs_labels": FixTemplate(
        summary="keep every input with its own target: index, sort or shuffle inputs and "
                "targets with one permutation",
        code="""
def reorder(x, y, order):              # order: torch.randperm(len(x)), lengths.argsort()...
    return x[order], y[order]          # the same order for inputs and targets
# datasets: DataLoader(TensorDataset(x, y), shuffle=True), never x and y shuffled apart"""),
    "batch_first_reshape": FixTemplate(
        summary="keep the batch dimension first and apart: flatten with reshape(batch, -1), "
                "swap dimensions with transpose/permute, never with view or reshape",
        code="""
def flatten(h):
    return h.reshape(h.shape[0], -1)   # each sample's values stay in its own row
# swapping dimensions: h.transpose(0, 1), not h.view(h.shape[1], h.shape[0])"""),
    "optimizer_params": FixTemplate(
        summary="build the optimizer over every trainable parameter, with a non-zero "
                "learning rate in each group",
        code="""
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
# param groups: every trainable parameter in exactly one group, none with lr=0""",
        variants={"step_call": Wording(
            summary="call optimizer.step() after loss.backward() in the training step",
            code="""
def train_step(model, batch, optimizer):
    x, y = batch
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()                   # applies the gradient: without it nothing learns
    return loss""")}),
}


def make_fix(fix_id: str, variant: str | None = None, **values: Any) -> Fix:
    """Instantiate a catalogue fix.

    Args:
        fix_id: A fix id of ``CATALOG``.
        variant: The name of an alternative wording of that fix, or ``None`` for the default.
        **values: The values of the template's placeholders.

    Returns:
        The fix, its code stripped of leading and trailing blank lines.

    Raises:
        KeyError: An unknown fix id or variant, or a placeholder without a value.

    Example:
        >>> make_fix("gradient_clipping").code.splitlines()[1]
        'torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)'
    """
    entry = CATALOG[fix_id]
    wording = entry.variants[variant] if variant is not None else entry
    return Fix(fix_id, wording.summary.format(**values), wording.code.format(**values).strip("\n"),
               automatic=entry.automatic)


# Learning-rate fixes and the factor each applies.
LR_FACTORS = {"lower_learning_rate": 0.1, "raise_learning_rate": 10.0}
# torch.optim's optimizers built as Class(params, lr=...) (named here: advice imports no torch).
TORCH_OPTIMIZERS = frozenset({"SGD", "Adam", "AdamW", "Adamax", "Adagrad", "Adadelta",
                              "Adafactor", "ASGD", "NAdam", "RAdam", "RMSprop", "Rprop"})


def fit_learning_rate_fix(fix: Fix, optimizer: str | None, lr: float | None) -> Fix:
    """A learning-rate fix written for the run's own optimizer class and rate.

    A ``torch.optim`` class is rebuilt with the new rate (the user keeps their other
    arguments); any other optimizer gets its parameter groups' rate set.
    """
    factor = LR_FACTORS.get(fix.id)
    if factor is None or lr is None or not math.isfinite(lr) or lr <= 0:
        return fix
    new = f"{lr * factor:.3g}"
    if optimizer in TORCH_OPTIMIZERS:
        code = (f"optimizer = torch.optim.{optimizer}(model.parameters(), lr={new})"
                f"  # was lr={lr:.3g}; keep your other arguments")
    else:
        code = (f"for group in optimizer.param_groups:  # {optimizer or 'your optimizer'} "
                f"at {lr:.3g}\n    group[\"lr\"] = {new}")
    return Fix(fix.id, fix.summary, code, automatic=fix.automatic)


# ----------------------------------------------------------------------------- placeholder values

# Weight-layer classes of torch.nn a snippet may name (Hugging Face's Conv1D is not one).
TORCH_WEIGHT_LAYERS = frozenset({"Linear", "Bilinear", "Conv1d", "Conv2d", "Conv3d",
                                 "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"})
_MODULE_NAME = {"sigmoid": "Sigmoid", "tanh": "Tanh", "hardtanh": "Hardtanh",
                "softsign": "Softsign", "hardsigmoid": "Hardsigmoid"}
# Activations ``nn.init.calculate_gain`` knows; for the others the snippet uses the linear gain
# (1), as ``--try-fixes`` does when it applies Xavier init.
_GAIN_NAMES = frozenset({"sigmoid", "tanh", "relu", "leaky_relu", "selu", "linear"})


def layer_types(kinds: Iterable[str]) -> str:
    """The ``{layer_types}`` value: the model's Linear/conv classes as an ``isinstance`` argument.

    Args:
        kinds: Module class names found in the model (``Linear``, ``Conv2d``, ``ReLU``...).

    Returns:
        ``nn.Linear``, or a tuple such as ``(nn.Conv2d, nn.Linear)``; ``nn.Linear`` when the
        model has none.
    """
    layers = sorted(k for k in set(kinds) if k in TORCH_WEIGHT_LAYERS)
    names = ", ".join(f"nn.{k}" for k in layers or ["Linear"])
    return f"({names})" if len(layers) > 1 else names


def activation_module(activation: str) -> str:
    """The ``{module}`` value: the ``nn`` class of an activation kind (``tanh`` -> ``Tanh``)."""
    return _MODULE_NAME.get(activation, activation.title())


def init_gain(activation: str) -> str:
    """The ``{gain}`` value: the ``calculate_gain`` name for an activation kind."""
    return activation if activation in _GAIN_NAMES else "linear"
