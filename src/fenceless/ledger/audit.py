"""The audit log: who asked for what, and what came of it, in region ``audit``.

Why: any host can run a command that changes the VG, but only the writer
carries it out. The writer appends one record per request here, so every
host (and the admin after an incident) can see the cluster-wide sequence of
changes, each with its requesting host, user, argv, request id, writer
epoch and result.

Layout (docs/format.md, "Audit log"): the region is a ring of one-sector
records of kind ``KIND_AUDIT``; record number ``n`` (the header's ``seq``,
rising by one per record) lives in sector ``n % slots``. A record is a
single 4 KiB write, atomic by our sector assumption: there is no torn
multi-sector state. A record that would not fit is truncated, visibly (a
marker in each cut string, ``argv_omitted`` and the ``truncated`` flag),
never split.

The ring rule (numbering from the highest claimed number, refusing a stale
writer, never writing over foreign data or another format) is the metadata
history's: see ``fenceless.ledger.history``. The argv is stored as data
(a JSON list of strings) and never interpreted.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fenceless.blockio import SECTOR, BlockDevice
from fenceless.ledger.history import (
    Claim,
    Heads,
    RingFull,
    mark_stale,
    next_slot,
    slot_claims,
)
from fenceless.ondisk.errors import BadLength, ChecksumMismatch, CorruptRecord
from fenceless.ondisk.layout import Layout, Region
from fenceless.ondisk.record import HEADER_SIZE, KIND_AUDIT, decode_record, encode_record, pad

REGION = "audit"
RESULTS = ("ok", "refused", "failed", "started")  # "started": an intent (a repair)
FLAG_TRUNCATED = 0x1
MARK = "…[truncated]"
_BODY = struct.Struct("<QHBB")  # wall ms, requesting host id, result, flags
ROOM = SECTOR - HEADER_SIZE - _BODY.size  # bytes of JSON a record holds
_NAME_CAP = 200  # JSON bytes kept of host, user and request id
_MESSAGE_MIN = 512  # JSON bytes of message kept before argv is cut
_ARG_CAP = 256  # JSON bytes kept of each argument once argv must be cut


@dataclass(frozen=True)
class AuditRecord:
    """One request as the writer saw it (``argv`` is data, never run or parsed)."""

    host: str
    user: str
    argv: tuple[str, ...]
    request_id: str
    result: str  # one of RESULTS
    message: str = ""
    host_id: int = 0
    argv_omitted: int = 0  # trailing arguments dropped to fit the sector


@dataclass(frozen=True)
class AuditEntry:
    """One slot as read: a record, or a problem (``error``; ``seq`` as claimed, or 0)."""

    slot: int
    offset: int
    seq: int
    epoch: int
    wall_ms: int = 0
    record: AuditRecord | None = None
    truncated: bool = False
    stale: bool = False
    error: CorruptRecord | None = field(default=None)


def _dumps(obj: Any) -> str:
    """ASCII JSON: argv from the command line may hold undecodable bytes (surrogates)."""
    return json.dumps(obj, ensure_ascii=True, sort_keys=True, separators=(",", ":"))


def _size(obj: Any) -> int:
    return len(_dumps(obj))


def _clip(text: str, cap: int) -> tuple[str, bool]:
    """``text`` cut so its JSON encoding is at most ``cap`` bytes, with the marker."""
    if _size(text) <= cap:
        return text, False
    lo, hi = 0, len(text)
    while lo < hi:  # the longest prefix that still fits with the marker
        mid = (lo + hi + 1) // 2
        if _size(text[:mid] + MARK) <= cap:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + MARK, True


def _json(rec: AuditRecord) -> dict[str, Any]:
    out: dict[str, Any] = {"argv": list(rec.argv), "host": rec.host, "message": rec.message,
                           "request_id": rec.request_id, "user": rec.user}
    if rec.argv_omitted:
        out["argv_omitted"] = rec.argv_omitted
    return out


def fit(rec: AuditRecord) -> tuple[AuditRecord, bool]:
    """Cut ``rec`` down until its JSON fits one sector; (record, whether it was cut).

    Order: host, user and request id are capped first; then the message
    yields what argv needs (keeping at least 512 bytes); then each argument
    is capped and trailing arguments are dropped (``argv_omitted``).
    """
    host, c1 = _clip(rec.host, _NAME_CAP)
    user, c2 = _clip(rec.user, _NAME_CAP)
    request_id, c3 = _clip(rec.request_id, _NAME_CAP)
    cut = c1 or c2 or c3
    rec = replace(rec, host=host, user=user, request_id=request_id)
    if _size(_json(rec)) <= ROOM:
        return rec, cut
    without = _size(_json(replace(rec, message=""))) - 2
    message, _ = _clip(rec.message, max(_MESSAGE_MIN, ROOM - without))
    rec = replace(rec, message=message)
    if _size(_json(rec)) <= ROOM:
        return rec, True
    argv = [_clip(a, _ARG_CAP)[0] for a in rec.argv]
    omitted = rec.argv_omitted
    rec = replace(rec, argv=tuple(argv))
    while _size(_json(rec)) > ROOM and argv:
        argv.pop()
        omitted += 1
        rec = replace(rec, argv=tuple(argv), argv_omitted=omitted)
    if _size(_json(rec)) > ROOM:  # only a pathological message is left: cut it to fit
        without = _size(_json(replace(rec, message=""))) - 2
        rec = replace(rec, message=_clip(rec.message, ROOM - without)[0])
    return rec, True


def encode_audit(rec: AuditRecord, *, seq: int, epoch: int, wall_ms: int) -> bytes:
    """The record's sector: header, fixed body, JSON (sorted keys), zero padding."""
    if rec.result not in RESULTS:
        raise ValueError(f"audit result must be one of {RESULTS}, not {rec.result!r}")
    if not all(isinstance(a, str) for a in rec.argv):
        raise ValueError("audit argv must be a list of strings")
    rec, cut = fit(rec)
    body = _dumps(_json(rec)).encode("ascii")
    payload = _BODY.pack(wall_ms, rec.host_id, RESULTS.index(rec.result),
                         FLAG_TRUNCATED if cut else 0) + body
    return pad(encode_record(KIND_AUDIT, payload, seq=seq, epoch=epoch), SECTOR)


