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
    assert op.step() is None and "an I/O timed out, trying again" in op.waiting_for
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
