"""The A/B ledger: newest valid slot wins, torn writes and stale writers are harmless."""

from __future__ import annotations

import random

import pytest

from fenceless.blockio import SECTOR, BlockDevice, IoError, MemDevice
from fenceless.errors import IntegrityError, LeaseLost
from fenceless.ledger.slots import (
    LedgerRecord,
    LedgerTooLarge,
    LedgerUnreadable,
    encode_ledger,
    max_ledger_state,
    read_ledger,
    write_ledger,
)
from fenceless.ondisk.errors import BadMagic, ChecksumMismatch, StaleEpoch, UnsupportedVersion
from fenceless.ondisk.layout import Layout
from fenceless.ondisk.record import FORMAT_VERSION, KIND_HOST, KIND_LEDGER, encode_record, pad

LAYOUT = Layout.compute(4)
A = LAYOUT.region("ledger_a")
B = LAYOUT.region("ledger_b")


def _write(dev: BlockDevice, epoch: int, state: dict[str, object], **kw: object) -> LedgerRecord:
    return write_ledger(dev, LAYOUT, epoch, state, writer_host_id=1, **kw)  # type: ignore[arg-type]


def _slots(dev: BlockDevice) -> tuple[bytes, bytes]:
    return dev.read(A.offset, A.length), dev.read(B.offset, B.length)


def test_empty_ledger_then_round_trip_and_alternation(dev: BlockDevice) -> None:
    assert read_ledger(dev, LAYOUT).current is None
    r1 = _write(dev, 1, {"vms": {"b": 2, "a": 1}, "ü": "ö"})
    r2 = _write(dev, 1, {"n": 2})
    r3 = _write(dev, 1, {"n": 3})
    assert (r1.generation, r2.generation, r3.generation) == (1, 2, 3)
    view = read_ledger(dev, LAYOUT)
    assert view.current is not None
    assert view.current.state == {"n": 3}
    assert view.current.order == (1, 3)
    # A, B, A: the previous generation is still in B
    slot_b = view.slots[1].record
    assert slot_b is not None
    assert slot_b.generation == 2
    assert view.problems == []


def test_payload_is_sorted_utf8_json(dev: BlockDevice) -> None:
    _write(dev, 1, {"b": 1, "a": "ü"})
    raw = dev.read(A.offset, SECTOR)
    assert '{"a":"ü","b":1}'.encode() in raw


def test_big_state_spans_sectors_and_too_big_is_refused(dev: BlockDevice) -> None:
    big = {"blob": "x" * (3 * SECTOR)}
    _write(dev, 1, big)
    view = read_ledger(dev, LAYOUT)
    assert view.current is not None
    assert view.current.state == big
    before = _slots(dev)
    with pytest.raises(LedgerTooLarge, match="at most"):
        _write(dev, 1, {"blob": "x" * max_ledger_state(LAYOUT)})
    assert _slots(dev) == before


def test_torn_multi_sector_write_leaves_the_previous_slot_current() -> None:
    dev = MemDevice(LAYOUT.total_size())
    _write(dev, 1, {"gen": 1, "blob": "a" * 9000})  # -> A
    _write(dev, 1, {"gen": 2, "blob": "b" * 9000})  # -> B
    dev.tear_next_write(1)  # next write goes to A: only its first tail sector lands
    with pytest.raises(IoError, match="torn"):
        _write(dev, 1, {"gen": 3, "blob": "c" * 9000})
    view = read_ledger(dev, LAYOUT)
    assert view.current is not None
    assert view.current.state["gen"] == 2
    assert len(view.problems) == 1
    assert isinstance(view.problems[0], ChecksumMismatch)
    assert f"region 'ledger_a' at offset {A.offset}" in str(view.problems[0])
    # our own interrupted write into the older slot may be replaced
    _write(dev, 1, {"gen": 4})
    view = read_ledger(dev, LAYOUT)
    assert view.current is not None
    assert view.current.state == {"gen": 4}
    assert view.problems == []


