"""Cost of ``nndiag.Monitor`` in a training loop, as a ratio to the same loop without it.

Same process, one thread, CPU; the variants are interleaved in blocks of --block steps and the
median time per step of each is compared with the plain loop's:

- the same plain loop again on its own copy of the model (how far two identical loops differ:
  the noise floor of every ratio on this machine);
- Monitor(every=50) and Monitor(every=1), writing a run log;
- a naive recorder as a peer, recording the same statistics the obvious way on every step:
  forward hooks on every layer reading mean, std and dead fraction with ``.item()``, and a loop
  over the parameters reading gradient norm, weight norm and update ratio (a full copy of the
  weights before the step) with ``.item()``;
- a bare recorder (``BareRecorder``): the same kinds of reductions with none of the
  bookkeeping (a little less work than ``Monitor``'s: weight norms on subsets, ReLU sums per
  position), a floor under a recorder that takes them in Python hooks, one kernel at a time.

Targets (issue 20): every=50 <= 1.01x, every=1 <= 1.15x and cheaper than the naive recorder
on each model (the 25x256 MLP with SGD+momentum at batch 64 is the case issue 9 names). Run
it on a quiet machine: another process on the second core moves every ratio by several
percent.

Usage: python benchmarks/monitor_overhead.py [--repeats 7] [--block 50]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nndiag import examples
from nndiag.monitor import Monitor


def mlp25x256() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(25):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(256, 10))


def mlp25() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(256, 512), nn.ReLU()]
    for _ in range(23):
        layers += [nn.Linear(512, 512), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(512, 10))


def cnn_bn() -> nn.Module:
    return examples.resnet_bn(widths=(16, 32, 64), blocks=2)


def transformer() -> nn.Module:
    return examples.transformer_preln(layers=4, dim=128)


def sgd_momentum(params: object) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9)  # type: ignore[arg-type]


def adamw(params: object) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4)  # type: ignore[arg-type]


# (name, model, input batch, optimizer)
CASES_ALL = [
    ("25x256 ReLU MLP, SGD+momentum, batch 64", mlp25x256,
     lambda g: torch.randn(64, 256, generator=g), sgd_momentum),
    ("25-layer MLP 512 wide, batch 128", mlp25, lambda g: torch.randn(128, 256, generator=g),
     adamw),
    ("ResNet with BN, batch 32 of 32x32", cnn_bn, lambda g: torch.randn(32, 3, 32, 32,
                                                                          generator=g), adamw),
    ("pre-LN transformer 4x128, batch 16x64", transformer,
     lambda g: torch.randint(0, examples.VOCAB, (16, 64), generator=g), adamw),
]


CASES = CASES_ALL


class NaiveRecorder:
    """The same statistics, recorded the obvious way: per layer, with ``.item()`` each.

    Per leaf module: output mean, std and dead fraction; per parameter: gradient norm, weight
    norm and update ratio (a full copy of the weights before the step, the difference after).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.records = model, []
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if not list(m.children())]
        self.before: list[torch.Tensor] = []
        optimizer.register_step_pre_hook(self._snapshot)

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        out = output[0] if isinstance(output, tuple) else output
        out = out.detach().float()
        self.records.append((out.mean().item(), out.std().item(),
                             (out == 0).all(0).float().mean().item()))

    def _snapshot(self, optimizer: object, args: object, kwargs: object) -> None:
        self.before = [p.detach().clone() for p in self.model.parameters()]

    def step(self, loss: torch.Tensor) -> None:
        row = [loss.item()]
        for p, before in zip(self.model.parameters(), self.before, strict=True):
            if p.grad is not None:
                row.append(p.grad.norm().item())
            weight = before.norm().item()
            row += [p.detach().norm().item(), (p.detach() - before).norm().item() / weight
                    if weight else 0.0]
        self.records.append(tuple(row))


