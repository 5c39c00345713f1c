"""The VG metadata history: a ring of the last 128 metadata texts in region ``mdhistory``.

Why: LVM keeps only the current metadata (and a local archive on whichever
host ran the command). After every change the writer stores the new VG
metadata text here, so any host can show what changed, when, by which
request and under which writer epoch, and an admin can diff two versions.

Layout (docs/format.md, "Metadata history"): the region is cut into
``MDHISTORY_ENTRIES`` (128) equal slots; entry number ``n`` (the header's
``seq``, rising by one per entry) lives in slot ``n % 128``. Each entry is
one record of kind ``KIND_MDHISTORY``: the common header (``epoch`` = writer
epoch), a fixed body, then the zlib-compressed text. A write puts the tail
sectors down first and the header sector last (the commit point, as in
``write_ledger``), so an interrupted write leaves a checksum mismatch in the
oldest slot, never a wrong entry.

Only the writer appends. A stale writer is handled like this:

- ``append`` re-reads every slot header right before writing and refuses
  (``StaleEpoch``) if any carries a higher epoch; ``before_write`` (the
  writer's lease check) runs before each of its two device writes.
- A write that was issued in time but lands late can still replace one
  slot, at most the entry the new writer put there. Readers therefore mark
  an entry ``stale`` when an entry with a lower number has a higher epoch
  (it was written after a newer writer had taken over), list it as such,
  and ``read_entry`` ignores it unless asked.
- History is for humans (show, diff, audit): no decision reads it. The
  ledger and the real VG stay the only inputs to recovery.

Slots that do not decode are reported by ``list_entries`` and never written
over, except our own torn or older entries: a slot with foreign data or a
record of an older format is skipped (its entry number is left unused), and
a record of a newer format makes ``append`` refuse outright (a newer
fenceless is writing this ring).
"""

from __future__ import annotations

import difflib
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from fenceless.blockio import SECTOR, BlockDevice
from fenceless.errors import IntegrityError, UserError
from fenceless.ondisk.errors import BadLength, ChecksumMismatch, CorruptRecord, StaleEpoch
from fenceless.ondisk.layout import MDHISTORY_ENTRIES, Layout, Region
from fenceless.ondisk.record import (
    FORMAT_VERSION,
    HEADER,
    HEADER_SIZE,
    KIND_MDHISTORY,
    MAGICS,
    MIN_FORMAT_VERSION,
    decode_record,
    encode_record,
    is_empty,
    pack_name,
    pad,
    unpack_name,
    write_tail_first,
)

# What an entry's text must be: the LVM metadata of one VG. Reading that text is
# the LVM adapter's business (``fenceless.lvm.mda.vg_identity``), so callers
# pass the parser in: it returns (VG name, seqno) or raises an IntegrityError.
TextParser = Callable[[str], tuple[str, int]]

REGION = "mdhistory"
COMPRESSION_ZLIB = 1
# vg_seqno, wall ms, text length, writer host id, compression, request id, VG name
_BODY = struct.Struct("<QQIHH64s128s")
BODY_SIZE = HEADER_SIZE + _BODY.size  # 256: compressed text starts here
MAX_TEXT = 64 * 1024 * 1024  # decompression bound: far above any LVM metadata area
_MAX_SEQ = 1 << 62  # a claimed entry number above this is damage, not history


class HistoryTooLarge(UserError):
    """VG {vg} metadata seqno {seqno} is {size} bytes ({stored} compressed) but a history \
slot holds {limit} compressed bytes; no history entry was written for it"""


class HistoryNotFound(UserError):
    """VG metadata seqno {seqno} is not in the metadata history{detail}"""


class RingFull(IntegrityError):
    """Control area region '{region}' at offset {offset}: {detail}; refusing to overwrite \
any of its slots"""


# --- the ring rule, shared with the audit log -------------------------------------


@dataclass(frozen=True)
class Claim:
    """What a slot's header sector says, before any checksum: enough to pick a slot.

    ``ours``: our magic, kind and a readable version: the header's ``seq``
    and ``epoch`` are claims (untrusted, possibly torn) that are used only to
    refuse a stale writer and to number the next entry. ``blocked``: foreign
    data or an older format, which must never be written over.
    """

    state: Literal["empty", "ours", "blocked"]
    seq: int = 0
    epoch: int = 0


def claim(buf: bytes, kind: int, *, region: str, offset: int) -> Claim:
    """Classify a slot by its first sector; a newer format version raises.

    A newer version is refused rather than skipped: a newer fenceless is
    writing this ring and we cannot know its numbering.
    """
    if is_empty(buf[:SECTOR]):
        return Claim("empty")
    magic, version, rkind, _flags, _len, seq, epoch, _crc, _res = HEADER.unpack_from(buf)
    if magic != MAGICS[kind]:
        return Claim("blocked")
    if version > FORMAT_VERSION:
        decode_record(buf[:SECTOR], kind=kind, region=region, offset=offset)  # raises
    if version < MIN_FORMAT_VERSION or rkind != kind or seq >= _MAX_SEQ:
        return Claim("blocked")
    return Claim("ours", seq=seq, epoch=epoch)


