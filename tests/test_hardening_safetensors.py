"""Hostile and unusual safetensors files, shard directories and checkpoint contents: huge or
tiny finite weights, every dtype the ``safetensors`` package writes, malformed headers, an index
contradicted by a shard, oversized side files, zero-channel BatchNorms and odd optimizer
states. Each one ends in an analysis or one readable error (exit 2), never exit 4."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from nndiag import inspect_checkpoint
from nndiag.checkpoints import load_checkpoint
from nndiag.checkpoints import static as static_module
from nndiag.checkpoints.static import tensor_stats
from nndiag.cli.app import app
from nndiag.errors import UsageError
from tests.test_checkpoint_hardening import assert_one_clean_error

runner = CliRunner()


def inspect_json(path: Path) -> tuple[int, dict]:
    """Exit code and JSON report of ``nndiag inspect PATH --json`` (no traceback allowed)."""
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code in (0, 1), (result.exit_code, result.stderr)
    return result.exit_code, json.loads(result.stdout)


def write_raw(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    """A safetensors file with this header (JSON text or an object) and data, as given."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def chain(std: float) -> dict[str, torch.Tensor]:
    """Three 32x32 float32 Linear weights drawn with this std."""
    generator = torch.Generator().manual_seed(0)
    return {f"layers.{i}.weight": torch.randn(32, 32, generator=generator) * std
            for i in range(3)}


# ----------------------------------------------------------------------- statistics


