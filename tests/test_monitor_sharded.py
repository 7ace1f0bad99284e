"""Monitor under FSDP2 and DDP (2 CPU processes, gloo) against one process on the global batch.

Each rank trains on its half of a global batch; both wrappers average the gradients, so the
recorded norms, update ratios and activation statistics must equal those of a single process
training the unwrapped model on the whole batch.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from nndiag.monitor import Monitor
from nndiag.runlog import read_run

STEPS, EVERY, HALF = 4, 2, 12


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 4))


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(HALF, 8, generator=g), torch.randint(0, 4, (HALF,), generator=g)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, wrapper: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        net = _net()
        if wrapper == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for layer in (net[0], net[2], net[4]):
                fully_shard(layer, mesh=mesh)
            model = fully_shard(net, mesh=mesh)
        else:
            model = nn.parallel.DistributedDataParallel(net)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with Monitor(model, optimizer, every=EVERY, log_dir=Path(out) / "run") as monitor:
            for step in range(STEPS):
                x, y = _batch(step, rank)
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                monitor.step(loss)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown: gloo's threads can abort the process there after all work is
    # done, which mp.spawn reports as a crash.
    os._exit(0)


def _reference() -> Monitor:
    net = _net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    with Monitor(net, optimizer, every=EVERY) as monitor:
        for step in range(STEPS):
            halves = [_batch(step, rank) for rank in range(2)]
            x = torch.cat([h[0] for h in halves])
            y = torch.cat([h[1] for h in halves])
            loss = F.cross_entropy(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss)
    return monitor


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("wrapper", ["fsdp2", "ddp"])
def test_sharded_and_replicated_runs_record_what_one_process_does(tmp_path, wrapper):
    if wrapper == "fsdp2":
        pytest.importorskip("torch.distributed.fsdp", reason="no FSDP2")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), wrapper), nprocs=2, join=True)
    log = read_run(tmp_path / "run")
    reference = _reference()
    assert log.meta["world_size"] == 2
    assert [s.step for s in log.samples] == [s.step for s in reference.samples] == [0, 2]
    for ours, expected in zip(log.samples, reference.samples, strict=True):
        assert ours.loss == pytest.approx(expected.loss, rel=1e-5)
        assert ours.grad_norm == pytest.approx(expected.grad_norm, rel=1e-4)
        by_name = {layer.name.removeprefix("module."): layer for layer in ours.layers}
        for layer in expected.layers:
            got = by_name[layer.name]
            for stat in ("mean", "std", "dead_fraction", "grad_norm", "weight_norm",
                         "update_ratio"):
                value = getattr(layer, stat)
                if value is None:
                    assert getattr(got, stat) is None, (layer.name, stat)
                else:
                    assert getattr(got, stat) == pytest.approx(value, rel=1e-4, abs=1e-7), \
                        (layer.name, stat)
