"""The agent's port: fresh reads before "dead", claims that last, a handover that fails.

Real leases, ledger and claims on a memory or O_DIRECT device; LVM is the
in-memory VG of tests/unit/harness.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fenceless.blockio import SECTOR, BlockDevice, IoError
from fenceless.clock import FakeClock
from fenceless.lease.delta import HostState
from fenceless.ondisk.layout import Layout
from fenceless.ops.journal import claims
from fenceless.ops.writer import hand_over
from tests.unit.harness import Host, N, writer_and_reader

LAYOUT = Layout.compute(4)


@pytest.fixture
def cluster(dev: BlockDevice) -> Iterator[tuple[FakeClock, Host, Host]]:
    clock, _vg, h1, h2 = writer_and_reader(dev)
    yield clock, h1, h2


def test_dead_is_decided_from_a_read_made_right_then(cluster):
    """h1 last looked at h2 long ago; h2 renewed since. A stale look would call it DEAD."""
    clock, h1, h2 = cluster
    h1.port.renew()  # h1 sees h2 (generation 1) once
    h1.port.renew()
    gen = h2.port.generation
    clock.advance(13 * N)
    assert h2.keeper.lease is not None
    h2.keeper.lease.last_renewal = clock.now()  # (its own renewals went on meanwhile)
    h2.port.renew()
    clock.advance(1.5 * N)  # 14.5N after h1's last look at a change of h2
    assert not h1.port.owner_gone(2, gen)
    assert h1.port.host_state(2) is HostState.LIVE


def test_claims_outlive_a_clean_stop_of_the_agent(cluster):
    """An agent restart releases the host lease; the mappings stay. So do the claims."""
    _clock, h1, h2 = cluster
    h2.port.claim("db")
    assert h2.keeper.lease is not None
    h2.keeper.lease.release()
    h2.keeper.lease = None
    assert claims(h1.port, "db") == ["h2"]


def test_many_active_volumes_do_not_cost_the_lease(cluster):
    """A VM host with 150 disks mapped: its lease renews, and every disk is claimed."""
    _clock, h1, h2 = cluster
    names = [f"vm-{i:03d}-" + "d" * 100 for i in range(150)]
    for name in names:
        h2.port.claim(name)
        h2.activator.mapped[name] = 1 << 30
    assert h2.port.renew()
    assert h2.keeper.lease is not None
    assert claims(h1.port, names[77]) == ["h2"]


def test_a_handover_that_fails_part_way_leaves_no_writer_behind(cluster, dev):
    """The release write times out: the old writer must not go on as the writer."""
    _clock, h1, _h2 = cluster
    area = h1.keeper.area
    assert area is not None
    leader_at = area.layout.region("writer").offset
    real_write = dev.write

    def failing(offset: int, data: bytes) -> None:
        if offset == leader_at:
            raise IoError(path="<test>", op="write", length=SECTOR, offset=offset,
                          detail="injected timeout")
        real_write(offset, data)

    dev.write = failing
    try:
        with pytest.raises(IoError):
            hand_over(h1.port, 2, "h2", "nonce")
    finally:
        dev.write = real_write
    assert h1.port.epoch is None