def _slots(layout: Layout) -> tuple[Region, int]:
    region = layout.region(REGION)
    return region, region.length // SECTOR


def _decode(buf: bytes, slot: int, slots: int, offset: int) -> AuditEntry | None:
    try:
        rec = decode_record(buf, kind=KIND_AUDIT, region=REGION, offset=offset)
    except (ChecksumMismatch, BadLength) as exc:
        return AuditEntry(slot, offset, int(exc.fields["seq"]), int(exc.fields["epoch"]),
                          error=exc)
    except CorruptRecord as exc:
        return AuditEntry(slot, offset, 0, 0, error=exc)
    if rec is None:
        return None

    def bad(detail: str) -> AuditEntry:
        err = CorruptRecord(region=REGION, offset=offset, detail=detail)
        return AuditEntry(slot, offset, rec.seq, rec.epoch, error=err)

    if rec.seq % slots != slot:
        return bad(f"record {rec.seq} does not belong in slot {slot}")
    try:
        wall, host_id, result, flags = _BODY.unpack_from(rec.payload)
        obj = json.loads(rec.payload[_BODY.size :].decode("ascii"))
        argv = obj["argv"]
        strings = [obj[k] for k in ("host", "user", "request_id", "message")]
        omitted = obj.get("argv_omitted", 0)
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv) \
                or not all(isinstance(s, str) for s in strings) \
                or not isinstance(omitted, int) or result >= len(RESULTS):
            raise ValueError("fields have the wrong types")
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        return bad(f"checksum is valid but the audit payload is not: {exc}")
    host, user, request_id, message = strings
    record = AuditRecord(host=host, user=user, argv=tuple(argv), request_id=request_id,
                         result=RESULTS[result], message=message, host_id=host_id,
                         argv_omitted=omitted)
    return AuditEntry(slot, offset, rec.seq, rec.epoch, wall_ms=wall, record=record,
                      truncated=bool(flags & FLAG_TRUNCATED))


def read_log(dev: BlockDevice, layout: Layout, limit: int | None = None) -> list[AuditEntry]:
    """The log, oldest to newest; a slot that does not decode is an entry with ``error``.

    ``limit`` keeps the newest ``limit`` entries with a known number; problems
    with no number of ours (foreign data) are always included, first.
    """
    region, slots = _slots(layout)
    data = dev.read(region.offset, slots * SECTOR)
    found = []
    for i in range(slots):
        e = _decode(data[i * SECTOR : (i + 1) * SECTOR], i, slots, region.offset + i * SECTOR)
        if e is not None:
            found.append(e)
    stale = mark_stale([(e.seq, e.epoch) for e in found if e.error is None])
    found = [replace(e, stale=e.seq in stale) if e.error is None else e for e in found]
    unknown = [e for e in found if e.error is not None and e.seq == 0]
    known = sorted((e for e in found if e.seq != 0), key=lambda e: (e.seq, e.slot))
    if limit is not None:
        known = known[-limit:] if limit > 0 else []
    return unknown + known


def append(
    dev: BlockDevice,
    layout: Layout,
    record: AuditRecord,
    *,
    epoch: int,
    before_write: Callable[[], None] | None = None,
    wall_clock: Callable[[], float] = time.time,
    known: Heads | None = None,
) -> AuditEntry:
    """Append ``record`` as the writer at ``epoch``: one read of the region, one write.

    The next number is one past the highest claimed in any slot header (torn
    or valid), so the slot written is the oldest one; a higher epoch on disk
    is ``StaleEpoch``; foreign slots are skipped, never overwritten. With
    ``known`` (the heads this writer left last time) only the slot to write and
    the newest one are read again, as for the history ring (``history.Heads``).
    """
    if epoch <= 0:
        raise ValueError("writer epochs start at 1")
    region, slots = _slots(layout)
    if slots < 1:
        raise RingFull(region=REGION, offset=region.offset, detail="the region is empty")
    claims, _heads = slot_claims(dev, region, SECTOR, slots, KIND_AUDIT, epoch, known,
                                 name=REGION)
    if known is not None:
        known.claims = None  # valid again only once this append has succeeded
    seq, slot = next_slot(claims, epoch, region=region)
    wall_ms = int(wall_clock() * 1000)
    sector = encode_audit(record, seq=seq, epoch=epoch, wall_ms=wall_ms)
    offset = region.offset + slot * SECTOR
    if before_write is not None:
        before_write()
    dev.write(offset, sector)
    written = _decode(sector, slot, slots, offset)
    assert written is not None and written.error is None
    if known is not None:
        claims[slot] = Claim("ours", seq=seq, epoch=epoch)
        known.epoch, known.claims = epoch, claims
    return written


def audit_record(*, host: str, user: str, argv: Sequence[str], request_id: str,
                 result: str, message: str = "", host_id: int = 0) -> AuditRecord:
    """Build a record from any argv sequence (stored as a tuple of strings)."""
    return AuditRecord(host=host, user=user, argv=tuple(argv), request_id=request_id,
                       result=result, message=message, host_id=host_id)
