"""The layout of the control area (its regions) and the superblock that records it.

Readers find regions by name in the superblock's table, never by constants,
so that a later version can add regions without breaking older readers.
"""

from __future__ import annotations

import itertools
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from fenceless.blockio import SECTOR, BlockDevice
from fenceless.errors import IntegrityError, UserError
from fenceless.ondisk.errors import CorruptRecord, UnsupportedVersion
from fenceless.ondisk.record import (
    KIND_SUPERBLOCK,
    decode_record,
    encode_record,
    pack_name,
    pad,
    unpack_name,
)

MiB = 1024 * 1024
KiB = 1024

REGION_ALIGN = MiB
LEDGER_SLOT_SIZE = 256 * KiB
MAILBOX_SLOT_SIZE = 8 * KiB  # per host: 4 KiB inbox + 4 KiB outbox
MDHISTORY_ENTRIES = 128  # fixed: a slot is the region's length / 128 (ledger/history.py)
MDHISTORY_SLOT_SIZE = 256 * KiB  # ~2.5 MB of LVM text (~6000 LVs) at zlib's ~10x
AUDIT_SIZE = MiB  # 256 one-sector records
# Per host: the LVs it has mapped, ~250 bytes of JSON each at most: 2000 LVs fit.
CLAIMS_SLOT_SIZE = 512 * KiB
# VM definitions (ledger/vmstore.py): 64 KiB of XML and a header per slot; 1024 slots
# hold 500 VMs and at least as many earlier versions. One upload slot per host.
VM_SLOT_SIZE = 68 * KiB
VM_SLOTS = 1024
MAX_HOSTS_LIMIT = 250  # the host area must fit its 1 MiB alignment unit

REQUIRED_REGIONS = ("superblock", "hosts", "writer", "ledger_a", "ledger_b")


class SuperblockExists(UserError):
    """{path} already holds a fenceless superblock (cluster {cluster})"""


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
        claims_slot_size: int = CLAIMS_SLOT_SIZE,
        mdhistory_slot_size: int = MDHISTORY_SLOT_SIZE,
        audit_size: int = AUDIT_SIZE,
        vm_slots: int = VM_SLOTS,
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
            ("claims", max_hosts * claims_slot_size),
            ("vms", vm_slots * VM_SLOT_SIZE),
            ("vmstage", max_hosts * VM_SLOT_SIZE),
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
        raise SuperblockExists(path=dev.path, cluster=str(current.cluster_uuid))
    dev.write(0, data)



class SuperblockReadable(IntegrityError):
    """Refused: the superblock reads (cluster {cluster}); a repair writes only over one \
that does not. Nothing was changed"""


class SuperblockChanged(IntegrityError):
    """The superblock sector changed between the repair's plan and its write; nothing \
was written. Run `fenceless repair superblock` again to see the new state"""


def rewrite_superblock(dev: BlockDevice, sb: Superblock, *, expect: bytes,
                       before_write: Callable[[], None] | None = None) -> None:
    """``fenceless repair superblock`` only: write ``sb`` over a superblock sector that
    does not decode, and only while it still holds ``expect``, the bytes the plan saw
    (``write_superblock`` never writes over such a sector)."""
    now = dev.read(0, SECTOR)
    if now != expect:
        raise SuperblockChanged()
    try:
        current = decode_superblock(now)
    except UnsupportedVersion as exc:
        if exc.fields.get("newer"):
            raise  # a newer fenceless's superblock is not damage
        current = None
    except CorruptRecord:
        current = None
    if current is not None:
        raise SuperblockReadable(cluster=str(current.cluster_uuid))
    data = encode_superblock(sb)
    if before_write is not None:
        before_write()
    dev.write(0, data)
