"""How good is a learning-rate finder's suggestion? Measured against a grid search.

For each task: train the model at a constant learning rate for a fixed budget of steps, for
every LR of a log grid and two seeds; the best grid LR gives L(best), the untrained model
L(untrained). A finder's suggestion is trained the same way, and scored by

    normalized regret = (L(suggested) - L(best)) / (L(untrained) - L(best))

(0: as good as the best constant LR; 1: no better than not training; a run that diverges
scores 2). Finders, each given the same model initialization and data order:

- nndiag: ``nndiag.lr_find`` with its defaults (1e-7 .. 10, 100 steps).
- torch-lr-finder: ``LRFinder.range_test`` (1e-7 .. 10, 100 steps, its defaults) and the
  suggestion ``plot(suggest_lr=True)`` returns (steepest gradient, skip 10 / 5).
- fastai valley: fastai's ``valley`` rule (longest valley of the smoothed curve), re-implemented
  from fastai 2.8.12 because fastai does not install beside this CPU torch build, on a
  fastai-style sweep (EMA 0.98 with bias correction, stop at 4x the best loss, skip_end 5).
- fixed default: 1e-2 for SGD, 1e-3 for Adam/AdamW: what a finder must beat to be worth running.
- rules computed on nndiag's own curve (min/10, min/3, steepest, valley) show how the chosen rule
  compares with its alternatives.

Also printed: the range test's time against torch-lr-finder's for the same model, data and
step budget (both without early stopping), median of interleaved repeats.

Usage: python benchmarks/lr_find_quality.py [--tasks digits_mlp,...] [--quick]
Needs scikit-learn and torch-lr-finder (``pip install scikit-learn torch-lr-finder``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from nndiag.lrfind import lr_find, smooth_curve  # noqa: E402


@dataclass
class Task:
    name: str
    build: Callable[[], nn.Module]
    train: TensorDataset
    val: TensorDataset
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: str
    steps: int
    batch: int


def _optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)


def _split(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    return TensorDataset(x[order[:cut]], y[order[:cut]]), TensorDataset(x[order[cut:]],
                                                                         y[order[cut:]])


def _standardize(x: np.ndarray) -> torch.Tensor:
    return torch.tensor((x - x.mean(0)) / (x.std(0) + 1e-8), dtype=torch.float32)


def _seq_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


class _TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 16, dim: int = 32, length: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[:, : x.shape[1]]
        return self.head(self.encoder(h, mask=self.mask[: x.shape[1], : x.shape[1]],
                                      is_causal=True))


class _LSTMClassifier(nn.Module):
    def __init__(self, vocab: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.rnn = nn.LSTM(16, 48, batch_first=True)
        self.head = nn.Linear(48, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(x))
        return self.head(out[:, -1])


def make_tasks() -> list[Task]:
    from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits

    tasks = []
    x, y = load_digits(return_X_y=True)
    digits = _split(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
    tasks.append(Task("digits_mlp (SGD)", lambda: nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)),
        *digits, F.cross_entropy, "sgd", 300, 64))
    images = _split(torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8),
                    torch.tensor(y))
    tasks.append(Task("digits_cnn_bn (SGD)", lambda: nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)),
        *images, F.cross_entropy, "sgd", 200, 64))
    x, y = load_breast_cancer(return_X_y=True)
    tasks.append(Task("breast_cancer_mlp (Adam)", lambda: nn.Sequential(
        nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)),
        *_split(_standardize(x), torch.tensor(y)), F.cross_entropy, "adam", 150, 32))
    x, y = load_diabetes(return_X_y=True)
    target = torch.tensor((y - y.mean()) / y.std(), dtype=torch.float32).unsqueeze(1)
    tasks.append(Task("diabetes_regression (AdamW)", lambda: nn.Sequential(
        nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)),
        *_split(_standardize(x), target), F.mse_loss, "adamw", 200, 32))
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, 8, (2000, 15), generator=g)
    tasks.append(Task("lstm_first_token (Adam)", _LSTMClassifier,
                      *_split(seqs, seqs[:, 0] % 4), F.cross_entropy, "adam", 300, 64))
    starts = torch.randint(0, 16, (2000, 1), generator=g)
    strides = torch.randint(1, 4, (2000, 1), generator=g)
    tokens = (starts + strides * torch.arange(13)) % 16
    tasks.append(Task("transformer_arithmetic (AdamW)", _TinyTransformer,
                      *_split(tokens[:, :12], tokens[:, 1:]), _seq_loss, "adamw", 300, 64))
    return tasks


def _loader(data: TensorDataset, batch: int, seed: int) -> DataLoader:
    return DataLoader(data, batch_size=batch, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


def _model(task: Task, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return task.build()


@torch.no_grad()
def _val_loss(model: nn.Module, task: Task) -> float:
    model.eval()
    x, y = task.val.tensors
    return float(task.loss(model(x), y))


def train_val_loss(task: Task, lr: float, seed: int) -> float:
    """Validation loss after the task's budget at a constant learning rate (inf if diverged)."""
    model = _model(task, seed)
    optimizer = _optimizer(task.optimizer, model.parameters(), lr)
    loader, done = _loader(task.train, task.batch, seed), 0
    model.train()
    while done < task.steps:
        for x, y in loader:
            loss = task.loss(model(x), y)
            if not torch.isfinite(loss):
                return math.inf
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done >= task.steps:
                break
    value = _val_loss(model, task)
    return value if math.isfinite(value) else math.inf


