"""On-disk format of the control area: record header, superblock, layout, ledger.

Every record starts with the same 40-byte little-endian header (see
docs/format.md) and carries a CRC-32C over header and payload, as sanlock's
records do. Reading is strict: an all-zero sector is "empty"; anything else
that is not a well-formed record of the expected kind and a known version is
an ``IntegrityError`` naming the region and byte offset, and the writers in
this package never write over such a record.

The ledger is cluster state written only by the writer host, into two slots
A and B: each write goes to the slot that is older by (epoch, generation), so
the newest valid record survives any torn write, and a stale writer (epoch
lower than what is on disk) is refused before it writes (protocol-notes §1).
"""

from __future__ import annotations

import functools
import itertools
import json
import struct
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fenceless.blockio import SECTOR, BlockDevice
from fenceless.errors import IntegrityError, UserError
from fenceless.lease.errors import StaleEpoch

FORMAT_VERSION = 1
MIN_FORMAT_VERSION = 1

MiB = 1024 * 1024
KiB = 1024

# --- CRC-32C (Castagnoli) -------------------------------------------------------

_CRC32C_POLY = 0x82F63B78  # reflected 0x1EDC6F41


@functools.cache
def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ _CRC32C_POLY if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


def crc32c_py(data: bytes, crc: int = 0) -> int:
    """CRC-32C in plain Python (about 20 MB/s): the reference, and the fallback."""
    table = _crc32c_table()
    c = crc ^ 0xFFFFFFFF
    for b in data:
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


try:
    # Google's C library (SSE4.2 where present): GB/s instead of MB/s, which is
    # most of the writer's CPU time per request with a ledger of a few hundred KiB.
    from google_crc32c import extend as _extend
    from google_crc32c import implementation as _impl
except ImportError:  # pragma: no cover - without the wheel, the reference serves
    _extend, _impl = None, "none"

CRC32C_IMPLEMENTATION = "c" if _extend is not None and _impl == "c" else "python"


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C as in iSCSI/ext4/sanlock (zlib only has the IEEE CRC-32)."""
    if CRC32C_IMPLEMENTATION == "c":
        return int(_extend(crc, data))
    return crc32c_py(data, crc)


# --- record header --------------------------------------------------------------

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
}
_KIND_BY_MAGIC = {m: k for k, m in MAGICS.items()}


class CorruptRecord(IntegrityError):
    """Control area region '{region}' at offset {offset}: {detail}; \
refusing to use or overwrite it"""


class BadMagic(CorruptRecord):
    """Control area region '{region}' at offset {offset}: {detail} (magic {magic!r}); \
refusing to use or overwrite it"""


class UnsupportedVersion(CorruptRecord):
    """Control area region '{region}' at offset {offset}: {kind} record has format version \
{version}, this fenceless reads versions {lo}..{hi} ({detail}); refusing to use or overwrite it"""


class BadLength(CorruptRecord):
    """Control area region '{region}' at offset {offset}: length overflow (payload \
{length} bytes, room for {room}); refusing to use or overwrite it"""


class ChecksumMismatch(CorruptRecord):
    """Control area region '{region}' at offset {offset}: checksum mismatch \
