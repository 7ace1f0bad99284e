"""The records of a zip-format torch checkpoint or TorchScript archive, and reading them.

The zip's own directory says where each record lies, how long it is and how it is stored;
nothing is assumed from how ``torch.save`` usually lays records out, so a file re-zipped by
another tool (records compressed, reordered or moved) is read exactly as torch reads it.

Reading is bounded: a record is read only up to its declared size, metadata records (the
pickled structure, ``byteorder``, ``version``) only up to a fixed cap, so a small file whose
records would inflate to gigabytes is refused before anything is inflated; and a compressed
tensor record is inflated in chunks straight into the tensor's buffer, one tensor at a time.
"""

from __future__ import annotations

import struct
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from nndiag.errors import UsageError, describe_exception

_LOCAL_HEADER = struct.Struct("<4s22sHH")  # signature, fixed fields, name length, extra length
_LOCAL_SIGNATURE = b"PK\x03\x04"
_ENCRYPTED = 0x1
_DOS_DIRECTORY = 0x10  # the external attribute that makes torch's reader skip a record
# The most a checkpoint's pickled structure (``data.pkl``, ``constants.pkl``) or a
# TorchScript code file may inflate to; a state dict of 100,000 tensors pickles to ~15 MB.
MAX_PICKLE_BYTES = 64 * 1024 * 1024
# The most a small metadata record (``byteorder``, ``version``...) may hold.
MAX_METADATA_BYTES = 64
# Compressed bytes read, and inflated bytes produced, at a time.
_CHUNK = 1024 * 1024
# The small records torch reads and interprets: each is read whole and checked against its CRC.
_METADATA = (".data/version", "version", "byteorder", ".format_version", ".storage_alignment",
             ".data/serialization_id")


@dataclass(frozen=True)
class ZipRecord:
    """One record of the archive.

    Attributes:
        name: The entry's full name (``archive/data/0``).
        data_offset: Where the record's (possibly compressed) bytes start in the file.
        size: The record's uncompressed size in bytes, as the zip's directory declares it.
        compressed_size: How many bytes it takes in the file.
        method: The zip compression method (0 stored, 8 deflated...).
        crc: The CRC-32 of the uncompressed bytes.
        encrypted: The record is encrypted (nndiag does not read those).
    """

    name: str
    data_offset: int
    size: int
    compressed_size: int
    method: int
    crc: int
    encrypted: bool

    @property
    def stored(self) -> bool:
        """Stored uncompressed and unencrypted: the bytes at ``data_offset`` are the record."""
        return (self.method == zipfile.ZIP_STORED and not self.encrypted
                and self.compressed_size == self.size)


@dataclass
class ZipLayout:
    """The records of a torch zip archive, found from the zip's own directory.

    Attributes:
        path: The archive.
        prefix: The archive's top directory with its slash (``archive/``); torch reads only
            the records under it.
        records: The records under ``prefix``, by their name below it (``data.pkl``,
            ``data/0``, ``constants.pkl``...).
        byteorder: ``little`` or ``big``: the byte order the tensors were saved in.
    """

    path: Path
    prefix: str
    records: dict[str, ZipRecord]
    byteorder: str

    @property
    def swapped(self) -> bool:
        """Tensors were saved in the other byte order than this machine's."""
        return self.byteorder != sys.byteorder

    @property
    def torchscript(self) -> bool:
        """A TorchScript archive (``torch.jit.save``), not a ``torch.save`` file."""
        return "constants.pkl" in self.records

    def record(self, name: str) -> ZipRecord | None:
        """The record ``name`` (below the prefix), if present."""
        return self.records.get(name)


def corrupt(path: Path, what: str) -> UsageError:
    """The error for a checkpoint whose bytes contradict its own structure."""
    return UsageError(f"corrupt checkpoint: {str(path)!r}: {what}")


