"""The audit log ring: one sector per record, truncated never split, damage reported."""

from __future__ import annotations

import json

import pytest

from fenceless.blockio import SECTOR, BlockDevice, MemDevice
from fenceless.ledger import audit
from fenceless.ledger.audit import MARK, AuditRecord, append, audit_record, read_log
from fenceless.ondisk.errors import BadMagic, ChecksumMismatch, StaleEpoch, UnsupportedVersion
from fenceless.ondisk.layout import Layout
from fenceless.ondisk.record import HEADER_SIZE, KIND_AUDIT, decode_record, encode_record, pad

LAYOUT = Layout.compute(4)
REGION = LAYOUT.region("audit")
SLOTS = REGION.length // SECTOR


def rec(i: int = 1, **kw: object) -> AuditRecord:
    fields: dict[str, object] = dict(
        host="h2", user="alice", argv=("fenceless", "lvcreate", "-L", "10g", f"vm{i}"),
        request_id=f"req-{i}", result="ok", message="", host_id=2)
    fields.update(kw)
    return audit_record(**fields)  # type: ignore[arg-type]


def test_round_trip(dev: BlockDevice) -> None:
    t = iter([100.0, 101.5, 102.25])
    records = [rec(1), rec(2, result="refused", message="Refused: not the writer"),
               rec(3, result="failed", message="LVM `lvcreate` failed (exit 5)")]
    for r in records:
        got = append(dev, LAYOUT, r, epoch=7, wall_clock=lambda: next(t))
        assert got.record == r
    log = read_log(dev, LAYOUT)
    assert [e.record for e in log] == records
    assert [(e.seq, e.epoch, e.wall_ms) for e in log] == [(1, 7, 100000), (2, 7, 101500),
                                                        (3, 7, 102250)]
    assert not any(e.truncated or e.stale or e.error for e in log)
    assert [e.record.request_id for e in read_log(dev, LAYOUT, limit=2) if e.record] == \
        ["req-2", "req-3"]
    assert read_log(dev, LAYOUT, limit=0) == []


def test_argv_is_data() -> None:
    dev = MemDevice(LAYOUT.total_size())
    argv = ("lvcreate", "-n", "$(rm -rf /)", '"; DROP', "a\nb\x00c", "ünïcode ✓", "{}", "",
            b"bad-\xff-utf8".decode("utf-8", "surrogateescape"))
    append(dev, LAYOUT, rec(argv=argv), epoch=1)
    (e,) = read_log(dev, LAYOUT)
    assert e.record is not None and e.record.argv == argv


def test_ring_wraps_and_keeps_the_newest(dev: BlockDevice) -> None:
    total = SLOTS + 44
    for i in range(1, total + 1):
        append(dev, LAYOUT, rec(i), epoch=1)
    log = read_log(dev, LAYOUT)
    assert len(log) == SLOTS
    assert [e.seq for e in log] == list(range(total - SLOTS + 1, total + 1))
    assert all(e.slot == e.seq % SLOTS for e in log)
    assert [e.seq for e in read_log(dev, LAYOUT, limit=3)] == [total - 2, total - 1, total]


def test_oversized_record_is_truncated_never_split() -> None:
    dev = MemDevice(LAYOUT.total_size())
    big = rec(1, host="h" * 5000, user="u" * 300, request_id="r" * 300, result="failed",
              message="m" * 9000, argv=tuple(f"arg{i:04d}-" + "x" * 40 for i in range(400)))
    writes = dev.writes
    got = append(dev, LAYOUT, big, epoch=1)
    assert dev.writes == writes + 1
    assert got.truncated and got.record is not None
    r = got.record
    assert r.host.endswith(MARK) and len(r.host.encode()) < 210
    assert r.message.startswith("mmm") and r.message.endswith(MARK)
    assert len(r.message) >= 400
    assert r.argv_omitted > 0 and len(r.argv) + r.argv_omitted == 400
    assert r.argv[0] == "arg0000-" + "x" * 40
    # the next sector is untouched: the record was not split
    assert dev.read(REGION.offset + 2 * SECTOR, SECTOR) == bytes(SECTOR)
    (e,) = read_log(dev, LAYOUT)
    assert e.record == r and e.truncated


def test_long_message_alone_keeps_the_whole_argv() -> None:
    dev = MemDevice(LAYOUT.total_size())
    got = append(dev, LAYOUT, rec(1, message="é" * 5000), epoch=1)
    assert got.record is not None and got.truncated
    assert got.record.argv == rec(1).argv and got.record.argv_omitted == 0
    assert got.record.message.endswith(MARK)


