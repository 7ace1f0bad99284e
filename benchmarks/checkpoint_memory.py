"""Data-free inspection of a large synthetic checkpoint: peak RSS and wall time.

Writes a checkpoint of about --size-mb megabytes (square Linear layers of --width in --dtype,
float32 or bfloat16, plus biases and a BatchNorm), as torch.save (zip), as the same zip
re-zipped with every record deflated (what a zip tool makes of it) and as safetensors, then
runs `nndiag inspect FILE --json` in a fresh process for each and reads the process's peak RSS
from the kernel (wait4). For comparison the same is measured for a process that only imports
nndiag and torch (the floor), and for a plain `torch.load` of the whole file (the naive peer).

Target: peak RSS <= 1.5 x the largest tensor (as stored) + 300 MB.

The files are written by a child process and this process never imports torch, so the
measured children start small (a fork copies the parent's resident set into the child's peak).

Usage: python benchmarks/checkpoint_memory.py [--size-mb 512] [--width 4096]
    [--dtype float32|bfloat16] [--keep DIR]
(a bf16 checkpoint whose largest tensor is 288 MB: --dtype bfloat16 --width 12288 --size-mb 1024)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

MB = 1024 * 1024
ITEMSIZE = {"float32": 4, "bfloat16": 2}


def peak_rss_mb(command: list[str]) -> tuple[float, float, int]:
    """Run a command; return (peak RSS in MB, wall seconds, exit code)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024, elapsed, process.returncode


def write_checkpoints(directory: Path, size_mb: int, width: int, dtype_name: str) -> None:
    """Write big.pt, big-deflated.pt and big.safetensors (run in a child process)."""
    import torch

    dtype = getattr(torch, dtype_name)
    layer_bytes = width * width * ITEMSIZE[dtype_name]
    layers = max(2, round(size_mb * MB / layer_bytes))
    generator = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    for i in range(layers):
        state[f"layers.{i}.weight"] = (torch.randn(width, width, generator=generator) * (
            2 / width) ** 0.5).to(dtype)
        state[f"layers.{i}.bias"] = torch.zeros(width, dtype=dtype)
    state["norm.weight"] = torch.ones(width, dtype=dtype)
    state["norm.bias"] = torch.zeros(width, dtype=dtype)
    state["norm.running_mean"] = torch.zeros(width, dtype=dtype)
    state["norm.running_var"] = torch.ones(width, dtype=dtype)
    torch.save(state, directory / "big.pt")
    deflate(directory / "big.pt", directory / "big-deflated.pt")
    try:
        from safetensors.torch import save_file
    except ImportError:
        return
    save_file(state, directory / "big.safetensors")


def deflate(source: Path, target: Path) -> None:
    """Re-zip ``source`` with every record deflated, streaming (as a zip tool would)."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            record = zipfile.ZipInfo(info.filename, info.date_time)
            record.compress_type = zipfile.ZIP_DEFLATED
            with src.open(info) as reader, dst.open(record, "w", force_zip64=True) as writer:
                shutil.copyfileobj(reader, writer, 16 * MB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--dtype", choices=sorted(ITEMSIZE), default="float32")
    parser.add_argument("--keep", type=Path, default=None,
                        help="write the files here and keep them (default: a temp dir)")
    parser.add_argument("--write", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write is not None:
        write_checkpoints(args.write, args.size_mb, args.width, args.dtype)
        return
    with tempfile.TemporaryDirectory() as temp:
        directory = args.keep or Path(temp)
        directory.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, __file__, "--write", str(directory), "--size-mb",
                        str(args.size_mb), "--width", str(args.width), "--dtype", args.dtype],
                       check=True)
        largest = args.width * args.width * ITEMSIZE[args.dtype]
        paths = [directory / name for name in ("big.pt", "big-deflated.pt", "big.safetensors")]
        target = 1.5 * largest / MB + 300
        python = sys.executable
        floor, _, _ = peak_rss_mb([python, "-c", "import torch, nndiag.cli.app"])
        print(f"largest tensor {largest / MB:.0f} MB ({args.dtype}); target peak RSS <= "
              f"{target:.0f} MB; import floor {floor:.0f} MB")
        print(f"{'file':28s} {'size':>9s} {'nndiag peak':>12s} {'time':>7s} {'ok':>4s} "
              f"{'torch.load peak':>16s}")
        for path in paths:
            if not path.exists():
                continue
            peak, seconds, code = peak_rss_mb([python, "-m", "nndiag", "inspect", str(path),
                                               "--json"])
            naive_code = ("import torch, sys; sd = torch.load(sys.argv[1], weights_only=True)"
                          if path.suffix == ".pt" else
                          "import sys; from safetensors.torch import load_file; "
                          "sd = load_file(sys.argv[1]); [t.sum() for t in sd.values()]")
            naive, _, _ = peak_rss_mb([python, "-c", naive_code, str(path)])
            verdict = "yes" if peak <= target and code in (0, 1) else "NO"
            print(f"{path.name:28s} {path.stat().st_size / MB:7.0f}MB {peak:10.0f}MB "
                  f"{seconds:6.1f}s {verdict:>4s} {naive:14.0f}MB")


if __name__ == "__main__":
    main()