def mean_loss(task: Task, lr: float, seeds: tuple[int, ...], cache: dict) -> float:
    key = (task.name, round(math.log10(lr), 6))
    if key not in cache:
        cache[key] = statistics.fmean(train_val_loss(task, lr, s) for s in seeds)
    return cache[key]


# ----------------------------------------------------------------------------- finders


def nndiag_finder(task: Task, early_stop: bool = True) -> tuple[float | None, object]:
    model = _model(task, 0)
    result = lr_find(model, _loader(task.train, task.batch, 0), loss=task.loss,
                     optimizer=lambda p, lr: _optimizer(task.optimizer, p, lr),
                     early_stop=early_stop)
    return result.suggested_lr, result


def torch_lr_finder(task: Task, early_stop: bool = True) -> float | None:
    from torch_lr_finder import LRFinder

    model = _model(task, 0)
    optimizer = _optimizer(task.optimizer, model.parameters(), 1e-7)
    finder = LRFinder(model, optimizer, task.loss, device="cpu")
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        finder.range_test(_loader(task.train, task.batch, 0), end_lr=10, num_iter=100,
                          diverge_th=5 if early_stop else 1e30)
        try:
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots()
            _, lr = finder.plot(ax=ax, suggest_lr=True)
            plt.close(fig)
        except Exception:  # too few points before divergence: no suggestion
            lr = None
    finder.reset()
    return lr


def fastai_valley_rule(lrs: list[float], losses: list[float]) -> float:
    """fastai 2.8.12 ``valley``: the point 1/2 past 1/3 of the longest decreasing run."""
    n = len(losses)
    max_start = max_end = 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return float(lrs[max_start + int(sections) + int(sections / 2)])


def fastai_finder(task: Task) -> float | None:
    """A fastai-style sweep (defaults of ``Learner.lr_find``) read with ``valley``."""
    model = _model(task, 0)
    optimizer = _optimizer(task.optimizer, model.parameters(), 1e-7)
    loader = _loader(task.train, task.batch, 0)
    lrs, smooth, avg, best = [], [], 0.0, math.inf
    batches = iter(loader)
    model.train()
    for i in range(100):
        lr = 1e-7 * (10 / 1e-7) ** (i / 99)
        for group in optimizer.param_groups:
            group["lr"] = lr
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        loss = task.loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        avg = 0.98 * avg + 0.02 * float(loss.detach())
        value = avg / (1 - 0.98 ** (i + 1))
        lrs.append(lr)
        smooth.append(value)
        best = min(best, value)
        if not math.isfinite(value) or value > 4 * best:
            break
    lrs, smooth = lrs[:-5], smooth[:-5]
    return fastai_valley_rule(lrs, smooth) if len(lrs) > 2 else None


