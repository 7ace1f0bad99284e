"""Fuzzing the readers of torch archives: TorchScript archives and the pickles inside torch zips.

Properties, for any bytes hypothesis makes:

* ``nndiag inspect`` ends with exit code 0, 1 or 2, never 4, and never prints a traceback;
* nothing in the file is executed: the archives carry a scripted class whose loading
  overwrites a marker file, and the hostile pickles call functions that would write it; the
  marker never changes.

Members are mutated after the zip's CRCs are computed (entries are rewritten whole), so the
mutations reach the restricted unpickler and the TorchScript reader, not just the CRC check.
Derandomized and few by default; ``NNDIAG_FUZZ_EXAMPLES=2000`` searches harder.
"""

from __future__ import annotations

import io
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from tests.fixtures.scripted import FileFiller
from tests.test_fuzz import ENTRIES as TORCH_ENTRIES
from tests.test_fuzz import cli, damaged, fresh, fuzz

_MARKER_DIR = Path(tempfile.mkdtemp(prefix="nndiag-fuzz-marker-"))
MARKER = _MARKER_DIR / "marker.bin"
UNTOUCHED = b"AAAA"
MARKER.write_bytes(UNTOUCHED)


class _Carrier(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)
        self.payload = FileFiller(str(MARKER))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(x))


with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit's own notice
    _buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(_Carrier()), _buffer)
SCRIPTED = _buffer.getvalue()
with zipfile.ZipFile(io.BytesIO(SCRIPTED)) as _zip:
    SCRIPTED_ENTRIES = [(info.filename, _zip.read(info)) for info in _zip.infolist()]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    yield tmp_path_factory.mktemp("fuzz-archives")
    shutil.rmtree(_MARKER_DIR, ignore_errors=True)


def check(workdir: Path, name: str, data: bytes) -> None:
    """The CLI contract, and no code from the file ran."""
    path = fresh(workdir, name) / "model.pt"
    path.write_bytes(data)
    cli("inspect", path)
    assert MARKER.read_bytes() == UNTOUCHED, "code from the archive ran"


@st.composite
def flipped(draw, data: bytes) -> bytes:
    """``data`` with a few bytes overwritten, cut, or grown."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if out:
            out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
    if draw(st.integers(0, 3)) == 0:
        del out[draw(st.integers(0, len(out))):]
    if draw(st.integers(0, 3)) == 0:
        out += draw(st.binary(min_size=1, max_size=16))
    return bytes(out)


# Pickle fragments: containers, tensors, allowed and forbidden names, and calls that would
# write the marker if they ever ran.
_MARKER_TEXT = str(MARKER).encode()
FRAGMENTS = [
    b"\x80\x02", b"}", b"]", b")", b"(", b"t", b"u", b"e", b"s", b"a", b"b", b"R", b"\x81",
    b"\x85", b"\x86", b"\x87", b"N", b"\x88", b"\x89", b"K\x03", b"J\xff\xff\xff\x7f", b".",
    b"X\x06\x00\x00\x00weight", b"X\x08\x00\x00\x00training", b"q\x00", b"h\x00", b"Q",
    b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu"
    b"K\x0ctQ",
    b"ctorch._utils\n_rebuild_tensor_v2\n", b"ctorch._utils\n_rebuild_qtensor\n",
    b"ctorch._utils\n_rebuild_sparse_tensor\n", b"ctorch\nSize\n", b"ctorch\nqint8\n",
    b"ctorch\nper_channel_affine\n", b"ccollections\nOrderedDict\n", b"cbuiltins\nbytearray\n",
    b"c__torch__\nThing\n", b"c__torch__.torch.nn.modules.linear\nLinear\n",
    b"ctorch.jit._pickle\nrestore_type_tag\n", b"\x8e\xff\xff\xff\xff\xff\xff\xff\x7f",
    b"(X" + len(_MARKER_TEXT).to_bytes(4, "little") + _MARKER_TEXT + b"\x88K\x04t",
    b"ctorch\nfrom_file\n", b"cbuiltins\nopen\n", b"cposix\nsystem\n", b"cbuiltins\nexec\n",
    b"X\x01\x00\x00\x00w\x86R",
]
pickle_soup = st.lists(st.sampled_from(FRAGMENTS), max_size=40).map(b"".join)


def rezip(entries: list[tuple[str, bytes]], edits: dict[int, tuple[str, object]],
          compressions: list[int]) -> bytes:
    """The entries re-zipped, each edit applied to its entry's content (CRC recomputed)."""
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        with zipfile.ZipFile(out, "w") as archive:
            for index, (name, data) in enumerate(entries):
                kind, arg = edits.get(index, (None, None))
                if kind == "drop":
                    continue
                if kind == "replace":
                    data = arg
                archive.writestr(zipfile.ZipInfo(name), data,
                                 compress_type=compressions[index % len(compressions)])
                if kind == "duplicate":
                    archive.writestr(zipfile.ZipInfo(name), arg,
                                     compress_type=compressions[index % len(compressions)])
    return out.getvalue()


