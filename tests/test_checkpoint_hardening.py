"""Hostile and extreme checkpoints (issue 12): re-zipped and short zip entries, names carrying
terminal escapes, chains whose predicted scale leaves the float range, 20,000 modules, and
shard indexes naming files outside their directory."""

from __future__ import annotations

import json
import math
import os
import time
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nndiag import UsageError, examples, inspect_checkpoint
from nndiag.checkpoints import load_checkpoint
from nndiag.checkpoints.static import _assign_chains
from nndiag.cli.app import app
from nndiag.records import CheckpointRecord, ModuleWeights
from nndiag.render.safe import printable
from nndiag.rules import run_checkpoint_rules
from nndiag.stats.weights import he_std

runner = CliRunner()


def inspect(*args: str):
    return runner.invoke(app, ["inspect", *map(str, args)])


def assert_one_clean_error(result, *fragments: str) -> None:
    """Exit 2, one ``error:`` line on stderr, no traceback, nothing on stdout."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert result.stdout == ""


def small_state() -> dict[str, torch.Tensor]:
    return examples.he_mlp(depth=3, width=16).state_dict()


def rezip(source: Path, target: Path, compression: int = zipfile.ZIP_STORED,
          edit=None, duplicate: str | None = None) -> None:
    """Copy a torch zip entry by entry (as a user's zip tool would), optionally editing one."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", compression) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if edit is not None:
                data = edit(info.filename, data)
            dst.writestr(info.filename, data)
            if duplicate is not None and info.filename.endswith(duplicate):
                with pytest.warns(UserWarning, match="Duplicate name"):
                    dst.writestr(info.filename, bytes(len(data)))


def data_entry(name: str, key: str) -> bool:
    return name.endswith(f"/data/{key}")


# ----------------------------------------------------------------------- zip entries


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])
def test_re_zipped_checkpoint_is_read_exactly_as_torch_reads_it(tmp_path, compression):
    state = small_state()
    torch.save(state, tmp_path / "model.pt")
    rezip(tmp_path / "model.pt", tmp_path / "rezipped.pt", compression)
    assert torch.load(tmp_path / "rezipped.pt", weights_only=True).keys() == state.keys()
    loaded = load_checkpoint(tmp_path / "rezipped.pt").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    result = inspect(tmp_path / "rezipped.pt")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert "no problem found" in result.stdout


def test_torch_written_zip_is_still_read_lazily_at_offsets(tmp_path):
    torch.save(small_state(), tmp_path / "model.pt")
    entry = load_checkpoint(tmp_path / "model.pt").entries[0]
    assert "_entry_at" in entry.read.__qualname__  # not loaded whole


