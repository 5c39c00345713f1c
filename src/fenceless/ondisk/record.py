"""The common record: a 40-byte header with magic, version, kind, sequence, epoch and CRC.

Every record on the control area, of every kind, starts with this header (see
docs/format.md). Reading is strict: an all-zero sector is "empty"; anything
else that is not a well-formed record of the expected kind and a known
version raises a ``CorruptRecord`` naming the region and byte offset, and no
writer writes over such a record.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from fenceless.blockio import SECTOR, BlockDevice
from fenceless.ondisk.crc import crc32c
from fenceless.ondisk.errors import (
    BadLength,
    BadMagic,
    ChecksumMismatch,
    CorruptRecord,
    UnsupportedVersion,
)

FORMAT_VERSION = 1
MIN_FORMAT_VERSION = 1

HEADER = struct.Struct("<4sHHIIQQII")
HEADER_SIZE = HEADER.size  # 40
_CRC_OFFSET = 32

KIND_SUPERBLOCK = 1
KIND_HOST = 2
KIND_LEADER = 3
KIND_REQUEST = 4
KIND_DBLOCK = 5
KIND_LEDGER = 6
KIND_ANCHOR = 7
KIND_MDHISTORY = 8
KIND_AUDIT = 9
KIND_INBOX = 10
KIND_OUTBOX = 11
KIND_CLAIMS = 12
KIND_VMDEF = 13
KIND_VMSTAGE = 14

MAGICS: dict[int, bytes] = {
    KIND_SUPERBLOCK: b"FLSB",
    KIND_HOST: b"FLHL",
    KIND_LEADER: b"FLPL",
    KIND_REQUEST: b"FLPR",
    KIND_DBLOCK: b"FLPD",
    KIND_LEDGER: b"FLLG",
    KIND_ANCHOR: b"FLAN",
    KIND_MDHISTORY: b"FLMH",
    KIND_AUDIT: b"FLAU",
    KIND_INBOX: b"FLIB",
    KIND_OUTBOX: b"FLOB",
    KIND_CLAIMS: b"FLCL",
    KIND_VMDEF: b"FLVD",
    KIND_VMSTAGE: b"FLVS",
}
KIND_NAMES = {
    KIND_SUPERBLOCK: "superblock",
    KIND_HOST: "host lease",
    KIND_LEADER: "writer leader",
    KIND_REQUEST: "writer request",
    KIND_DBLOCK: "writer dblock",
    KIND_LEDGER: "ledger",
    KIND_ANCHOR: "anchor",
    KIND_MDHISTORY: "metadata history",
    KIND_AUDIT: "audit",
    KIND_INBOX: "mailbox inbox",
    KIND_OUTBOX: "mailbox outbox",
    KIND_CLAIMS: "claims",
    KIND_VMDEF: "VM definition",
    KIND_VMSTAGE: "VM definition upload",
}
_KIND_BY_MAGIC = {m: k for k, m in MAGICS.items()}


@dataclass(frozen=True)
class Record:
    """A decoded, checksum-verified record."""

    kind: int
    version: int
    seq: int
    epoch: int
    payload: bytes


def encode_record(kind: int, payload: bytes, *, seq: int = 0, epoch: int = 0,
                  version: int = FORMAT_VERSION) -> bytes:
    """Header + payload, unpadded; callers pad to whole sectors when writing."""
    header = HEADER.pack(MAGICS[kind], version, kind, 0, len(payload), seq, epoch, 0, 0)
    crc = crc32c(payload, crc32c(header))
    return header[:_CRC_OFFSET] + struct.pack("<I", crc) + header[_CRC_OFFSET + 4 :] + payload


def pad(data: bytes, size: int | None = None) -> bytes:
    """Zero-pad to ``size`` (default: the next whole sector)."""
    if size is None:
        size = -(-len(data) // SECTOR) * SECTOR or SECTOR
    if len(data) > size:
        raise ValueError(f"{len(data)} bytes do not fit in {size}")
    return data + bytes(size - len(data))


def is_empty(buf: bytes) -> bool:
    return not any(buf)


def decode_record(buf: bytes, *, kind: int, region: str, offset: int) -> Record | None:
    """Decode the record at the start of ``buf`` (read from ``offset`` in ``region``).

    Returns None when the first sector is all zeroes (never written, or
    zeroed). Every other failure raises a ``CorruptRecord`` subclass; a
    ``ChecksumMismatch`` or ``BadLength`` carries the header's ``epoch`` and
    ``seq`` in its fields so the ledger can recognise its own torn writes.
    """
    if is_empty(buf[:SECTOR]):
        return None
    if len(buf) < HEADER_SIZE:
        raise BadLength(region=region, offset=offset, length=HEADER_SIZE, room=len(buf))
    magic, version, rkind, _flags, length, seq, epoch, stored, _res = HEADER.unpack_from(buf)
    want = MAGICS[kind]
    if magic != want:
        other = _KIND_BY_MAGIC.get(magic)
        if other is not None:
            detail = f"found a {KIND_NAMES[other]} record where a {KIND_NAMES[kind]} record belongs"
        elif magic == bytes(4):
            detail = f"no record header, but the sector is not empty (expected {KIND_NAMES[kind]})"
        else:
            detail = f"foreign data, not a fenceless {KIND_NAMES[kind]} record"
        raise BadMagic(region=region, offset=offset, detail=detail, magic=magic,
                       kind_found=KIND_NAMES[other] if other is not None else None)
    if version > FORMAT_VERSION or version < MIN_FORMAT_VERSION:
        raise UnsupportedVersion(
            region=region, offset=offset, kind=KIND_NAMES[kind], version=version,
            lo=MIN_FORMAT_VERSION, hi=FORMAT_VERSION,
            detail="written by a newer fenceless" if version > FORMAT_VERSION
            else "an older format that is no longer read",
            newer=version > FORMAT_VERSION,
        )
    if rkind != kind:
        raise CorruptRecord(region=region, offset=offset,
                            detail=f"kind field {rkind} does not match magic {magic!r}")
    room = len(buf) - HEADER_SIZE
    if length > room:
        raise BadLength(region=region, offset=offset, length=length, room=room,
                        epoch=epoch, seq=seq)
    payload = bytes(buf[HEADER_SIZE : HEADER_SIZE + length])
    zeroed = bytes(buf[:_CRC_OFFSET]) + bytes(4) + bytes(buf[_CRC_OFFSET + 4 : HEADER_SIZE])
    computed = crc32c(payload, crc32c(zeroed))
    if computed != stored:
        raise ChecksumMismatch(region=region, offset=offset, stored=stored, computed=computed,
                               epoch=epoch, seq=seq)
    return Record(kind=kind, version=version, seq=seq, epoch=epoch, payload=payload)


def pack_name(text: str, size: int, what: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > size or b"\0" in raw:
        raise ValueError(f"{what} {text!r} must be at most {size} UTF-8 bytes without NUL")
    return raw.ljust(size, b"\0")


def unpack_name(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", errors="replace")


def read_sized(dev: BlockDevice, offset: int, *, kind: int, region: str,
               limit: int) -> Record | None:
    """A record that may span sectors: the header sector, then as many more as its length
    says (at most ``limit`` bytes in all). None if the first sector is empty."""
    head = dev.read(offset, SECTOR)
    if is_empty(head):
        return None
    buf = head
    length = HEADER.unpack_from(head)[4]
    if head[:4] == MAGICS[kind] and HEADER_SIZE + length > SECTOR:
        need = min(limit, -(-(HEADER_SIZE + length) // SECTOR) * SECTOR)
        buf = head + dev.read(offset + SECTOR, need - SECTOR)
    return decode_record(buf, kind=kind, region=region, offset=offset)


def write_tail_first(dev: BlockDevice, offset: int, data: bytes,
                     before_write: Callable[[], None] | None = None) -> None:
    """Write a padded record's tail sectors, then its header sector: a write cut short
    leaves a checksum mismatch, never a record that reads as whole. ``before_write`` (the
    writer's lease check) runs before each of the two writes."""
    if len(data) > SECTOR:
        if before_write is not None:
            before_write()
        dev.write(offset + SECTOR, data[SECTOR:])
    if before_write is not None:
        before_write()
    dev.write(offset, data[:SECTOR])