def test_only_first_sectors_of_a_new_record_written(dev: BlockDevice) -> None:
    _write(dev, 1, {"gen": 1, "blob": "a" * 9000})  # A
    _write(dev, 1, {"gen": 2, "blob": "b" * 9000})  # B
    new = encode_ledger(LedgerRecord(1, 3, 1, 0, {"gen": 3, "blob": "c" * 9000}), A.length)
    dev.write(A.offset, new[:SECTOR])  # header landed, tail is still generation 1's
    view = read_ledger(dev, LAYOUT)
    assert view.current is not None
    assert view.current.state["gen"] == 2
    assert isinstance(view.problems[0], ChecksumMismatch)
    # A torn slot that claims to be the newest is left as it is, and the writer goes on
    # in the valid older slot, above the torn slot's generation: it never refuses for good.
    torn_a = dev.read(A.offset, A.length)
    rec = _write(dev, 1, {"gen": 4})
    assert rec.generation == 4 and dev.read(A.offset, A.length) == torn_a
    view = read_ledger(dev, LAYOUT)
    assert view.current is not None and view.current.state == {"gen": 4}
    _write(dev, 1, {"gen": 5})  # now the torn slot is the older one: replaced
    assert read_ledger(dev, LAYOUT).problems == []


def _corrupt_variants() -> dict[str, bytes]:
    rnd = random.Random(3)
    return {
        "random": bytes(rnd.randrange(256) for _ in range(SECTOR)),
        "foreign kind": pad(encode_record(KIND_HOST, b"x")),
        "newer version": pad(encode_record(KIND_LEDGER, b"\0" * 12 + b"{}",
                                           version=FORMAT_VERSION + 1, epoch=1, seq=1)),
        "older version": pad(encode_record(KIND_LEDGER, b"\0" * 12 + b"{}", version=0)),
    }


@pytest.mark.parametrize("kind", sorted(_corrupt_variants()))
def test_corrupt_slot_is_reported_and_never_overwritten(dev: BlockDevice, kind: str) -> None:
    _write(dev, 1, {"gen": 1})  # A
    _write(dev, 1, {"gen": 2})  # B
    dev.write(A.offset, _corrupt_variants()[kind])  # the older slot goes bad
    if kind == "newer version":
        # the newest state may be in a format we cannot read: never fall back
        with pytest.raises(UnsupportedVersion, match="newer fenceless"):
            read_ledger(dev, LAYOUT)
    else:
        view = read_ledger(dev, LAYOUT)
        assert view.current is not None
        assert view.current.state == {"gen": 2}
        assert f"region 'ledger_a' at offset {A.offset}" in str(view.problems[0])
    before = _slots(dev)
    with pytest.raises(IntegrityError) as info:
        _write(dev, 1, {"gen": 3})
    assert "refusing to use or overwrite it" in str(info.value)
    assert _slots(dev) == before


def test_bit_flip_in_newest_slot_is_kept_and_the_writer_goes_on_in_the_other(
        dev: BlockDevice) -> None:
    _write(dev, 1, {"gen": 1})  # A
    _write(dev, 1, {"gen": 2})  # B (newest)
    raw = bytearray(dev.read(B.offset, SECTOR))
    raw[60] ^= 0x04
    dev.write(B.offset, bytes(raw))
    view = read_ledger(dev, LAYOUT)
    assert view.current is not None
    assert view.current.state == {"gen": 1}  # the damaged newest is reported, not used
    damaged = dev.read(B.offset, B.length)
    _write(dev, 1, {"gen": 3})  # into A; the damaged B stays as it is
    assert dev.read(B.offset, B.length) == damaged
    assert read_ledger(dev, LAYOUT).current.state == {"gen": 3}  # type: ignore[union-attr]