@pytest.mark.parametrize(("case", "compression", "key", "edit"), [
    ("short first entry", zipfile.ZIP_STORED, "0", lambda d: d[: len(d) // 2]),
    ("short later entry", zipfile.ZIP_STORED, "3", lambda d: d[:-4]),
    ("long entry", zipfile.ZIP_STORED, "0", lambda d: d + bytes(64)),
    ("short compressed entry", zipfile.ZIP_DEFLATED, "2", lambda d: d[:8]),
])
def test_entry_whose_size_is_not_its_tensors_is_a_corrupt_checkpoint(tmp_path, case,
                                                                      compression, key, edit):
    torch.save(small_state(), tmp_path / "model.pt")
    rezip(tmp_path / "model.pt", tmp_path / "bad.pt", compression,
          edit=lambda name, data: edit(data) if data_entry(name, key) else data)
    with pytest.raises(RuntimeError, match="size"):  # torch itself refuses these files
        torch.load(tmp_path / "bad.pt", weights_only=True)
    assert_one_clean_error(inspect(tmp_path / "bad.pt"), "corrupt checkpoint")


def test_duplicated_zip_entry_is_a_corrupt_checkpoint(tmp_path):
    torch.save(small_state(), tmp_path / "model.pt")
    rezip(tmp_path / "model.pt", tmp_path / "dup.pt", duplicate="/data/1")
    assert_one_clean_error(inspect(tmp_path / "dup.pt"), "corrupt checkpoint", "more than once")


# ----------------------------------------------------------------------- untrusted names

HOSTILE = {
    "osc": "a\x1b]0;PWNED\x07b",
    "csi": "c\x1b[31mred",
    "newline": "d\nfake row",
    "c1": "e\x9b31mf",
    "separator": "g\u2028h",
    "markup": "i[/]j[bold]k",
}


def test_printable_escapes_every_control_character():
    assert printable("a\x1b]0;t\x07b\nc\rd\te\x7f\x85\x9b\u2028\u2029") == (
        "a\\x1b]0;t\\x07b\\nc\\rd\\te\\x7f\\x85\\x9b\\u2028\\u2029")
    assert printable("résumé.weight[0]") == "résumé.weight[0]"


def test_tensor_names_cannot_drive_the_terminal(tmp_path):
    state = {f"{name}.weight": torch.randn(8, 8) * 3 for name in HOSTILE.values()}
    torch.save(state, tmp_path / "hostile.pt")
    result = inspect(tmp_path / "hostile.pt")
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert "poor_initialization" in result.stdout
    for char in "\x1b\x07\x9b\u2028\x85":
        assert char not in result.stdout
    assert "a\\x1b]0;PWNED\\x07b" in result.stdout and "d\\nfake row" in result.stdout
    assert "i[/]j[bold]k" in result.stdout  # shown as text, not taken as markup
    assert not any(line.startswith("fake row") for line in result.stdout.splitlines())
    as_json = runner.invoke(app, ["inspect", str(tmp_path / "hostile.pt"), "--json"])
    names = {row["name"] for row in json.loads(as_json.stdout)["layers"]}
    assert names == set(HOSTILE.values())  # --json keeps the names exactly


def test_names_in_error_messages_cannot_drive_the_terminal(tmp_path):
    state = dict(small_state())
    state[HOSTILE["osc"] + HOSTILE["markup"] + ".weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "extra.pt")
    result = inspect(tmp_path / "extra.pt", "--model", "nndiag.examples:he_mlp",
                     "--input-shape", "4,32")
    assert_one_clean_error(result, "does not fit --model", "PWNED", "i[/]j[bold]k")
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr


# ----------------------------------------------------------------------- deep chains


def chain_state(depth: int, scale: float, width: int = 4) -> dict[str, torch.Tensor]:
    """``depth`` Linear weights whose RMS is ``scale`` times the He std."""
    value = scale * he_std(width)
    return {f"layers.{i}.weight": torch.full((width, width), value) for i in range(depth)}


@pytest.mark.parametrize(("scale", "direction", "exponent"),
                         [(100.0, "grows", "+400"), (0.01, "collapses", "-400")])
def test_a_chain_beyond_the_float_range_is_diagnosed_not_crashed(tmp_path, scale, direction,
                                                                  exponent):
    torch.save(chain_state(200, scale), tmp_path / "deep.pt")
    result = inspect(tmp_path / "deep.pt", "--plot", tmp_path / "deep.png")
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert f"{direction} 1e{exponent}x" in result.stdout
    assert (tmp_path / "deep.png").read_bytes()[:4] == b"\x89PNG"
    as_json = runner.invoke(app, ["inspect", str(tmp_path / "deep.pt"), "--json"])
    evidence = json.loads(as_json.stdout)["findings"][0]["evidence"]
    assert evidence["log10_predicted_factor"] == pytest.approx(float(exponent), rel=1e-6)
    assert evidence["predicted_factor"] == ("inf" if direction == "grows" else 0.0)
    assert evidence["direction"] == direction


def test_zero_and_non_finite_layers_inside_a_chain_are_skipped_not_poisoning_it(tmp_path):
    state = chain_state(6, 100.0)
    state["layers.2.weight"] = torch.zeros(4, 4)
    state["layers.4.weight"] = torch.full((4, 4), math.nan)
    torch.save(state, tmp_path / "holes.pt")
    report = inspect_checkpoint(tmp_path / "holes.pt")
    assert report.finding("nan_inf").layers == ["layers.4"]
    drift = report.finding("poor_initialization").evidence
    assert drift["layers_in_chain"] == 4  # layers 0, 1, 3 and 5
    assert drift["log10_predicted_factor"] == pytest.approx(8.0)


def test_twenty_thousand_modules_are_judged_in_linear_time():
    modules = [ModuleWeights(f"layers.{i}", "linear", 4, [], 2, 2, 1.0,
                             init_scale_he=10.0 if i % 2 == 0 else 0.5) for i in range(20_000)]
    record = CheckpointRecord("x.pt", "state_dict", modules, None, {}, [])
    started = time.perf_counter()
    _assign_chains(modules)
    findings = run_checkpoint_rules(record)
    elapsed = time.perf_counter() - started
    assert findings[0].id == "poor_initialization" and len(findings[0].layers) >= 19_999
    assert elapsed < 5, f"{elapsed:.1f} s for 20,000 modules (quadratic: about a minute)"


# ----------------------------------------------------------------------- shard indexes


def write_index(directory: Path, weight_map: dict[str, str]) -> None:
    (directory / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink", "backslash"])
def test_shard_index_naming_a_file_outside_the_directory_is_refused(tmp_path, where):
    outside = tmp_path / "outside"
    outside.mkdir()
    torch.save(small_state(), outside / "secret.bin")
    directory = tmp_path / "hf" / "model"
    directory.mkdir(parents=True)
    if where == "symlink":
        os.symlink(outside / "secret.bin", directory / "shard.bin")
    name = {"parent": "../../outside/secret.bin", "absolute": str(outside / "secret.bin"),
            "symlink": "shard.bin", "backslash": "..\\..\\outside\\secret.bin"}[where]
    write_index(directory, {key: name for key in small_state()})
    assert_one_clean_error(inspect(directory), "outside the checkpoint directory")


def test_shards_inside_the_directory_and_the_hugging_face_cache_layout(tmp_path):
    state = small_state()
    keys = list(state)
    repo = tmp_path / "models--org--net"
    snapshot = repo / "snapshots" / "abc123"
    (snapshot / "sub").mkdir(parents=True)
    (repo / "blobs").mkdir()
    torch.save({k: state[k] for k in keys[:2]}, repo / "blobs" / "sha1")
    os.symlink("../../blobs/sha1", snapshot / "a.bin")  # as huggingface_hub writes them
    torch.save({k: state[k] for k in keys[2:]}, snapshot / "sub" / "b.bin")
    write_index(snapshot, {k: "a.bin" if i < 2 else "sub/b.bin" for i, k in enumerate(keys)})
    loaded = load_checkpoint(snapshot).state_dict()
    assert sorted(loaded) == sorted(keys)
    write_index(snapshot, {keys[0]: "../../blobs/sha1"})  # the name itself leaves the directory
    with pytest.raises(UsageError, match="outside"):
        load_checkpoint(snapshot)
