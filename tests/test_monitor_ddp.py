"""Monitor under DistributedDataParallel: 2 CPU processes on the gloo backend."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from nndiag.runlog import read_run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    from nndiag.monitor import Monitor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        model = nn.parallel.DistributedDataParallel(net)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        monitor = Monitor(model, optimizer, every=2, log_dir=Path(out) / "run")
        records = []
        for step in range(4):
            g = torch.Generator().manual_seed(100 * rank + step)
            x, y = torch.randn(12, 8, generator=g), torch.randint(0, 4, (12,), generator=g)
            hidden = net[1](net[0](x)).detach()
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            grad_norm = math.sqrt(sum(p.grad.norm().item() ** 2 for p in net.parameters()))
            optimizer.step()
            monitor.step(loss)
            records.append({"loss": loss.item(), "grad_norm": grad_norm,
                            "hidden_sum": hidden.sum().item(), "hidden_n": hidden.numel(),
                            "alive": (hidden != 0).any(0).tolist()})
        monitor.close()
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(records))
        dist.barrier()  # both ranks done before the group is torn down
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown: gloo's threads can abort the process there ("terminate called
    # without an active exception") after all work is done, which mp.spawn reports as a crash.
    os._exit(0)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_two_ranks_one_log_with_reduced_statistics(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    log = read_run(tmp_path / "run")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert log.meta["world_size"] == 2
    assert len(log.losses) == 4 and [s.step for s in log.samples] == [0, 2]
    for step in range(4):  # the loss of every step is the mean over ranks
        mean = (ranks[0][step]["loss"] + ranks[1][step]["loss"]) / 2
        assert log.losses[step] == pytest.approx(mean, rel=1e-5)
    for sample in log.samples:
        step = sample.step
        a, b = ranks[0][step], ranks[1][step]
        relu = next(layer for layer in sample.layers if layer.name == "module.1")
        pooled = (a["hidden_sum"] + b["hidden_sum"]) / (a["hidden_n"] + b["hidden_n"])
        assert relu.mean == pytest.approx(pooled, rel=1e-5)
        alive = [x or y for x, y in zip(a["alive"], b["alive"], strict=True)]
        assert relu.dead_fraction == pytest.approx(1 - sum(alive) / len(alive))
        # after DDP's all-reduce both ranks hold the same gradient: the recorded norm is it
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert sample.grad_norm == pytest.approx(a["grad_norm"], rel=1e-5)
