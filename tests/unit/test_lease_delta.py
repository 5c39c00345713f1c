"""Delta leases (host ids) and host liveness, with a fake clock and on real files."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from fenceless.blockio import SECTOR, BlockDevice, DirectDevice, IoTimeout, MemDevice, TimedIO
from fenceless.clock import FakeClock, SystemClock
from fenceless.errors import LeaseLost, UserError
from fenceless.lease.delta import (
    DeltaLease,
    HostArea,
    HostObserver,
    HostRecord,
    HostState,
    LeaseTiming,
    encode_host,
)
from fenceless.lease.errors import HostIdInUse, HostLeaseLost, HostNameInUse, LeaseExpired
from fenceless.ondisk.errors import BadMagic, ChecksumMismatch
from fenceless.ondisk.layout import Layout

N = 10.0
HOSTS = 4
LAYOUT = Layout.compute(HOSTS)
REGION = LAYOUT.region("hosts")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _area(dev: BlockDevice, clock: FakeClock | SystemClock, n: float = N) -> HostArea:
    return HostArea(dev, REGION, HOSTS, n, clock)


def _sector(dev: BlockDevice, host_id: int) -> bytes:
    return dev.read(REGION.offset + (host_id - 1) * SECTOR, SECTOR)


def _put(dev: BlockDevice, host_id: int, name: str, gen: int, ts: int) -> bytes:
    data = encode_host(HostRecord(host_id, name, gen, ts, N, {}))
    dev.write(REGION.offset + (host_id - 1) * SECTOR, data)
    return data


def test_timing_table_in_multiples_of_n() -> None:
    t = LeaseTiming(10.0)
    assert (t.renew_interval, t.acquire_wait, t.warn_after, t.fail_after, t.dead_after) == \
        (20.0, 20.0, 60.0, 80.0, 140.0)


def test_acquire_renew_release(dev: BlockDevice, clock: FakeClock) -> None:
    area = _area(dev, clock)
    t0 = clock.now()
    lease = area.acquire(2, "h2", {"version": "0.1", "lvm_role": "reader"})
    assert clock.slept == [2 * N]  # written, then 2N, then re-read
    assert (lease.host_id, lease.name, lease.generation) == (2, "h2", 1)
    assert lease.expires_at() == t0 + 8 * N
    assert lease.takeover_at() == t0 + 14 * N
    rec = area.decode(area.read_area(), 2)
    assert rec is not None
    assert rec.facts == {"version": "0.1", "lvm_role": "reader"}
    assert rec.timestamp == int(t0 * 1000)

    clock.advance(2 * N)
    before = _sector(dev, 2)
    area_bytes = lease.renew()
    assert len(area_bytes) == HOSTS * SECTOR
    assert _sector(dev, 2) != before
    assert lease.last_renewal == clock.now()
    lease.check()

    lease.release()
    rec = area.decode(area.read_area(), 2)
    assert rec is not None
    assert rec.free
    assert rec.generation == 1
    with pytest.raises(HostLeaseLost, match="released"):
        lease.check()
    # the next acquire of a free id needs no dead wait, and is a new incarnation
    clock.slept.clear()
    again = area.acquire(2, "h2")
    assert again.generation == 2
    assert clock.slept == [2 * N]


def test_id_held_by_a_live_host_is_refused(dev: BlockDevice, clock: FakeClock) -> None:
    other = _area(dev, clock).acquire(1, "h1")
    clock.on_sleep.append(other.renew)  # h1 keeps renewing while we wait
    held = _sector(dev, 1)
    with pytest.raises(HostIdInUse, match=r"in use by 'h1' \(generation 1\)") as info:
        _area(dev, clock).acquire(1, "h9")
    assert isinstance(info.value, UserError)
    clock.on_sleep.clear()
    rec = _area(dev, clock).decode(_area(dev, clock).read_area(), 1)
    assert rec is not None
    assert rec.name == "h1"  # never written over
    assert _sector(dev, 1) != held  # (it was renewed meanwhile)


def test_id_of_a_dead_host_is_taken_after_the_dead_time(dev: BlockDevice,
                                                        clock: FakeClock) -> None:
    _put(dev, 3, "old", 7, 123456)
    lease = _area(dev, clock).acquire(3, "new")
    assert lease.generation == 8
    waited = sum(clock.slept)
    assert waited >= 14 * N + 2 * N
    assert waited <= 14 * N + 2 * N + 1e-9


def test_same_name_live_on_another_id_is_refused(dev: BlockDevice, clock: FakeClock) -> None:
    twin = _area(dev, clock).acquire(1, "alpha")
    clock.on_sleep.append(twin.renew)
    with pytest.raises(HostNameInUse, match="'alpha' is already live on host id 1"):
        _area(dev, clock).acquire(2, "alpha")
    clock.on_sleep.clear()
    assert _area(dev, clock).decode(_area(dev, clock).read_area(), 2) is None


def test_same_name_dead_on_another_id_is_not_an_obstacle(dev: BlockDevice,
                                                         clock: FakeClock) -> None:
    _put(dev, 1, "alpha", 4, 999)  # our previous incarnation, on another id, dead
    lease = _area(dev, clock).acquire(2, "alpha")
    assert lease.generation == 1
    assert sum(clock.slept) >= 14 * N


def test_losing_the_race_during_the_2n_wait(dev: BlockDevice, clock: FakeClock) -> None:
    clock.on_sleep.append(lambda: _put(dev, 1, "rival", 1, 5))
    with pytest.raises(HostIdInUse, match="another host wrote the sector"):
        _area(dev, clock).acquire(1, "me")


def test_renew_after_takeover_is_lease_lost(dev: BlockDevice, clock: FakeClock) -> None:
    lease = _area(dev, clock).acquire(1, "h1")
    _put(dev, 1, "h2", 2, 77)
    taken = _sector(dev, 1)
    with pytest.raises(HostLeaseLost, match="'h2' generation 2") as info:
        lease.renew()
    assert isinstance(info.value, LeaseLost)
    assert _sector(dev, 1) == taken  # never written over
    with pytest.raises(HostLeaseLost):
        lease.check()
    with pytest.raises(HostLeaseLost):
        lease.release()
    assert _sector(dev, 1) == taken


@pytest.mark.parametrize("damage", ["bitflip", "foreign"])
def test_corrupt_own_sector_is_never_written_over(dev: BlockDevice, clock: FakeClock,
                                                  damage: str) -> None:
    lease = _area(dev, clock).acquire(1, "h1")
    raw = bytearray(_sector(dev, 1))
    if damage == "bitflip":
        raw[50] ^= 0x01
    else:
        raw[:] = b"\xab" * SECTOR
    dev.write(REGION.offset, bytes(raw))
    expected = ChecksumMismatch if damage == "bitflip" else BadMagic
    with pytest.raises(expected, match=f"region 'hosts' at offset {REGION.offset}"):
        lease.renew()
    assert _sector(dev, 1) == bytes(raw)
    with pytest.raises(HostLeaseLost):
        lease.check()
    with pytest.raises(expected):
        _area(dev, clock).acquire(1, "h1")
    assert _sector(dev, 1) == bytes(raw)


def test_expiry_and_late_renewal(dev: BlockDevice, clock: FakeClock) -> None:
    lease = _area(dev, clock).acquire(1, "h1")
    # the lease clock started when we wrote the sector, before the 2N wait
    assert clock.now() - lease.last_renewal == 2 * N
    clock.advance(5 * N)
    lease.check()
    with pytest.raises(LeaseExpired):
        lease.check(margin=1.5 * N)  # not enough time left for the next step
    clock.advance(1.5 * N)
    with pytest.raises(LeaseExpired, match="exclusive work must stop"):
        lease.check()
    before = _sector(dev, 1)
    with pytest.raises(LeaseExpired):
        lease.renew()  # a late renewal must not revive the lease
    assert _sector(dev, 1) == before
    with pytest.raises(HostLeaseLost):
        lease.renew()


class _LateWrites(MemDevice):
    """Writes land, but report failure: an I/O that timed out and completed later."""

    fail_writes = False

    def write(self, offset: int, data: bytes) -> None:
        super().write(offset, data)
        if self.fail_writes:
            raise IoTimeout(path=self.path, op="write", length=len(data), offset=offset,
                            timeout=0.1)


def test_a_renewal_that_timed_out_but_landed_is_not_a_takeover(clock: FakeClock) -> None:
    dev = _LateWrites(LAYOUT.total_size())
    lease = _area(dev, clock).acquire(1, "h1")
    first = lease.last_renewal
    clock.advance(2 * N)
    dev.fail_writes = True
    with pytest.raises(IoTimeout):
        lease.renew()
    assert lease.last_renewal == first  # no credit for an unconfirmed write
    dev.fail_writes = False
    clock.advance(2 * N)
    lease.renew()  # the sector holds our unconfirmed write: still ours
    assert lease.last_renewal == clock.now()


def test_hung_storage_times_out_and_the_lease_runs_out(clock: FakeClock) -> None:
    mem = MemDevice(LAYOUT.total_size())
    lease = HostArea(TimedIO(mem, 0.05), REGION, HOSTS, N, clock).acquire(1, "h1")
    mem.hang()
    try:
        clock.advance(2 * N)
        with pytest.raises(IoTimeout, match=r"did not complete within 0\.050s"):
            lease.renew()
        lease.check()  # still inside 8N of the last good renewal
        clock.advance(6.5 * N)
        with pytest.raises(LeaseExpired):
            lease.check()
    finally:
        mem.unhang()


def test_observer_live_fail_dead_and_free(dev: BlockDevice, clock: FakeClock) -> None:
    area = _area(dev, clock)
    watcher = HostObserver(area)
    lease = area.acquire(1, "h1")
    _put(dev, 2, "h2", 1, 0)  # released
    watcher.observe(area.read_area(), clock.now())
    assert watcher.state(1, clock.now()) is HostState.UNKNOWN  # no change seen yet
    assert watcher.state(2, clock.now()) is HostState.FREE
    assert watcher.state(3, clock.now()) is HostState.FREE  # never used
    clock.advance(2 * N)
    lease.renew()
    watcher.observe(area.read_area(), clock.now())
    changed = clock.now()
    assert watcher.state(1, changed) is HostState.LIVE
    assert watcher.state(1, changed + 8 * N - 0.01) is HostState.LIVE
    assert watcher.state(1, changed + 8 * N) is HostState.FAIL
    assert watcher.state(1, changed + 14 * N - 0.01) is HostState.FAIL
    assert watcher.state(1, changed + 14 * N) is HostState.DEAD
    assert not watcher.owner_gone(1, 1, changed + 13 * N)
    assert watcher.owner_gone(1, 1, changed + 14 * N)
    assert watcher.owner_gone(1, 0, changed)  # another incarnation


def test_observer_calls_a_never_changing_host_dead_after_the_dead_time(
        dev: BlockDevice, clock: FakeClock) -> None:
    area = _area(dev, clock)
    _put(dev, 1, "crashed-before-we-started", 3, 555)
    dev.write(REGION.offset + SECTOR, b"\x13" * SECTOR)  # host 2: garbage
    watcher = HostObserver(area)
    start = clock.now()
    for _ in range(8):
        watcher.observe(area.read_area(), clock.now())
        clock.advance(2 * N)
    assert watcher.state(1, start + 14 * N - 0.01) is HostState.UNKNOWN
    assert watcher.state(1, start + 14 * N) is HostState.DEAD
    assert watcher.state(2, start + 14 * N) is HostState.DEAD  # corrupt is never FREE
    assert watcher.error(2) is not None
    assert watcher.record(1) is not None


def _race_round(path: Path, n: float) -> list[object]:
    barrier = threading.Barrier(2)
    stop = threading.Event()
    results: list[object] = [None, None]

    def host(i: int) -> None:
        dev = DirectDevice(str(path), writable=True)
        try:
            area = HostArea(dev, REGION, HOSTS, n, SystemClock())
            barrier.wait()
            try:
                lease = area.acquire(1, f"host{i}")
            except HostIdInUse as exc:
                results[i] = exc
                return
            results[i] = lease
            while not stop.wait(n):  # renew more often than 2N: never look dead
                lease.renew()
        finally:
            dev.close()

    threads = [threading.Thread(target=host, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for _ in range(400):
        if all(r is not None for r in results):
            break
        stop.wait(0.01)
    # keep the winner renewing a little longer, as a loser may still be watching
    stop.wait(3 * n)
    stop.set()
    for t in threads:
        t.join()
    return results


def test_two_hosts_race_for_one_id_on_a_real_file(tmp_path: Path) -> None:
    n = 0.05
    for round_ in range(6):
        path = tmp_path / f"control-{round_}"
        with open(path, "wb") as f:
            f.truncate(LAYOUT.total_size())
        results = _race_round(path, n)
        holders = [r for r in results if isinstance(r, DeltaLease)]
        assert len(holders) == 1, results
        assert all(isinstance(r, DeltaLease | HostIdInUse) for r in results), results
        winner = holders[0]
        assert winner.lost is None
        dev = DirectDevice(str(path))
        try:
            rec = HostArea(dev, REGION, HOSTS, n, SystemClock()).decode(
                dev.read(REGION.offset, HOSTS * SECTOR), 1)
        finally:
            dev.close()
        assert rec is not None
        assert rec.name == winner.name


def test_only_a_strictly_newer_generation_means_the_owner_is_gone(
        dev: BlockDevice, clock: FakeClock) -> None:
    """The writer lease names (host 2, generation 5); our last read showed generation 4.

    The owner restarted and took the writer role as generation 5; an observer
    that has not yet seen that must not call generation 5 gone (sanlock: only a
    strictly greater generation than the owner's means a new incarnation).
    """
    area = _area(dev, clock)
    watcher = HostObserver(area)
    _put(dev, 2, "h2", 4, 100)
    watcher.observe(area.read_area(), clock.now())
    clock.advance(2 * N)
    _put(dev, 2, "h2", 4, 200)  # renewing: LIVE
    watcher.observe(area.read_area(), clock.now())
    assert not watcher.owner_gone(2, 5, clock.now())  # not yet seen: not gone
    assert not watcher.owner_gone(2, 4, clock.now())
    _put(dev, 2, "h2", 6, 300)
    watcher.observe(area.read_area(), clock.now())
    assert watcher.owner_gone(2, 5, clock.now())  # a newer incarnation: 5 is gone


def test_acquire_waits_out_the_previous_holders_io_timeout(dev: BlockDevice,
                                                           clock: FakeClock) -> None:
    """After writing, wait 2N of the longer of our N and the previous holder's.

    A host that ran with a longer io_timeout (say a slow path) may still be
    writing its sector within its own 2N; waiting only ours could miss it.
    """
    slow = HostRecord(2, "old", 3, 0, 10 * N, {})  # released, by a host with 10N
    dev.write(REGION.offset + SECTOR, encode_host(slow))
    lease = _area(dev, clock).acquire(2, "new")
    assert lease.generation == 4
    assert max(clock.slept) >= 2 * 10 * N
