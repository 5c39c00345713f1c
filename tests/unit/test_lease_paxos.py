"""The writer lease (Disk Paxos) through its real driver, in memory and on real files."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fenceless.blockio import SECTOR, BlockDevice, DirectDevice, MemDevice
from fenceless.clock import FakeClock, SystemClock
from fenceless.errors import LeaseLost
from fenceless.lease.errors import NotWriter
from fenceless.lease.paxos import (
    DBlock,
    Inp,
    Leader,
    Outcome,
    Request,
    WriterLease,
    dblock_index,
    decode_dblock,
    encode_dblock,
    encode_leader,
    next_mbal,
)
from fenceless.ondisk.errors import ChecksumMismatch
from fenceless.ondisk.layout import Layout
from fenceless.ondisk.record import pad

HOSTS = 4
LAYOUT = Layout.compute(HOSTS)
REGION = LAYOUT.region("writer")


def alive(host_id: int, generation: int) -> bool:
    return False


def gone(host_id: int, generation: int) -> bool:
    return True


@pytest.fixture(params=["mem", "direct"])
def dev(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlockDevice]:
    d: BlockDevice
    if request.param == "mem":
        d = MemDevice(LAYOUT.total_size())
    else:
        path = tmp_path / "control"
        with open(path, "wb") as f:
            f.truncate(LAYOUT.total_size())
        d = DirectDevice(str(path), writable=True)
    yield d
    d.close()


def _lease(dev: BlockDevice, n: float = 1.0) -> WriterLease:
    return WriterLease(dev, REGION, HOSTS, n, FakeClock(), random.Random(1))


def _put(dev: BlockDevice, index: int, record: bytes) -> None:
    dev.write(REGION.offset + index * SECTOR, pad(record, SECTOR))


def _region(dev: BlockDevice) -> bytes:
    return dev.read(REGION.offset, REGION.length)


def test_next_mbal_is_unique_per_host_and_above_the_floor() -> None:
    seen = set()
    for floor in range(0, 40):
        for h in range(1, HOSTS + 1):
            m = next_mbal(floor, h, HOSTS)
            assert m > floor
            assert m % HOSTS == h % HOSTS
            seen.add((floor, m))
    assert next_mbal(0, 1, HOSTS) == 5


def test_first_acquire_reacquire_and_busy(dev: BlockDevice) -> None:
    w = _lease(dev)
    got = w.acquire(1, 3, alive, name="h1")
    assert (got.outcome, got.epoch, got.owner_id, got.owner_generation) == (Outcome.WON, 1, 1, 3)
    assert got.fresh
    leader = w.read_leader()
    assert leader is not None
    assert (leader.owner_id, leader.owner_generation, leader.lver, leader.owner_name) == \
        (1, 3, 1, "h1")
    assert not leader.released
    again = w.acquire(1, 3, alive)
    assert (again.outcome, again.epoch, again.fresh) == (Outcome.WON, 1, False)
    before = _region(dev)
    busy = w.acquire(2, 1, alive)
    assert (busy.outcome, busy.epoch, busy.owner_id) == (Outcome.BUSY, 1, 1)
    assert _region(dev) == before  # a busy lease is not even balloted for


def test_takeover_from_a_dead_owner_and_from_an_old_incarnation(dev: BlockDevice) -> None:
    w = _lease(dev)
    assert w.acquire(1, 1, alive).epoch == 1
    asked: list[tuple[int, int]] = []

    def observer(host_id: int, generation: int) -> bool:
        asked.append((host_id, generation))
        return True

    got = w.acquire(2, 1, observer)
    assert (got.outcome, got.epoch) == (Outcome.WON, 2)
    assert asked == [(1, 1)]
    # host 2 restarts as generation 2: its old incarnation's lease is not inherited
    got = w.acquire(2, 2, lambda h, g: (h, g) == (2, 1))
    assert (got.outcome, got.epoch, got.owner_generation) == (Outcome.WON, 3, 2)


def test_planned_handover(dev: BlockDevice) -> None:
    w = _lease(dev)
    old = w.acquire(1, 1, alive)
    with pytest.raises(NotWriter, match="leader names host 1 gen 1 at epoch 1"):
        w.release(2, 1, old.epoch)
    with pytest.raises(NotWriter):
        w.release(1, 1, old.epoch + 1)
    w.release(1, 1, old.epoch)
    leader = w.read_leader()
    assert leader is not None
    assert leader.released
    assert leader.lver == 1
    w.release(1, 1, old.epoch)  # idempotent
    new = w.acquire(2, 1, alive)  # no liveness question for a released lease
    assert (new.outcome, new.epoch) == (Outcome.WON, 2)


def test_value_chosen_for_another_host_is_lost_not_an_error(dev: BlockDevice) -> None:
    # Host 3 finished phase 2 for epoch 1 but has not written the leader yet.
    _put(dev, dblock_index(3), encode_dblock(DBlock(7, 7, Inp(3, 5, 0), 1)))
    w = _lease(dev)
    got = w.acquire(1, 1, alive)
    assert (got.outcome, got.epoch, got.owner_id, got.owner_generation) == (Outcome.LOST, 1, 3, 5)
    assert w.read_leader() is None  # only the winner writes the leader
    # If host 3 (generation 5) is gone, its epoch is skipped and we take the next.
    got = w.acquire(1, 1, lambda h, g: (h, g) == (3, 5))
    assert (got.outcome, got.epoch) == (Outcome.WON, 2)


def test_higher_lver_in_a_dblock_moves_us_to_that_instance(dev: BlockDevice) -> None:
    # The leader says epoch 1, but host 4 decided epoch 3 for itself and died.
    _put(dev, 0, encode_leader(Leader(2, 1, 1, 0, True, "h2")))
    _put(dev, dblock_index(4), encode_dblock(DBlock(12, 12, Inp(4, 1, 0), 3)))
    got = _lease(dev).acquire(1, 1, lambda h, g: h == 4)
    assert (got.outcome, got.epoch) == (Outcome.WON, 4)


def test_our_own_later_ballot_is_never_overwritten_with_an_older_lver(
        dev: BlockDevice) -> None:
    # An earlier acquire call of ours accepted host 4's value for epoch 3;
    # the leader still says epoch 1 (released).
    _put(dev, 0, encode_leader(Leader(2, 1, 1, 0, True, "h2")))
    ours = encode_dblock(DBlock(9, 9, Inp(4, 1, 0), 3))
    _put(dev, dblock_index(1), ours)
    got = _lease(dev).acquire(1, 1, alive)
    assert (got.outcome, got.epoch, got.owner_id) == (Outcome.LOST, 3, 4)
    after = dev.read(REGION.offset + dblock_index(1) * SECTOR, SECTOR)
    blk = decode_dblock(after, REGION, 1)
    assert blk is not None
    assert (blk.lver, blk.inp.host_id) == (3, 4)


def test_a_corrupt_leader_or_own_dblock_stops_the_acquire(dev: BlockDevice) -> None:
    w = _lease(dev)
    w.acquire(2, 1, alive)
    w.release(2, 1, 1)
    raw = bytearray(dev.read(REGION.offset + dblock_index(2) * SECTOR, SECTOR))
    raw[45] ^= 0x80
    _put(dev, dblock_index(2), bytes(raw))
    with pytest.raises(ChecksumMismatch, match=f"region 'writer' at offset "
                                               f"{REGION.offset + 3 * SECTOR}"):
        w.acquire(2, 1, alive)  # our own earlier vote may be in there: never overwrite it
    assert dev.read(REGION.offset + dblock_index(2) * SECTOR, SECTOR) == bytes(raw)
    leader = dev.read(REGION.offset, SECTOR)
    raw_leader = bytearray(leader)
    raw_leader[41] ^= 0x01
    _put(dev, 0, bytes(raw_leader))
    before = _region(dev)
    with pytest.raises(ChecksumMismatch, match=f"region 'writer' at offset {REGION.offset}:"):
        w.acquire(3, 1, alive)
    assert _region(dev) == before


def test_another_hosts_corrupt_dblock_is_skipped(dev: BlockDevice) -> None:
    """As sanlock does: one host's damaged dblock must not stop every acquire for good."""
    w = _lease(dev)
    w.acquire(1, 1, alive)
    w.release(1, 1, 1)
    damaged = b"\x5a" * SECTOR
    _put(dev, dblock_index(1), damaged)
    got = w.acquire(2, 1, alive)
    assert got.won and got.epoch == 2
    assert dev.read(REGION.offset + dblock_index(1) * SECTOR, SECTOR) == damaged  # untouched


