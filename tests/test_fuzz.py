"""Fuzzing the readers of untrusted files (issue 12): checkpoints and run logs.

Properties, for any bytes hypothesis makes:

* the command ends with exit code 0, 1 or 2, never 4 (a bug of nndiag), and never prints a
  traceback;
* a checkpoint nndiag accepts is read exactly as its own format defines it: the tensors equal
  what ``torch.load`` reads from the zip (which must accept it too), or the bytes a safetensors
  header points at -- never bytes that are not the tensor;
* a shard index never makes nndiag read a file outside the checkpoint directory.

The examples are few and derandomized, so the suite is fast and stable; to search harder,
run ``NNDIAG_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py`` (random, more examples).
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import struct
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from nndiag.checkpoints import load_checkpoint
from nndiag.cli.app import app
from nndiag.errors import UsageError
from tests.test_bad_input_sweep import record_run

runner = CliRunner()
_SEARCH = int(os.environ.get("NNDIAG_FUZZ_EXAMPLES", "0"))


def fuzz(examples: int):
    """Hypothesis settings: ``examples`` derandomized examples (or a random search, see above)."""
    return settings(max_examples=_SEARCH or examples, deadline=None, database=None,
                    derandomize=not _SEARCH, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def cli(*args: str):
    """Run the CLI; assert the contract every input must keep; return the result."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code in (0, 1, 2), (result.exit_code, result.stderr)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        repr(result.exception))
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    if result.exit_code == 2:
        assert result.stdout == "" and result.stderr.startswith("error:"), result.stderr
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def fresh(workdir: Path, name: str) -> Path:
    """An empty directory for one example."""
    path = workdir / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape, dtype and bytes (NaNs included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.numel():
        return True
    return a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8))


# ----------------------------------------------------------------------- torch zip files

STATE = {
    "a.weight": torch.linspace(-1, 1, 48).reshape(6, 8),
    "a.bias": torch.arange(6, dtype=torch.float32),
    "b.weight": torch.full((3, 6), 0.25),
}
_buffer = io.BytesIO()
torch.save(STATE, _buffer)
SAVED = _buffer.getvalue()
with zipfile.ZipFile(io.BytesIO(SAVED)) as _zip:
    ENTRIES = [(info.filename, _zip.read(info)) for info in _zip.infolist()]
DATA_ENTRIES = [i for i, (name, _) in enumerate(ENTRIES) if "/data/" in name]

edit = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 64)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("replace"), st.binary(min_size=0, max_size=256)),
    st.tuples(st.just("duplicate"), st.binary(max_size=64)),
    st.tuples(st.just("drop"), st.none()),
)


@st.composite
def zip_checkpoints(draw) -> bytes:
    """torch.save's zip, re-zipped with entries compressed, cut, grown, duplicated, moved."""
    if draw(st.booleans()):
        order = list(range(len(ENTRIES)))
    else:
        order = draw(st.permutations(range(len(ENTRIES))))
    edits = draw(st.dictionaries(st.sampled_from(DATA_ENTRIES), edit, max_size=3))
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        with zipfile.ZipFile(out, "w") as archive:
            for index in order:
                name, data = ENTRIES[index]
                compression = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
                kind, arg = edits.get(index, (None, None))
                if kind == "drop":
                    continue
                if kind == "truncate":
                    data = data[: min(arg, len(data) - 1)]
                elif kind == "extend":
                    data = data + arg
                elif kind == "replace":
                    data = arg
                archive.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
                if kind == "duplicate":
                    archive.writestr(zipfile.ZipInfo(name), arg, compress_type=compression)
    return out.getvalue()


@st.composite
def damaged(draw, source: st.SearchStrategy[bytes]) -> bytes:
    """Bytes from ``source``, then maybe cut short or with a few bytes overwritten."""
    data = bytearray(draw(source))
    for _ in range(draw(st.integers(0, 3))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()) and data:
        del data[draw(st.integers(0, len(data) - 1)):]
    return bytes(data)


