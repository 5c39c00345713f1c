"""The ledger: cluster state written only by the writer host, in two slots A and B.

Each write goes to the slot that is older by (epoch, generation), so the
newest valid record survives any torn write, and a stale writer (epoch lower
than what is on disk) is refused before it writes (docs/design.md, "The
stale writer").
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fenceless.blockio import BlockDevice
from fenceless.errors import IntegrityError
from fenceless.ondisk.errors import (
    BadLength,
    ChecksumMismatch,
    CorruptRecord,
    RecordTooLarge,
    StaleEpoch,
    UnsupportedVersion,
)
from fenceless.ondisk.layout import Layout, Region
from fenceless.ondisk.record import (
    HEADER_SIZE,
    KIND_LEDGER,
    decode_record,
    encode_record,
    pad,
    write_tail_first,
)


class LedgerUnreadable(IntegrityError):
    """Ledger has no valid slot ({detail}); refusing to use or overwrite it. On the \
writer, `fenceless repair ledger` shows how it would rebuild it"""


class LedgerTooLarge(RecordTooLarge):
    """Ledger state is {size} bytes but a ledger slot holds at most {limit}; nothing was \
written"""


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
    return _slot(dev.read(region.offset, region.length), region)


def _slot(buf: bytes, region: Region) -> SlotStatus:
    """What the bytes of one ledger slot (all of its region) hold."""
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
    other = [s.error.fields["kind_found"] for s in (a, b)
             if s.error is not None and s.error.fields.get("kind_found") is not None]
    raise LedgerUnreadable(detail=detail, kind_found=other[0] if other else None)


def read_ledger(dev: BlockDevice, layout: Layout) -> LedgerView:
    """Read both slots; the newest valid one by (epoch, generation) is current.

    A corrupt slot is reported in ``slots``/``problems`` and the other valid
    slot wins. No valid slot but some corrupt one: ``LedgerUnreadable``.
    Both empty: ``current`` is None (a fresh cluster).
    """
    a, b = (_read_slot(dev, layout.region(n)) for n in LEDGER_SLOTS)
    return _view(a, b)


MAX_GENERATION = 1 << 62  # a torn header claiming more is damage, not one of our writes


def _choose_target(view: LedgerView, epoch: int,
                   confirm: Callable[[], None] | None = None) -> SlotStatus:
    """The slot the writer at ``epoch`` may write into, or raise.

    Rules (docs/format.md, "The A/B rule for writing"):
    1. any slot with a higher epoch (valid, or in a torn header) -> StaleEpoch;
       except a torn header when ``confirm`` shows the leader still names this
       writer at ``epoch``: that slot is damage, and is written over;
    2. a slot that is foreign, of another version or otherwise corrupt but
       not recognisably our own torn write -> refuse (never overwrite it);
    3. an empty slot is used first (A before B);
    4. one torn slot next to a valid one: if the valid record is newer than
       the torn header claims, the torn slot is an interrupted write of ours
       and is reused; if the torn header claims to be newer (a late write of
       a stale writer landed on it, or damage), it is left as it is and the
       valid slot is written, with a generation above the torn claim, so the
       next write reuses the torn slot: the writer never stops for good;
    5. otherwise the slot that is older by (epoch, generation).
    """
    for s in view.slots:
        if s.record is not None and s.record.epoch > epoch:
            raise StaleEpoch(epoch=epoch, where=f"ledger slot {s.name}", seen=s.record.epoch)
    for s in view.slots:
        if s.record is None and s.torn_order[0] > epoch:
            if confirm is None:
                raise StaleEpoch(epoch=epoch, where=f"ledger slot {s.name}",
                                 seen=s.torn_order[0])
            confirm()  # raises unless this writer still holds the lease at ``epoch``
            return s  # then the torn header is damage (see ``write_ledger``)
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
        if len(torn) == 1 and valid and valid[0].record is not None:
            if t.torn_order < valid[0].record.order:
                return t
            if t.torn_order[1] < MAX_GENERATION:
                return valid[0]
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
    confirm: Callable[[], None] | None = None,
) -> LedgerRecord:
    """Write ``state`` as the next ledger generation at writer ``epoch``.

    Re-reads both slots first (never trusts an earlier read), refuses if the
    disk shows a higher epoch, and writes only the slot chosen by
    ``_choose_target``. A multi-sector record is written tail first and its
    header sector last, so the header write is the commit point.
    ``before_write`` runs right before every device write; the writer passes
    its lease check there (docs/design.md, "The stale writer"). ``confirm`` (the
    writer's fresh read of its lease's leader) judges a torn header that claims a
    higher epoch: ledger epochs are lease epochs, so while the leader still names
    this writer at ``epoch`` no such write ever began, and the slot is damage to
    write over; without it, or if the leader moved, StaleEpoch. ``both_slots``
    writes the record into both slots one after the other: a takeover does
    this first, so no slot is left from the previous epoch.
    """
    if epoch <= 0:
        raise ValueError("writer epochs start at 1")
    written: list[LedgerRecord] = []
    for _ in range(2 if both_slots else 1):
        a, b = (_read_slot(dev, layout.region(n)) for n in LEDGER_SLOTS)
        view = LedgerView(current=None, slots=(a, b))
        target = _choose_target(view, epoch, confirm)
        prev = [s.record.generation for s in (a, b) if s.record is not None]
        prev += [s.torn_order[1] for s in (a, b) if s.torn and s.torn_order[0] == epoch]
        rec = LedgerRecord(
            epoch=epoch, generation=max(prev, default=0) + 1, writer_host_id=writer_host_id,
            written_wall_ms=int(wall_clock() * 1000), state=dict(state),
        )
        region = layout.region(target.name)
        write_tail_first(dev, region.offset, encode_ledger(rec, region.length), before_write)
        written.append(rec)
    return written[-1]


class SlotsChanged(IntegrityError):
    """The ledger slots changed between the repair's plan and its write ({detail}); \
nothing was written. Run `fenceless repair ledger` again to see the new state"""


