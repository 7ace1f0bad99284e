"""Files nndiag writes: whole or not at all, readable like any other file."""

from __future__ import annotations

import stat

import pytest
from matplotlib.figure import Figure

from nndiag.files import write_atomic
from nndiag.render.plots import save_figure


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "report.html"
    target.write_text("old")

    def half_written(temp: str) -> None:
        with open(temp, "w") as out:
            out.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, half_written)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_written_files_are_readable_by_all_not_private_temporaries(tmp_path):
    page = write_atomic(tmp_path / "page.html", lambda temp: open(temp, "w").write("<p>"))
    assert page.read_text() == "<p>" and _mode(page) == 0o644
    fig = Figure()
    fig.subplots().plot([0, 1], [1, 0])
    png = save_figure(fig, tmp_path / "figure.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and _mode(png) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.png", "page.html"]