def test_before_write_guards_every_write(dev: BlockDevice) -> None:
    w = _lease(dev)
    calls: list[int] = []
    w.acquire(1, 1, alive, before_write=lambda: calls.append(1))
    assert len(calls) == 3  # phase 1, phase 2, leader

    def expired() -> None:
        raise LeaseLost(detail="host lease expired")

    before = _region(dev)
    with pytest.raises(LeaseLost):
        w.release(1, 1, 1, before_write=expired)
    assert _region(dev) == before
    w.release(1, 1, 1)
    before = _region(dev)
    with pytest.raises(LeaseLost):
        w.acquire(2, 1, alive, before_write=expired)
    assert _region(dev) == before


def test_handover_request_round_trip(dev: BlockDevice) -> None:
    w = _lease(dev)
    assert w.read_request() is None
    w.request_handover(3, 7, force_mode=1)
    assert w.read_request() == Request(7, 3, 1)


def test_contention_backs_off_with_random_sleeps_bounded_by_n() -> None:
    # A rival with an ever higher ballot number makes every ballot abort.
    mem = MemDevice(LAYOUT.total_size())
    clock = FakeClock()
    w = WriterLease(mem, REGION, HOSTS, 0.5, clock, random.Random(5))
    rival = [100]

    def bump() -> None:
        rival[0] += 10
        _put(mem, dblock_index(4), encode_dblock(DBlock(rival[0], 0, Inp(0, 0, 0), 1)))

    bump()
    clock.on_sleep.append(bump)
    got = w.acquire(1, 1, alive, max_ballots=4)
    assert got.outcome is Outcome.CONTENDED
    assert len(clock.slept) == 4
    assert all(0 <= s <= 0.5 for s in clock.slept)


