"""The anchor: the LUN's last MiB, which LVM never uses, points at the control area.

Why a fixed place outside LVM:
- ``status`` must find the control area without running LVM;
- two hosts racing ``init`` on a blank LUN need somewhere to decide who
  goes first *before* any LVM metadata exists.
``init`` creates the PV with ``--setphysicalvolumesize`` one MiB short of the
device, so LVM never allocates the tail.

Tail layout (offsets from ``device size - 1 MiB``):

======  ======================================================================
0       anchor record: cluster UUID, VG name and UUID, control LV name and
        UUID, and the control area's byte offset and length on this device
4 KiB   init lock: a delta-lease sector (``hosts`` kind, one host id) that
        ``init`` takes, renews and releases
======  ======================================================================
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from fenceless.blockio import SECTOR, BlockDevice
from fenceless.errors import IntegrityError, UserError
from fenceless.ondisk.errors import CorruptRecord
from fenceless.ondisk.layout import Region
from fenceless.ondisk.record import (
    KIND_ANCHOR,
    decode_record,
    encode_record,
    pack_name,
    pad,
    unpack_name,
)

TAIL_SIZE = 1 << 20
ANCHOR_INDEX = 0
INIT_LOCK_INDEX = 1
_BODY = struct.Struct("<16s128s64s64s64sQQ")


class NotInitialized(UserError):
    """Refused: there is no fenceless cluster on VG {vg} as this host sees it ({device}). \
Run `fenceless init` on the first host."""


class DeviceTooSmall(IntegrityError):
    """Device {path} is {size} bytes; fenceless needs at least {need}"""


class AnchorTaken(IntegrityError):
    """{path} already anchors cluster {cluster} (VG {vg}); refusing to replace it"""


@dataclass(frozen=True)
class Anchor:
    cluster_uuid: uuid.UUID
    vg_name: str
    vg_uuid: str
    lv_name: str
    lv_uuid: str
    offset: int  # byte offset of the control area on this device
    length: int


def tail_offset(device_size: int) -> int:
    return (device_size // SECTOR) * SECTOR - TAIL_SIZE


def anchor_region(device_size: int) -> Region:
    return Region("anchor", tail_offset(device_size) + ANCHOR_INDEX * SECTOR, SECTOR)


def init_lock_region(device_size: int) -> Region:
    return Region("init_lock", tail_offset(device_size) + INIT_LOCK_INDEX * SECTOR, SECTOR)


def encode_anchor(a: Anchor) -> bytes:
    body = _BODY.pack(a.cluster_uuid.bytes, pack_name(a.vg_name, 128, "VG name"),
                      pack_name(a.vg_uuid, 64, "VG UUID"), pack_name(a.lv_name, 64, "LV name"),
                      pack_name(a.lv_uuid, 64, "LV UUID"), a.offset, a.length)
    return pad(encode_record(KIND_ANCHOR, body), SECTOR)


def decode_anchor(buf: bytes, offset: int) -> Anchor | None:
    rec = decode_record(buf, kind=KIND_ANCHOR, region="anchor", offset=offset)
    if rec is None:
        return None
    try:
        cu, vg, vgu, lv, lvu, off, length = _BODY.unpack_from(rec.payload)
    except struct.error as exc:
        raise CorruptRecord(region="anchor", offset=offset,
                            detail=f"anchor payload is malformed: {exc}") from exc
    if off % SECTOR or length % SECTOR or length == 0:
        raise CorruptRecord(region="anchor", offset=offset,
                            detail=f"control area at {off}+{length} is not sector aligned")
    return Anchor(uuid.UUID(bytes=cu), unpack_name(vg), unpack_name(vgu), unpack_name(lv),
                  unpack_name(lvu), off, length)


def read_anchor(dev: BlockDevice, device_size: int) -> Anchor | None:
    if device_size < 8 * TAIL_SIZE:
        raise DeviceTooSmall(path=dev.path, size=device_size, need=8 * TAIL_SIZE)
    region = anchor_region(device_size)
    anchor = decode_anchor(dev.read(region.offset, SECTOR), region.offset)
    if anchor is not None and anchor.offset + anchor.length > tail_offset(device_size):
        raise CorruptRecord(region="anchor", offset=region.offset,
                            detail="it points past the end of the LVM area")
    return anchor


def write_anchor(dev: BlockDevice, device_size: int, anchor: Anchor) -> None:
    """Write the anchor; refuses to replace one that is there (or foreign data)."""
    current = read_anchor(dev, device_size)  # raises on foreign data: never overwrite it
    if current is not None and current != anchor:
        raise AnchorTaken(path=dev.path, cluster=str(current.cluster_uuid),
                          vg=current.vg_name)
    dev.write(anchor_region(device_size).offset, encode_anchor(anchor))