def test_both_slots_bad_is_unreadable(dev: BlockDevice) -> None:
    dev.write(A.offset, b"\x01" * SECTOR)
    dev.write(B.offset, b"\x02" * SECTOR)
    with pytest.raises(LedgerUnreadable, match="no valid slot"):
        read_ledger(dev, LAYOUT)
    with pytest.raises(BadMagic):
        _write(dev, 1, {})
    assert dev.read(A.offset, SECTOR) == b"\x01" * SECTOR


def test_stale_writer_is_refused_and_cannot_roll_back(dev: BlockDevice) -> None:
    _write(dev, 5, {"who": "old", "n": 1})
    _write(dev, 5, {"who": "old", "n": 2})
    # The old writer prepares its next record (target: the older slot, A),
    # then stalls. A new writer takes over at epoch 6 and publishes first.
    stale = encode_ledger(LedgerRecord(5, 3, 1, 0, {"who": "old", "n": 3}), A.length)
    _write(dev, 6, {"who": "new", "n": 3}, both_slots=True)
    # The stale writer resumes through the API: refused, nothing written.
    before = _slots(dev)
    with pytest.raises(StaleEpoch, match="epoch 5 is stale") as info:
        _write(dev, 5, {"who": "old", "n": 99})
    assert isinstance(info.value, LeaseLost)
    assert _slots(dev) == before
    # Its write was already in flight and lands late, on either slot:
    # the ledger still shows epoch 6.
    for region in (A, B):
        dev.write(region.offset, stale)
        view = read_ledger(dev, LAYOUT)
        assert view.current is not None
        assert (view.current.epoch, view.current.state["who"]) == (6, "new")
        _write(dev, 6, {"who": "new", "n": 4})  # replaces the stale slot
        view = read_ledger(dev, LAYOUT)
        assert view.current is not None
        assert view.current.epoch == 6
        assert all(s.record is not None and s.record.epoch == 6 for s in view.slots)


def test_before_write_runs_before_every_write_and_can_stop_it() -> None:
    dev = MemDevice(LAYOUT.total_size())
    calls: list[int] = []
    _write(dev, 1, {"blob": "x" * 9000}, before_write=lambda: calls.append(dev.writes))
    assert calls == [0, 1]  # tail, then header: checked before each

    def expired() -> None:
        raise LeaseLost(detail="lease expired")

    writes = dev.writes
    with pytest.raises(LeaseLost):
        _write(dev, 1, {"n": 1}, before_write=expired)
    assert dev.writes == writes


def test_epoch_must_be_positive(dev: BlockDevice) -> None:
    with pytest.raises(ValueError, match="epochs start at 1"):
        _write(dev, 0, {})


def test_a_late_stale_write_torn_on_the_newest_slot_does_not_stop_the_writer() -> None:
    """The old writer's write into what was then the older slot lands late, and torn.

    Its tail sectors overwrite the newest slot, whose header is still the new
    writer's: the slot claims to be newest but does not check out. The new
    writer must still be able to write (into the other slot), or the cluster
    would be left without a ledger writer for good.
    """
    dev = MemDevice(LAYOUT.total_size())
    _write(dev, 1, {"n": 1, "blob": "a" * 9000})  # A
    stale = encode_ledger(LedgerRecord(1, 2, 1, 0, {"n": 2, "blob": "x" * 9000}), A.length)
    _write(dev, 2, {"n": 2, "blob": "b" * 9000}, both_slots=True)  # takeover: A and B
    dev.write(A.offset + SECTOR, stale[SECTOR:])  # the old writer's tail lands on A, late
    view = read_ledger(dev, LAYOUT)
    assert view.current is not None and view.current.epoch == 2
    rec = _write(dev, 2, {"n": 3})
    assert read_ledger(dev, LAYOUT).current == rec
    with pytest.raises(StaleEpoch):
        _write(dev, 1, {"n": 99})  # and the old writer itself is still refused
