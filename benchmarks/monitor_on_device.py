"""Monitor on an accelerator: host synchronisations, overhead, and torch.compile.

    python benchmarks/monitor_on_device.py [--device cuda] [--layers 12] [--skip-compile]

On a GPT-2-124M-sized model (transformers' ``GPT2LMHeadModel`` at its default config when the
package is installed, else a causal transformer of the same shape) in bf16 autocast with AdamW,
batch 8 x 512:

1. host synchronisations on unsampled steps: ``torch.cuda.set_sync_debug_mode("error")`` over
   nine unsampled steps of ``Monitor(every=10)`` (and of the plain loop, as the control);
2. the cost of ``Monitor(every=1)`` and ``Monitor(every=50)`` as ratios to the plain step
   (median per-step time, variants interleaved in blocks, each on its own copy of the model);
3. with ``torch.compile`` (inductor): ``Monitor(every=10)`` against the compiled plain step,
   with the number of frames dynamo compiled after warm-up (must stay 0).

Targets (issue 20): every=1 <= 1.15x, every=50 <= 1.01x, compiled every=10 <= 1.05x, no
synchronisation on unsampled steps, no recompile after warm-up.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nndiag.monitor import Monitor  # noqa: E402

BATCH, SEQ, VOCAB = 8, 512, 50257


class Block(nn.Module):
    """A pre-norm GPT block written out (no data-dependent checks, no host reads)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.act, self.out = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        attn = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.out(self.act(self.fc(self.ln_2(x))))


class CausalLM(nn.Module):
    """A GPT-2-shaped causal transformer built from plain modules."""

    def __init__(self, layers: int, dim: int = 768, heads: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.position = nn.Embedding(1024, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.position(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def causal_lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids)[:, :-1]
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(),
                                       ids[:, 1:].reshape(-1))


def build(layers: int, plain: bool = False
          ) -> tuple[nn.Module, Callable[[nn.Module, torch.Tensor], torch.Tensor]]:
    """The model and its loss on a batch of token ids (transformers' GPT-2 unless ``plain``)."""
    torch.manual_seed(0)
    try:
        if plain:
            raise ImportError
        import transformers

        config = transformers.GPT2Config(n_layer=layers)
        model = transformers.GPT2LMHeadModel(config)

        def hf_loss(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
            return m(input_ids=ids, labels=ids).loss

        return model, hf_loss
    except ImportError:
        return CausalLM(layers), causal_lm_loss


class Variant:
    """One training loop on its own copy of the model, optionally monitored."""

    def __init__(self, name: str, model: nn.Module, loss: Callable, ids: torch.Tensor,
                 every: int | None, compiled: bool) -> None:
        self.name, self.loss, self.ids = name, loss, ids
        self.model = copy.deepcopy(model)
        self.run = torch.compile(self.model) if compiled else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.monitor = None
        if every is not None:
            log = Path(tempfile.mkdtemp()) / "run"
            self.monitor = Monitor(self.run, self.optimizer, every=every, log_dir=log)
        self.times: list[float] = []

    def step(self) -> None:
        with torch.autocast(self.ids.device.type, dtype=torch.bfloat16):
            loss = self.loss(self.run, self.ids)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.monitor is not None:
            self.monitor.step(loss)

    def block(self, steps: int, sync: Callable[[], None]) -> None:
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync()
        self.times.append((time.perf_counter() - start) / steps)


def syncs_on_unsampled_steps(variant: Variant, device: torch.device) -> str:
    """Run nine unsampled steps with synchronisation debugging set to raise."""
    if device.type != "cuda":
        return "not measured (needs CUDA)"
    if variant.monitor is not None:
        while variant.monitor.step_count % variant.monitor.every:  # to the next sampled step
            variant.step()
        variant.step()  # the sampled step
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(9):
            variant.step()
        return "none"
    except RuntimeError as exc:
        return f"SYNC: {str(exc).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()


def timed(variants: list[Variant], repeats: int, block: int, sync: Callable[[], None]) -> None:
    for _ in range(repeats):
        for variant in variants:
            variant.block(block, sync)
    base = statistics.median(variants[0].times)
    for variant in variants:
        median = statistics.median(variant.times)
        print(f"  {variant.name:<28} {median * 1e3:8.2f} ms/step   {median / base:6.3f}x",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block", type=int, default=20)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--plain-model", action="store_true",
                        help="the written-out GPT-2-shaped model even with transformers")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model, loss = build(args.layers, args.plain_model)
    model.to(device)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), device=device,
                        generator=torch.Generator(device).manual_seed(0))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {name}; {type(model).__name__}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
          f"batch {BATCH}x{SEQ}, bf16 autocast, AdamW", flush=True)

    variants = [Variant("plain", model, loss, ids, None, False),
                Variant("Monitor every=50", model, loss, ids, 50, False),
                Variant("Monitor every=1", model, loss, ids, 1, False)]
    for variant in variants:  # warm-up: allocator, kernels, the first sampled step
        for _ in range(3):
            variant.step()
    sync()
    print("host synchronisations on 9 unsampled steps:", flush=True)
    print(f"  {type(model).__name__}, plain loop: "
          f"{syncs_on_unsampled_steps(variants[0], device)}", flush=True)
    probe = Variant("probe every=10", model, loss, ids, 10, False)
    print(f"  {type(model).__name__}, Monitor every=10: "
          f"{syncs_on_unsampled_steps(probe, device)}", flush=True)
    probe.monitor.close()
    # The written-out model has no host read of its own: a clean control.
    plain_model, plain_loss = build(2, plain=True)
    plain_model.to(device)
    for every in (None, 10):
        control = Variant("control", plain_model, plain_loss, ids, every, False)
        for _ in range(3):
            control.step()
        label = "plain loop" if every is None else f"Monitor every={every}"
        print(f"  CausalLM (2 blocks), {label}: {syncs_on_unsampled_steps(control, device)}",
              flush=True)
        if control.monitor is not None:
            control.monitor.close()
    del probe, control, plain_model
    print(f"eager, {args.repeats} x {args.block}-step blocks interleaved:", flush=True)
    timed(variants, args.repeats, args.block, sync)
    for variant in variants:
        if variant.monitor is not None:
            variant.monitor.close()
    del variants

    if args.skip_compile:
        return
    import torch._dynamo as dynamo

    print("torch.compile (inductor):", flush=True)
    started = time.perf_counter()
    compiled = [Variant("compiled plain", model, loss, ids, None, True),
                Variant("compiled Monitor every=10", model, loss, ids, 10, True)]
    for variant in compiled:  # warm-up: both graphs (sampled and unsampled steps)
        for _ in range(12):
            variant.step()
    sync()
    print(f"  warm-up (compiling) {time.perf_counter() - started:.0f} s", flush=True)
    frames = dynamo.utils.counters["frames"]["total"]
    print(f"  Monitor every=10, unsampled steps: syncs "
          f"{syncs_on_unsampled_steps(compiled[1], device)}", flush=True)
    timed(compiled, args.repeats, args.block, sync)
    print(f"  frames compiled after warm-up: {dynamo.utils.counters['frames']['total'] - frames}",
          flush=True)
    samples = compiled[1].monitor.samples
    print(f"  sampled steps {[s.step for s in samples][:6]}..., layers per sample "
          f"{len(samples[-1].layers)}", flush=True)
    compiled[1].monitor.close()


if __name__ == "__main__":
    main()