class BareRecorder:
    """About the least a recorder of these statistics does: a floor under ``Monitor(every=1)``.

    The reductions alone, with no bookkeeping: per leaf module with a tensor output, its sum
    (after a ReLU, its sums over the batch, per position) and sum of squares, left on the
    device; the gradient norms in one ``_foreach_norm`` before the step; weight and update
    norms on the first 4,096 elements of each parameter, copied before the step; one transfer
    of everything per step, and no record, pooling, run log or judgement. It does a little
    less than ``Monitor`` (no channel sums, no per-layer subsets scaled to whole tensors).
    """

    SUBSET = 4096

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.sums: list[torch.Tensor] = []
        self.before: list[torch.Tensor] = []
        self.grad_norms: list[torch.Tensor] = []
        self.update_norms: list[torch.Tensor] = []
        for module in model.modules():
            if not list(module.children()):
                module.register_forward_hook(self._hook)
        optimizer.register_step_pre_hook(self._before_step)
        optimizer.register_step_post_hook(self._after_step)

    def _subsets(self) -> list[torch.Tensor]:
        return [p.detach().reshape(-1)[: self.SUBSET] for p in self.params]

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if type(output) is not torch.Tensor:
            return
        values = output.detach()
        flat = values.reshape(-1)
        head = values.sum(0) if isinstance(module, nn.ReLU) else flat.sum()
        self.sums += (head, torch.dot(flat, flat))

    def _before_step(self, optimizer: object, args: object, kwargs: object) -> None:
        self.grad_norms = list(torch._foreach_norm([p.grad for p in self.params
                                                    if p.grad is not None]))
        self.before = [s.clone() for s in self._subsets()]

    def _after_step(self, optimizer: object, args: object, kwargs: object) -> None:
        after = self._subsets()
        self.update_norms = list(torch._foreach_norm(torch._foreach_sub(after, self.before)))
        self.update_norms += torch._foreach_norm(self.before)

    def step(self, loss: torch.Tensor) -> None:
        values = [loss.detach().reshape(())] + [s.sum() if s.dim() else s for s in self.sums]
        torch.stack(values + self.grad_norms + self.update_norms).tolist()
        self.sums = []


def make_step(model: nn.Module, batch: torch.Tensor, targets: torch.Tensor,
              recorder: Callable[[torch.Tensor], None] | None,
              make_optimizer: Callable[[object], torch.optim.Optimizer]) -> Callable[[], None]:
    """One training step; the optimizer is exposed as ``step.optimizer``."""
    optimizer = make_optimizer(model.parameters())

    def step() -> None:
        out = model(batch)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if recorder is not None:
            recorder(loss)
        else:
            loss.item()

    step.optimizer = optimizer  # type: ignore[attr-defined]
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--block", type=int, default=50)
    parser.add_argument("--models", default="", help="comma-separated substrings of names")
    args = parser.parse_args()
    cases = [c for c in CASES if not args.models or any(m in c[0] for m in
                                                        args.models.split(","))]
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, median step time over {args.repeats} "
          f"interleaved blocks of {args.block} steps")
    print(f"{'model':42s} {'plain':>9s} {'again':>7s} {'every=50':>9s} {'every=1':>9s} "
          f"{'naive':>9s} {'floor':>9s}")
    with tempfile.TemporaryDirectory() as temp:
        for name, build, make_input, make_optimizer in cases:
            base = build()
            g = torch.Generator().manual_seed(0)
            batch = make_input(g)
            out = base(batch)
            targets = torch.randint(0, out.shape[-1], out.shape[:-1], generator=g)
            variants = {"plain": make_step(copy.deepcopy(base), batch, targets, None,
                                           make_optimizer),
                        # The same plain loop on its own copy: the noise floor of a ratio.
                        "plain again": make_step(copy.deepcopy(base), batch, targets, None,
                                                 make_optimizer)}
            for every in (50, 1):
                model = copy.deepcopy(base)
                holder: dict[str, Monitor] = {}
                step = make_step(model, batch, targets, lambda loss, h=holder: h["m"].step(loss),
                                 make_optimizer)
                holder["m"] = Monitor(model, step.optimizer, every=every,
                                      log_dir=Path(temp) / f"{name[:6]}-{every}")
                variants[f"every={every}"] = step
            for key, recorder_class in (("naive", NaiveRecorder), ("bare floor", BareRecorder)):
                recorded_model = copy.deepcopy(base)
                recorders: dict[str, NaiveRecorder | BareRecorder] = {}
                step = make_step(recorded_model, batch, targets,
                                 lambda loss, r=recorders: r["r"].step(loss), make_optimizer)
                recorders["r"] = recorder_class(recorded_model, step.optimizer)
                variants[key] = step
            times: dict[str, list[float]] = {k: [] for k in variants}
            for step in variants.values():  # warm-up
                for _ in range(3):
                    step()
            for _ in range(args.repeats):
                for key, step in variants.items():
                    start = time.perf_counter()
                    for _ in range(args.block):
                        step()
                    times[key].append((time.perf_counter() - start) / args.block)
            plain = statistics.median(times["plain"])
            ratios = {k: statistics.median(v) / plain for k, v in times.items()}
            print(f"{name:42s} {plain * 1e3:7.1f}ms {ratios['plain again']:6.3f}x "
                  f"{ratios['every=50']:8.3f}x "
                  f"{ratios['every=1']:8.3f}x {ratios['naive']:8.3f}x "
                  f"{ratios['bare floor']:8.3f}x", flush=True)


if __name__ == "__main__":
    main()
