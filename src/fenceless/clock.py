"""Injected clocks: lease code never calls ``time`` directly.

Every lease decision is measured on this host's CLOCK_BOOTTIME: it only
moves forward, keeps counting while the process is stopped, and, unlike
CLOCK_MONOTONIC, also while the machine is suspended. A writer resumed from
suspend therefore sees its lease as old as its peers see it, and stops
(docs/design.md, "The stale writer" and "Clocks"). The guard's role file
and the watchdog use the same clock (``/proc/uptime`` is CLOCK_BOOTTIME).
Tests drive the same code with ``FakeClock`` and never sleep for real.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol


def boottime() -> float:
    """Seconds on CLOCK_BOOTTIME: since boot, suspend included."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on this host's lease clock (never compared with another host's)."""

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """CLOCK_BOOTTIME and a real sleep."""

    def now(self) -> float:
        return boottime()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class FakeClock:
    """A clock that moves only when told to: ``sleep`` advances it instantly.

    ``on_sleep`` (if set) is called after each advance so a test can change
    the disk "while" the code under test waits.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()
        self.slept: list[float] = []
        self.on_sleep: list[Callable[[], None]] = []

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a lease clock never goes back")
        with self._lock:
            self._now += seconds

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(max(0.0, seconds))
        for hook in list(self.on_sleep):
            hook()
