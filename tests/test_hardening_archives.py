"""Hostile and unusual torch archives: TorchScript code that must not run, quantized and sparse
tensors, zip bombs, re-zipped (deflated) checkpoints read one tensor at a time, views expanded
far beyond their stored elements, and files saved in the other byte order."""

from __future__ import annotations

import json
import sys
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from nndiag import UsageError
from nndiag.checkpoints import formats, load_checkpoint, ziplayout
from nndiag.cli.app import app
from tests.fixtures.scripted import FileFiller

runner = CliRunner()
MARKER = b"AAAA"


def inspect(*args: object):
    return runner.invoke(app, ["inspect", *map(str, args)])


def assert_clean(result, codes=(0, 1)) -> None:
    """An expected exit code, no traceback, no raw warning on stderr."""
    assert result.exit_code in codes, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    assert "Warning" not in result.stderr, result.stderr


def inspect_quietly(*args: object):
    """``inspect``, asserting that no warning escapes it (each would be a raw stderr line)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = inspect(*args)
    assert [str(w.message) for w in caught] == []
    return result


def rezip(source: Path, target: Path, compression: int = zipfile.ZIP_STORED,
          edit=None) -> None:
    """Copy a zip entry by entry (as a user's zip tool would), optionally editing entries."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", compression) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            dst.writestr(info.filename, data if edit is None else edit(info.filename, data))


# ----------------------------------------------------------------------- TorchScript code


class EndlessLoader:
    """Loading it never ends."""

    def __init__(self, count: int):
        self.count = count

    def __getstate__(self) -> int:
        return self.count

    def __setstate__(self, state: int) -> None:
        self.count = state
        while self.count >= 0:
            self.count += 1


with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit's own notice
    EndlessLoader = torch.jit.script(EndlessLoader)


class Trojan(nn.Module):
    def __init__(self, payload: object):
        super().__init__()
        self.lin = nn.Linear(3, 5)
        self.payload = payload

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def script(module: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit's own notice
        torch.jit.script(module).save(str(path))
    return path


def test_torchscript_code_does_not_run_without_unsafe_load(tmp_path):
    marker = tmp_path / "marker.bin"
    marker.write_bytes(MARKER)
    trojan = Trojan(FileFiller(str(marker)))
    path = script(trojan, tmp_path / "trojan.pt")

    checkpoint = load_checkpoint(path)
    assert marker.read_bytes() == MARKER
    assert checkpoint.format == "torchscript" and checkpoint.module is None
    loaded = checkpoint.state_dict()
    assert loaded.keys() == {"lin.weight", "lin.bias"}
    assert all(torch.equal(loaded[k], v) for k, v in trojan.state_dict().items())

    result = inspect(path, "--json")
    assert_clean(result)
    assert marker.read_bytes() == MARKER
    modules = json.loads(result.stdout)["layers"]
    assert [m["name"] for m in modules] == ["lin"] and modules[0]["weight_rms"] > 0

    live = inspect(path, "--input-shape", "2,3")
    assert live.exit_code == 2 and "--unsafe-load" in live.stderr
    assert marker.read_bytes() == MARKER

    # The archive really does run code when loaded: --unsafe-load loads it as before.
    assert load_checkpoint(path, unsafe_load=True).module is not None
    assert marker.read_bytes() == b"XXXX"


def test_torchscript_whose_loading_never_ends_is_read_at_once(tmp_path):
    path = script(Trojan(EndlessLoader(0)), tmp_path / "endless.pt")
    start = time.perf_counter()
    result = inspect(path)
    assert_clean(result)
    assert time.perf_counter() - start < 10
    assert "lin" in result.stdout


class Scripted(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
        self.register_buffer("mask", torch.ones(2))
        self.plain = torch.zeros(3)  # an attribute, not a buffer: not in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.mask


def test_scripted_model_is_analysed_with_torch_s_names_and_values(tmp_path):
    path = script(Scripted(), tmp_path / "scripted.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        theirs = torch.jit.load(str(path)).state_dict()
    checkpoint = load_checkpoint(path)
    ours = checkpoint.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())
    assert checkpoint.extras["module"] == "Scripted"
    result = inspect(path, "--json")
    assert_clean(result)
    kinds = {m["name"]: m["kind"] for m in json.loads(result.stdout)["layers"]}
    assert kinds["body.0"] == "linear" and kinds["body.1"] == "batch_norm"


# ----------------------------------------------------------------------- quantized and sparse


def quantized(kind: str) -> torch.Tensor:
    weight = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized dtypes are deprecated in recent torch
        if kind == "per_channel":
            return torch.quantize_per_channel(weight, torch.rand(6) + 0.01,
                                              torch.randint(-3, 3, (6,)), 0, torch.qint8)
        if kind == "per_channel_float_qparams":
            return torch.quantize_per_channel(weight, torch.rand(4) + 0.01, torch.rand(4), 1,
                                              torch.quint8)
        dtype = getattr(torch, kind)
        zero_point = {torch.qint8: 0, torch.quint8: 128, torch.qint32: 5, torch.quint4x2: 8}
        return torch.quantize_per_tensor(weight, 0.05 if dtype != torch.quint4x2 else 0.5,
                                         zero_point[dtype], dtype)


@pytest.mark.parametrize("kind", ["qint8", "quint8", "qint32", "quint4x2", "per_channel",
                                  "per_channel_float_qparams"])
@pytest.mark.parametrize("zipped", [True, False])
def test_quantized_tensors_are_read_as_their_dequantized_values(tmp_path, kind, zipped):
    weight = quantized(kind)
    torch.save({"layer.weight": weight, "layer.bias": torch.zeros(6)}, tmp_path / "q.pt",
               _use_new_zipfile_serialization=zipped)
    result = inspect_quietly(tmp_path / "q.pt")
    assert_clean(result)
    assert "dequantized" in result.stdout
    checkpoint = load_checkpoint(tmp_path / "q.pt")
    assert torch.equal(checkpoint.state_dict()["layer.weight"], weight.dequantize())
    assert "quantized" in checkpoint.extras


@pytest.mark.parametrize("layout", ["coo", "csr"])
@pytest.mark.parametrize("zipped", [True, False])
def test_sparse_tensors_are_named_not_analysed(tmp_path, layout, zipped):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes on sparse invariants and CSR beta
        sparse = torch.sparse_coo_tensor(torch.tensor([[0, 1, 2], [1, 2, 3]]),
                                         torch.tensor([1.0, 2.0, 3.0]), (4, 5))
        state = {"emb.weight": sparse if layout == "coo" else sparse.to_sparse_csr(),
                 "lin.weight": torch.randn(3, 3)}
        torch.save(state, tmp_path / "sparse.pt", _use_new_zipfile_serialization=zipped)
    result = inspect_quietly(tmp_path / "sparse.pt")
    assert_clean(result)
    assert "not analysed" in result.stdout
    checkpoint = load_checkpoint(tmp_path / "sparse.pt")
    assert [e.name for e in checkpoint.entries] == ["lin.weight"]
    assert f"emb.weight (sparse_{layout} tensor)" in checkpoint.extras["not analysed"]


# ----------------------------------------------------------------------- bombs and memory


def small_checkpoint(path: Path) -> Path:
    torch.save({"fc.weight": torch.randn(4, 4), "fc.bias": torch.zeros(4)}, path)
    return path


@pytest.mark.parametrize(("member", "inflated"), [
    ("data.pkl", ziplayout.MAX_PICKLE_BYTES + 1024), ("byteorder", 1 << 20),
    ("version", 1 << 20)])
def test_a_record_that_inflates_beyond_its_cap_is_refused_before_it_is_read(
        tmp_path, monkeypatch, member, inflated):
    source = small_checkpoint(tmp_path / "model.pt")
    rezip(source, tmp_path / "bomb.pt", zipfile.ZIP_DEFLATED,
          edit=lambda name, data: data + bytes(inflated - len(data))
          if name.endswith("/" + member) else data)
    assert (tmp_path / "bomb.pt").stat().st_size < 200_000
    inflated_sizes = []
    real_inflate = ziplayout.inflate_into
    monkeypatch.setattr(ziplayout, "inflate_into", lambda layout, record, skip, out: (
        inflated_sizes.append(len(out)), real_inflate(layout, record, skip, out))[1])
    result = inspect(tmp_path / "bomb.pt")
    assert result.exit_code == 2, result.stderr
    assert "would inflate to" in result.stderr and member in result.stderr
    assert max(inflated_sizes, default=0) <= ziplayout.MAX_METADATA_BYTES


def test_deflated_checkpoint_is_inflated_one_tensor_at_a_time(tmp_path, monkeypatch):
    state = {f"layers.{i}.weight": torch.randn(64, 64) for i in range(4)}
    state["shared.view"] = state["layers.0.weight"][8:16, 4:]  # a view inside a storage
    torch.save(state, tmp_path / "model.pt")
    rezip(tmp_path / "model.pt", tmp_path / "deflated.pt", zipfile.ZIP_DEFLATED)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("loaded whole"))
    buffers = []
    real_inflate = ziplayout.inflate_into
    monkeypatch.setattr(formats, "inflate_into", lambda layout, record, skip, out: (
        buffers.append(len(out)), real_inflate(layout, record, skip, out))[1])
    checkpoint = load_checkpoint(tmp_path / "deflated.pt")
    assert buffers == []  # nothing inflated until a tensor is read
    for entry in checkpoint.entries:
        assert torch.equal(entry.read(), state[entry.name])
    one = 64 * 64 * 4
    assert buffers[:4] == [one] * 4  # each tensor's own bytes, one at a time
    assert buffers[4] == (7 * 64 + 60) * 4  # the view's span, not its whole storage


def test_view_expanded_far_beyond_its_storage_is_named_not_expanded(tmp_path):
    torch.save({"huge.weight": torch.ones(1).expand(2 ** 40), "small.weight":
                torch.arange(3.0).expand(4, 3), "fc.weight": torch.randn(3, 3)},
               tmp_path / "expanded.pt")
    assert (tmp_path / "expanded.pt").stat().st_size < 4096
    start = time.perf_counter()
    result = inspect(tmp_path / "expanded.pt")
    assert_clean(result)
    assert time.perf_counter() - start < 10
    assert "huge.weight (a view of 1,099,511,627,776 elements over 1 stored" in result.stdout
    loaded = load_checkpoint(tmp_path / "expanded.pt").state_dict()
    assert torch.equal(loaded["small.weight"], torch.arange(3.0).expand(4, 3))


def test_checkpoint_saved_in_the_other_byte_order_is_read_as_torch_reads_it(tmp_path):
    state = {"fc.weight": torch.randn(4, 3), "fc.bias": torch.arange(4, dtype=torch.int64),
             "half": torch.randn(5).half()}
    torch.save(state, tmp_path / "native.pt")
    other = "big" if sys.byteorder == "little" else "little"
    storages = {str(key): tensor.element_size() for key, tensor in enumerate(state.values())}

    def swap(name: str, data: bytes) -> bytes:
        if name.endswith("/byteorder"):
            return other.encode()
        key = name.rsplit("/data/", 1)[-1]
        if "/data/" in name and key in storages:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(
                -1, storages[key]).flip(1).reshape(-1).numpy().tobytes()
        return data

    rezip(tmp_path / "native.pt", tmp_path / "swapped.pt", edit=swap)
    assert (tmp_path / "swapped.pt").read_bytes() != (tmp_path / "native.pt").read_bytes()
    theirs = torch.load(tmp_path / "swapped.pt", weights_only=True)
    ours = load_checkpoint(tmp_path / "swapped.pt").state_dict()
    assert all(torch.equal(ours[k], theirs[k]) and torch.equal(ours[k], v)
               for k, v in state.items())


def test_pickle_naming_a_scripted_class_in_a_torch_file_is_unsafe(tmp_path):
    source = small_checkpoint(tmp_path / "model.pt")
    hostile = b"\x80\x02c__torch__\nAnything\nq\x00)\x81}b."
    rezip(source, tmp_path / "hostile.pt",
          edit=lambda name, data: hostile if name.endswith("/data.pkl") else data)
    with pytest.raises(UsageError, match="__torch__.Anything"):
        load_checkpoint(tmp_path / "hostile.pt")
