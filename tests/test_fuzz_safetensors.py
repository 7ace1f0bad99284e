"""Fuzzing safetensors headers with numbers at the edges of JSON, float32 and float64.

Properties, for any header hypothesis writes (sizes and offsets of 2^63, 2^64, -1, 1e309,
``Infinity``, ``NaN``, 16.0; dtype names right, wrong and not strings; JSON nested 100,000 deep)
and tensor values at the edges of their type (the largest float32, subnormals, 1e18, Inf, NaN):

* the command ends with exit code 0, 1 or 2, never 4, and never prints a traceback;
* a file nndiag accepts is read as the format defines it: each tensor is the bytes its entry
  points at, and its RMS, mean and NaN/Inf count are those of its values, computed exactly
  (huge finite values never overflow into Inf, tiny ones never vanish into 0).

Derandomized and few by default; ``NNDIAG_FUZZ_EXAMPLES=2000`` searches harder (see
``tests/test_fuzz.py``).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from nndiag.checkpoints import load_checkpoint
from nndiag.checkpoints.static import tensor_stats
from tests.test_fuzz import cli, fresh, fuzz, same_tensor

# Header dtypes whose values these tests write and check, with their torch dtype.
VALUE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                "BF16": torch.bfloat16, "I32": torch.int32, "U8": torch.uint8}
OTHER_DTYPES = ["BOOL", "I8", "I16", "I64", "U16", "U32", "U64", "C64", "F8_E4M3", "F8_E5M2",
                "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F4", "F6_E2M3", "F6_E3M2"]
WRONG_DTYPES = ["f32", "F32 ", "", "F8", "F6", "C128", "U1", "bf16", "F8_E4M3FN", "Float32"]
EDGE_INTS = [0, 1, 4, 16, -1, -16, 2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63,
             2**64 - 1, 2**64, -(2**63), 10**30]
# JSON number (and not-quite-number) tokens, written as they stand in the header's text.
EDGE_TOKENS = ["16.0", "4.0", "1e2", "1e309", "-1e309", "1E400", "-0", "-0.0", "5e-324",
               "3.4028235e38", "1.7976931348623157e308", "Infinity", "-Infinity", "NaN",
               "true", "false", "null", '"16"', "[]", "{}"]
EDGE_VALUES = [0.0, -0.0, 1.0, -2.5, 3.4028234663852886e38, -3.4e38, 1.1754943508222875e-38,
               1.401298464324817e-45, 1e18, -1e18, 1e-20, 1e30, 6.1e-5, 65504.0, 1e300,
               5e-324, math.inf, -math.inf, math.nan]

number = st.one_of(st.sampled_from(EDGE_INTS).map(str), st.sampled_from(EDGE_TOKENS),
                   st.integers(-40, 2**64 + 1).map(str))
nested = st.sampled_from([2, 60, 5_000, 100_000]).map(lambda depth: "[" * depth + "]" * depth)
dtype_token = st.one_of(st.sampled_from(sorted(VALUE_DTYPES) + OTHER_DTYPES).map(json.dumps),
                        st.sampled_from(WRONG_DTYPES).map(json.dumps),
                        st.sampled_from(EDGE_TOKENS), nested)
shape_token = st.one_of(st.lists(number, max_size=3).map(lambda v: f"[{', '.join(v)}]"),
                        st.sampled_from(EDGE_TOKENS), nested)
offsets_token = st.one_of(st.lists(number, min_size=2, max_size=2).map(
    lambda v: f"[{', '.join(v)}]"), st.lists(number, max_size=3).map(
    lambda v: f"[{', '.join(v)}]"), st.sampled_from(EDGE_TOKENS), nested)


@st.composite
def tensors_with_values(draw) -> tuple[list[dict], bytes]:
    """Valid, contiguous entries whose values sit at the edges of their type."""
    entries, data = [], b""
    for _ in range(draw(st.integers(1, 3))):
        dtype = draw(st.sampled_from(sorted(VALUE_DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        values = draw(st.lists(st.sampled_from(EDGE_VALUES), min_size=math.prod(shape),
                               max_size=math.prod(shape)))
        source = torch.tensor(values, dtype=torch.float64)
        if not VALUE_DTYPES[dtype].is_floating_point:
            source = torch.nan_to_num(source).clamp(-1e6, 1e6)
        raw = source.to(VALUE_DTYPES[dtype]).view(torch.uint8).numpy().tobytes()
        entries.append({"dtype": json.dumps(dtype), "shape": json.dumps(shape),
                        "data_offsets": json.dumps([len(data), len(data) + len(raw)])})
        data += raw
    return entries, data


@st.composite
def safetensors_files(draw) -> bytes:
    """A header of valid entries, some fields replaced by edge tokens, and its data."""
    entries, data = draw(tensors_with_values())
    for entry in entries:
        for field, token in (("dtype", dtype_token), ("shape", shape_token),
                             ("data_offsets", offsets_token)):
            if draw(st.integers(0, 5)) == 0:
                entry[field] = draw(token)
    fields = [", ".join(f'"{k}": {v}' for k, v in entry.items()) for entry in entries]
    parts = [f'"layer{i}.weight": {{{text}}}' for i, text in enumerate(fields)]
    if draw(st.booleans()):
        parts.append(f'"__metadata__": {{"format": {draw(st.one_of(number, nested))}}}')
    raw = ("{" + ", ".join(parts) + "}").encode()
    return struct.pack("<Q", len(raw)) + raw + data


def exact_stats(values: torch.Tensor) -> tuple[int, float | None, float | None]:
    """NaN/Inf count, RMS and mean of a tensor's finite values, scaled so nothing overflows."""
    flat = values.reshape(-1).double()
    finite = flat[torch.isfinite(flat)]
    if not finite.numel():
        return flat.numel(), None, None
    peak = float(finite.abs().max())
    if peak == 0:
        return flat.numel() - finite.numel(), 0.0, 0.0
    scaled = finite / peak
    return (flat.numel() - finite.numel(), peak * float(scaled.square().mean().sqrt()),
            peak * float(scaled.mean()))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_safetensors")


@fuzz(30)
@given(data=safetensors_files())
def test_edge_numbers_in_headers_and_values_never_crash_nor_overflow(workdir, data):
    path = fresh(workdir, "st") / "model.safetensors"
    path.write_bytes(data)
    result = cli("inspect", path)
    event(f"exit code {result.exit_code}")
    if result.exit_code == 2:
        return
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + length])
    for entry in load_checkpoint(path).entries:
        info = header[entry.name]
        begin, end = info["data_offsets"]
        declared = torch.frombuffer(bytearray(data[8 + length + begin: 8 + length + end]) or
                                    bytearray(1), dtype=torch.uint8)[: end - begin]
        tensor = entry.read()
        assert same_tensor(tensor.reshape(-1).view(torch.uint8), declared), entry.name
        if not tensor.is_floating_point():
            continue
        stats = tensor_stats(entry.name, tensor)
        nonfinite, rms, mean = exact_stats(tensor)
        assert stats.nonfinite == nonfinite, entry.name
        if not tensor.numel():
            assert stats.rms is None and stats.mean is None, entry.name
        elif rms is None:  # no finite value
            assert math.isnan(stats.rms) and math.isnan(stats.mean), entry.name
        else:
            assert stats.rms == pytest.approx(rms, rel=1e-5, abs=0), entry.name
            assert stats.mean == pytest.approx(mean, rel=1e-4, abs=1e-4 * rms), entry.name
