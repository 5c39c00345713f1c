"""VM definitions on the LUN: the XML of every VM, and each host's upload slot.

Why a region of its own: a libvirt domain XML may be 64 KiB, and a cluster
may have 500 VMs; the ledger (256 KiB per slot) holds only the index. Two
regions (docs/format.md, "VM definitions"):

- ``vms``: ``VM_SLOTS`` slots of ``VM_SLOT_SIZE``, written by the writer only.
  Each version of a definition goes to a free slot (copy on write), and the
  ledger's ``vms`` index names the slot, version and digest of the current
  one. The ledger write is the commit: a writer that dies after writing a
  slot and before the ledger leaves an unreferenced slot, never a half
  definition. Earlier versions stay readable until their slot is reused
  (``vm_history`` in the ledger says where they are).
- ``vmstage``: one slot per host id, written by that host only: every host
  (the writer too) uploads the XML there, and its request (through the
  mailboxes, which hold 4 KiB) names the VM and the XML's digest.

Each slot holds one record (the common header: ``seq`` is the definition's
version, or the upload's number; ``epoch`` the writer epoch, or the host's
generation) whose payload is the VM name and the XML. Multi-sector records
are written tail first and the header sector last, so a cut write fails its
checksum. A reader checks kind, checksum, name, version and digest against
what the ledger says: a slot a late write of a stale writer changed is
refused (``DefinitionMismatch``), never used.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fenceless.blockio import BlockDevice
from fenceless.errors import IntegrityError, UserError
from fenceless.ondisk.errors import RecordTooLarge
from fenceless.ondisk.layout import VM_SLOT_SIZE, Layout, Region
from fenceless.ondisk.record import (
    HEADER_SIZE,
    KIND_VMDEF,
    KIND_VMSTAGE,
    encode_record,
    pad,
    read_sized,
    write_tail_first,
)

DEFS = "vms"
STAGE = "vmstage"
_NAME = struct.Struct("<H")


class NoVmStore(UserError):
    """Refused: this cluster's control area has no VM store (it was made by a fenceless \
before VMs); nothing was changed"""


class DefinitionTooLarge(RecordTooLarge):
    """The definition of VM {name} is {size} bytes, a slot holds {limit}; nothing was \
written"""


class DefinitionMismatch(IntegrityError):
    """The definition of VM {name} in region '{region}' slot {slot} is not the one the \
ledger names ({detail}); refusing to use it"""


class StoreFull(UserError):
    """Refused: the VM store has no free slot ({slots} slots, all holding current \
definitions); undefine a VM first; nothing was changed"""


def digest(xml: str) -> str:
    """What the ledger keeps to recognise a definition: SHA-256 of its XML, hex."""
    return hashlib.sha256(xml.encode("utf-8")).hexdigest()


def has_store(layout: Layout) -> bool:
    return any(r.name == DEFS for r in layout.regions)


def _slot(layout: Layout, region_name: str, index: int) -> tuple[Region, int]:
    if not has_store(layout):
        raise NoVmStore()
    region = layout.region(region_name)
    count = region.length // VM_SLOT_SIZE
    if not 0 <= index < count:
        raise ValueError(f"{region_name} has no slot {index}")
    return region, region.offset + index * VM_SLOT_SIZE


def slot_count(layout: Layout) -> int:
    return layout.region(DEFS).length // VM_SLOT_SIZE if has_store(layout) else 0


@dataclass(frozen=True)
class StoredXml:
    name: str
    xml: str
    seq: int
    epoch: int


def encode(kind: int, name: str, xml: str, *, seq: int, epoch: int) -> bytes:
    raw_name = name.encode("utf-8")
    body = _NAME.pack(len(raw_name)) + raw_name + xml.encode("utf-8")
    if HEADER_SIZE + len(body) > VM_SLOT_SIZE:
        raise DefinitionTooLarge(name=name, size=len(body),
                                 limit=VM_SLOT_SIZE - HEADER_SIZE)
    return pad(encode_record(kind, body, seq=seq, epoch=epoch))


