"""The control area as one object: superblock, host leases, writer lease, ledger.

Every host reaches it the same way, through its own view of the LUN (O_DIRECT,
no page cache) at the byte offset the anchor names: no activation, no LVM call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fenceless.blockio import SECTOR, BlockDevice, check_aligned
from fenceless.clock import Clock
from fenceless.control.anchor import Anchor
from fenceless.errors import IntegrityError
from fenceless.lease.delta import HostArea
from fenceless.lease.paxos import WriterLease
from fenceless.ledger.slots import LedgerView, read_ledger
from fenceless.ondisk.layout import Layout, Superblock, read_superblock


class OutOfBounds(IntegrityError):
    """I/O at {offset}+{length} falls outside the control area ({size} bytes) on {path}"""


class NoSuperblockAtAnchor(IntegrityError):
    """the anchor on {path} points at offset {offset}, but no superblock is there"""


class SuperblockMismatch(IntegrityError):
    """superblock at {offset} on {path} belongs to {what} {found}, the anchor names \
{expected}"""


class LayoutTooLarge(IntegrityError):
    """the superblock's layout is larger than the control LV"""


class OffsetDevice:
    """A window of a device: offsets are relative to ``base`` and bounded by ``size``."""

    def __init__(self, dev: BlockDevice, base: int, size: int) -> None:
        check_aligned(base, size)
        self.dev = dev
        self.base = base
        self.size = size

    @property
    def path(self) -> str:
        return f"{self.dev.path}@{self.base}"

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or offset + length > self.size:
            raise OutOfBounds(offset=offset, length=length, size=self.size, path=self.dev.path)

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return self.dev.read(self.base + offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        self.dev.write(self.base + offset, data)

    def close(self) -> None:
        self.dev.close()


@dataclass
class ControlArea:
    dev: BlockDevice  # an OffsetDevice over the host's LUN device
    sb: Superblock
    clock: Clock

    @classmethod
    def open(cls, dev: BlockDevice, anchor: Anchor, clock: Clock) -> ControlArea:
        view = OffsetDevice(dev, anchor.offset, anchor.length)
        sb = read_superblock(view)
        if sb is None:
            raise NoSuperblockAtAnchor(path=dev.path, offset=anchor.offset)
        if sb.cluster_uuid != anchor.cluster_uuid:
            raise SuperblockMismatch(offset=anchor.offset, path=dev.path, what="cluster",
                                     found=str(sb.cluster_uuid),
                                     expected=str(anchor.cluster_uuid))
        if sb.vg_uuid != anchor.vg_uuid:
            raise SuperblockMismatch(offset=anchor.offset, path=dev.path, what="VG",
                                     found=sb.vg_uuid, expected=anchor.vg_uuid)
        if sb.layout.total_size() > anchor.length:
            raise LayoutTooLarge()
        return cls(view, sb, clock)

    @property
    def layout(self) -> Layout:
        return self.sb.layout

    @property
    def io_timeout(self) -> float:
        return self.sb.io_timeout

    def hosts(self, dev: BlockDevice | None = None) -> HostArea:
        return HostArea(dev or self.dev, self.layout.region("hosts"), self.sb.max_hosts,
                        self.io_timeout, self.clock)

    def writer(self, dev: BlockDevice | None = None) -> WriterLease:
        return WriterLease(dev or self.dev, self.layout.region("writer"), self.sb.max_hosts,
                           self.io_timeout, self.clock)

    def ledger(self, dev: BlockDevice | None = None) -> LedgerView:
        return read_ledger(dev or self.dev, self.layout)

    def shared_snapshot(self) -> dict[str, bytes]:
        """Raw bytes of every region only the writer writes (for tests and audits)."""
        out: dict[str, bytes] = {}
        for name in ("writer", "ledger_a", "ledger_b"):
            r = self.layout.region(name)
            if name == "writer":
                # dblocks are per host; only the leader and request sectors are shared.
                out[name] = self.dev.read(r.offset, 2 * SECTOR)
            else:
                out[name] = self.dev.read(r.offset, r.length)
        return out


def format_regions(dev: BlockDevice, layout: Layout,
                   before_write: Callable[[], None] | None = None) -> None:
    """Zero every region fenceless reads, so old bytes in reused extents are never trusted.

    A chunk that already reads as zeroes is not written: on a thin LUN (or a
    lab's sparse image) the writes would only allocate space, and each is a
    synchronous write that a slow path makes slow.
    """
    zero = bytes(1 << 20)
    for r in layout.regions:
        if r.name == "superblock":
            continue
        pos = r.offset
        while pos < r.end:
            n = min(len(zero), r.end - pos)
            if dev.read(pos, n) != zero[:n]:
                if before_write is not None:
                    before_write()
                dev.write(pos, zero[:n])
            pos += n