@pytest.mark.parametrize(("dtype", "scale"), [
    (torch.float32, 1e19), (torch.float32, 1e-22), (torch.float32, 1e-42),
    (torch.bfloat16, 1e30), (torch.float64, 1e200), (torch.float64, 1e-200),
    (torch.float64, 1e-310),
])
def test_statistics_of_huge_and_tiny_finite_weights_are_exact(monkeypatch, dtype, scale):
    monkeypatch.setattr(static_module, "CHUNK", 50)  # several chunks, reduced one by one
    base = torch.randn(10, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    values = (base * scale).to(dtype)
    exact = values.double() / scale  # the stored values, brought back near 1 exactly enough
    stats = tensor_stats("w", values)
    assert stats.nonfinite == 0
    assert stats.rms / scale == pytest.approx(float(exact.square().mean().sqrt()), rel=1e-6)
    assert stats.mean / scale == pytest.approx(float(exact.mean()), rel=1e-5)


def test_huge_finite_weights_are_the_error_they_are_not_an_overflow(tmp_path):
    for std in (1e10, 1e18):  # 1024 squares of 1e36 overflow a float32 sum
        save_file(chain(std), tmp_path / f"x{std:.0e}.safetensors")
        code, report = inspect_json(tmp_path / f"x{std:.0e}.safetensors")
        assert code == 1, report["findings"]
        assert report["findings"][0]["severity"] == "error"
        rms = report["layers"][0]["weight_rms"]
        assert math.isfinite(rms) and rms == pytest.approx(std, rel=0.1)


def test_statistics_of_non_contiguous_views_match_their_copies(monkeypatch):
    monkeypatch.setattr(static_module, "CHUNK", 7)
    fused = torch.randn(12, 36, generator=torch.Generator().manual_seed(2))
    for part in (fused.chunk(3, dim=1)[1], fused.t(), fused[::2, ::3]):
        assert not part.is_contiguous()
        view, copy = tensor_stats("w", part), tensor_stats("w", part.contiguous())
        assert (view.rms, view.mean) == pytest.approx((copy.rms, copy.mean), rel=1e-6)


# ----------------------------------------------------------------------- dtypes


def test_every_dtype_the_safetensors_package_writes_is_read(tmp_path):
    generator = torch.Generator().manual_seed(3)
    state = {
        "c.weight": torch.randn(8, 8, generator=generator, dtype=torch.complex64),
        "e.scale": torch.tensor([0.25, 1.0, 8.0, 2.0]).to(torch.float8_e8m0fnu),
        "f.weight": torch.randint(0, 256, (4, 4), generator=generator,
                                  dtype=torch.uint8).view(torch.float4_e2m1fn_x2),
        "g.weight": torch.randn(4, 4, generator=generator).to(torch.float8_e4m3fnuz),
        "h.weight": torch.randn(4, 4, generator=generator).to(torch.float8_e5m2fnuz),
        "n.weight": torch.zeros(8, dtype=torch.uint8).view(torch.float4_e2m1fn_x2),
    }
    save_file(state, tmp_path / "dtypes.safetensors")
    expected = load_file(tmp_path / "dtypes.safetensors")
    checkpoint = load_checkpoint(tmp_path / "dtypes.safetensors")
    for entry in checkpoint.entries:
        read = entry.read()
        assert read.dtype == expected[entry.name].dtype
        assert read.shape == expected[entry.name].shape
        assert read.view(torch.uint8).equal(expected[entry.name].view(torch.uint8)), entry.name
    code, report = inspect_json(tmp_path / "dtypes.safetensors")
    tensors = {t["name"]: t for layer in report["layers"] for t in layer["tensors"]}
    magnitude = float(state["c.weight"].abs().square().mean().sqrt())
    assert tensors["c.weight"]["rms"] == pytest.approx(magnitude, rel=1e-6)
    assert tensors["c.weight"]["mean"] is None  # a complex mean is not one number
    assert tensors["e.scale"]["rms"] == pytest.approx(math.sqrt((0.25**2 + 1 + 64 + 4) / 4))
    assert tensors["f.weight"]["rms"] is None  # packed 4-bit floats: no arithmetic in torch
    assert "f.weight" in report["summary"]["extras"]["no statistics"]


def test_six_bit_floats_torch_cannot_hold_are_named_not_refused(tmp_path):
    header = {"x.weight": {"dtype": "F6_E2M3", "shape": [4, 4], "data_offsets": [0, 12]},
              "y.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [12, 28]}}
    code, report = inspect_json(write_raw(tmp_path / "f6.safetensors", header, bytes(28)))
    assert [layer["name"] for layer in report["layers"]] == ["y"]
    assert "x.weight (F6_E2M3 [4, 4])" in report["summary"]["extras"]["not read"]
    del header["y.weight"]
    result = runner.invoke(app, ["inspect", str(write_raw(tmp_path / "only.safetensors", header,
                                                          bytes(12)))])
    assert_one_clean_error(result, "no tensor torch can hold", "F6_E2M3")


def test_float4_and_complex_vectors_among_batch_norm_buffers_are_described(tmp_path):
    state = {"bn.weight": torch.zeros(4, dtype=torch.uint8).view(torch.float4_e2m1fn_x2),
             "bn.bias": torch.zeros(4, dtype=torch.complex64),
             "bn.running_mean": torch.zeros(4), "bn.running_var": torch.ones(4)}
    torch.save(state, tmp_path / "odd.pt")
    assert inspect_json(tmp_path / "odd.pt")[0] == 0


# ----------------------------------------------------------------------- malformed headers

F32_16 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


@pytest.mark.parametrize(("header", "message"), [
    ({"x": {**F32_16, "shape": [-1, -4]}}, "shape must be"),
    ({"x": {**F32_16, "shape": [2**64, 0], "data_offsets": [0, 0]}}, "shape must be"),
    ({"x": {**F32_16, "shape": [2**40, 2**30, 0], "data_offsets": [0, 0]}}, "2^63 elements"),
    ({"x": {**F32_16, "shape": [True, 4]}}, "shape must be"),
    ({"x": {**F32_16, "data_offsets": [0.0, 16.0]}}, "data_offsets must be"),
    ({"x": {**F32_16, "data_offsets": [-16, 0]}}, "data_offsets must be"),
    ({"x": {**F32_16, "data_offsets": [0, 2**64]}}, "data_offsets must be"),
    ({"x": {**F32_16, "data_offsets": [16, 0]}}, "data_offsets must be"),
    (b'{"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, Infinity]}}', "data_offsets"),
    (b'{"x": {"dtype": "F32", "shape": [4], "data_offsets": [NaN, 16]}}', "data_offsets"),
    (b'{"x": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 16]}}', "shape must be"),
    (b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    ({"x": {**F32_16, "dtype": "f32"}}, "unknown dtype"),
    ({"x": {**F32_16, "dtype": "F4", "shape": [3]}}, "wrong size"),
    ({"x": F32_16, "y": {**F32_16, "data_offsets": [8, 24]}}, "share bytes"),
])
def test_malformed_headers_are_one_clean_error(tmp_path, header, message):
    path = write_raw(tmp_path / "bad.safetensors", header, bytes(32))
    assert_one_clean_error(runner.invoke(app, ["inspect", str(path)]), message)


def test_a_thousand_entries_over_the_same_bytes_are_refused_before_reading(tmp_path):
    size = 4096 * 1024 * 4
    header = {f"t{i}": {"dtype": "F32", "shape": [4096, 1024], "data_offsets": [0, size]}
              for i in range(1000)}
    path = write_raw(tmp_path / "overlap.safetensors", header, bytes(size))
    with pytest.raises(UsageError, match="share bytes"):
        load_checkpoint(path)


# ----------------------------------------------------------------------- directories


@pytest.mark.parametrize("stale_name", ["a-stale.safetensors", "z-stale.safetensors"])
def test_the_shard_index_decides_which_copy_of_a_tensor_is_read(tmp_path, stale_name):
    save_file({"a.weight": torch.ones(4, 4), "b.weight": torch.ones(4, 4)},
              tmp_path / stale_name)
    save_file({"a.weight": torch.full((4, 4), 7.0)}, tmp_path / "m-named.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a.weight": "m-named.safetensors", "b.weight": stale_name}}))
    read = load_checkpoint(tmp_path).state_dict()
    assert read["a.weight"].eq(7.0).all() and read["b.weight"].eq(1.0).all()


