"""Small built-in models with known pathologies and healthy counterparts.

Each public function builds a model deterministically (seeded, without touching the caller's
global RNG), so ``nndiag inspect --model nndiag.examples:<name> --input-shape ...`` works with
no user files. The input shape each model expects is in ``INPUT_SHAPES``.

Pathological:
    deep_sigmoid_mlp: 20 stacked sigmoids: vanishing gradients, saturation.
    xavier_relu_convnet: 30 plain ReLU conv layers with Xavier init: activations and
        gradients shrink ~0.7x per layer.
    normal_init_mlp: 10-layer 256-wide ReLU MLP with N(0, 1) weights: explodes forward.
    dead_relu_mlp: ReLU MLP whose hidden biases are all -3: most units never fire.
    functional_dead_relu_mlp: the same with ``F.relu`` applied inside ``forward``.
    saturated_tanh_mlp: tanh MLP with oversized weights: saturated units.
    unused_branch_model: a branch whose parameters never reach the loss.

Healthy:
    he_mlp, functional_relu_mlp, resnet_bn, transformer_preln, lstm_classifier, gru_tagger,
    residual_mlp, dict_input_model (dict inputs, tuple outputs), inplace_relu_cnn,
    frozen_backbone_mlp, shared_weights_mlp.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

ModelFactory = TypeVar("ModelFactory", bound=Callable[..., Any])

VOCAB = 100
INPUT_SHAPES: dict[str, str] = {
    "deep_sigmoid_mlp": "64,32",
    "xavier_relu_convnet": "16,3,8,8",
    "normal_init_mlp": "64,32",
    "dead_relu_mlp": "64,32",
    "functional_dead_relu_mlp": "64,32",
    "saturated_tanh_mlp": "64,32",
    "unused_branch_model": "64,32",
    "he_mlp": "64,32",
    "functional_relu_mlp": "64,32",
    "resnet_bn": "16,3,32,32",
    "transformer_preln": "8,16 --input-dtype long",
    "lstm_classifier": "16,12 --input-dtype long",
    "gru_tagger": "16,12 --input-dtype long",
    "residual_mlp": "64,32",
    "inplace_relu_cnn": "16,3,16,16",
    "frozen_backbone_mlp": "64,32",
    "shared_weights_mlp": "64,32",
}


def _seeded(factory: ModelFactory) -> ModelFactory:
    """Build under a fixed seed, restoring the caller's RNG afterwards."""

    @functools.wraps(factory)
    def build(*args: Any, **kwargs: Any) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return factory(*args, **kwargs)

    return build