@pytest.mark.parametrize("n", [0, 1, 100, 1000, 3000, 4000, 5000])
def test_every_size_fits_one_sector(n: int) -> None:
    r = rec(1, message="\x01" * n, argv=tuple("\x02" * (n // 10 + 1) for _ in range(n // 50)))
    sector = audit.encode_audit(r, seq=1, epoch=1, wall_ms=0)
    assert len(sector) == SECTOR
    got = decode_record(sector, kind=KIND_AUDIT, region="audit", offset=0)
    assert got is not None
    json.loads(got.payload[audit._BODY.size :])
    assert HEADER_SIZE + len(got.payload) <= SECTOR


def test_bad_result_is_refused() -> None:
    with pytest.raises(ValueError, match="audit result"):
        append(MemDevice(LAYOUT.total_size()), LAYOUT, rec(result="maybe"), epoch=1)


def test_corrupt_slot_is_reported_not_fatal(dev: BlockDevice) -> None:
    for i in range(1, 5):
        append(dev, LAYOUT, rec(i), epoch=1)
    at = REGION.offset + 2 * SECTOR
    sector = bytearray(dev.read(at, SECTOR))
    sector[60] ^= 0x10
    dev.write(at, bytes(sector))
    log = read_log(dev, LAYOUT)
    assert [e.seq for e in log] == [1, 2, 3, 4]
    assert isinstance(log[1].error, ChecksumMismatch) and log[1].record is None
    assert f"region 'audit' at offset {at}" in str(log[1].error)
    assert append(dev, LAYOUT, rec(5), epoch=1).seq == 5


def test_torn_sector_on_512e_is_a_checksum_mismatch_and_numbering_goes_on() -> None:
    dev = MemDevice(LAYOUT.total_size())
    for i in range(1, SLOTS + 1):
        append(dev, LAYOUT, rec(i), epoch=1)
    # the write of record SLOTS+1 into slot 1 tore after 512 bytes
    new = audit.encode_audit(rec(999, message="n" * 2000), seq=SLOTS + 1, epoch=1, wall_ms=0)
    at = REGION.offset + SECTOR
    old = dev.read(at, SECTOR)
    dev.write(at, new[:512] + old[512:])
    log = read_log(dev, LAYOUT)
    torn = [e for e in log if e.error is not None]
    assert len(torn) == 1 and torn[0].seq == SLOTS + 1
    got = append(dev, LAYOUT, rec(1000), epoch=1)
    assert got.seq == SLOTS + 2 and got.slot == 2


def test_foreign_slot_is_skipped_never_overwritten(dev: BlockDevice) -> None:
    append(dev, LAYOUT, rec(1), epoch=1)
    at = REGION.offset + 2 * SECTOR
    dev.write(at, b"\xee" * SECTOR)
    got = append(dev, LAYOUT, rec(2), epoch=1)
    assert (got.seq, got.slot) == (3, 3)
    assert dev.read(at, SECTOR) == b"\xee" * SECTOR
    log = read_log(dev, LAYOUT, limit=1)
    assert isinstance(log[0].error, BadMagic) and log[0].seq == 0
    assert [e.seq for e in log[1:]] == [3]


def test_newer_format_refuses_the_append() -> None:
    dev = MemDevice(LAYOUT.total_size())
    dev.write(REGION.offset + 9 * SECTOR,
              pad(encode_record(KIND_AUDIT, b"{}", seq=9, epoch=1, version=2)))
    writes = dev.writes
    with pytest.raises(UnsupportedVersion):
        append(dev, LAYOUT, rec(1), epoch=1)
    assert dev.writes == writes


def test_stale_writer_is_refused(dev: BlockDevice) -> None:
    append(dev, LAYOUT, rec(1), epoch=5)
    before = dev.read(REGION.offset, REGION.length)
    with pytest.raises(StaleEpoch, match="region audit carries epoch 5"):
        append(dev, LAYOUT, rec(2), epoch=4)
    assert dev.read(REGION.offset, REGION.length) == before


def test_record_from_an_older_epoch_after_a_newer_one_is_marked_stale() -> None:
    dev = MemDevice(LAYOUT.total_size())
    append(dev, LAYOUT, rec(1), epoch=2)
    late = audit.encode_audit(rec(2), seq=2, epoch=1, wall_ms=0)
    dev.write(REGION.offset + 2 * SECTOR, late)  # an old writer's write landing late
    log = read_log(dev, LAYOUT)
    assert [(e.seq, e.epoch, e.stale) for e in log] == [(1, 2, False), (2, 1, True)]


def test_before_write_runs_before_the_write() -> None:
    dev = MemDevice(LAYOUT.total_size())

    def lost() -> None:
        raise StaleEpoch(epoch=1, where="lease check", seen=2)

    with pytest.raises(StaleEpoch):
        append(dev, LAYOUT, rec(1), epoch=1, before_write=lost)
    assert dev.writes == 0


def test_misplaced_record_is_reported() -> None:
    dev = MemDevice(LAYOUT.total_size())
    dev.write(REGION.offset + 5 * SECTOR, audit.encode_audit(rec(1), seq=7, epoch=1, wall_ms=0))
    (e,) = read_log(dev, LAYOUT)
    assert e.error is not None and "does not belong in slot 5" in str(e.error)


def test_known_heads_read_two_sectors_and_write_what_a_full_read_writes() -> None:
    """The writer keeps the ring's headers between appends (as for the history ring):
    it reads two sectors, not the whole ring, and writes the same bytes (over a wrap)."""
    from fenceless.ledger.history import Heads

    kept, full = MemDevice(LAYOUT.total_size()), MemDevice(LAYOUT.total_size())
    heads = Heads()
    append(kept, LAYOUT, rec(0), epoch=1, known=heads, wall_clock=lambda: 5.0)
    for i in range(1, SLOTS + 20):
        reads = kept.reads
        append(kept, LAYOUT, rec(i), epoch=1, known=heads, wall_clock=lambda: 5.0)
        assert kept.reads - reads <= 2
    for i in range(0, SLOTS + 20):
        append(full, LAYOUT, rec(i), epoch=1, wall_clock=lambda: 5.0)
    assert kept.read(REGION.offset, REGION.length) == full.read(REGION.offset, REGION.length)


def test_known_heads_still_notice_a_newer_writer() -> None:
    from fenceless.ledger.history import Heads

    dev = MemDevice(LAYOUT.total_size())
    heads = Heads()
    append(dev, LAYOUT, rec(1), epoch=1, known=heads)
    append(dev, LAYOUT, rec(2), epoch=1, known=heads)
    append(dev, LAYOUT, rec(3), epoch=2)  # a takeover, unknown to this writer
    before = dev.read(REGION.offset, REGION.length)
    with pytest.raises(StaleEpoch):
        append(dev, LAYOUT, rec(4), epoch=1, known=heads)
    assert dev.read(REGION.offset, REGION.length) == before
    assert heads.claims is None