def next_slot(claims: list[Claim], epoch: int, *, region: Region) -> tuple[int, int]:
    """(entry number, slot) for the next record at ``epoch``, per the ring rule.

    Refuses a stale writer (a claimed higher epoch anywhere), numbers the
    entry one past the highest claimed number (torn headers included, so an
    interrupted entry is never re-used with different content), and skips
    slots that are blocked.
    """
    for c in claims:
        if c.state == "ours" and c.epoch > epoch:
            raise StaleEpoch(epoch=epoch, where=f"region {region.name}", seen=c.epoch)
    n = len(claims)
    seq = max((c.seq for c in claims if c.state == "ours"), default=0) + 1
    for _ in range(n):
        if claims[seq % n].state != "blocked":
            return seq, seq % n
        seq += 1
    raise RingFull(region=region.name, offset=region.offset,
                   detail=f"all {n} slots hold foreign data or an older format")


def mark_stale(seqs_epochs: list[tuple[int, int]]) -> set[int]:
    """Entry numbers whose epoch is below that of some lower-numbered entry."""
    stale: set[int] = set()
    top = 0
    for seq, epoch in sorted(seqs_epochs):
        if epoch < top:
            stale.add(seq)
        top = max(top, epoch)
    return stale


# --- entries ----------------------------------------------------------------------


@dataclass(frozen=True)
class HistoryEntry:
    """What the writer records after a change: the VG's metadata text as LVM wrote it."""

    text: str
    vg_seqno: int
    request_id: str
    writer_host_id: int = 0


@dataclass(frozen=True)
class HistorySummary:
    """One slot as listed: an entry without its text, or a problem (``error``).

    For a problem the entry number and epoch are those its header claims
    (0 when the header is not ours); nothing else is known.
    """

    slot: int
    offset: int
    seq: int
    epoch: int
    vg_name: str = ""
    vg_seqno: int = 0
    wall_ms: int = 0
    request_id: str = ""
    writer_host_id: int = 0
    text_size: int = 0
    stored_size: int = 0
    stale: bool = False
    error: CorruptRecord | None = None


def slot_size(layout: Layout) -> int:
    """Bytes per slot: the region's length / 128, in whole sectors."""
    region = layout.region(REGION)
    size = region.length // MDHISTORY_ENTRIES // SECTOR * SECTOR
    if size < SECTOR:
        raise RingFull(region=REGION, offset=region.offset, detail=f"the region is "
                       f"{region.length} bytes, less than {MDHISTORY_ENTRIES} sectors")
    return size


def max_stored(layout: Layout) -> int:
    """Largest compressed text one entry can hold."""
    return slot_size(layout) - BODY_SIZE


def _compress(entry: HistoryEntry, layout: Layout,
              parse: TextParser) -> tuple[str, bytes, bytes]:
    try:
        vg_name, seqno = parse(entry.text)
    except IntegrityError as exc:
        raise ValueError(f"history entry text is not VG metadata: {exc}") from exc
    if seqno != entry.vg_seqno:
        raise ValueError(f"history entry says seqno {entry.vg_seqno}, its text {seqno}")
    raw = entry.text.encode("utf-8")
    # Level 1: the writer pays this after every change; level 9 cost 25 ms at 1000 LVs.
    stored = zlib.compress(raw, 1) if len(raw) <= MAX_TEXT else raw
    if len(raw) > MAX_TEXT or len(stored) > max_stored(layout):
        raise HistoryTooLarge(vg=vg_name, seqno=entry.vg_seqno, size=len(raw),
                              stored=len(stored), limit=max_stored(layout))
    return vg_name, raw, stored


