"""``writer takeover --wait`` on a real control area: an I/O that times out is a round
without an answer, not the end of the wait (a CI run on a busy machine lost a racer's
takeover to one slow read of 0.1 s)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fenceless.blockio import BlockDevice, IoTimeout
from fenceless.lease.paxos import Leader
from fenceless.ops.writer import Takeover
from tests.unit.harness import writer_and_reader


def slow_once(real: Callable[[], Leader | None]) -> Callable[[], Leader | None]:
    """``real``, but its first call times out."""
    calls = {"n": 0}

    def read() -> Leader | None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise IoTimeout(path="/dev/fake", op="read", length=4096, offset=0, timeout=0.1)
        return real()
    return read


def test_with_wait_a_timed_out_read_is_retried_and_the_takeover_then_wins(dev: BlockDevice,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, h1, h2 = writer_and_reader(dev)
    op = Takeover(h2.port, wait=True)
    assert op.step() is None and "not yet dead" in op.waiting_for
    monkeypatch.setattr(h2.port, "read_leader", slow_once(h2.port.read_leader))
    assert op.step() is None and "trying again after: I/O timeout" in op.waiting_for
    assert h2.port.epoch is None
    # h1's host lease is gone: the next round wins the role at the next epoch.
    assert h1.keeper.lease is not None
    h1.keeper.lease.release()
    h1.keeper.lease = None
    got = op.step()
    assert got == {"outcome": "won", "epoch": 2, "host": "h2"} and h2.port.epoch == 2


def test_without_wait_a_timed_out_read_is_the_answer(dev: BlockDevice,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, _, h2 = writer_and_reader(dev)
    monkeypatch.setattr(h2.port, "read_leader", slow_once(h2.port.read_leader))
    with pytest.raises(IoTimeout):
        Takeover(h2.port).step()
    assert Takeover(h2.port).step() is None  # h1 not yet seen long enough: not dead


def test_the_epoch_seen_at_arrival_is_the_baseline_even_if_the_first_read_fails(
        dev: BlockDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rival that wins while this racer's first read hangs is a lost race at once, not
    a live writer to wait for until the time limit."""
    from fenceless.ops.writer import TakeoverLost, become_writer
    from tests.unit.harness import host

    _clock, vg, h1, h2 = writer_and_reader(dev)
    area = h1.keeper.area
    assert area is not None and h1.keeper.lease is not None
    seen = h2.port.read_leader()  # as the CLI read it when the admin asked
    assert seen is not None
    op = Takeover(h2.port, wait=True, seen_epoch=seen.lver)
    monkeypatch.setattr(h2.port, "read_leader", slow_once(h2.port.read_leader))
    assert op.step() is None
    h1.keeper.lease.release()
    h1.keeper.lease = None
    h3 = host(area, _clock, "h3", 3, vg)
    assert become_writer(h3.port, "a rival").epoch == 2
    with pytest.raises(TakeoverLost, match="h3 won the writer lease at epoch 2"):
        op.step()


def test_its_own_ballot_cut_short_is_waited_for_not_taken_for_a_rivals(
        dev: BlockDevice) -> None:
    from fenceless.errors import LeaseLost
    from fenceless.ops.writer import become_writer

    _clock, _vg, h1, h2 = writer_and_reader(dev)
    assert h1.keeper.lease is not None
    seen = h2.port.read_leader()
    assert seen is not None
    h1.keeper.lease.release()
    h1.keeper.lease = None
    assert become_writer(h2.port, "won").epoch == 2
    h2.port.set_epoch(None, "the ledger write after the ballot timed out")
    op = Takeover(h2.port, wait=True, seen_epoch=seen.lver)
    assert op.step() is None and "this host won the ballot" in op.waiting_for
    # An I/O still hung stops every shared write (LeaseLost): with --wait, not yet.
    op2 = Takeover(h2.port, wait=True, seen_epoch=seen.lver)

    def hung() -> Leader | None:
        raise LeaseLost(detail="an I/O is still hung")
    h2.port.read_leader = hung  # type: ignore[method-assign]
    assert op2.step() is None and "trying again after" in op2.waiting_for


def test_a_win_before_the_request_arrived_is_not_a_lost_race(dev: BlockDevice) -> None:
    """With no epoch from the CLI, the first fresh read is the baseline, not an older
    view (a CI run: "h1 won the writer lease at epoch 2 first", said to a host that asked
    after it)."""
    from fenceless.ops.writer import become_writer
    from tests.unit.harness import host

    clock, vg, h1, h2 = writer_and_reader(dev)
    area = h1.keeper.area
    assert area is not None and h1.keeper.lease is not None
    h1.keeper.lease.release()
    h1.keeper.lease = None
    h3 = host(area, clock, "h3", 3, vg)
    assert become_writer(h3.port, "before the request").epoch == 2
    op = Takeover(h2.port, wait=True)
    assert op.step() is None and op.seen_epoch == 2 and "not yet dead" in op.waiting_for


def test_the_epoch_the_admin_saw_is_the_baseline_when_the_cli_read_it(dev: BlockDevice) -> None:
    """Racers' CLIs read epoch 1; one wins epoch 2 before a slow agent takes up another's
    request: that one lost the race (a CI run instead waited out the winner's live lease)."""
    from fenceless.ops.writer import TakeoverLost, become_writer
    from tests.unit.harness import host

    clock, vg, h1, h2 = writer_and_reader(dev)
    area = h1.keeper.area
    assert area is not None and h1.keeper.lease is not None
    h1.keeper.lease.release()
    h1.keeper.lease = None
    h3 = host(area, clock, "h3", 3, vg)
    assert become_writer(h3.port, "the fastest racer").epoch == 2
    with pytest.raises(TakeoverLost, match="h3 won the writer lease at epoch 2"):
        Takeover(h2.port, wait=True, seen_epoch=1).step()