def read_zip_layout(path: Path, archive: zipfile.ZipFile) -> ZipLayout:
    """Read the zip's directory and each record's local header; check what torch checks.

    Args:
        path: The checkpoint file.
        archive: The same file, opened.

    Raises:
        UsageError: Duplicate or overlapping entries, a record extending past the end of the
            file, a local header that is not one, a missing or unsupported format version, a
            byte order other than ``little`` or ``big``, or an archive torch's own reader
            refuses.
    """
    size = path.stat().st_size
    infos = archive.infolist()
    seen: set[str] = set()
    for info in infos:
        if info.filename in seen:
            raise corrupt(path, f"the zip entry {info.filename!r} appears more than once "
                                "(which copy torch would read is ambiguous)")
        seen.add(info.filename)
    if not infos or "/" not in infos[0].filename:
        raise UsageError(f"{str(path)!r} is a zip archive but not a PyTorch checkpoint "
                         "(its records are not under one top directory)")
    prefix = infos[0].filename.split("/", 1)[0] + "/"
    records: dict[str, ZipRecord] = {}
    starts: dict[int, str] = {}
    with open(path, "rb") as handle:
        for info in infos:
            if not info.filename.startswith(prefix) or info.filename.endswith("/"):
                continue  # torch reads neither records outside the prefix nor directories
            if info.external_attr & _DOS_DIRECTORY:
                raise corrupt(path, f"the zip entry {info.filename!r} is marked as a directory "
                                    "(torch would read no bytes for it)")
            handle.seek(info.header_offset)
            header = handle.read(_LOCAL_HEADER.size)
            if len(header) < _LOCAL_HEADER.size or header[:4] != _LOCAL_SIGNATURE:
                raise corrupt(path, f"the zip entry {info.filename!r} has no valid local header")
            _, _, name_length, extra_length = _LOCAL_HEADER.unpack(header)
            start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
            if start + info.compress_size > size:
                raise corrupt(path, f"the zip entry {info.filename!r} extends past the end of "
                                    f"the {size}-byte file (truncated)")
            if start in starts and info.compress_size:
                raise corrupt(path, f"the zip entries {starts[start]!r} and {info.filename!r} "
                                    "share their bytes")
            starts[start] = info.filename
            records[info.filename[len(prefix):]] = ZipRecord(
                info.filename, start, info.file_size, info.compress_size, info.compress_type,
                info.CRC, bool(info.flag_bits & _ENCRYPTED))
    layout = ZipLayout(path, prefix, records, "little")  # torch's default without a record
    metadata = {name: read_record(layout, records[name], MAX_METADATA_BYTES, f"{name} record")
                for name in _METADATA if name in records}
    _check_version(layout, metadata.get(".data/version", metadata.get("version")))
    if "byteorder" in metadata:
        if metadata["byteorder"] not in (b"little", b"big"):
            raise corrupt(path, f"unknown byte order {metadata['byteorder'][:16]!r}")
        layout.byteorder = metadata["byteorder"].decode()
    _check_with_torch(layout)
    return layout


def _check_version(layout: ZipLayout, text: bytes | None) -> None:
    """The format version record torch's reader requires, parsed as it parses it.

    Which versions are supported, torch's reader checks (``_check_with_torch``).
    """
    if text is None:
        raise corrupt(layout.path, "no format version record (archive/version)")
    digits = text.lstrip(b" \t\n\r\f\v")
    digits = digits[: len(digits) - len(digits.lstrip(b"0123456789"))]
    if not digits or int(digits) < 1:
        raise corrupt(layout.path, f"unsupported format version {text[:16]!r}")


def _check_with_torch(layout: ZipLayout) -> None:
    """Open the archive with torch's own zip reader, which checks the container.

    It reads no record but the version (already bounded), and nndiag never accepts an archive
    torch refuses.
    """
    reader = getattr(torch._C, "PyTorchFileReader", None)
    if reader is None:
        return
    try:
        reader(str(layout.path)).get_all_records()  # also checks every record is in prefix
    except Exception as exc:  # torch's reader raises RuntimeError for any bad archive
        raise corrupt(layout.path, f"torch's zip reader refuses it "
                                   f"({describe_exception(exc)})") from exc


