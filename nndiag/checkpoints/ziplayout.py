"""Where each record of a zip-format torch checkpoint really lies.

``torch.load(map_location="meta")`` gives every storage an offset computed on the assumption
that the file was written by ``torch.save`` (records stored uncompressed, laid out one after the
other). A re-zipped file breaks that assumption: its records may be compressed or placed
elsewhere, and reading raw bytes at the computed offset yields bytes that are not the tensor.
So before a tensor is read at an offset, the offset must be the start of a record of the zip's
own directory, stored uncompressed, exactly as long as the storage, and inside the file.
"""

from __future__ import annotations

import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from nndiag.errors import UsageError

_LOCAL_HEADER = struct.Struct("<4s22sHH")  # signature, fixed fields, name length, extra length
_LOCAL_SIGNATURE = b"PK\x03\x04"
_ENCRYPTED = 0x1


@dataclass(frozen=True)
class ZipRecord:
    """One record of the archive.

    Attributes:
        name: The entry's name (``archive/data/0``).
        data_offset: Where the record's (possibly compressed) bytes start in the file.
        size: The record's uncompressed size in bytes.
        stored: Stored uncompressed and unencrypted: the bytes at ``data_offset`` are the record.
    """

    name: str
    data_offset: int
    size: int
    stored: bool


@dataclass
class ZipLayout:
    """The records of a torch zip checkpoint, found from the zip's own directory.

    Attributes:
        names: Every entry name, in stored order.
        data_records: The tensor data records (``<archive>/data/<key>``) by data offset.
        raw_readable: Raw bytes can stand for tensors: the stored byte order is this machine's.
    """

    names: list[str]
    data_records: dict[int, ZipRecord]
    raw_readable: bool


def corrupt(path: Path, what: str) -> UsageError:
    """The error for a checkpoint whose bytes contradict its own structure."""
    return UsageError(f"corrupt checkpoint: {str(path)!r}: {what}")


def read_zip_layout(path: Path, archive: zipfile.ZipFile) -> ZipLayout:
    """Read the zip's directory and each tensor record's local header.

    Args:
        path: The checkpoint file.
        archive: The same file, opened.

    Raises:
        UsageError: Duplicate or overlapping entries, a record extending past the end of the
            file, or a local header that is not one.
    """
    size = path.stat().st_size
    infos = archive.infolist()
    names = [info.filename for info in infos]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise corrupt(path, f"the zip entry {name!r} appears more than once (which copy "
                                "torch would read is ambiguous)")
        seen.add(name)
    prefix = names[0].split("/", 1)[0] + "/" if names and "/" in names[0] else ""
    records: dict[int, ZipRecord] = {}
    byteorder: bytes | None = None
    with open(path, "rb") as handle:
        for info in infos:
            if info.filename == prefix + "byteorder":
                byteorder = archive.read(info) if info.file_size <= 16 else b"?"
            if not info.filename.startswith(prefix + "data/"):
                continue
            handle.seek(info.header_offset)
            header = handle.read(_LOCAL_HEADER.size)
            if len(header) < _LOCAL_HEADER.size or header[:4] != _LOCAL_SIGNATURE:
                raise corrupt(path, f"the zip entry {info.filename!r} has no valid local header")
            _, _, name_length, extra_length = _LOCAL_HEADER.unpack(header)
            start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
            if start + info.compress_size > size:
                raise corrupt(path, f"the zip entry {info.filename!r} extends past the end of "
                                    f"the {size}-byte file (truncated)")
            stored = (info.compress_type == zipfile.ZIP_STORED
                      and not info.flag_bits & _ENCRYPTED
                      and info.compress_size == info.file_size)
            record = ZipRecord(info.filename, start, info.file_size, stored)
            if start in records:
                raise corrupt(path, f"the zip entries {records[start].name!r} and "
                                    f"{info.filename!r} share their bytes")
            records[start] = record
    native = sys.byteorder.encode()
    raw_readable = (byteorder or b"little") == native
    return ZipLayout(names, records, raw_readable)