def torch_reads(path: Path) -> dict[str, torch.Tensor] | None:
    """What torch itself reads from a file (None: torch refuses it)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    return obj if isinstance(obj, dict) else None


@fuzz(30)
@given(data=st.one_of(zip_checkpoints(), damaged(zip_checkpoints()),
                      damaged(st.just(SAVED))))
def test_zip_checkpoints_are_read_as_torch_reads_them_or_refused(workdir, data):
    path = fresh(workdir, "zip") / "model.pt"
    path.write_bytes(data)
    result = cli("inspect", path)
    if result.exit_code == 2:
        return
    ours = load_checkpoint(path).state_dict()
    theirs = torch_reads(path)
    assert theirs is not None, "nndiag diagnosed a checkpoint torch refuses to read"
    for name, tensor in ours.items():
        assert name in theirs and same_tensor(tensor, theirs[name]), name


def test_the_untouched_checkpoint_is_read_exactly(workdir):
    path = fresh(workdir, "plain") / "model.pt"
    path.write_bytes(SAVED)
    assert cli("inspect", path).exit_code in (0, 1)
    loaded = load_checkpoint(path).state_dict()
    assert loaded.keys() == STATE.keys()
    assert all(same_tensor(loaded[k], v) for k, v in STATE.items())


# ----------------------------------------------------------------------- safetensors headers

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
small_int = st.integers(-3, 40)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                        st.floats(allow_nan=False), st.text(max_size=8))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)
entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.one_of(st.sampled_from(sorted(DTYPES)), json_value),
        "shape": st.one_of(st.lists(small_int, max_size=3), st.lists(json_scalar, max_size=3),
                           json_value),
        "data_offsets": st.one_of(st.lists(st.integers(-8, 300), min_size=0, max_size=3),
                                  st.lists(json_scalar, max_size=2), json_value),
    })


@st.composite
def consistent_entries(draw) -> dict:
    """A valid header (contiguous tensors, right sizes) to start from."""
    header, offset = {}, 0
    for i in range(draw(st.integers(1, 3))):
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        count = 1
        for dim in shape:
            count *= dim
        size = count * torch.empty((), dtype=DTYPES[dtype]).element_size()
        header[f"layer{i}.weight"] = {"dtype": dtype, "shape": shape,
                                      "data_offsets": [offset, offset + size]}
        offset += size
    return header


@st.composite
def safetensors_files(draw) -> bytes:
    if draw(st.booleans()):
        header = draw(consistent_entries())
        for name in draw(st.lists(st.sampled_from(sorted(header)), max_size=2, unique=True)):
            header[name] = draw(entry)  # break one entry
    else:
        header = draw(st.dictionaries(st.text(max_size=8), entry, max_size=3))
    if draw(st.booleans()):
        # Only objects here: any other __metadata__ is refused (tested below).
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=6), json_value,
                                                      max_size=3))
    text = json.dumps(header) if draw(st.integers(0, 9)) else json.dumps(draw(json_value))
    raw = text.encode()
    end = max([int(v["data_offsets"][-1]) for v in header.values()
               if isinstance(v, dict) and isinstance(v.get("data_offsets"), list)
               and v["data_offsets"] and isinstance(v["data_offsets"][-1], int)
               and 0 <= v["data_offsets"][-1] < 4096] or [0])
    body = draw(st.binary(min_size=0, max_size=8)) + bytes(
        random.Random(len(raw)).getrandbits(8) for _ in range(end))
    body = body[: draw(st.integers(0, len(body)))] if draw(st.integers(0, 4)) == 0 else body
    length = len(raw) if draw(st.integers(0, 5)) else draw(st.integers(0, 2**64 - 1))
    return struct.pack("<Q", length) + raw + body


def declared_tensor(data: bytes, info: dict) -> torch.Tensor:
    """A tensor read by the safetensors definition: the bytes its header entry points at."""
    (length,) = struct.unpack("<Q", data[:8])
    begin, end = info["data_offsets"]
    raw = bytearray(data[8 + length + begin: 8 + length + end])
    dtype = DTYPES[info["dtype"]]
    return torch.frombuffer(raw, dtype=dtype).reshape(info["shape"]) if raw else \
        torch.empty(info["shape"], dtype=dtype)


@fuzz(40)
@given(data=safetensors_files())
def test_safetensors_headers_are_trusted_only_for_bytes_they_own(workdir, data):
    path = fresh(workdir, "st") / "model.safetensors"
    path.write_bytes(data)
    result = cli("inspect", path)
    if result.exit_code == 2:
        return
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + length])
    for tensor_entry in load_checkpoint(path).entries:
        info = header[tensor_entry.name]
        begin, end = info["data_offsets"]
        assert 0 <= begin <= end and 8 + length + end <= len(data), tensor_entry.name
        assert same_tensor(tensor_entry.read(), declared_tensor(data, info)), tensor_entry.name


@pytest.mark.parametrize("metadata", ["0", [1, 2], True, 1.5])
def test_safetensors_metadata_that_is_not_an_object_is_refused(tmp_path, metadata):
    raw = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                      "__metadata__": metadata}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    with pytest.raises(UsageError):
        load_checkpoint(path)


# ----------------------------------------------------------------------- shard indexes

SHARDS = {"part-1.safetensors": {"a.weight": torch.ones(4, 4)},
          "part-2.safetensors": {"b.weight": torch.full((2, 4), 2.0)}}
hostile_names = st.sampled_from([
    "part-1.safetensors", "part-2.safetensors", "../outside.safetensors",
    "/etc/passwd", "..\\outside.safetensors", "sub/../../outside.safetensors", "sub/",
    "", ".", "..", "C:\\outside.safetensors", "part-3.safetensors", "a" * 300,
    "link.safetensors", "part-1.safetensors/..",
])
# A NUL byte in a shard name is tested on its own below.
names = st.one_of(hostile_names, st.text(st.characters(blacklist_characters="\x00"),
                                         max_size=12))
weight_maps = st.one_of(
    st.dictionaries(st.text(max_size=8), st.one_of(names, json_scalar), max_size=4),
    json_value,
)


def write_shards(directory: Path) -> None:
    from safetensors.torch import save_file

    for name, tensors in SHARDS.items():
        save_file(tensors, directory / name)
    save_file({"secret.weight": torch.full((3, 3), 7.0)}, directory.parent / "outside.safetensors")
    os.symlink(directory.parent / "outside.safetensors", directory / "link.safetensors")


@fuzz(25)
@given(weight_map=weight_maps, garbage=st.one_of(st.none(), st.binary(max_size=40)),
       index_name=st.sampled_from(["model.safetensors.index.json",
                                   "pytorch_model.bin.index.json"]))
def test_shard_indexes_never_lead_outside_the_directory(workdir, weight_map, garbage,
                                                        index_name):
    directory = fresh(workdir, "shards") / "model"
    directory.mkdir()
    write_shards(directory)
    index = directory / index_name
    if garbage is None:
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        index.write_bytes(garbage)
    result = cli("inspect", directory)
    if result.exit_code == 2:
        return
    checkpoint = load_checkpoint(directory)
    root = directory.resolve()
    assert all(Path(f).resolve().is_relative_to(root) for f in checkpoint.files), checkpoint.files
    assert "secret.weight" not in {e.name for e in checkpoint.entries}


def test_a_nul_byte_in_a_shard_name_is_refused(tmp_path):
    directory = tmp_path / "model"
    directory.mkdir()
    write_shards(directory)
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a.weight": "part-1\x00.safetensors"}}))
    with pytest.raises(UsageError):
        load_checkpoint(directory)


# ----------------------------------------------------------------------- run logs


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    return record_run(tmp_path_factory.mktemp("fuzz_run") / "run", steps=8)


garbage_line = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
    json_value.map(json.dumps),
    st.dictionaries(st.sampled_from(["first", "loss", "lr", "step", "layers", "grad_norm",
                                     "name", "std", "mean", "dead_fraction"]),
                    json_value, max_size=4).map(json.dumps),
)
mutation = st.fixed_dictionaries({
    "file": st.sampled_from(["steps.jsonl", "samples.jsonl", "meta.json"]),
    "cut": st.one_of(st.none(), st.floats(0, 1)),
    "insert": st.lists(st.tuples(st.floats(0, 1), garbage_line), max_size=3),
    "replace_field": st.one_of(st.none(), st.tuples(st.text(max_size=12), json_value)),
})


def mutate_run(source: Path, target: Path, mutations: list[dict]) -> None:
    shutil.copytree(source, target)
    for change in mutations:
        path = target / change["file"]
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines(keepends=True)
        for where, line in change["insert"]:
            lines.insert(int(where * len(lines)), line.replace("\n", " ") + "\n")
        text = "".join(lines)
        if change["replace_field"] is not None and change["file"] == "meta.json":
            key, value = change["replace_field"]
            if _is_json_object(text):
                meta = json.loads(text)
                meta[key if key in meta or not meta else sorted(meta)[len(key) % len(meta)]] = \
                    value
                text = json.dumps(meta)
        elif change["replace_field"] is not None:
            key, value = change["replace_field"]
            records = [json.loads(line) for line in text.splitlines() if _is_json_object(line)]
            if records:
                records[0][key] = value
                text = "\n".join(json.dumps(r) for r in records) + "\n"
        if change["cut"] is not None:
            text = text[: int(change["cut"] * len(text))]
        path.write_text(text, encoding="utf-8", errors="surrogatepass")


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


@fuzz(30)
@given(mutations=st.lists(mutation, min_size=1, max_size=3), as_json=st.booleans())
def test_check_reads_any_damaged_run_log_without_crashing(workdir, clean_run, mutations,
                                                          as_json):
    target = workdir / "run_check"
    shutil.rmtree(target, ignore_errors=True)
    mutate_run(clean_run, target, mutations)
    result = cli("check", target, *(["--json"] * as_json))
    if as_json and result.exit_code != 2:
        json.loads(result.stdout)


@fuzz(3)
@given(mutations=st.lists(mutation, min_size=1, max_size=2))
def test_report_draws_any_damaged_run_log_without_crashing(workdir, clean_run, mutations):
    from nndiag.advice import advise_run
    from nndiag.render.plots.run_figures import FIGURES
    from nndiag.rules.run import run_rules
    from nndiag.runlog import read_run

    target = workdir / "run_report"
    shutil.rmtree(target, ignore_errors=True)
    mutate_run(clean_run, target, mutations)
    try:
        log = read_run(target)
    except UsageError:
        return
    findings = [advise_run(f, log) for f in run_rules(log)]
    for figure in FIGURES.values():  # drawn, not saved: saving a PNG only costs time here
        figure(log, findings)