def _read(dev: BlockDevice, kind: int, region: Region, offset: int) -> StoredXml | None:
    rec = read_sized(dev, offset, kind=kind, region=region.name, limit=VM_SLOT_SIZE)
    if rec is None:
        return None
    payload = rec.payload
    if len(payload) < _NAME.size:
        raise DefinitionMismatch(name="?", region=region.name, slot=offset,
                                 detail="the payload has no name")
    (n,) = _NAME.unpack_from(payload)
    try:
        name = payload[_NAME.size:_NAME.size + n].decode("utf-8")
        xml = payload[_NAME.size + n:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DefinitionMismatch(name="?", region=region.name, slot=offset,
                                 detail=f"not UTF-8 ({exc.reason})") from exc
    return StoredXml(name, xml, rec.seq, rec.epoch)


def write_definition(dev: BlockDevice, layout: Layout, slot: int, name: str, xml: str, *,
                     seq: int, epoch: int, before_write: Callable[[], None] | None = None
                     ) -> None:
    """The writer only: version ``seq`` of VM ``name`` into a free slot."""
    _region, offset = _slot(layout, DEFS, slot)
    write_tail_first(dev, offset, encode(KIND_VMDEF, name, xml, seq=seq, epoch=epoch), before_write)


def read_definition(dev: BlockDevice, layout: Layout, slot: int, *, name: str, seq: int,
                    sha: str) -> str:
    """The XML of version ``seq`` of VM ``name``, as the ledger names it."""
    region, offset = _slot(layout, DEFS, slot)
    got = _read(dev, KIND_VMDEF, region, offset)
    if got is None:
        raise DefinitionMismatch(name=name, region=DEFS, slot=slot, detail="the slot is empty")
    if got.name != name or got.seq != seq:
        raise DefinitionMismatch(name=name, region=DEFS, slot=slot, detail=(
            f"it holds version {got.seq} of {got.name[:64]!r}, the ledger names version "
            f"{seq} of {name!r}"))
    if digest(got.xml) != sha:
        raise DefinitionMismatch(name=name, region=DEFS, slot=slot,
                                 detail="its digest differs")
    return got.xml


def read_slot(dev: BlockDevice, layout: Layout, slot: int) -> StoredXml | None:
    """Whatever definition slot ``slot`` holds, unchecked against any ledger (a repair
    rebuilds the index from these); None if it is empty."""
    region, offset = _slot(layout, DEFS, slot)
    return _read(dev, KIND_VMDEF, region, offset)


def write_stage(dev: BlockDevice, layout: Layout, host_id: int, name: str, xml: str, *,
                seq: int, generation: int,
                before_write: Callable[[], None] | None = None) -> None:
    """Host ``host_id`` only: an upload for the writer to pick up."""
    _region, offset = _slot(layout, STAGE, host_id - 1)
    write_tail_first(dev, offset, encode(KIND_VMSTAGE, name, xml, seq=seq, epoch=generation),
           before_write)


def read_stage(dev: BlockDevice, layout: Layout, host_id: int, *, name: str,
               sha: str) -> str:
    """The upload of host ``host_id``, checked against its request's name and digest.

    By content, not by the upload's number: a request retried under its id is the
    same request, whichever upload carried it."""
    region, offset = _slot(layout, STAGE, host_id - 1)
    try:
        got = _read(dev, KIND_VMSTAGE, region, offset)
    except IntegrityError as exc:
        raise StageMismatch(host_id=host_id, name=name, detail=str(exc)) from exc
    if got is None or got.name != name or digest(got.xml) != sha:
        raise StageMismatch(host_id=host_id, name=name,
                            detail="another definition is there now" if got else "it is empty")
    return got.xml


def stage_seq(dev: BlockDevice, layout: Layout, host_id: int) -> int:
    """The number of the host's last upload (0: none, or unreadable: start again)."""
    region, offset = _slot(layout, STAGE, host_id - 1)
    try:
        got = _read(dev, KIND_VMSTAGE, region, offset)
    except IntegrityError:
        return 0
    return got.seq if got is not None else 0


class StageMismatch(UserError):
    """Refused: the definition of VM {name} uploaded by host id {host_id} is not in its \
upload slot ({detail}); nothing was changed (send it again)"""


def free_slot(used: Iterable[int], history: Iterable[int], count: int) -> tuple[int, bool]:
    """A slot for a new version: one nothing names, else the oldest earlier version's
    (``history`` oldest first). Returns (slot, whether an earlier version is dropped)."""
    taken = set(used)
    kept = [s for s in history if s not in taken]
    busy = taken | set(kept)
    for slot in range(count):
        if slot not in busy:
            return slot, False
    if kept:
        return kept[0], True
    raise StoreFull(slots=count)