def sparse_file(path: Path, size: int) -> Path:
    """A file of ``size`` zero bytes that takes no disk space."""
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


def test_a_six_gigabyte_shard_index_is_refused_without_reading_it(tmp_path):
    save_file({"a.weight": torch.ones(4, 4)}, tmp_path / "model.safetensors")
    sparse_file(tmp_path / "model.safetensors.index.json", 6 * 2**30)
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert_one_clean_error(result, "shard index is larger than 64 MB")


def test_a_six_gigabyte_config_is_noted_not_read(tmp_path):
    save_file({"a.weight": torch.ones(4, 4)}, tmp_path / "model.safetensors")
    sparse_file(tmp_path / "config.json", 6 * 2**30)
    code, report = inspect_json(tmp_path)
    assert "larger than 64 MB" in report["summary"]["extras"]["config"]


@pytest.mark.parametrize("side_file", ["model.safetensors.index.json", "config.json"])
def test_deeply_nested_side_files_are_not_a_crash(tmp_path, side_file):
    save_file({"a.weight": torch.ones(4, 4)}, tmp_path / "model.safetensors")
    (tmp_path / side_file).write_text("[" * 100_000 + "]" * 100_000)
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    if side_file == "config.json":
        assert result.exit_code == 0, result.stderr
        assert "nested too deeply" in result.stdout
    else:
        assert_one_clean_error(result, "nested too deeply")


# ----------------------------------------------------------------------- checkpoint contents


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_zero_channel_batch_norm_is_analysed(tmp_path, suffix):
    state = {k: v for k, v in torch.nn.BatchNorm1d(0).state_dict().items()
             if suffix == ".pt" or v.dim()}
    path = tmp_path / f"bn0{suffix}"
    torch.save(state, path) if suffix == ".pt" else save_file(state, path)
    layer = inspect_checkpoint(path).layers[0]
    assert (layer.channels, layer.dead_channels) == (0, 0)


@pytest.mark.parametrize(("rates", "shown"), [
    (["0.1", 0.2], "lr [0.2, '0.1']"),
    ([[0.1], {"base": 1}, None], "lr [None, dict with 1 entries, list of 1]"),
    ([torch.tensor(0.01), 0.001, True], "lr [0.001, True, tensor ()]"),
    ([math.nan, 0.5], "lr [0.5, nan]"),
])
def test_optimizer_groups_with_learning_rates_of_mixed_types_are_described(tmp_path, rates,
                                                                            shown):
    optimizer = {"state": {}, "param_groups": [{"lr": lr, "params": [i]}
                                               for i, lr in enumerate(rates)]}
    torch.save({"model": {"l.weight": torch.eye(3)}, "optimizer": optimizer},
               tmp_path / "bundle.pt")
    code, report = inspect_json(tmp_path / "bundle.pt")
    assert report["summary"]["extras"]["optimizer"] == (
        f"optimizer state for 0 parameters, {len(rates)} param group(s), {shown}")
