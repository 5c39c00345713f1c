"""The lease clock is CLOCK_BOOTTIME: it counts the time a host spent suspended.

A writer resumed from suspend must see its lease as old as its peers do; with
CLOCK_MONOTONIC (which stops during suspend) it would believe the lease fresh
while the others already declared it dead (docs/design.md, "Clocks").
"""

from __future__ import annotations

import time

import pytest

from fenceless import clock


def test_the_system_clock_reads_boottime(monkeypatch: pytest.MonkeyPatch) -> None:
    real = time.clock_gettime

    def fake(clk: int) -> float:
        # As after a suspend: BOOTTIME ran on, MONOTONIC did not.
        return 5000.0 if clk == time.CLOCK_BOOTTIME else real(clk)

    monkeypatch.setattr(time, "clock_gettime", fake)
    monkeypatch.setattr(time, "monotonic", lambda: 40.0)
    assert clock.SystemClock().now() == 5000.0
    assert clock.boottime() == 5000.0


def test_the_fake_clock_only_moves_when_told() -> None:
    c = clock.FakeClock(start=10.0)
    c.sleep(2.5)
    assert c.now() == 12.5 and c.slept == [2.5]
    with pytest.raises(ValueError):
        c.advance(-1)