def _read_slot(dev: BlockDevice, region: Region, size: int, slot: int,
               head: bytes | None = None) -> tuple[HistorySummary | None, bytes]:
    """Decode one slot fully (header, then the sectors its length names).

    Returns (None, b"") for an empty slot, else the summary (with ``error``
    set for a problem) and the compressed text.
    """
    offset = region.offset + slot * size
    if head is None:
        head = dev.read(offset, SECTOR)
    if is_empty(head):
        return None, b""
    buf = head
    length = HEADER.unpack_from(head)[4]
    if head[:4] == MAGICS[KIND_MDHISTORY] and HEADER_SIZE + length > SECTOR:
        need = min(size, -(-(HEADER_SIZE + length) // SECTOR) * SECTOR)
        buf = head + dev.read(offset + SECTOR, need - SECTOR)
    try:
        rec = decode_record(buf, kind=KIND_MDHISTORY, region=REGION, offset=offset)
    except (ChecksumMismatch, BadLength) as exc:
        return HistorySummary(slot, offset, int(exc.fields["seq"]), int(exc.fields["epoch"]),
                              error=exc), b""
    except CorruptRecord as exc:
        return HistorySummary(slot, offset, 0, 0, error=exc), b""
    assert rec is not None

    def bad(detail: str) -> tuple[HistorySummary, bytes]:
        err = CorruptRecord(region=REGION, offset=offset, detail=detail)
        return HistorySummary(slot, offset, rec.seq, rec.epoch, error=err), b""

    if len(rec.payload) < _BODY.size:
        return bad("checksum is valid but the history payload is too short")
    if rec.seq % MDHISTORY_ENTRIES != slot:
        return bad(f"entry {rec.seq} does not belong in slot {slot}")
    seqno, wall, text_len, host, comp, rid, vg = _BODY.unpack_from(rec.payload)
    if comp != COMPRESSION_ZLIB or text_len > MAX_TEXT:
        return bad(f"unknown compression {comp} or text length {text_len}")
    stored = rec.payload[_BODY.size :]
    return HistorySummary(
        slot=slot, offset=offset, seq=rec.seq, epoch=rec.epoch, vg_name=unpack_name(vg),
        vg_seqno=seqno, wall_ms=wall, request_id=unpack_name(rid), writer_host_id=host,
        text_size=text_len, stored_size=len(stored)), stored


def _scan(dev: BlockDevice, layout: Layout) -> list[tuple[HistorySummary, bytes]]:
    region = layout.region(REGION)
    size = slot_size(layout)
    found = []
    for slot in range(MDHISTORY_ENTRIES):
        summary, stored = _read_slot(dev, region, size, slot)
        if summary is not None:
            found.append((summary, stored))
    stale = mark_stale([(s.seq, s.epoch) for s, _ in found if s.error is None])
    return [(replace(s, stale=s.seq in stale) if s.error is None else s, b)
            for s, b in found]


def list_entries(dev: BlockDevice, layout: Layout) -> list[HistorySummary]:
    """Every non-empty slot, newest first; problems are listed, not raised.

    Problems whose header is ours sort by the number they claim; the others
    (foreign data) come last.
    """
    found = [s for s, _ in _scan(dev, layout)]
    return sorted(found, key=lambda s: (s.seq, s.slot), reverse=True)


def _inflate(summary: HistorySummary, stored: bytes, parse: TextParser) -> str:
    def bad(detail: str) -> CorruptRecord:
        return CorruptRecord(region=REGION, offset=summary.offset, detail=detail)

    d = zlib.decompressobj()
    try:
        raw = d.decompress(stored, summary.text_size + 1)
    except zlib.error as exc:
        raise bad(f"compressed text does not inflate: {exc}") from exc
    if len(raw) != summary.text_size or not d.eof or d.unused_data:
        raise bad(f"text inflates to {len(raw)}+ bytes, the entry says {summary.text_size}")
    try:
        text = raw.decode("utf-8")
        _name, seqno = parse(text)
    except (UnicodeDecodeError, IntegrityError) as exc:
        raise bad(f"stored text is not VG metadata: {exc}") from exc
    if seqno != summary.vg_seqno:
        raise bad(f"stored text has seqno {seqno}, the entry says {summary.vg_seqno}")
    return text


def read_entry(dev: BlockDevice, layout: Layout, seqno: int, *, parse: TextParser,
               include_stale: bool = False) -> str:
    """The metadata text recorded for VG seqno ``seqno``.

    If several entries carry that seqno (recorded again after a takeover),
    the one with the highest (epoch, number) wins; ``stale`` entries are
    ignored unless ``include_stale``.
    """
    found = _scan(dev, layout)
    match = [(s, b) for s, b in found if s.error is None and s.vg_seqno == seqno
             and (include_stale or not s.stale)]
    if not match:
        kept = sorted(s.vg_seqno for s, _ in found if s.error is None)
        bad = sum(1 for s, _ in found if s.error is not None)
        detail = f" (it holds seqno {kept[0]}..{kept[-1]})" if kept else " (it is empty)"
        if bad:
            detail += f"; {bad} slot(s) could not be read"
        raise HistoryNotFound(seqno=seqno, detail=detail)
    summary, stored = max(match, key=lambda m: (m[0].epoch, m[0].seq))
    return _inflate(summary, stored, parse)


@dataclass
class Heads:
    """The slot headers as this writer last saw and left them, kept between appends.

    With it an append re-reads two headers instead of all 128: the slot it is
    about to write and the newest entry. Anything another writer could have
    written since must show in one of them (a ring is written in order), and
    any difference, or any error, sends the next append back to a full read.
    """

    epoch: int = 0
    claims: list[Claim] | None = None


def _newest(claims: list[Claim], seq: int) -> list[int]:
    """The slot(s) holding the entry just before number ``seq``."""
    return [i for i, c in enumerate(claims) if c.state == "ours" and c.seq == seq - 1]


def slot_claims(dev: BlockDevice, region: Region, size: int, count: int, kind: int,
                epoch: int, known: Heads | None, *, name: str = REGION,
                ) -> tuple[list[Claim], dict[int, bytes]]:
    """Every slot's claim in a ring of ``count`` slots of ``size`` bytes, and the header
    sectors read (all, or with ``known`` the two that matter). The audit ring uses it
    too."""
    def read(i: int) -> tuple[bytes, Claim]:
        head = dev.read(region.offset + i * size, SECTOR)
        return head, claim(head, kind, region=name, offset=region.offset + i * size)

    if known is not None and known.claims is not None and known.epoch == epoch \
            and len(known.claims) == count:
        claims = list(known.claims)
        seq, slot = next_slot(claims, epoch, region=region)
        heads: dict[int, bytes] = {}
        newest = _newest(claims, seq)
        for i in {slot, *newest}:
            heads[i], now = read(i)
            if now != claims[i]:
                break
        else:
            return claims, heads
    if size == SECTOR:  # one read for the whole ring (the audit log's 1-sector slots)
        data = dev.read(region.offset, count * SECTOR)
        got = [(data[i * SECTOR:(i + 1) * SECTOR],
                claim(data[i * SECTOR:(i + 1) * SECTOR], kind, region=name,
                      offset=region.offset + i * SECTOR)) for i in range(count)]
    else:
        got = [read(i) for i in range(count)]
    return [c for _h, c in got], {i: h for i, (h, _c) in enumerate(got)}


def append(
    dev: BlockDevice,
    layout: Layout,
    entry: HistoryEntry,
    *,
    epoch: int,
    parse: TextParser,
    before_write: Callable[[], None] | None = None,
    wall_clock: Callable[[], float] = time.time,
    known: Heads | None = None,
) -> HistorySummary:
    """Record ``entry`` as the next history entry, written by the writer at ``epoch``.

    Refuses before any I/O if the compressed text does not fit a slot
    (``HistoryTooLarge``: the change itself stands, only its history entry
    is missing). Re-reads every slot header (or, with ``known``, the two that
    matter), refuses a stale writer, and is idempotent: if the newest entry
    already holds this very text, nothing is written and that entry is
    returned (a retried request after a crash).
    """
    if epoch <= 0:
        raise ValueError("writer epochs start at 1")
    vg_name, raw, stored = _compress(entry, layout, parse)
    region = layout.region(REGION)
    size = slot_size(layout)
    claims, heads = slot_claims(dev, region, size, MDHISTORY_ENTRIES, KIND_MDHISTORY, epoch,
                                known)
    if known is not None:
        known.claims = None  # valid again only once this append has succeeded
    seq, slot = next_slot(claims, epoch, region=region)
    newest = _newest(claims, seq)
    if newest:
        last, last_stored = _read_slot(dev, region, size, newest[0], heads[newest[0]])
        if last is not None and last.error is None and last.vg_name == vg_name \
                and last.vg_seqno == entry.vg_seqno:
            try:
                if _inflate(last, last_stored, parse) == entry.text:
                    if known is not None:
                        known.epoch, known.claims = epoch, claims
                    return last
            except CorruptRecord:
                pass
    wall_ms = int(wall_clock() * 1000)
    body = _BODY.pack(entry.vg_seqno, wall_ms, len(raw), entry.writer_host_id,
                      COMPRESSION_ZLIB, pack_name(entry.request_id, 64, "request id"),
                      pack_name(vg_name, 128, "VG name"))
    data = pad(encode_record(KIND_MDHISTORY, body + stored, seq=seq, epoch=epoch))
    offset = region.offset + slot * size
    write_tail_first(dev, offset, data, before_write)
    if known is not None:
        claims[slot] = Claim("ours", seq=seq, epoch=epoch)
        known.epoch, known.claims = epoch, claims
    return HistorySummary(
        slot=slot, offset=offset, seq=seq, epoch=epoch, vg_name=vg_name,
        vg_seqno=entry.vg_seqno, wall_ms=wall_ms, request_id=entry.request_id,
        writer_host_id=entry.writer_host_id, text_size=len(raw), stored_size=len(stored))


def diff(text_a: str, text_b: str, *, label_a: str = "a", label_b: str = "b",
         context: int = 3) -> str:
    """Unified diff of two metadata texts (empty string when they are equal)."""
    a = [line + "\n" for line in text_a.splitlines()]
    b = [line + "\n" for line in text_b.splitlines()]
    return "".join(difflib.unified_diff(a, b, fromfile=label_a, tofile=label_b, n=context))
