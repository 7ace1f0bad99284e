"""The architecture zoo on an accelerator, plus full-size models the zoo only imitates.

    python benchmarks/zoo_on_device.py [--device cuda]

Inspects every zoo model (``tests/fixtures/arch_zoo.py``) on the device at its default init and
sabotaged, and, where the packages are installed, full-size models built from their libraries'
default configs: transformers' GPT-2 (124M) and ResNet-50, torchvision's ResNet-50 (also with
``zero_init_residual``), ConvNeXt-T, EfficientNet-B0 and ViT-B/16, and timm's ConvNeXt, ViT,
EfficientNet and RegNet. Prints one row per model (status at default init, status sabotaged,
seconds) and the totals; healthy models must be ``ok``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nndiag import inspect_model  # noqa: E402
from tests.fixtures.arch_zoo import zoo  # noqa: E402


def _summary(report) -> str:
    return report.status + "".join(f" {f.id}({f.severity[0]})" for f in report.findings
                                   if f.severity != "info")


def full_size() -> list[tuple[str, Callable[[], nn.Module], Callable[[], tuple]]]:
    """Full-size models from the libraries that are installed, with a small batch each."""
    models: list[tuple[str, Callable[[], nn.Module], Callable[[], tuple]]] = []
    gen = torch.Generator().manual_seed(0)

    def images(size: int = 64, classes: int = 1000) -> Callable[[], tuple]:
        return lambda: (torch.randn(8, 3, size, size, generator=gen),
                        torch.randint(0, classes, (8,), generator=gen))

    try:
        import transformers

        transformers.logging.set_verbosity_error()
        models.append(("hf gpt2-124M", lambda: transformers.GPT2LMHeadModel(
            transformers.GPT2Config()), lambda: ({"input_ids": torch.randint(
                0, 50257, (4, 64), generator=gen)}, torch.randint(0, 50257, (4, 64),
                                                                  generator=gen))))
        models.append(("hf resnet-50", lambda: transformers.ResNetForImageClassification(
            transformers.ResNetConfig()), lambda: ({"pixel_values": torch.randn(
                8, 3, 64, 64, generator=gen)}, torch.randint(0, 2, (8,), generator=gen))))
    except ImportError:
        pass
    try:
        import torchvision.models as tv

        models += [("tv resnet50", tv.resnet50, images()),
                   ("tv resnet50 zero_init_residual",
                    lambda: tv.resnet50(zero_init_residual=True), images()),
                   ("tv convnext_tiny", tv.convnext_tiny, images()),
                   ("tv efficientnet_b0", tv.efficientnet_b0, images()),
                   ("tv vit_b_16", tv.vit_b_16, images(224))]
    except ImportError:
        pass
    try:
        import timm

        models += [(f"timm {name}", (lambda n=name: timm.create_model(n)), images(size))
                   for name, size in (("convnext_atto", 64), ("vit_tiny_patch16_224", 224),
                                      ("efficientnet_b0", 64), ("regnety_002", 64))]
    except ImportError:
        pass
    return models


def main() -> None:
    """Inspect the zoo and the full-size models on the device; print a table.

    Batches stay on the CPU: an inspection moves them to the model's device.
    """
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(parser.parse_args().device)
    warnings.simplefilter("ignore")
    print(f"device {device}, torch {torch.__version__}")
    quiet = caught = total = 0
    for entry in zoo():
        start = time.perf_counter()
        try:
            default = inspect_model(entry.build().to(device), entry.batch(),
                                    loss=entry.loss)
            model = entry.build()
            entry.sabotage(model)
            sabotaged = inspect_model(model.to(device), entry.batch(),
                                      loss=entry.loss)
        except Exception as exc:  # a config this transformers version does not take
            print(f"{entry.name:32s} skipped: {type(exc).__name__}: {str(exc)[:80]}")
            continue
        total += 1
        quiet += default.status == "ok" or entry.default_finding is not None
        caught += sabotaged.status != "ok"
        print(f"{entry.name:32s} {_summary(default):45s} {_summary(sabotaged):45s} "
              f"{time.perf_counter() - start:5.1f}s")
    print(f"zoo on {device}: {quiet}/{total} as expected at default init, "
          f"{caught}/{total} caught sabotaged")
    healthy = 0
    models = full_size()
    for name, build, batch in models:
        start = time.perf_counter()
        report = inspect_model(build().to(device), batch())
        healthy += report.status == "ok"
        print(f"{name:32s} {_summary(report):60s} {time.perf_counter() - start:5.1f}s")
    print(f"full-size on {device}: {healthy}/{len(models)} ok")


if __name__ == "__main__":
    main()