def _mlp(widths: list[int], activation: Callable[[], nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def _init_linear(model: nn.Module, init: Callable[[torch.Tensor], Any], bias: float = 0.0) -> None:
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            init(module.weight)
            nn.init.constant_(module.bias, bias)


@_seeded
def deep_sigmoid_mlp(depth: int = 20, width: int = 32) -> nn.Sequential:
    """``depth`` Linear+Sigmoid layers (PyTorch default init) and a 10-class head."""
    return _mlp([32] + [width] * depth + [10], nn.Sigmoid)


class _PlainConvNet(nn.Module):
    def __init__(self, depth: int, channels: int) -> None:
        super().__init__()
        convs = [nn.Conv2d(3, channels, 3, padding=1)]
        convs += [nn.Conv2d(channels, channels, 3, padding=1) for _ in range(depth - 1)]
        self.convs = nn.ModuleList(convs)
        self.act = nn.ReLU()
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = self.act(conv(x))
        return self.head(x.mean(dim=(2, 3)))


@_seeded
def xavier_relu_convnet(depth: int = 30, channels: int = 16) -> nn.Module:
    """A plain ``depth``-layer ReLU conv net initialized with Xavier (no skip, no norm)."""
    model = _PlainConvNet(depth, channels)
    _init_linear(model, nn.init.xavier_normal_)
    return model


@_seeded
def normal_init_mlp(depth: int = 10, width: int = 256) -> nn.Sequential:
    """A ``depth``-layer ``width``-wide ReLU MLP with N(0, 1) weights."""
    model = _mlp([32] + [width] * (depth - 1) + [10], nn.ReLU)
    _init_linear(model, nn.init.normal_)
    return model


def _he(weight: torch.Tensor) -> None:
    nn.init.kaiming_normal_(weight, nonlinearity="relu")


@_seeded
def he_mlp(depth: int = 8, width: int = 256) -> nn.Sequential:
    """A healthy He-initialized ReLU MLP."""
    model = _mlp([32] + [width] * (depth - 1) + [10], nn.ReLU)
    _init_linear(model, _he)
    return model


@_seeded
def dead_relu_mlp(depth: int = 4, width: int = 64) -> nn.Sequential:
    """A He-initialized ReLU MLP whose biases are all -3: most hidden units never fire."""
    model = _mlp([32] + [width] * (depth - 1) + [10], nn.ReLU)
    _init_linear(model, _he, bias=-3.0)
    return model


class _FunctionalMLP(nn.Module):
    def __init__(self, depth: int, width: int, bias: float) -> None:
        super().__init__()
        self.hidden = nn.ModuleList(
            [nn.Linear(32 if i == 0 else width, width) for i in range(depth - 1)]
        )
        self.out = nn.Linear(width, 10)
        _init_linear(self, _he, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.out(x)


@_seeded
def functional_dead_relu_mlp(depth: int = 4, width: int = 64) -> nn.Module:
    """Like ``dead_relu_mlp`` but with ``F.relu`` inside ``forward`` (no activation modules)."""
    return _FunctionalMLP(depth, width, bias=-3.0)


@_seeded
def functional_relu_mlp(depth: int = 4, width: int = 64) -> nn.Module:
    """A healthy He-initialized MLP with ``F.relu`` inside ``forward``."""
    return _FunctionalMLP(depth, width, bias=0.0)


@_seeded
def saturated_tanh_mlp(depth: int = 6, width: int = 64) -> nn.Sequential:
    """A tanh MLP whose weights are 6x the Xavier scale: most units sit in saturation."""
    model = _mlp([32] + [width] * (depth - 1) + [10], nn.Tanh)
    _init_linear(model, lambda w: nn.init.xavier_normal_(w, gain=6.0))
    return model


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class _ResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...], blocks: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages: list[nn.Module] = []
        c_in = widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks):
                stages.append(_BasicBlock(c_in, width, 2 if i > 0 and j == 0 else 1))
                c_in = width
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, 10)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(self.stem(x)).mean(dim=(2, 3)))


@_seeded
def resnet_bn(widths: tuple[int, ...] = (16, 32, 64), blocks: int = 2) -> nn.Module:
    """A CIFAR-style ResNet with BatchNorm (13 conv layers with the defaults)."""
    return _ResNet(widths, blocks)