def read_record(layout: ZipLayout, record: ZipRecord, limit: int, what: str) -> bytes:
    """A whole (small) record, inflated up to ``limit`` bytes and checked against its CRC.

    Raises:
        UsageError: The record declares more than ``limit`` bytes (a zip bomb, or not a
            checkpoint), is encrypted, or its bytes do not inflate to what it declares.
    """
    if record.size > limit:
        raise UsageError(
            f"{str(layout.path)!r} is not a usable checkpoint: its {what} ({record.name!r}) "
            f"would inflate to {record.size:,} bytes, more than the {limit:,} nndiag reads "
            "of it (a zip bomb, or a file that is not a checkpoint)")
    buffer = bytearray(record.size)
    with memoryview(buffer) as view:  # released even when reading fails
        inflate_into(layout, record, 0, view)
    return bytes(buffer)


def inflate_into(layout: ZipLayout, record: ZipRecord, skip: int, out: memoryview) -> None:
    """Write the record's uncompressed bytes ``[skip, skip + len(out))`` into ``out``.

    Stored records are read in place; deflated ones are inflated chunk by chunk, so memory
    stays at ``out`` plus one chunk whatever the record's size. A record read whole is
    checked against its CRC.

    Raises:
        UsageError: The record is encrypted, uses an unsupported compression, is shorter than
            declared, or its bytes do not inflate (or do not match the CRC).
    """
    path = layout.path
    end = skip + len(out)
    if end > record.size:
        raise corrupt(path, f"the zip entry {record.name!r} holds {record.size} bytes, "
                            f"not the {end} needed")
    if record.encrypted:
        raise UsageError(f"{str(path)!r}: the zip entry {record.name!r} is encrypted")
    whole = skip == 0 and end == record.size
    try:
        if record.stored:
            _read_stored(path, record, skip, out)
        elif record.method == zipfile.ZIP_DEFLATED:
            _inflate(path, record, skip, out)
        else:
            _read_with_zipfile(path, record, skip, out)
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile, NotImplementedError,
            RuntimeError, ValueError) as exc:
        raise corrupt(path, f"the zip entry {record.name!r} could not be read "
                            f"({describe_exception(exc)})") from exc
    if whole and zlib.crc32(out) != record.crc:
        raise corrupt(path, f"the zip entry {record.name!r} does not match its CRC "
                            "(damaged)")


def _read_stored(path: Path, record: ZipRecord, skip: int, out: memoryview) -> None:
    with open(path, "rb") as handle:
        handle.seek(record.data_offset + skip)
        done = 0
        while done < len(out):
            got = handle.readinto(out[done:])
            if not got:
                raise EOFError(f"the file ends {len(out) - done} bytes early")
            done += got


def _inflate(path: Path, record: ZipRecord, skip: int, out: memoryview) -> None:
    decompressor = zlib.decompressobj(-zlib.MAX_WBITS)
    produced, end, left = 0, skip + len(out), record.compressed_size
    with open(path, "rb") as handle:
        handle.seek(record.data_offset)
        pending = b""
        while produced < end:
            if not pending:
                if left <= 0 or decompressor.eof:
                    raise EOFError(f"the data inflates to {produced} bytes, not {end}")
                pending = handle.read(min(_CHUNK, left))
                if not pending:
                    raise EOFError("the file ends inside the compressed data")
                left -= len(pending)
            piece = decompressor.decompress(pending, min(_CHUNK, end - produced))
            pending = decompressor.unconsumed_tail
            _place(piece, produced, skip, out)
            produced += len(piece)


def _read_with_zipfile(path: Path, record: ZipRecord, skip: int, out: memoryview) -> None:
    """Other compressions (bzip2, lzma): zipfile's stream, read in chunks."""
    with zipfile.ZipFile(path) as archive, archive.open(record.name) as stream:
        produced, end = 0, skip + len(out)
        while produced < end:
            piece = stream.read(min(_CHUNK, end - produced))
            if not piece:
                raise EOFError(f"the data inflates to {produced} bytes, not {end}")
            _place(piece, produced, skip, out)
            produced += len(piece)


def _place(piece: bytes, produced: int, skip: int, out: memoryview) -> None:
    """Copy the part of ``piece`` (record bytes from ``produced``) that falls in ``out``."""
    first = max(skip - produced, 0)
    if first >= len(piece):
        return
    at = produced + first - skip
    chunk = piece[first: first + len(out) - at]
    out[at: at + len(chunk)] = chunk
