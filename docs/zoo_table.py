"""Write the architecture-zoo table of the documentation (``docs/architecture-zoo.md``).

Run from the repository root: ``python docs/zoo_table.py``. Every row is measured: each model
of ``tests/fixtures/arch_zoo.py`` inspected live and data-free at its default init and
sabotaged. ``tests/test_zoo.py`` checks every row against what it measures itself.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nndiag import inspect_checkpoint, inspect_model  # noqa: E402
from tests.fixtures.arch_zoo import zoo  # noqa: E402

HEADER = """# The architecture zoo

nndiag's diagnosis rules are developed against {count} architectures people train, built small
(a few layers, narrow widths, tiny inputs) from the model classes of the `transformers`
package at their library's default init, and written by hand in plain torch. Each one is
inspected live (`nndiag inspect --model`) and data-free from its saved weights
(`nndiag inspect weights.pt`), at its default init and sabotaged the way its family goes
wrong. At the default init every one is quiet, except where the init is truly broken (a test
verifies it by training); sabotaged, every one is caught, and live and data-free analysis
agree. The CI gate (`nndiag check --model`) passes one healthy model of every family.

This table is written by `python docs/zoo_table.py`; `tests/test_zoo.py` measures every row
again. `-` means no warning or error.

| architecture | family | at default init | sabotage | live, sabotaged | data-free, sabotaged |
|---|---|---|---|---|---|
"""


def ids(report) -> str:
    """The warnings and errors of a report, ``id (severity)``, sorted; ``-`` for none."""
    found = sorted(f"{f.id} ({f.severity})" for f in report.findings
                   if f.severity in ("warning", "error"))
    return ", ".join(found) or "-"


def measure(entry) -> tuple[str, str, str, str]:
    """Live findings at default init, live and data-free findings sabotaged."""
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as directory:
        warnings.simplefilter("ignore")
        default = inspect_model(entry.build(), entry.batch(), loss=entry.loss)
        model = entry.build()
        entry.sabotage(model)
        live = inspect_model(model, entry.batch(), loss=entry.loss)
        path = Path(directory) / "weights.pt"
        torch.save(model.state_dict(), path)
        data_free = inspect_checkpoint(path)
    return ids(default), entry.sabotage_name, ids(live), ids(data_free)


def main() -> None:
    """Measure the zoo and write the table."""
    torch.set_num_threads(1)
    entries = zoo()
    rows = [f"| {e.name} | {e.family} | " + " | ".join(measure(e)) + " |" for e in entries]
    out = ROOT / "docs" / "architecture-zoo.md"
    out.write_text(HEADER.format(count=len(entries)) + "\n".join(rows) + "\n")
    print(f"wrote {out} ({len(rows)} architectures)")


if __name__ == "__main__":
    main()