class _TokenTransformer(nn.Module):
    def __init__(self, layers: int, dim: int, norm_first: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(torch.randn(1, 64, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=2 * dim, dropout=0.0,
                                           batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        return self.head(self.norm(self.encoder(x)))


@_seeded
def transformer_preln(layers: int = 4, dim: int = 64) -> nn.Module:
    """A pre-LayerNorm ``nn.TransformerEncoder`` language model over a 100-token vocabulary."""
    return _TokenTransformer(layers, dim, norm_first=True)


class _RecurrentClassifier(nn.Module):
    def __init__(self, cell: type[nn.LSTM] | type[nn.GRU], per_token: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.rnn = cell(32, 64, num_layers=2, batch_first=True)
        self.head = nn.Linear(64, 10)
        self.per_token = per_token

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        states, _ = self.rnn(self.embed(tokens))
        return self.head(states if self.per_token else states[:, -1])


@_seeded
def lstm_classifier() -> nn.Module:
    """Embedding, 2-layer LSTM and a 10-class head on the last step."""
    return _RecurrentClassifier(nn.LSTM, per_token=False)


@_seeded
def gru_tagger() -> nn.Module:
    """Embedding, 2-layer GRU and a 10-class head on every step."""
    return _RecurrentClassifier(nn.GRU, per_token=True)


class _ResidualMLP(nn.Module):
    def __init__(self, blocks: int, width: int) -> None:
        super().__init__()
        self.inp = nn.Linear(32, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
            for _ in range(blocks)
        )
        self.out = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = x + block(x)
        return self.out(x)


@_seeded
def residual_mlp(blocks: int = 24, width: int = 64) -> nn.Module:
    """24 residual blocks ``x + Linear(ReLU(Linear(x)))`` with PyTorch's default init."""
    return _ResidualMLP(blocks, width)


class _DictModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.meta = nn.Sequential(nn.Linear(5, 16), nn.ReLU())
        self.head = nn.Linear(8 + 16, 4)
        self.aux = nn.Linear(16, 1)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.conv(image).mean(dim=(2, 3))
        features = self.meta(meta)
        return self.head(torch.cat([pooled, features], dim=1)), self.aux(features)


@_seeded
def dict_input_model() -> nn.Module:
    """Called as ``model(image=..., meta=...)``; returns ``(logits, aux)``."""
    return _DictModel()


def dict_input_data(batches: int = 2, size: int = 16) -> list[tuple[dict[str, torch.Tensor],
                                                                    torch.Tensor]]:
    """Batches ``({"image", "meta"}, labels)`` for ``dict_input_model``."""
    generator = torch.Generator().manual_seed(1)
    return [({"image": torch.randn(size, 3, 8, 8, generator=generator),
              "meta": torch.randn(size, 5, generator=generator)},
             torch.randint(0, 4, (size,), generator=generator)) for _ in range(batches)]


@_seeded
def inplace_relu_cnn() -> nn.Sequential:
    """A small CNN with BatchNorm and ``ReLU(inplace=True)``."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


@_seeded
def frozen_backbone_mlp() -> nn.Sequential:
    """A He-initialized MLP whose first two layers are frozen (fine-tuning style)."""
    model = he_mlp.__wrapped__(depth=5, width=64)  # type: ignore[attr-defined]
    for param in list(model.parameters())[:4]:
        param.requires_grad_(False)
    return model


class _SharedMLP(nn.Module):
    def __init__(self, repeats: int, width: int) -> None:
        super().__init__()
        self.inp = nn.Linear(32, width)
        self.shared = nn.Linear(width, width)
        self.act = nn.ReLU()
        self.out = nn.Linear(width, 10)
        self.repeats = repeats
        _init_linear(self, _he)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.inp(x))
        for _ in range(self.repeats):
            x = self.act(self.shared(x))
        return self.out(x)


@_seeded
def shared_weights_mlp() -> nn.Module:
    """One Linear (and one ReLU module) applied three times: shared parameters."""
    return _SharedMLP(3, 64)


class _UnusedBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
        self.branch = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@_seeded
def unused_branch_model() -> nn.Module:
    """A model whose ``branch`` is defined but never called."""
    return _UnusedBranch()


def dict_input_loss(outputs: tuple[torch.Tensor, torch.Tensor],
                    targets: torch.Tensor) -> torch.Tensor:
    """Loss for ``dict_input_model``: cross-entropy on the logits plus a small aux penalty."""
    logits, aux = outputs
    return F.cross_entropy(logits, targets) + 0.1 * aux.square().mean()


def classification_data(batches: int = 16, batch_size: int = 64,
                        features: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of a learnable 10-class problem on 32 features (for the MLP examples).

    The label is the index of the largest of the first ten features.
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batches * batch_size, features, generator=generator)
    y = x[:, :10].argmax(dim=1)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


def train_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
               optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """A healthy training step ``f(model, batch, optimizer) -> loss`` (``--train-step``)."""
    inputs, targets = batch
    model.train()
    optimizer.zero_grad()
    loss = F.cross_entropy(model(inputs), targets)
    loss.backward()
    optimizer.step()
    return loss