(stored {stored:#010x}, computed {computed:#010x}); refusing to use or overwrite it"""


class LedgerUnreadable(IntegrityError):
    """Ledger has no valid slot ({detail}); refusing to use or overwrite it"""


class LedgerTooLarge(UserError):
    """Ledger state is {size} bytes but a ledger slot holds at most {limit}; nothing was \
written"""


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
        raise BadMagic(region=region, offset=offset, detail=detail, magic=magic)
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


# --- layout ---------------------------------------------------------------------

REGION_ALIGN = MiB
LEDGER_SLOT_SIZE = 256 * KiB
MAILBOX_SLOT_SIZE = 8 * KiB  # per host: 4 KiB inbox + 4 KiB outbox
MDHISTORY_ENTRIES = 128  # fixed: a slot is the region's length / 128 (ledger/history.py)
MDHISTORY_SLOT_SIZE = 256 * KiB  # ~2.5 MB of LVM text (~6000 LVs) at zlib's ~10x
AUDIT_SIZE = MiB  # 256 one-sector records
MAX_HOSTS_LIMIT = 250  # the host area must fit its 1 MiB alignment unit

REQUIRED_REGIONS = ("superblock", "hosts", "writer", "ledger_a", "ledger_b")


@dataclass(frozen=True)
class Region:
    name: str
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class Layout:
    """Where each region of the control area lives; stored in the superblock."""

    max_hosts: int
    regions: tuple[Region, ...]

    @classmethod
    def compute(
        cls,
        max_hosts: int,
        *,
        ledger_slot_size: int = LEDGER_SLOT_SIZE,
        mailbox_slot_size: int = MAILBOX_SLOT_SIZE,
        mdhistory_slot_size: int = MDHISTORY_SLOT_SIZE,
        audit_size: int = AUDIT_SIZE,
    ) -> Layout:
        """Lay regions out in order, each starting on a 1 MiB boundary."""
        if not 1 <= max_hosts <= MAX_HOSTS_LIMIT:
            raise ValueError(f"max_hosts must be 1..{MAX_HOSTS_LIMIT}, not {max_hosts}")
        for what, size in (("ledger_slot_size", ledger_slot_size),
                           ("mailbox_slot_size", mailbox_slot_size),
                           ("mdhistory_slot_size", mdhistory_slot_size),
                           ("audit_size", audit_size)):
            if size <= 0 or size % SECTOR:
                raise ValueError(f"{what} must be a positive multiple of {SECTOR}")
        if ledger_slot_size < 2 * SECTOR:
            raise ValueError("a ledger slot needs at least two sectors")
        sizes = [
            ("superblock", SECTOR),
            ("hosts", max_hosts * SECTOR),
            ("writer", (2 + max_hosts) * SECTOR),
            ("ledger_a", ledger_slot_size),
            ("ledger_b", ledger_slot_size),
            ("mailboxes", max_hosts * mailbox_slot_size),
            ("mdhistory", MDHISTORY_ENTRIES * mdhistory_slot_size),
            ("audit", audit_size),
        ]
        regions = []
        offset = 0
        for name, length in sizes:
            regions.append(Region(name, offset, length))
            offset = _align(offset + length, REGION_ALIGN)
        return cls(max_hosts=max_hosts, regions=tuple(regions))

    def region(self, name: str) -> Region:
        for r in self.regions:
            if r.name == name:
                return r
        raise KeyError(f"control area has no region {name!r}")

    def total_size(self) -> int:
        """Bytes the control LV needs, rounded up to whole MiB."""
        return _align(max(r.end for r in self.regions), MiB)


# --- superblock -----------------------------------------------------------------

_SB_FIXED = struct.Struct("<16s64sIHIQH")
_SB_REGION = struct.Struct("<16sQQ")


@dataclass(frozen=True)
class Superblock:
    cluster_uuid: uuid.UUID
    vg_uuid: str
    io_timeout: float
    creation_epoch: int
    layout: Layout
    sector_size: int = SECTOR

    @property
    def max_hosts(self) -> int:
        return self.layout.max_hosts


def encode_superblock(sb: Superblock) -> bytes:
    io_ms = round(sb.io_timeout * 1000)
    if not 1 <= io_ms <= 0xFFFFFFFF:
        raise ValueError(f"io_timeout {sb.io_timeout} s is out of range")
    body = _SB_FIXED.pack(
        sb.cluster_uuid.bytes, pack_name(sb.vg_uuid, 64, "VG UUID"), sb.sector_size,
        sb.layout.max_hosts, io_ms, sb.creation_epoch, len(sb.layout.regions),
    )
    for r in sb.layout.regions:
        body += _SB_REGION.pack(pack_name(r.name, 16, "region name"), r.offset, r.length)
    rec = encode_record(KIND_SUPERBLOCK, body, epoch=sb.creation_epoch)
    if len(rec) > SECTOR:
        raise ValueError("superblock does not fit in one sector")
    return pad(rec)


def decode_superblock(buf: bytes, offset: int = 0) -> Superblock | None:
    rec = decode_record(buf[:SECTOR], kind=KIND_SUPERBLOCK, region="superblock", offset=offset)
    if rec is None:
        return None

    def bad(detail: str) -> CorruptRecord:
        return CorruptRecord(region="superblock", offset=offset, detail=detail)

    p = rec.payload
    if len(p) < _SB_FIXED.size:
        raise bad("superblock payload too short")
    cu, vg, sector, max_hosts, io_ms, epoch, count = _SB_FIXED.unpack_from(p)
    if len(p) != _SB_FIXED.size + count * _SB_REGION.size:
        raise bad(f"superblock payload length does not match its {count} regions")
    if sector != SECTOR:
        raise bad(f"sector size {sector} is not supported (only {SECTOR})")
    if not 1 <= max_hosts <= MAX_HOSTS_LIMIT or io_ms == 0:
        raise bad(f"max_hosts {max_hosts} / io_timeout {io_ms} ms out of range")
    regions = []
    for i in range(count):
        raw, roff, rlen = _SB_REGION.unpack_from(p, _SB_FIXED.size + i * _SB_REGION.size)
        regions.append(Region(unpack_name(raw), roff, rlen))
    ordered = sorted(regions, key=lambda r: r.offset)
    for r in ordered:
        if r.offset % SECTOR or r.length % SECTOR or r.length == 0:
            raise bad(f"region {r.name!r} is not sector aligned")
    for a, b in itertools.pairwise(ordered):
        if a.end > b.offset:
            raise bad(f"regions {a.name!r} and {b.name!r} overlap")
    names = {r.name for r in regions}
    missing = [n for n in REQUIRED_REGIONS if n not in names]
    if missing or len(names) != len(regions):
        raise bad(f"region table is missing {missing} or has duplicates")
    layout = Layout(max_hosts=max_hosts, regions=tuple(regions))
    if layout.region("hosts").length < max_hosts * SECTOR or \
            layout.region("writer").length < (2 + max_hosts) * SECTOR:
        raise bad("host or writer region too small for max_hosts")
    return Superblock(
        cluster_uuid=uuid.UUID(bytes=cu), vg_uuid=unpack_name(vg), io_timeout=io_ms / 1000,
        creation_epoch=epoch, layout=layout, sector_size=sector,
    )


def read_superblock(dev: BlockDevice) -> Superblock | None:
    return decode_superblock(dev.read(0, SECTOR))


def write_superblock(dev: BlockDevice, sb: Superblock, *, overwrite: bool = False) -> None:
    """Write the superblock; refuses to replace an existing one unless ``overwrite``.

    Even with ``overwrite`` a sector that does not decode as a superblock of
    a known version is never written over: that is somebody else's data.
    """
    data = encode_superblock(sb)
    current = read_superblock(dev)  # raises on foreign or unreadable data
    if current is not None and not overwrite:
        raise UserError(detail=f"{dev.path} already holds a fenceless superblock "
                               f"(cluster {current.cluster_uuid})")
    dev.write(0, data)


# --- ledger ---------------------------------------------------------------------

_LEDGER_BODY = struct.Struct("<HHQ")  # writer host id, reserved, wall clock ms (humans only)
LEDGER_SLOTS = ("ledger_a", "ledger_b")


@dataclass(frozen=True)
class LedgerRecord:
    epoch: int
    generation: int
    writer_host_id: int
    written_wall_ms: int
    state: dict[str, Any]

    @property
    def order(self) -> tuple[int, int]:
        return (self.epoch, self.generation)


@dataclass(frozen=True)
class SlotStatus:
    """What one ledger slot holds: a record, nothing, or a problem.

    ``torn`` marks a slot whose header is ours (magic, kind, current version)
    but whose checksum or length does not match: possibly the footprint of a
    write of our own that did not complete. Its header (epoch, generation) is
    kept (``torn_order``, untrusted) so that a stale writer can still be
    refused and a damaged *newest* slot can be told from an interrupted
    overwrite of the older one.
    """

    name: str
    offset: int
    record: LedgerRecord | None = None
    error: CorruptRecord | None = None
    torn: bool = False
    torn_order: tuple[int, int] = (0, 0)

    @property
    def empty(self) -> bool:
        return self.record is None and self.error is None


@dataclass(frozen=True)
class LedgerView:
    current: LedgerRecord | None
    slots: tuple[SlotStatus, SlotStatus]

    @property
    def problems(self) -> list[CorruptRecord]:
        return [s.error for s in self.slots if s.error is not None]


def max_ledger_state(layout: Layout) -> int:
    """Largest JSON state (bytes) a slot can hold."""
    return layout.region("ledger_a").length - HEADER_SIZE - _LEDGER_BODY.size


def encode_ledger(rec: LedgerRecord, slot_len: int) -> bytes:
    body = json.dumps(rec.state, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")
    payload = _LEDGER_BODY.pack(rec.writer_host_id, 0, rec.written_wall_ms) + body
    if HEADER_SIZE + len(payload) > slot_len:
        raise LedgerTooLarge(size=len(body), limit=slot_len - HEADER_SIZE - _LEDGER_BODY.size)
    return pad(encode_record(KIND_LEDGER, payload, seq=rec.generation, epoch=rec.epoch))


def _read_slot(dev: BlockDevice, region: Region) -> SlotStatus:
    buf = dev.read(region.offset, region.length)
    try:
        rec = decode_record(buf, kind=KIND_LEDGER, region=region.name, offset=region.offset)
    except (ChecksumMismatch, BadLength) as exc:
        return SlotStatus(region.name, region.offset, error=exc, torn=True,
                          torn_order=(int(exc.fields["epoch"]), int(exc.fields["seq"])))
    except CorruptRecord as exc:
        return SlotStatus(region.name, region.offset, error=exc)
    if rec is None:
        return SlotStatus(region.name, region.offset)
    try:
        host, _res, wall = _LEDGER_BODY.unpack_from(rec.payload)
        state = json.loads(rec.payload[_LEDGER_BODY.size :].decode("utf-8"))
        if not isinstance(state, dict):
            raise ValueError("state is not a JSON object")
    except (struct.error, ValueError) as exc:
        err = CorruptRecord(region=region.name, offset=region.offset,
                            detail=f"checksum is valid but the ledger payload is not: {exc}")
        return SlotStatus(region.name, region.offset, error=err)
    return SlotStatus(region.name, region.offset, record=LedgerRecord(
        epoch=rec.epoch, generation=rec.seq, writer_host_id=host, written_wall_ms=wall,
        state=state))


def _view(a: SlotStatus, b: SlotStatus) -> LedgerView:
    for s in (a, b):
        if isinstance(s.error, UnsupportedVersion) and s.error.fields.get("newer"):
            # The newest state may be in a format we cannot read: reading the
            # other slot would silently roll the cluster state back.
            raise s.error
    valid = [s.record for s in (a, b) if s.record is not None]
    if valid:
        current = max(valid, key=lambda r: r.order)
        return LedgerView(current=current, slots=(a, b))
    if a.empty and b.empty:
        return LedgerView(current=None, slots=(a, b))
    detail = "; ".join(str(s.error) if s.error else f"{s.name} is empty" for s in (a, b))
    raise LedgerUnreadable(detail=detail)


def read_ledger(dev: BlockDevice, layout: Layout) -> LedgerView:
    """Read both slots; the newest valid one by (epoch, generation) is current.

    A corrupt slot is reported in ``slots``/``problems`` and the other valid
    slot wins. No valid slot but some corrupt one: ``LedgerUnreadable``.
    Both empty: ``current`` is None (a fresh cluster).
    """
    a, b = (_read_slot(dev, layout.region(n)) for n in LEDGER_SLOTS)
    return _view(a, b)


def _choose_target(view: LedgerView, epoch: int) -> SlotStatus:
    """The slot the writer at ``epoch`` may write into, or raise.

    Rules (docs/format.md, "Ledger A/B rule"):
    1. any slot with a higher epoch (valid, or in a torn header) -> StaleEpoch;
    2. a slot that is foreign, of another version or otherwise corrupt but
       not recognisably our own torn write -> refuse (never overwrite it);
    3. an empty slot is used first (A before B);
    4. a torn slot is used only if the other slot holds a valid record that
       is newer than the torn slot's header claims: that is what an
       interrupted write leaves (the header sector, written last, still
       names the older record). A corrupt slot claiming to be the newest is
       damage, not our torn write: refuse;
    5. otherwise the slot that is older by (epoch, generation).
    """
    for s in view.slots:
        seen = s.record.epoch if s.record is not None else s.torn_order[0]
        if seen > epoch:
            raise StaleEpoch(epoch=epoch, where=f"ledger slot {s.name}", seen=seen)
    for s in view.slots:
        if s.error is not None and not s.torn:
            raise s.error
    for s in view.slots:
        if s.empty:
            return s
    valid = [s for s in view.slots if s.record is not None]
    torn = [s for s in view.slots if s.torn]
    if torn:
        t = torn[0]
        if valid and len(torn) == 1 and valid[0].record is not None \
                and t.torn_order < valid[0].record.order:
            return t
        if t.error is not None and valid:
            raise t.error
        raise LedgerUnreadable(detail="; ".join(str(s.error) for s in torn))
    return min(valid, key=lambda s: s.record.order if s.record else (0, 0))


def write_ledger(
    dev: BlockDevice,
    layout: Layout,
    epoch: int,
    state: Mapping[str, Any],
    *,
    writer_host_id: int,
    both_slots: bool = False,
    before_write: Callable[[], None] | None = None,
    wall_clock: Callable[[], float] = time.time,
) -> LedgerRecord:
    """Write ``state`` as the next ledger generation at writer ``epoch``.

    Re-reads both slots first (never trusts an earlier read), refuses if the
    disk shows a higher epoch, and writes only the slot chosen by
    ``_choose_target``. A multi-sector record is written tail first and its
    header sector last, so the header write is the commit point.
    ``before_write`` runs right before every device write; the writer passes
    its lease check there (protocol-notes §1). ``both_slots`` writes the
    record into both slots one after the other: a takeover does this first,
    so no slot is left from the previous epoch.
    """
    if epoch <= 0:
        raise ValueError("writer epochs start at 1")
    written: list[LedgerRecord] = []
    for _ in range(2 if both_slots else 1):
        a, b = (_read_slot(dev, layout.region(n)) for n in LEDGER_SLOTS)
        view = LedgerView(current=None, slots=(a, b))
        target = _choose_target(view, epoch)
        prev = [s.record.generation for s in (a, b) if s.record is not None]
        rec = LedgerRecord(
            epoch=epoch, generation=max(prev, default=0) + 1, writer_host_id=writer_host_id,
            written_wall_ms=int(wall_clock() * 1000), state=dict(state),
        )
        region = layout.region(target.name)
        data = encode_ledger(rec, region.length)
        if len(data) > SECTOR:
            if before_write is not None:
                before_write()
            dev.write(region.offset + SECTOR, data[SECTOR:])
        if before_write is not None:
            before_write()
        dev.write(region.offset, data[:SECTOR])
        written.append(rec)
    return written[-1]