def _race(paths: Path, rounds: int) -> list[list[tuple[Outcome, int, int]]]:
    n = 0.004
    barrier = threading.Barrier(3)
    results: list[list[tuple[Outcome, int, int]]] = [[] for _ in range(rounds)]
    errors: list[BaseException] = []
    lock = threading.Lock()
    winners: list[int] = [0] * rounds

    def host(host_id: int) -> None:
        dev = DirectDevice(str(paths), writable=True)
        w = WriterLease(dev, REGION, HOSTS, n, SystemClock(), random.Random(host_id))
        try:
            for r in range(rounds):
                barrier.wait(timeout=10)
                got = w.acquire(host_id, 1, alive, name=f"h{host_id}", max_ballots=100)
                with lock:
                    results[r].append((got.outcome, got.epoch, got.owner_id))
                barrier.wait(timeout=10)
                if got.won:
                    winners[r] = host_id
                    w.release(host_id, 1, got.epoch)
                barrier.wait(timeout=10)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()
        finally:
            dev.close()

    threads = [threading.Thread(target=host, args=(h,)) for h in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_three_hosts_race_on_a_real_file(tmp_path: Path) -> None:
    path = tmp_path / "control"
    with open(path, "wb") as f:
        f.truncate(LAYOUT.total_size())
    rounds = 60
    results = _race(path, rounds)
    outcomes = set()
    for r, got in enumerate(results):
        won = [g for g in got if g[0] is Outcome.WON]
        assert len(won) == 1, (r, got)
        epoch, owner = r + 1, won[0][2]
        assert won[0][1] == epoch
        for outcome, e, who in got:
            outcomes.add(outcome)
            assert outcome in (Outcome.WON, Outcome.LOST, Outcome.BUSY), (r, got)
            assert (e, who) == (epoch, owner), (r, got)
    assert Outcome.BUSY in outcomes
    dev = DirectDevice(str(path))
    try:
        leader = WriterLease(dev, REGION, HOSTS, 0.01, SystemClock()).read_leader()
    finally:
        dev.close()
    assert leader is not None
    assert (leader.lver, leader.released) == (rounds, True)



def test_a_new_acquire_never_lowers_its_own_ballot_number(dev: BlockDevice) -> None:
    """Found by the model check once a host could acquire again (after a failed leader
    write): each acquire started its ballots at the lowest number of the host again,
    lowering the mbal in its own dblock. A host in phase 2 with a ballot between the two
    then missed it and won too: two writers for one epoch. Ballot numbers of a host only
    ever rise."""
    w = _lease(dev)
    # An earlier acquire of host 1 reached ballot 13 at lver 1 (it was contended).
    _put(dev, dblock_index(1), encode_dblock(DBlock(13, 13, Inp(1, 1, 0), 1)))
    got = w.acquire(1, 1, alive)
    assert got.won and got.epoch == 1
    mine = decode_dblock(dev.read(REGION.offset + dblock_index(1) * SECTOR, SECTOR), REGION, 1)
    assert mine is not None and mine.mbal > 13