def alternative_rules(result) -> dict[str, float | None]:
    """Other ways of reading nndiag's own curve, for comparison with the rule it uses."""
    lrs = np.asarray(result.lrs)
    losses = np.asarray(result.losses)
    finite = np.isfinite(losses)
    cut = len(losses) if finite.all() else int(np.argmin(finite))
    if cut < 8:
        return {}
    smoothed = smooth_curve(np.log10(lrs[:cut]), losses[:cut])
    low = int(np.argmin(smoothed))
    slope = np.gradient(smoothed[: low + 1], np.log10(lrs[: low + 1])) if low >= 2 else [0]
    return {
        "min/10": float(lrs[low] / 10),
        "min/3": float(lrs[low] / 3),
        "steepest": float(lrs[int(np.argmin(slope))]),
        "valley": fastai_valley_rule(list(lrs[:cut]), list(smoothed)),
    }


def regret(loss: float, best: float, untrained: float) -> float:
    if not math.isfinite(loss):
        return 2.0
    return min(2.0, max(0.0, (loss - best) / (untrained - best)))


def time_ratio(task: Task, repeats: int) -> tuple[float, float]:
    ours, theirs = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        nndiag_finder(task, early_stop=False)
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        torch_lr_finder(task, early_stop=False)
        theirs.append(time.perf_counter() - start)
    return statistics.median(ours), statistics.median(theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", default="", help="comma-separated substrings of task names")
    parser.add_argument("--quick", action="store_true", help="a coarser grid (half the points)")
    parser.add_argument("--timing-repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tasks = [t for t in make_tasks()
             if not args.tasks or any(s in t.name for s in args.tasks.split(","))]
    seeds = (0, 1)
    step = 0.5 if args.quick else 0.25
    grid = [10 ** e for e in np.arange(-5.0, 0.5 + 1e-9, step)]
    cache: dict = {}
    columns = ["nndiag", "torch-lr-finder", "fastai valley", "fixed default",
               "min/10", "min/3", "steepest", "valley"]
    table: dict[str, dict[str, float]] = {}
    lrs_used: dict[str, dict[str, float | None]] = {}
    for task in tasks:
        started = time.perf_counter()
        untrained = statistics.fmean(_val_loss(_model(task, s), task) for s in seeds)
        losses = {lr: mean_loss(task, lr, seeds, cache) for lr in grid}
        best_lr = min(losses, key=losses.get)
        best = losses[best_lr]
        ours, result = nndiag_finder(task)
        suggestions = {"nndiag": ours, "torch-lr-finder": torch_lr_finder(task),
                       "fastai valley": fastai_finder(task),
                       "fixed default": 1e-2 if task.optimizer == "sgd" else 1e-3}
        suggestions.update(alternative_rules(result))
        lrs_used[task.name] = suggestions
        table[task.name] = {}
        for name, lr in suggestions.items():
            loss = mean_loss(task, lr, seeds, cache) if lr else math.inf
            table[task.name][name] = regret(loss, best, untrained)
        print(f"{task.name}: best grid lr {best_lr:.2e} (val {best:.4f}, untrained "
              f"{untrained:.4f}); " + ", ".join(
                  f"{k} {v:.2e}" if v else f"{k} none" for k, v in suggestions.items())
              + f"  [{time.perf_counter() - started:.0f}s]", flush=True)

    print("\nnormalized regret (0 = best constant LR of the grid, 1 = untrained, 2 = diverged)")
    print(f"{'task':32s}" + "".join(f"{c:>16s}" for c in columns))
    for name, row in table.items():
        print(f"{name:32s}" + "".join(f"{row.get(c, math.nan):16.3f}" for c in columns))
    means = {c: statistics.fmean(row.get(c, 2.0) for row in table.values()) for c in columns}
    worst = {c: max(row.get(c, 2.0) for row in table.values()) for c in columns}
    print(f"{'mean':32s}" + "".join(f"{means[c]:16.3f}" for c in columns))
    print(f"{'worst':32s}" + "".join(f"{worst[c]:16.3f}" for c in columns))

    timing_task = next((t for t in tasks if "cnn" in t.name), tasks[0])
    ours_t, theirs_t = time_ratio(timing_task, args.timing_repeats)
    print(f"\nrange test time, {timing_task.name}, 100 steps, no early stop: nndiag "
          f"{ours_t:.2f}s, torch-lr-finder {theirs_t:.2f}s, ratio {ours_t / theirs_t:.2f}x "
          "(target <= 1.1x)")


if __name__ == "__main__":
    main()
