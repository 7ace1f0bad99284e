"""The Lightning and Hugging Face callbacks under DDP: 2 CPU processes on gloo.

Each worker sets the variables a launcher (torchrun) sets, so that both frameworks join the
existing process group instead of starting processes of their own.
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from nndiag.runlog import read_run
from tests.test_integrations import _data, _lit_module, _mlp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lightning(out: Path) -> list[float]:
    from nndiag.integrations.lightning import NndiagCallback

    pl, module = _lit_module(killed=False)
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=out,
                         callbacks=[NndiagCallback(every=2, log_dir=out / "run",
                                                   verbose=False)])
    trainer.fit(module, loader)
    return module.grad_norms


def _transformers(out: Path) -> list[float]:
    import transformers

    from nndiag.integrations.transformers import NndiagCallback

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()

        def forward(self, inputs=None, labels=None):
            logits = self.net(inputs)
            return {"loss": F.cross_entropy(logits, labels), "logits": logits}

    class Norms(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.grad_norms: list[float] = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            self.grad_norms.append(float(torch.stack([g.norm() for g in grads]).norm()))

    x, y = _data()
    dataset = [{"inputs": x[i], "labels": y[i]} for i in range(len(y))]
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=8, learning_rate=0.05,
        lr_scheduler_type="constant", optim="sgd", weight_decay=0.0, report_to="none",
        logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        use_cpu=True, ddp_backend="gloo", dataloader_num_workers=0, seed=0,
        max_grad_norm=0.0)
    norms = Norms()
    trainer = transformers.Trainer(model=Classifier(), args=args, train_dataset=dataset,
                                   callbacks=[norms, NndiagCallback(every=2,
                                                                    log_dir=out / "run",
                                                                    verbose=False)])
    trainer.train()
    return norms.grad_norms


def _worker(rank: int, world: int, port: int, out: str, framework: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        norms = (_lightning if framework == "lightning" else _transformers)(Path(out))
    (Path(out) / f"norms{rank}.json").write_text(json.dumps(norms))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    # Skip interpreter teardown: gloo's threads can abort the process there after all work is
    # done, which mp.spawn reports as a crash.
    os._exit(0)


@pytest.mark.parametrize("framework", ["lightning", "transformers"])
def test_callbacks_under_ddp_record_the_averaged_gradients_once(tmp_path, framework):
    pytest.importorskip("pytorch_lightning" if framework == "lightning" else "transformers")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), framework), nprocs=2, join=True)
    log = read_run(tmp_path / "run")
    norms = [json.loads((tmp_path / f"norms{r}.json").read_text()) for r in range(2)]
    assert log.meta["world_size"] == 2
    steps = len(norms[0])
    assert steps >= 4 and len(log.losses) == steps
    assert [s.step for s in log.samples] == list(range(0, steps, 2))
    for sample in log.samples:  # the averaged gradient: the same on both ranks, and recorded
        assert norms[0][sample.step] == pytest.approx(norms[1][sample.step], rel=1e-5)
        assert sample.grad_norm == pytest.approx(norms[0][sample.step], rel=1e-4)
        assert all(layer.update_ratio is not None for layer in sample.layers
                   if layer.weight_norm is not None)