class LedgerReadable(IntegrityError):
    """Refused: the ledger reads (slot {slot}, epoch {epoch}, generation {generation}) and \
no slot holds damage a repair may write over. Nothing was changed"""


class LedgerEmpty(IntegrityError):
    """Refused: both ledger slots are empty (a cluster that was never initialized, or \
zeroed); there is nothing to repair, and nothing was changed"""


class NotALedger(IntegrityError):
    """Refused: ledger slot {slot} holds another fenceless record ({detail}): the control \
area's layout is not the one this agent reads. Nothing was changed"""


def slot_bytes(dev: BlockDevice, layout: Layout) -> tuple[bytes, bytes]:
    """Both ledger slots as they are on the disk (a repair keeps them, and writes over
    them only while they are still these bytes)."""
    a, b = (layout.region(n) for n in LEDGER_SLOTS)
    return dev.read(a.offset, a.length), dev.read(b.offset, b.length)


@dataclass(frozen=True)
class Damage:
    """What a repair may write: ``slots``, damaged and not ours to reuse (``write_ledger``
    never writes over them), and the newest valid record, if one slot still reads."""

    slots: tuple[str, ...]
    problems: tuple[str, ...]
    valid: LedgerRecord | None
    statuses: tuple[SlotStatus, ...]


def damage(raw: tuple[bytes, bytes], layout: Layout, epoch: int) -> Damage:
    """The damage a repair by the writer at ``epoch`` (its lease just checked) may write
    over; raises when there is none: both slots read, or a damaged one is our own torn
    write next to a valid one (the writer reuses it by itself), or both are empty; and
    when a slot is of a newer format or another record kind (not damage: another
    version, or a wrong layout). A torn header that claims an epoch above the writer's
    lease, or a generation no write reaches, is damage: ledger epochs are lease epochs.
    ``raw``: both slots' bytes, as ``slot_bytes`` read them (the plan's, and what is
    checked again before a write)."""
    got = [_slot(buf, layout.region(n)) for n, buf in zip(LEDGER_SLOTS, raw, strict=True)]
    for s in got:
        if isinstance(s.error, UnsupportedVersion) and s.error.fields.get("newer"):
            raise s.error
        if s.error is not None and s.error.fields.get("kind_found") is not None:
            raise NotALedger(slot=s.name, detail=str(s.error))
    valid = [s.record for s in got if s.record is not None]
    bad = [s for s in got if s.error is not None and not (
        valid and s.torn and s.torn_order[0] <= epoch and s.torn_order[1] < MAX_GENERATION)]
    if not bad:
        if all(s.empty for s in got):
            raise LedgerEmpty()
        newest = max(valid, key=lambda r: r.order)
        raise LedgerReadable(slot=next(s.name for s in got if s.record is newest),
                             epoch=newest.epoch, generation=newest.generation)
    return Damage(tuple(s.name for s in bad), tuple(f"{s.name}: {s.error}" for s in bad),
                  max(valid, key=lambda r: r.order) if valid else None, tuple(got))


def overwrite_ledger(
    dev: BlockDevice,
    layout: Layout,
    epoch: int,
    state: Mapping[str, Any],
    *,
    writer_host_id: int,
    expect: tuple[bytes, bytes],
    before_write: Callable[[], None] | None = None,
    wall_clock: Callable[[], float] = time.time,
) -> LedgerRecord:
    """``fenceless repair ledger`` only: write ``state`` over the damaged slots, which
    ``write_ledger`` refuses to touch (``damage`` says which).

    Not blind: both slots must still hold ``expect``, the bytes the admin's plan was
    made from (and that the agent kept a copy of); the damage is judged again on them;
    nothing is written at a lower epoch than any slot shows (a stale writer is refused as
    always). The generation starts above anything a late write of this epoch could
    carry: the wall clock in ms (a writer makes far fewer writes than that), so a write
    still in flight from before the damage can never count as newer. A repair cut short
    leaves slot A repaired and B damaged: run again, it writes B.
    """
    now = slot_bytes(dev, layout)
    if now != expect:
        which = [n for n, x, y in zip(LEDGER_SLOTS, now, expect, strict=True) if x != y]
        raise SlotsChanged(detail=f"{' and '.join(which)} now hold other bytes")
    found = damage(now, layout, epoch)
    got = found.statuses
    # (a torn header of a slot listed as damage is not trusted: see ``damage``)
    seen = [s.record.order for s in got if s.record is not None] + \
        [s.torn_order for s in got if s.torn and s.name not in found.slots]
    for order in seen:
        if order[0] > epoch:
            raise StaleEpoch(epoch=epoch, where="the ledger", seen=order[0])
    wall_ms = int(wall_clock() * 1000)
    generation = max([g for e, g in seen if e == epoch] + [wall_ms])
    rec = LedgerRecord(epoch, generation, writer_host_id, wall_ms, {})
    for name in found.slots:
        rec = LedgerRecord(epoch=epoch, generation=rec.generation + 1,
                           writer_host_id=writer_host_id, written_wall_ms=wall_ms,
                           state=dict(state))
        region = layout.region(name)
        write_tail_first(dev, region.offset, encode_ledger(rec, region.length), before_write)
    return rec