@st.composite
def mutated_archives(draw, entries: list[tuple[str, bytes]]) -> bytes:
    """An archive whose members are flipped, replaced by pickle soup, dropped or doubled."""
    edits = {}
    for index in draw(st.lists(st.integers(0, len(entries) - 1), max_size=3, unique=True)):
        name, data = entries[index]
        kind = draw(st.sampled_from(["flip", "soup", "drop", "duplicate"]))
        if kind == "flip":
            edits[index] = ("replace", draw(flipped(data)))
        elif kind == "soup":
            edits[index] = ("replace", draw(pickle_soup))
        else:
            edits[index] = (kind, draw(st.binary(max_size=32)))
    compressions = draw(st.lists(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]),
                                 min_size=1, max_size=4))
    return rezip(entries, edits, compressions)


def pickle_index(entries: list[tuple[str, bytes]], member: str) -> int:
    return next(i for i, (name, _) in enumerate(entries) if name.endswith("/" + member))


@st.composite
def pickle_variants(draw, entries: list[tuple[str, bytes]], member: str) -> bytes:
    """The archive with only ``member`` (a pickle) mutated: flipped or replaced by soup."""
    index = pickle_index(entries, member)
    data = entries[index][1]
    new = draw(st.one_of(flipped(data), pickle_soup,
                         pickle_soup.map(lambda soup: data[:-1] + soup)))
    return rezip(entries, {index: ("replace", new)}, [zipfile.ZIP_STORED])


def test_the_scripted_archive_is_hostile_and_read_untouched(workdir):
    """The archive's code really writes the marker when run; nndiag reads it without that."""
    path = fresh(workdir, "plain") / "model.pt"
    path.write_bytes(SCRIPTED)
    assert cli("inspect", path).exit_code in (0, 1)
    assert MARKER.read_bytes() == UNTOUCHED
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.load(str(path))
    assert MARKER.read_bytes() == b"XXXX"
    MARKER.write_bytes(UNTOUCHED)


@fuzz(40)
@given(data=st.one_of(mutated_archives(SCRIPTED_ENTRIES), damaged(st.just(SCRIPTED)),
                      pickle_variants(SCRIPTED_ENTRIES, "data.pkl"),
                      pickle_variants(SCRIPTED_ENTRIES, "constants.pkl")))
def test_mutated_torchscript_archives_never_crash_or_run_code(workdir, data):
    check(workdir, "scripted", data)


@fuzz(40)
@given(data=st.one_of(pickle_variants(TORCH_ENTRIES, "data.pkl"),
                      mutated_archives(TORCH_ENTRIES)))
def test_mutated_torch_zip_pickles_never_crash_or_run_code(workdir, data):
    check(workdir, "torchzip", data)
